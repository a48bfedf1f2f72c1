"""Durable store of the labeling page: annotators, batches of pairs, what each person was shown, labels.

SQLite in WAL mode, one connection per thread: readers never block the writer, and a label is on
disk (synchronous=FULL) when its request returns. Every write runs in `BEGIN IMMEDIATE`, so
concurrent writers queue on busy_timeout instead of failing to upgrade a read lock to a write lock.

An *impression* records that a pair was shown to a person in a drawn left/right order; a label
refers to its impression, so it is stored in terms of response_a/response_b no matter which side
the person clicked, and the export says what they actually saw (display_order).
"""
from __future__ import annotations

import hashlib
import re
import secrets
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa

from rlhf_core import schemas

# PKU-SafeRLHF's harm categories (Ji et al. 2024, "PKU-SafeRLHF"), spelled as the dataset spells
# them so that an export to its format carries them unchanged, plus "Other".
HARM_CATEGORIES = (
    "Endangering National Security", "Insulting Behavior", "Discriminatory Behavior",
    "Endangering Public Health", "Copyright Issues", "Violence", "Drugs", "Privacy Violation",
    "Economic Crime", "Mental Manipulation", "Human Trafficking", "Physical Harm", "Sexual Content",
    "Cybercrime", "Disrupting Public Order", "Environmental Damage", "Psychological Harm",
    "White-Collar Crime", "Animal Abuse", "Other",
)
CHOICES = ("left", "right", "tie")
# A pair shown but not yet answered counts against its batch's target for this long, so that
# concurrent annotators are handed different pairs; after that it may go to someone else too.
LEASE = timedelta(minutes=10)
PAIR_FIELDS = ("pair_id", "prompt_id", "prompt", "response_a", "response_b")
MAX_ID = 2**53 - 1  # the largest id the page's JavaScript holds exactly (SQLite's own limit is 2**63 - 1)

_local = threading.local()  # per-thread connections, keyed by database path
_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,100}")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS annotators (
    name TEXT PRIMARY KEY,
    token_sha256 TEXT NOT NULL UNIQUE,  -- the token itself is shown once and never stored
    created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
    batch_id TEXT PRIMARY KEY,
    created_at TEXT NOT NULL,
    target_labels INTEGER,  -- labels wanted per pair; NULL = every annotator labels every pair
    deadline TEXT);         -- UTC ISO time after which the batch is closed; NULL = never
CREATE TABLE IF NOT EXISTS items (
    item_id INTEGER PRIMARY KEY,
    batch_id TEXT NOT NULL REFERENCES batches(batch_id),
    pair_id TEXT NOT NULL, prompt_id TEXT NOT NULL, prompt TEXT NOT NULL,
    response_a TEXT NOT NULL, response_b TEXT NOT NULL,
    UNIQUE (batch_id, pair_id));
CREATE TABLE IF NOT EXISTS impressions (
    impression_id INTEGER PRIMARY KEY,
    item_id INTEGER NOT NULL REFERENCES items(item_id),
    annotator TEXT NOT NULL REFERENCES annotators(name),
    display_order TEXT NOT NULL CHECK (display_order IN ('ab', 'ba')),
    shown_at TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('open', 'labeled', 'skipped')),
    UNIQUE (item_id, annotator));
CREATE INDEX IF NOT EXISTS impressions_by_annotator ON impressions(annotator, status);
CREATE TABLE IF NOT EXISTS labels (
    label_id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused, so the largest is the latest
    impression_id INTEGER NOT NULL UNIQUE REFERENCES impressions(impression_id),
    item_id INTEGER NOT NULL REFERENCES items(item_id),
    annotator TEXT NOT NULL REFERENCES annotators(name),
    better INTEGER NOT NULL CHECK (better IN (-1, 0, 1)),
    is_safe_a INTEGER NOT NULL, is_safe_b INTEGER NOT NULL,
    harm_category_a TEXT, harm_category_b TEXT,
    labeled_at TEXT NOT NULL,
    UNIQUE (item_id, annotator));  -- a retried submit can never add a second label
CREATE INDEX IF NOT EXISTS labels_by_annotator ON labels(annotator, label_id);
"""
# Batches still taking labels, as a SQL condition on alias b and parameter :now.
_OPEN_BATCH = "(b.deadline IS NULL OR b.deadline > :now)"
# Pairs this annotator has not been shown, in open batches, whose target is not yet met
# (labels plus unexpired leases of other people's open impressions).
_AVAILABLE = f"""
FROM items i JOIN batches b ON b.batch_id = i.batch_id
WHERE {_OPEN_BATCH}
  AND NOT EXISTS (SELECT 1 FROM impressions m WHERE m.item_id = i.item_id AND m.annotator = :me)
  AND (b.target_labels IS NULL OR b.target_labels > (
        SELECT COUNT(*) FROM impressions m WHERE m.item_id = i.item_id
          AND (m.status = 'labeled' OR (m.status = 'open' AND m.shown_at > :lease_start))))
"""


class LabelingError(ValueError):
    """Bad input to the labeling store; the message names the field or object."""


class NotFound(LabelingError):
    """The object does not exist for this annotator (another person's counts as not existing)."""


class Conflict(LabelingError):
    """The request clashes with the stored state (already labeled, batch closed, name taken)."""


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(t: datetime) -> str:
    # One fixed format, so ISO strings compare in SQL in time order.
    return t.astimezone(UTC).isoformat(timespec="microseconds")


def _draw_order() -> str:
    """Left/right order for one person and pair, drawn fresh so that no side is systematically favoured."""
    return secrets.choice(("ab", "ba"))


def _hash(token: str) -> str:
    # surrogatepass: any string hashes, so a malformed token is a 401, never an encoding error.
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def connect(db: str | Path) -> sqlite3.Connection:
    """This thread's connection to db, opened on first use and kept for the thread's life.

    sqlite3 connections must not cross threads; reusing one per thread (server worker threads
    live long) makes a write ~10x cheaper than opening a connection per call (measured here:
    0.4-0.7 ms against 5-7 ms).
    """
    conns = _local.__dict__.setdefault("conns", {})
    key = str(Path(db).resolve())
    if key not in conns:
        conn = sqlite3.connect(key, timeout=30, isolation_level=None)  # autocommit: transactions are explicit
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA busy_timeout = 30000")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA synchronous = FULL")  # WAL + NORMAL could lose the last labels on power loss
        conns[key] = conn
    return conns[key]


def init_db(db: str | Path) -> Path:
    """Create the database (or add missing tables); safe to call on an existing one."""
    path = Path(db)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = connect(path)
    conn.execute("PRAGMA journal_mode = WAL")  # persistent: set once, kept in the file
    conn.executescript(_SCHEMA)
    return path


@contextmanager
def _transaction(db: str | Path, begin: str) -> Iterator[sqlite3.Connection]:
    conn = connect(db)
    conn.execute(begin)
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")  # the connection is reused: never leave a transaction open on it
        raise
    conn.execute("COMMIT")


def _write(db: str | Path) -> AbstractContextManager[sqlite3.Connection]:
    return _transaction(db, "BEGIN IMMEDIATE")


def _read(db: str | Path) -> AbstractContextManager[sqlite3.Connection]:
    return _transaction(db, "BEGIN")  # one snapshot for every query of the call


def _check_id(value: object, field: str) -> str:
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise LabelingError(f"{field} must be 1-100 characters of letters, digits, '.', '_' or '-'; got {value!r}")
    return value


def check_safety(side: str, safe: bool, harm_category: str | None) -> None:
    """PKU-SafeRLHF's rule: an unsafe answer needs a harm category, a safe one has none."""
    if harm_category is not None and harm_category not in HARM_CATEGORIES:
        raise LabelingError(f"{side}.harm_category must be one of {list(HARM_CATEGORIES)}; got {harm_category!r}")
    if not safe and harm_category is None:
        raise LabelingError(f"{side}.harm_category is required when {side}.safe is false")
    if safe and harm_category is not None:
        raise LabelingError(f"{side}.harm_category must be null when {side}.safe is true")


# ---------------------------------------------------------------------------- annotators

def add_annotator(db: str | Path, name: str) -> str:
    """Register a person and return their token; only its SHA-256 is stored, so it is shown once."""
    if not isinstance(name, str) or not name.strip() or len(name) > 64 or not name.isprintable():
        raise LabelingError(f"annotator name must be 1-64 printable characters; got {name!r}")
    token = secrets.token_urlsafe(24)
    with _write(db) as conn:
        if conn.execute("SELECT 1 FROM annotators WHERE name = ?", (name,)).fetchone():
            raise Conflict(f"annotator {name!r} already exists; choose another name")
        conn.execute("INSERT INTO annotators VALUES (?, ?, ?)", (name, _hash(token), _iso(_now())))
    return token


def list_annotators(db: str | Path) -> list[dict]:
    with _read(db) as conn:
        rows = conn.execute("""SELECT a.name, a.created_at,
                                      (SELECT COUNT(*) FROM labels l WHERE l.annotator = a.name) AS labels
                               FROM annotators a ORDER BY a.created_at, a.name""").fetchall()
    return [dict(r) for r in rows]


def authenticate(db: str | Path, token: str) -> str | None:
    """The annotator whose token this is, or None."""
    with _read(db) as conn:
        row = conn.execute("SELECT name FROM annotators WHERE token_sha256 = ?", (_hash(token),)).fetchone()
    return row["name"] if row else None


# ---------------------------------------------------------------------------- batches

def _pair_rows(rows: pa.Table | Sequence[dict]) -> list[tuple[str, ...]]:
    if isinstance(rows, pa.Table):
        missing = [f for f in PAIR_FIELDS if f not in rows.column_names]
        if missing:
            raise LabelingError(f"pairs: missing column(s) {missing}; a pair needs {list(PAIR_FIELDS)}")
        rows = rows.select(list(PAIR_FIELDS)).to_pylist()
    if not rows:
        raise LabelingError("pairs: nothing to publish (no rows)")
    out, seen = [], {}
    for i, row in enumerate(rows):
        for f in PAIR_FIELDS:
            v = row.get(f) if isinstance(row, dict) else None
            if not isinstance(v, str) or not v.strip():
                raise LabelingError(f"pairs row {i}: field {f!r} must be a non-empty string; got {v!r}")
        if row["pair_id"] in seen:
            raise LabelingError(f"pairs row {i}: pair_id {row['pair_id']!r} already in row {seen[row['pair_id']]}")
        seen[row["pair_id"]] = i
        out.append(tuple(row[f] for f in PAIR_FIELDS))
    return out


def _parse_deadline(deadline: datetime | str | None) -> str | None:
    if deadline is None:
        return None
    if isinstance(deadline, str):
        try:
            deadline = datetime.fromisoformat(deadline)
        except ValueError:
            raise LabelingError(f"deadline must be an ISO 8601 time, e.g. 2026-12-01T18:00Z; "
                                f"got {deadline!r}") from None
    if not isinstance(deadline, datetime) or deadline.tzinfo is None:
        raise LabelingError(f"deadline must include a time zone (e.g. a trailing Z for UTC); got {deadline!r}")
    if deadline <= _now():
        raise LabelingError(f"deadline {_iso(deadline)} is in the past")
    return _iso(deadline)


def publish_batch(db: str | Path, rows: pa.Table | Sequence[dict], batch_id: str,
                  target_labels: int | None = None, deadline: datetime | str | None = None) -> int:
    """Make pairs available for labeling, all or nothing; returns the number of pairs.

    rows: a PREFERENCES table or dicts with at least the pair fields (labels in them are ignored).
    target_labels: labels wanted per pair from different people (None: every annotator labels all).
    deadline: after it the batch takes no more labels and disappears from the page.
    """
    _check_id(batch_id, "batch_id")
    if target_labels is not None and (type(target_labels) is not int or target_labels < 1):
        raise LabelingError(f"target_labels must be a positive integer or None; got {target_labels!r}")
    deadline_iso = _parse_deadline(deadline)
    pairs = _pair_rows(rows)
    with _write(db) as conn:
        row = conn.execute("SELECT created_at FROM batches WHERE batch_id = ?", (batch_id,)).fetchone()
        if row:
            raise Conflict(f"batch {batch_id!r} already exists (published {row['created_at']}); "
                           "choose another batch id")
        conn.execute("INSERT INTO batches VALUES (?, ?, ?, ?)", (batch_id, _iso(_now()), target_labels, deadline_iso))
        conn.executemany("INSERT INTO items (batch_id, pair_id, prompt_id, prompt, response_a, response_b) "
                         "VALUES (?, ?, ?, ?, ?, ?)", [(batch_id, *p) for p in pairs])
    return len(pairs)


def _batch(conn: sqlite3.Connection, batch_id: str) -> sqlite3.Row:
    row = conn.execute("SELECT * FROM batches WHERE batch_id = ?", (batch_id,)).fetchone()
    if row is None:
        raise NotFound(f"batch {batch_id!r} does not exist")
    return row


def progress(db: str | Path, batch_id: str) -> dict:
    """How far a batch is: pairs, labels (per annotator), skips, and pairs that met the target."""
    with _read(db) as conn:
        b = _batch(conn, batch_id)
        pairs = conn.execute("SELECT COUNT(*) FROM items WHERE batch_id = ?", (batch_id,)).fetchone()[0]
        per = conn.execute("""SELECT l.annotator, COUNT(*) FROM labels l JOIN items i ON i.item_id = l.item_id
                              WHERE i.batch_id = ? GROUP BY l.annotator ORDER BY l.annotator""",
                           (batch_id,)).fetchall()
        skipped = conn.execute("""SELECT COUNT(*) FROM impressions m JOIN items i ON i.item_id = m.item_id
                                  WHERE i.batch_id = ? AND m.status = 'skipped'""", (batch_id,)).fetchone()[0]
        complete = None
        if b["target_labels"] is not None:
            complete = conn.execute("""SELECT COUNT(*) FROM items i WHERE i.batch_id = ? AND
                                       (SELECT COUNT(*) FROM labels l WHERE l.item_id = i.item_id) >= ?""",
                                    (batch_id, b["target_labels"])).fetchone()[0]
    return {"batch_id": batch_id, "created_at": b["created_at"], "pairs": pairs,
            "labels": sum(n for _, n in per), "annotators": {name: n for name, n in per},
            "skipped": skipped, "target_labels": b["target_labels"], "pairs_complete": complete,
            "deadline": b["deadline"], "closed": b["deadline"] is not None and b["deadline"] <= _iso(_now())}


def close_batch(db: str | Path, batch_id: str) -> str:
    """Stop a batch taking labels now (its deadline becomes now); returns that time. Labels given stay."""
    now = _iso(_now())
    with _write(db) as conn:
        b = _batch(conn, batch_id)
        if b["deadline"] is not None and b["deadline"] <= now:
            return b["deadline"]
        conn.execute("UPDATE batches SET deadline = ? WHERE batch_id = ?", (now, batch_id))
    return now


# ---------------------------------------------------------------------------- one annotator's work

def _shown(row: sqlite3.Row) -> dict:
    """An impression as the page sees it: left and right, never which one is response_a."""
    a, b = row["response_a"], row["response_b"]
    left, right = (a, b) if row["display_order"] == "ab" else (b, a)
    return {"impression_id": row["impression_id"], "batch_id": row["batch_id"], "pair_id": row["pair_id"],
            "prompt": row["prompt"], "left": left, "right": right}


_IMPRESSION = """SELECT m.impression_id, m.display_order, m.status, i.item_id, i.batch_id, i.pair_id, i.prompt,
                        i.response_a, i.response_b, b.deadline
                 FROM impressions m JOIN items i ON i.item_id = m.item_id JOIN batches b ON b.batch_id = i.batch_id"""


def next_item(db: str | Path, annotator: str) -> dict | None:
    """The pair to show this person now, or None when nothing is left.

    A pair already shown and not answered comes back first, in the same order (a reload, or the
    pair just undone: its reopened impression is the newest); otherwise a fresh pair is drawn and
    its left/right order with it.
    """
    now = _now()
    params = {"me": annotator, "now": _iso(now), "lease_start": _iso(now - LEASE)}
    with _write(db) as conn:
        row = conn.execute(f"""{_IMPRESSION} WHERE m.annotator = :me AND m.status = 'open' AND {_OPEN_BATCH}
                               ORDER BY m.shown_at DESC, m.impression_id DESC LIMIT 1""", params).fetchone()
        if row is None:
            pick = conn.execute(f"SELECT i.item_id {_AVAILABLE} ORDER BY b.created_at, i.item_id LIMIT 1",
                                params).fetchone()
            if pick is None:
                return None
            cur = conn.execute("INSERT INTO impressions (item_id, annotator, display_order, shown_at, status) "
                               "VALUES (?, ?, ?, ?, 'open')",
                               (pick["item_id"], annotator, _draw_order(), params["now"]))
            row = conn.execute(f"{_IMPRESSION} WHERE m.impression_id = ?", (cur.lastrowid,)).fetchone()
    return _shown(row)


def _own_open_impression(conn: sqlite3.Connection, annotator: str, impression_id: int) -> sqlite3.Row:
    if type(impression_id) is not int or not 1 <= impression_id <= MAX_ID:
        raise LabelingError(f"impression_id must be an integer in [1, {MAX_ID}]; got {impression_id!r}")
    row = conn.execute(f"{_IMPRESSION} WHERE m.impression_id = ? AND m.annotator = ?",
                       (impression_id, annotator)).fetchone()
    if row is None:  # another person's impression reads exactly like a missing one
        raise NotFound(f"impression {impression_id} not found")
    if row["deadline"] is not None and row["deadline"] <= _iso(_now()):
        raise Conflict(f"batch {row['batch_id']!r} closed at {row['deadline']}; it takes no more labels")
    if row["status"] != "open":
        raise Conflict(f"impression {impression_id} is already {row['status']}"
                       + ("; undo it to change the label" if row["status"] == "labeled" else ""))
    return row


def submit_label(db: str | Path, annotator: str, impression_id: int, better: str,
                 left_safe: bool, right_safe: bool,
                 left_harm_category: str | None = None, right_harm_category: str | None = None) -> dict:
    """Store what the person chose on the sides they saw, translated to response_a/response_b."""
    if better not in CHOICES:
        raise LabelingError(f"better must be one of {list(CHOICES)}; got {better!r}")
    check_safety("left", left_safe, left_harm_category)
    check_safety("right", right_safe, right_harm_category)
    with _write(db) as conn:
        row = _own_open_impression(conn, annotator, impression_id)
        ab = row["display_order"] == "ab"
        label = {"better": {"tie": -1, "left": 0 if ab else 1, "right": 1 if ab else 0}[better],
                 "is_safe_a": left_safe if ab else right_safe, "is_safe_b": right_safe if ab else left_safe,
                 "harm_category_a": left_harm_category if ab else right_harm_category,
                 "harm_category_b": right_harm_category if ab else left_harm_category,
                 "labeled_at": _iso(_now())}
        conn.execute("INSERT INTO labels (impression_id, item_id, annotator, better, is_safe_a, is_safe_b, "
                     "harm_category_a, harm_category_b, labeled_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                     (impression_id, row["item_id"], annotator, label["better"], label["is_safe_a"],
                      label["is_safe_b"], label["harm_category_a"], label["harm_category_b"], label["labeled_at"]))
        conn.execute("UPDATE impressions SET status = 'labeled' WHERE impression_id = ?", (impression_id,))
    return {"impression_id": impression_id, "batch_id": row["batch_id"], "pair_id": row["pair_id"],
            "display_order": row["display_order"], **label}


def skip(db: str | Path, annotator: str, impression_id: int) -> None:
    """Never show this pair to this person again (it stays available to others)."""
    with _write(db) as conn:
        _own_open_impression(conn, annotator, impression_id)
        conn.execute("UPDATE impressions SET status = 'skipped' WHERE impression_id = ?", (impression_id,))


def undo_last(db: str | Path, annotator: str) -> dict:
    """Delete this person's latest label and reopen its pair, which `next_item` then shows first."""
    with _write(db) as conn:
        row = conn.execute("""SELECT l.label_id, l.impression_id, i.batch_id, i.pair_id, b.deadline
                              FROM labels l JOIN items i ON i.item_id = l.item_id
                              JOIN batches b ON b.batch_id = i.batch_id
                              WHERE l.annotator = ? ORDER BY l.label_id DESC LIMIT 1""", (annotator,)).fetchone()
        if row is None:
            raise NotFound("no label to undo")
        if row["deadline"] is not None and row["deadline"] <= _iso(_now()):
            raise Conflict(f"batch {row['batch_id']!r} closed at {row['deadline']}; its labels are final")
        conn.execute("DELETE FROM labels WHERE label_id = ?", (row["label_id"],))
        conn.execute("UPDATE impressions SET status = 'open', shown_at = ? WHERE impression_id = ?",
                     (_iso(_now()), row["impression_id"]))
    return {"impression_id": row["impression_id"], "batch_id": row["batch_id"], "pair_id": row["pair_id"]}


def annotator_progress(db: str | Path, annotator: str) -> dict:
    """This person's work in open batches: labeled k of total (= labeled + still to do)."""
    now = _now()
    params = {"me": annotator, "now": _iso(now), "lease_start": _iso(now - LEASE)}
    with _read(db) as conn:
        counts = dict(conn.execute(f"""SELECT m.status, COUNT(*) FROM impressions m
                                       JOIN items i ON i.item_id = m.item_id JOIN batches b ON b.batch_id = i.batch_id
                                       WHERE m.annotator = :me AND {_OPEN_BATCH} GROUP BY m.status""",
                                   params).fetchall())
        fresh = conn.execute(f"SELECT COUNT(*) {_AVAILABLE}", params).fetchone()[0]
    labeled = counts.get("labeled", 0)
    remaining = counts.get("open", 0) + fresh
    return {"labeled": labeled, "skipped": counts.get("skipped", 0), "remaining": remaining,
            "total": labeled + remaining}


def annotator_labels(db: str | Path, annotator: str, limit: int = 100) -> list[dict]:
    """This person's own labels, newest first (never anyone else's)."""
    with _read(db) as conn:
        rows = conn.execute("""SELECT l.impression_id, i.batch_id, i.pair_id, m.display_order, l.better,
                                      l.is_safe_a, l.is_safe_b, l.harm_category_a, l.harm_category_b, l.labeled_at
                               FROM labels l JOIN items i ON i.item_id = l.item_id
                               JOIN impressions m ON m.impression_id = l.impression_id
                               WHERE l.annotator = ? ORDER BY l.label_id DESC LIMIT ?""",
                            (annotator, limit)).fetchall()
    return [{**dict(r), "is_safe_a": bool(r["is_safe_a"]), "is_safe_b": bool(r["is_safe_b"])} for r in rows]


# ---------------------------------------------------------------------------- export

_LABEL_ROWS = """SELECT l.label_id, i.pair_id, i.prompt_id, i.prompt, i.response_a, i.response_b, l.better,
                         l.is_safe_a, l.is_safe_b, l.harm_category_a, l.harm_category_b,
                         l.annotator, m.display_order, l.labeled_at
                  FROM labels l JOIN items i ON i.item_id = l.item_id
                  JOIN impressions m ON m.impression_id = l.impression_id"""


def _preference_rows(rows: list[sqlite3.Row], where: str) -> pa.Table:
    out = [{**{k: r[k] for k in r.keys() if k != "label_id"}, "is_safe_a": bool(r["is_safe_a"]),
            "is_safe_b": bool(r["is_safe_b"]),
            # PKU-SafeRLHF's safer_response_id, where the two safety labels imply it.
            "safer": None if r["is_safe_a"] == r["is_safe_b"] else int(r["is_safe_b"]),
            "labeled_at": datetime.fromisoformat(r["labeled_at"]), "source": "human", "weight": 1.0}
           for r in rows]
    return schemas.from_rows(out, schemas.PREFERENCES, where=where)


def export_labels(db: str | Path, batch_id: str) -> pa.Table:
    """Every label of a batch as PREFERENCES rows (one per person and pair), oldest first."""
    with _read(db) as conn:
        _batch(conn, batch_id)
        rows = conn.execute(_LABEL_ROWS + " WHERE i.batch_id = ? ORDER BY l.label_id", (batch_id,)).fetchall()
    return _preference_rows(rows, f"labels of batch {batch_id!r}")


def export_labels_after(db: str | Path, after: int) -> tuple[pa.Table, int]:
    """Every label of every batch given after label id `after` (a watermark), oldest first, and the
    newest label id among them (`after` when there are none). Label ids only grow, so a watermark
    never skips a label that arrived late nor takes one twice."""
    with _read(db) as conn:
        rows = conn.execute(_LABEL_ROWS + " WHERE l.label_id > ? ORDER BY l.label_id", (after,)).fetchall()
    last = rows[-1]["label_id"] if rows else after
    return _preference_rows(rows, f"labels after id {after} in {db}"), last


def export_parquet(db: str | Path, batch_id: str, path: str | Path) -> tuple[Path, int]:
    """Write a batch's labels to Parquet atomically (temp file + rename); returns the path and row count."""
    table = export_labels(db, batch_id)
    return schemas.write_table(table, path, schemas.PREFERENCES), table.num_rows
