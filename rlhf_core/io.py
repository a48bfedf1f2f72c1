"""Writing files so that a reader never sees half of one: write to a temp file beside the target,
then rename it into place (`os.replace` is atomic on one filesystem)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def read_jsonl(path: str | os.PathLike, error: type[Exception] = ValueError) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a .jsonl file; `error` names the file and
    line of one that is not a JSON object. Splits at "\\n" only: str.splitlines also breaks at
    U+2028 inside a JSON string, which would cut a record in two and shift every later line number."""
    import json
    path = Path(path)
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{path}:{n}: invalid JSON: {e.msg}") from e
        if not isinstance(obj, dict):
            raise error(f"{path}:{n}: expected a JSON object")
        out.append((n, obj))
    return out
