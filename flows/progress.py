"""Progress for long stages (generation, judging, training).

Rich progress bars on an interactive terminal; otherwise (CI, logs, Prefect workers) a log line at
every ~10 % of a stage with the elapsed time, so a run in a log file still shows where it is.
Inside a flow run, each stage is also a progress artifact in the Prefect UI, updated every ~20 %.
"""
from __future__ import annotations

import contextlib
import sys
import time

from flows.console import make_console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class ProgressUI:
    def __init__(self, enabled: bool | None = None, log=print, run_id: str | None = None):
        self.run_id = run_id            # set: each task is also a progress artifact in the Prefect UI
        self.console = make_console(stderr=True)
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.log = log
        self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), TimeRemainingColumn(), console=self.console,
                                  disable=not self.enabled, transient=False)

    def __enter__(self):
        self._progress.start()
        return self

    def __exit__(self, *exc):
        self._progress.stop()

    @contextlib.contextmanager
    def task(self, description: str, total: int):
        """Yield an advance(n) callback for a stage with `total` work items."""
        with self._terminal_or_log(description, total) as local:
            if self.run_id is None:
                yield local
                return
            from flows import artifacts
            # "iter 1: evaluate (greedy)" -> "<run>-progress-iter-1-evaluate-greedy" (Prefect keys:
            # lowercase letters, digits and dashes)
            slug = "-".join("".join(c if c.isalnum() else " " for c in description.lower()).split())
            key = artifacts.artifact_key(self.run_id, "progress-" + slug)
            bar = artifacts.progress(key, 0.0, description)
            state = {"done": 0, "next": 0.2}

            def advance(n: int = 1) -> None:
                local(n)
                state["done"] += n
                frac = state["done"] / max(total, 1)
                if frac >= state["next"] or state["done"] == total:     # ~5 API calls a stage
                    artifacts.update_progress(bar, 100.0 * frac)
                    state["next"] = frac + 0.2
            yield advance

    @contextlib.contextmanager
    def _terminal_or_log(self, description: str, total: int):
        if self.enabled:
            tid = self._progress.add_task(description, total=total)
            yield lambda n=1: self._progress.advance(tid, n)
            return
        state = {"done": 0, "next": 0.1, "t0": time.time()}

        def advance(n: int = 1) -> None:
            state["done"] += n
            frac = state["done"] / max(total, 1)
            if frac >= state["next"] or state["done"] == total:
                self.log(f"{description}: {state['done']}/{total} ({time.time() - state['t0']:.0f}s)")
                state["next"] = frac + 0.1

        yield advance
