"""Preference data in the formats other tools use: Anthropic HH-RLHF, PKU-SafeRLHF and TRL.

Each format is a set of fields per record, stored as JSON lines (.jsonl, or .json holding JSON
lines) or Parquet. Imports become PREFERENCES tables; exports write PREFERENCES tables back out.
Both check every record before anything is written, and fail with a PreferenceFormatError that
names the file, the line (JSON lines) or row (Parquet), and the field. Exports are atomic.

What a format cannot hold is dropped on export (scores, weights, soft labels, annotators), and
what PREFERENCES cannot hold is dropped on import (PKU's extra fields); TRL's `margin` is kept
(the reward model's loss uses it); everything else round-trips unchanged.
"""
from __future__ import annotations

import json
import math
import reprlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from rlhf_core.io import atomic_path
from rlhf_core.prompts import prompt_id
from rlhf_core.schemas import PREFERENCES, from_rows, read_table, validate


class PreferenceFormatError(ValueError):
    """A preference file or table that cannot be converted; the message names where and why."""


# ---------------------------------------------------------------------------- field checks

def _show(value: object) -> str:
    return "null" if value is None else reprlib.repr(value)


def _text(rec: dict, field: str, where: str) -> str:
    value = rec.get(field)
    if isinstance(value, list):
        # TRL's conversational records hold lists of {"role", "content"} messages.
        raise PreferenceFormatError(f"{where}: field {field!r} is a list of messages; only plain-text "
                                    "records are supported")
    if not isinstance(value, str):
        raise PreferenceFormatError(f"{where}: field {field!r} must be a string, got {_show(value)}")
    if not value.strip():
        raise PreferenceFormatError(f"{where}: field {field!r} is empty")
    return value


def _choice(rec: dict, field: str, where: str) -> int:
    value = rec.get(field)
    # type() rather than isinstance: bool is an int subclass, and `true` is not a response id.
    if type(value) is not int or value not in (0, 1):
        raise PreferenceFormatError(f"{where}: field {field!r} must be 0 or 1, got {_show(value)}")
    return value


def _flag(rec: dict, field: str, where: str) -> bool:
    value = rec.get(field)
    if not isinstance(value, bool):
        raise PreferenceFormatError(f"{where}: field {field!r} must be true or false, got {_show(value)}")
    return value


def _harm_category(rec: dict, field: str, where: str) -> str | None:
    """PKU-SafeRLHF gives {category: bool} per answer; keep the categories that apply."""
    value = rec.get(field)
    if isinstance(value, dict):
        value = ",".join(k for k, v in value.items() if v is True)
    elif value is not None and not isinstance(value, str):
        raise PreferenceFormatError(f"{where}: field {field!r} must be a string or a mapping of "
                                    f"category to true/false, got {_show(value)}")
    return value or None


# ---------------------------------------------------------------------------- HH-RLHF

_HUMAN, _ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


def _split_transcript(rec: dict, field: str, where: str) -> tuple[str, str]:
    """'\\n\\nHuman: q ...\\n\\nAssistant: answer' -> (everything through the last Assistant marker, answer)."""
    text = _text(rec, field, where)
    if not text.startswith(_HUMAN):
        raise PreferenceFormatError(f"{where}: field {field!r} must start with {_HUMAN!r}")
    cut = text.rfind(_ASSISTANT)
    if cut < 0:
        raise PreferenceFormatError(f"{where}: field {field!r} has no {_ASSISTANT!r} turn")
    cut += len(_ASSISTANT)
    # The one space after the marker is the format's separator, not part of the answer.
    answer = text[cut:].removeprefix(" ")
    if not answer.strip():
        raise PreferenceFormatError(f"{where}: field {field!r} has an empty final answer")
    return text[:cut], answer


def _hh_parse(rec: dict, where: str) -> dict:
    conversation, chosen = _split_transcript(rec, "chosen", where)
    other, rejected = _split_transcript(rec, "rejected", where)
    if other != conversation:
        raise PreferenceFormatError(f"{where}: fields 'chosen' and 'rejected' differ before their last "
                                    f"{_ASSISTANT!r}; both must continue the same conversation")
    # Earlier turns of a multi-turn conversation stay in the prompt text, markers included.
    prompt = conversation[len(_HUMAN):-len(_ASSISTANT)].removeprefix(" ")
    if not prompt.strip():
        raise PreferenceFormatError(f"{where}: field 'chosen' has an empty first {_HUMAN!r} turn")
    return {"prompt": prompt, "response_a": chosen, "response_b": rejected, "better": 0}


def _hh_build(pair: dict, where: str) -> dict:
    chosen, rejected = _ordered(pair)
    for field in ("response_a", "response_b"):
        # A marker inside an answer would move the prompt/answer split on the way back in.
        if _ASSISTANT in pair[field]:
            raise PreferenceFormatError(f"{where}: field {field!r} contains {_ASSISTANT!r}, "
                                        "which an HH-RLHF transcript cannot hold in an answer")
    head = f"{_HUMAN} {pair['prompt']}{_ASSISTANT} "
    return {"chosen": head + chosen, "rejected": head + rejected}


# ---------------------------------------------------------------------------- PKU-SafeRLHF

def _pku_parse(rec: dict, where: str) -> dict:
    return {"prompt": _text(rec, "prompt", where), "safer": _choice(rec, "safer_response_id", where),
            "response_a": _text(rec, "response_0", where), "response_b": _text(rec, "response_1", where),
            "better": _choice(rec, "better_response_id", where),
            "is_safe_a": _flag(rec, "is_response_0_safe", where), "is_safe_b": _flag(rec, "is_response_1_safe", where),
            "harm_category_a": _harm_category(rec, "response_0_harm_category", where),
            "harm_category_b": _harm_category(rec, "response_1_harm_category", where)}


def _pku_build(pair: dict, where: str) -> dict:
    safe_a, safe_b = pair["is_safe_a"], pair["is_safe_b"]
    safer = pair.get("safer")
    if safer is None and safe_a is not None and safe_b is not None and safe_a != safe_b:
        safer = int(safe_b)     # implied by the two safety flags
    return {"prompt": pair["prompt"], "response_0": pair["response_a"], "response_1": pair["response_b"],
            "better_response_id": pair["better"], "safer_response_id": safer,
            "is_response_0_safe": safe_a, "is_response_1_safe": safe_b,
            "response_0_harm_category": pair["harm_category_a"], "response_1_harm_category": pair["harm_category_b"]}


# ---------------------------------------------------------------------------- TRL

def _trl_parse(rec: dict, where: str) -> dict:
    margin = rec.get("margin")
    # Kept in its own column (the reward model's loss uses it), not as score_a/score_b: those are
    # judge totals, which a margin is not.
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))
                               or not math.isfinite(margin)):
        raise PreferenceFormatError(f"{where}: field 'margin' must be a finite number, got {_show(margin)}")
    return {"prompt": _text(rec, "prompt", where), "response_a": _text(rec, "chosen", where),
            "response_b": _text(rec, "rejected", where), "better": 0,
            "margin": None if margin is None else float(margin)}


def _trl_build(pair: dict, where: str) -> dict:
    chosen, rejected = _ordered(pair)
    return {"prompt": pair["prompt"], "chosen": chosen, "rejected": rejected}


def _ordered(pair: dict) -> tuple[str, str]:
    """(chosen, rejected) of a pair that has a winner."""
    a, b = pair["response_a"], pair["response_b"]
    return (a, b) if pair["better"] == 0 else (b, a)


# ---------------------------------------------------------------------------- the formats

@dataclass(frozen=True)
class PreferenceFormat:
    required: tuple[str, ...]              # fields every record has; also how detect_format tells formats apart
    columns: pa.Schema                     # what export writes: Parquet types, JSON key order
    parse: Callable[[dict, str], dict]     # record, where -> the pair's PREFERENCES fields
    build: Callable[[dict, str], dict]     # PREFERENCES row with a winner, where -> record


_S, _I, _B = pa.string(), pa.int64(), pa.bool_()
FORMATS: dict[str, PreferenceFormat] = {
    "hh-rlhf": PreferenceFormat(("chosen", "rejected"),
                                pa.schema([("chosen", _S), ("rejected", _S)]), _hh_parse, _hh_build),
    "pku-saferlhf": PreferenceFormat(
        ("prompt", "response_0", "response_1", "better_response_id", "safer_response_id",
         "is_response_0_safe", "is_response_1_safe"),
        pa.schema([("prompt", _S), ("response_0", _S), ("response_1", _S), ("better_response_id", _I),
                   ("safer_response_id", _I), ("is_response_0_safe", _B), ("is_response_1_safe", _B),
                   ("response_0_harm_category", _S), ("response_1_harm_category", _S)]),
        _pku_parse, _pku_build),
    "trl": PreferenceFormat(("prompt", "chosen", "rejected"),
                            pa.schema([("prompt", _S), ("chosen", _S), ("rejected", _S)]), _trl_parse, _trl_build),
}


def _format(fmt: str) -> PreferenceFormat:
    if fmt not in FORMATS:
        raise PreferenceFormatError(f"unknown preference format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return FORMATS[fmt]


def _needs(name: str) -> str:
    return f"{name} needs {', '.join(FORMATS[name].required)}"


# ---------------------------------------------------------------------------- files

def _jsonl_records(path: Path) -> Iterator[tuple[str, int, dict]]:
    with open(path, "rb") as fh:
        # Binary lines split on b"\n" only; str.splitlines would also split inside JSON strings
        # holding U+2028 and friends, and misnumber every line after.
        for n, raw in enumerate(fh, start=1):
            where = f"{path} line {n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:     # the line and column an editor shows, not a byte offset
                column = len(raw[:e.start].decode("utf-8", errors="replace")) + 1
                raise PreferenceFormatError(f"{where}: not valid UTF-8 at column {column} ({e.reason})") from e
            if n == 1:
                line = line.removeprefix("\ufeff")  # byte-order mark some editors write
            if not line.strip():
                continue
            # A JSON array (one line or pretty-printed) is the usual mix-up with JSON lines.
            hint = "; the file must hold one JSON object per line" if line.lstrip().startswith("[") else ""
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise PreferenceFormatError(f"{where}: not valid JSON ({e.msg} at column {e.colno}){hint}") from e
            if not isinstance(rec, dict):
                raise PreferenceFormatError(f"{where}: expected a JSON object, got {type(rec).__name__}{hint}")
            yield where, n, rec


def _parquet_records(path: Path) -> Iterator[tuple[str, int, dict]]:
    try:
        batches = pq.ParquetFile(path).iter_batches()
    except (pa.ArrowInvalid, OSError) as e:
        raise PreferenceFormatError(f"{path}: not a readable Parquet file: {e}") from e
    n = 0
    for batch in batches:
        for rec in batch.to_pylist():
            n += 1
            yield f"{path} row {n}", n, rec


def _write_jsonl(records: list[dict], columns: pa.Schema, tmp: str) -> None:
    with open(tmp, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps({k: rec[k] for k in columns.names}, ensure_ascii=False) + "\n")


def _write_parquet(records: list[dict], columns: pa.Schema, tmp: str) -> None:
    # Explicit types: a column that is null in every row (say, unknown safety) keeps its type.
    pq.write_table(pa.Table.from_pylist(records, schema=columns), tmp)


_FILE_TYPES = {".jsonl": (_jsonl_records, _write_jsonl), ".json": (_jsonl_records, _write_jsonl),
               ".parquet": (_parquet_records, _write_parquet)}


def _file_type(path: Path) -> tuple[Callable, Callable]:
    if path.suffix.lower() not in _FILE_TYPES:
        raise PreferenceFormatError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl, "
                                    ".json (JSON lines) or .parquet")
    return _FILE_TYPES[path.suffix.lower()]


def _records(path: Path) -> Iterator[tuple[str, int, dict]]:
    """(where, line or row number, record) for each record of a preference file."""
    read, _ = _file_type(path)
    if not path.is_file():
        raise PreferenceFormatError(f"{path}: file not found")
    return read(path)


# ---------------------------------------------------------------------------- public API

def detect_format(path: str | Path) -> str:
    """The format whose required fields the first record has (the most specific one, since a TRL
    record also has HH-RLHF's fields)."""
    path = Path(path)
    first = next(_records(path), None)
    if first is None:
        raise PreferenceFormatError(f"{path}: empty file, no preference records")
    where, _, rec = first
    matches = [name for name, f in FORMATS.items() if all(k in rec for k in f.required)]
    if not matches:
        raise PreferenceFormatError(f"{where}: no known preference format has the fields {sorted(rec)}; "
                                    + "; ".join(_needs(name) for name in FORMATS))
    return max(matches, key=lambda name: len(FORMATS[name].required))


def import_preferences(path: str | Path, fmt: str, annotator: str | None = None) -> pa.Table:
    """Read a preference file of format `fmt` into a validated PREFERENCES table.

    pair_id is "<fmt>-<file stem>-<line or row>", so importing the same file again gives the
    same ids; prompt_id is "imported-<sha1(prompt)[:12]>", so one prompt gets one id whichever
    file or format it came from.
    """
    path = Path(path)
    spec = _format(fmt)
    annotator = annotator or f"imported:{path.name}"
    rows = []
    for where, n, rec in _records(path):
        missing = [k for k in spec.required if k not in rec]
        if missing:
            raise PreferenceFormatError(f"{where}: missing field {missing[0]!r} ({_needs(fmt)})")
        pair = spec.parse(rec, where)
        rows.append({"pair_id": f"{fmt}-{path.stem}-{n}", "prompt_id": prompt_id("imported", pair["prompt"]),
                     **pair, "annotator": annotator, "source": "imported", "weight": 1.0})
    if not rows:
        raise PreferenceFormatError(f"{path}: empty file, no preference records")
    return from_rows(rows, PREFERENCES, str(path))


def read_preference_file(path: str | Path, fmt: str = "auto") -> tuple[pa.Table, str]:
    """A preference file of any format here, or alignflow's own PREFERENCES Parquet ("alignflow"),
    as a PREFERENCES table whose every row is `source: imported`; and the format it was read as.
    "auto": alignflow's Parquet by its columns, else `detect_format`."""
    path = Path(path)
    if fmt == "auto" and path.suffix.lower() == ".parquet" and path.is_file():
        try:
            names = set(pq.read_schema(path).names)
        except (OSError, pa.ArrowException) as e:
            raise PreferenceFormatError(f"{path}: not a readable Parquet file ({e})") from e
        if {"pair_id", "response_a", "response_b", "better"} <= names:
            fmt = "alignflow"
    if fmt == "alignflow":
        try:
            table = read_table(path, PREFERENCES)
        except (OSError, pa.ArrowException, ValueError) as e:
            raise PreferenceFormatError(f"{path}: {e}") from e
        if not table.num_rows:
            raise PreferenceFormatError(f"{path}: empty file, no preference records")
        return table.set_column(table.schema.get_field_index("source"), "source",
                                pa.array(["imported"] * table.num_rows)), fmt
    fmt = detect_format(path) if fmt == "auto" else fmt
    return import_preferences(path, fmt), fmt


def export_preferences(table_or_path: pa.Table | str | Path, dest: str | Path, fmt: str, *,
                       with_margin: bool = False) -> dict:
    """Write PREFERENCES pairs to `dest` in format `fmt`; returns {"written": n, "skipped_ties": n}.

    Ties (better == -1) are skipped: every format here needs a chosen answer. with_margin (TRL
    only) adds margin = |score_a - score_b|, which needs judge scores on every exported pair.
    All pairs are checked before the file is written to a temp file and renamed into place.
    """
    dest = Path(dest)
    spec = _format(fmt)
    if with_margin and fmt != "trl":
        raise PreferenceFormatError(f"with_margin applies to the trl format only, not {fmt!r}")
    _, write = _file_type(dest)
    table = (validate(table_or_path, PREFERENCES, "preference table") if isinstance(table_or_path, pa.Table)
             else read_table(table_or_path, PREFERENCES))
    records, ties = [], 0
    for n, pair in enumerate(table.to_pylist(), start=1):
        if pair["better"] == -1:
            ties += 1
            continue
        where = f"{dest}: pair {pair['pair_id']!r} (row {n})"
        for field in ("prompt", "response_a", "response_b"):
            _text(pair, field, where)  # an empty text would export a record no importer accepts
        rec = spec.build(pair, where)
        if with_margin and pair.get("margin") is not None:      # imported with one: kept as it came
            rec["margin"] = pair["margin"]
        elif with_margin:
            unscored = [k for k in ("score_a", "score_b") if pair[k] is None]
            if unscored:
                raise PreferenceFormatError(f"{where}: field {unscored[0]!r} is null; with_margin needs judge "
                                            "scores on every exported pair")
            rec["margin"] = abs(pair["score_a"] - pair["score_b"])
        records.append(rec)
    if not records:
        raise PreferenceFormatError(f"{dest}: nothing to export: {ties} of {table.num_rows} pairs are ties")
    columns = spec.columns.append(pa.field("margin", pa.float64())) if with_margin else spec.columns
    with atomic_path(dest) as tmp:
        write(records, columns, str(tmp))
    return {"written": len(records), "skipped_ties": ties}
