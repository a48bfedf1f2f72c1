"""The one console every `alignflow` command prints through.

Status and error lines are never wrapped: a path or a message stays one line that a user can grep
in a log file, a CI job or a narrow terminal. Rich wraps at the terminal width, and at 80 columns
(or `COLUMNS`) when no terminal is attached, which broke "cannot read Parquet" across two lines.
`soft_wrap=True` turns that off for printed text; tables still lay themselves out, at the
terminal's width on a terminal and at a generous fixed width in logs, so their cells (paths,
run ids) are not folded either.
"""
from __future__ import annotations

import sys

from rich.console import Console

LOG_WIDTH = 200  # columns for tables when the stream is a file or a pipe, whatever COLUMNS says


def make_console(stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    tty = hasattr(stream, "isatty") and stream.isatty()
    return Console(stderr=stderr, soft_wrap=True, width=None if tty else LOG_WIDTH)
