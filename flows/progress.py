"""Rich progress bars for long stages (generation, judging, training), quiet when not a terminal."""
from __future__ import annotations

import contextlib
import sys

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)


class ProgressUI:
    def __init__(self, enabled: bool | None = None):
        self.console = Console(stderr=True)
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
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
        """Yield an advance(n) callback for a bar with `total` items."""
        tid = self._progress.add_task(description, total=total)
        try:
            yield lambda n=1: self._progress.advance(tid, n)
        finally:
            self._progress.update(tid, completed=total)
