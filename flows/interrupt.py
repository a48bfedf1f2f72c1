"""Ctrl-C and SIGTERM stop a run cleanly, as Ray and Prefect users expect.

The first SIGINT or SIGTERM raises `RunInterrupted` in the flow's thread, wherever it waits (a
`ray.get` wakes for it). Prefect ends the flow run Crashed, `flows.pipeline.managed_run` writes
`status: interrupted` with the last completed stage and shuts the actors down, nothing is
registered (that happens only after a completed run), and the CLI prints one line: how to resume.
A second signal while that clean-up runs exits at once (status 130 for SIGINT, 143 for SIGTERM).

A terminal delivers Ctrl-C to every process of its foreground group. Ray's own processes block
SIGINT, but Prefect's embedded API server would die of it, and the flow would then spend minutes
retrying state updates against a dead server before failing with dozens of tracebacks. So the CLI
starts that server itself, with SIGINT blocked (a child inherits the signal mask).
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(KeyboardInterrupt):
    """Raised by the first SIGINT/SIGTERM. A KeyboardInterrupt, so Prefect treats it as a crash
    (no task retry) and nothing that catches `Exception` swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _State:
    active = False                  # inside stop_on_signals
    received: int | None = None     # the first signal's number, once one arrived
    cleaned = False                 # managed_run has shut the run down: only the exit is left


def received() -> int | None:
    """The first signal's number (the exception that reaches a caller may be a plain
    KeyboardInterrupt that Ray or Prefect re-raised on the way)."""
    return _State.received


def interrupted() -> bool:
    return _State.received is not None


def note(signum: int) -> None:
    """Record an interruption that reached the flow another way: during a flow run Prefect's own
    SIGTERM handler raises its TerminationSignal instead of ours."""
    if _State.received is None:
        _State.received = signum


def reclaim_sigterm() -> None:
    """Put our SIGTERM handler back after `ray.init`, which installs its own (a `sys.exit`, plus a
    C-level stack dump from Ray's core worker: a scheduler's SIGTERM then aborted the run with a
    dump and status "failed")."""
    if _State.active and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _handler)


def mark_cleaned() -> None:
    _State.cleaned = True


def _handler(signum, frame):
    if _State.received is None:
        _State.received = signum
        raise RunInterrupted(signum)
    if _State.cleaned:
        # the run is down; this is Prefect re-delivering a SIGTERM it turned into its own
        # exception (to the handler it replaced), or a late repeat: only the exit is left
        return
    os._exit(128 + signum)          # the second Ctrl-C during the clean-up: at once


class _DropCrashNoise(logging.Filter):
    """Once interrupted, Prefect's "Crash detected! …" and "Finished in state Crashed" lines are the
    interruption itself, told three times: the CLI's one line says it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (interrupted() and record.levelno >= logging.ERROR and record.name.startswith("prefect"))


def start_embedded_prefect_server() -> None:
    """Start Prefect's embedded API server (when no PREFECT_API_URL is set) with SIGINT blocked,
    so that a Ctrl-C meant for the run does not kill the server the run reports to."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED
    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return
    from prefect.server.api.server import SubprocessASGIServer
    # Its telemetry heartbeat cannot reach Prefect from an offline machine, and on a fresh
    # PREFECT_HOME it races the database set-up into a logged traceback on a user's first run.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        SubprocessASGIServer().start()   # the instance Prefect's client looks up later
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextmanager
def stop_on_signals():
    """SIGINT and SIGTERM raise RunInterrupted inside the block (main thread only)."""
    previous = {s: signal.signal(s, _handler) for s in SIGNALS}
    noise = _DropCrashNoise()
    loggers = [logging.getLogger(n) for n in ("prefect.flow_runs", "prefect.task_runs", "prefect")]
    for lg in loggers:
        lg.addFilter(noise)
    _State.received, _State.cleaned, _State.active = None, False, True
    try:
        yield
    finally:
        _State.active = False
        for s, h in previous.items():
            signal.signal(s, h)
        for lg in loggers:
            lg.removeFilter(noise)
