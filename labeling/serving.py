"""Serve an ASGI app (the labeling page, the judge endpoint) under uvicorn in a background thread.

Used by the flow's `collect_human_feedback` stage, which serves the page while it waits for labels,
and by the tests, which need a real HTTP server on a free port.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn


@contextmanager
def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 30) -> Iterator[str]:
    """Serve `app` on host:port (port 0: the OS picks a free one) until the block ends; yields the base URL.

    Raises OSError naming the address when it cannot listen (port taken, address not local).
    """
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    failure: list[BaseException] = []

    def run() -> None:
        try:
            server.run()
        except BaseException as e:  # noqa: BLE001 - reported to the caller below
            failure.append(e)

    thread = threading.Thread(target=run, daemon=True, name=f"serve-{host}:{port}")
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        # uvicorn logs a bind failure and exits (SystemExit) instead of raising OSError.
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            detail = f": {failure[0]!r}" if failure else " (address in use?)"
            raise OSError(f"could not serve on {host}:{port}{detail}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(10)
