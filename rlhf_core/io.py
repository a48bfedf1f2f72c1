"""Writing files so that a reader never sees half of one: write to a temp file beside the target,
then rename it into place (`os.replace` is atomic on one filesystem).

Every such write goes through `atomic_path` (files) or `temp_dir_beside` (folders): `mkstemp` and
`mkdtemp` create 0600 / 0700 for privacy, and a renamed temp file keeps that mode, so without the
chmod here a teammate or a serving container sharing the run folder could read nothing alignflow
wrote. They get what a plain `open` / `mkdir` would give: 0666 / 0777 less the umask.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def umask() -> int:
    """The process umask. Read from /proc where it exists: `os.umask` can only be read by setting it,
    and a file another thread creates in that instant would get the wrong mode."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~umask()


def dir_mode() -> int:
    return 0o777 & ~umask()


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temp file beside `path` for the block to write (by name or by opening it): renamed onto
    `path` if the block ends without error, removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, file_mode())
        os.close(fd)
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def temp_dir_beside(dest: str | os.PathLike, prefix: str) -> Path:
    """An empty folder in `dest`'s parent (same filesystem: it can be renamed onto `dest`)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=dest.parent))
    os.chmod(tmp, dir_mode())
    return tmp


@contextmanager
def atomic_dir(dest: str | os.PathLike, prefix: str | None = None) -> Iterator[Path]:
    """An empty folder beside `dest` for the block to fill: it replaces `dest` (whole) if the block
    ends without error, and is removed otherwise. A folder of model files is whole or absent."""
    dest = Path(dest)
    tmp = temp_dir_beside(dest, prefix or dest.name + ".tmp")
    try:
        yield tmp
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def path_component_problem(name: str) -> str | None:
    """Why `name` cannot be one folder or file name inside another folder, or None if it can: it must
    not be empty, '.' or '..', nor hold a path separator or NUL (each would name another place)."""
    if name in ("", ".", ".."):
        return f"must be a folder name, not {name!r}"
    if "/" in name or "\\" in name or "\0" in name:
        return f"must be one folder name, without '/', '\\' or NUL: {name[:80]!r}"
    return None


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def decode_utf8(raw: bytes, where: str, error: type[Exception] = ValueError) -> str:
    """`raw` as text (a leading byte-order mark dropped); `error` names the line of a bad byte, which
    is what a person can find in an editor (a byte offset is not)."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise error(f"{where}:{line}: not valid UTF-8 ({e.reason})") from e


def read_jsonl(path: str | os.PathLike, error: type[Exception] = ValueError) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a .jsonl file; `error` names the file and
    line of one that is not a JSON object. Splits at "\\n" only: str.splitlines also breaks at
    U+2028 inside a JSON string, which would cut a record in two and shift every later line number."""
    import json
    path = Path(path)
    out = []
    for n, line in enumerate(decode_utf8(path.read_bytes(), str(path), error).split("\n"), start=1):
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
