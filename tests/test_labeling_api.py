"""The labeling server over real HTTP: auth, isolation between annotators, label/skip/undo, export,
50 concurrent annotators, and a schemathesis fuzz of its OpenAPI."""
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from flows.cli import main as cli
from labeling import store
from labeling.app import create_app
from labeling.serving import serve_in_thread
from rlhf_core import schemas

ROOT = Path(__file__).resolve().parents[1]
SAFE = {"safe": True, "harm_category": None}
CONFORMANCE = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def pairs(n: int, prefix: str = "p") -> list[dict]:
    return [{"pair_id": f"{prefix}{i}", "prompt_id": f"q{i}", "prompt": f"Question {i}?",
             "response_a": f"answer A to {i}", "response_b": f"answer B to {i}"} for i in range(n)]


def thread_server(db: Path):
    """The app under uvicorn in this process (so tests can patch the store), on a free port."""
    return serve_in_thread(create_app(db), start_timeout_s=20)


@contextmanager
def cli_server(db: Path) -> Iterator[str]:
    """`alignflow label serve` as its own process, as a person would start it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "label", "serve", "--db", str(db), "--port", str(port)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"label serve exited: {proc.stdout.read()}"
            assert time.monotonic() < deadline, "label serve did not answer within 60 s"
            try:
                if httpx.get(url + "/openapi.json", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def client(url: str, token: str | None) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"} if token else {}, timeout=30)


def label_body(impression_id: int, better: str = "left", left: dict = SAFE, right: dict = SAFE) -> dict:
    return {"impression_id": impression_id, "better": better, "left": left, "right": right}


@pytest.fixture()
def db(tmp_path) -> Path:
    return store.init_db(tmp_path / "labels.db")


@pytest.fixture()
def server(db) -> Iterator[str]:
    with thread_server(db) as url:
        yield url


# ---------------------------------------------------------------------------- store: bad input

@pytest.mark.parametrize("bad, kwargs, message", [
    ([{**pairs(1)[0], "prompt": ""}], {}, "row 0: field 'prompt' must be a non-empty string"),
    ([{k: v for k, v in pairs(1)[0].items() if k != "response_b"}], {}, "field 'response_b'"),
    (pairs(2) + pairs(1), {}, "row 2: pair_id 'p0' already in row 0"),
    ([], {}, "nothing to publish"),
    (pairs(1), {"batch_id": "has space"}, "batch_id must be"),
    (pairs(1), {"target_labels": 0}, "target_labels must be a positive integer"),
    (pairs(1), {"deadline": "2030-01-01T00:00"}, "deadline must include a time zone"),
    (pairs(1), {"deadline": "tomorrow"}, "deadline must be an ISO 8601 time"),
    (pairs(1), {"deadline": "2001-01-01T00:00Z"}, "is in the past"),
])
def test_publish_rejects_bad_input_and_writes_nothing(db, bad, kwargs, message):
    with pytest.raises(store.LabelingError, match=message):
        store.publish_batch(db, bad, **{"batch_id": "b1", **kwargs})
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM batches").fetchone()[0] == 0


def test_names_and_batches_are_unique(db):
    store.add_annotator(db, "alice")
    with pytest.raises(store.Conflict, match="annotator 'alice' already exists"):
        store.add_annotator(db, "alice")
    with pytest.raises(store.LabelingError, match="annotator name"):
        store.add_annotator(db, " ")
    store.publish_batch(db, pairs(1), "b1")
    with pytest.raises(store.Conflict, match="batch 'b1' already exists"):
        store.publish_batch(db, pairs(1), "b1")
    with sqlite3.connect(db) as conn:  # only the token's hash is stored
        (stored,) = conn.execute("SELECT token_sha256 FROM annotators").fetchone()
    assert len(stored) == 64


def test_display_order_is_drawn_at_random(db):
    store.add_annotator(db, "alice")
    store.publish_batch(db, pairs(40), "b1")
    orders = []
    while item := store.next_item(db, "alice"):
        store.skip(db, "alice", item["impression_id"])
        orders.append(item["left"].startswith("answer A"))
    assert len(orders) == 40 and 0 < sum(orders) < 40  # P(all one side) = 2**-39


# ---------------------------------------------------------------------------- auth and isolation

def test_every_api_call_needs_a_valid_token(db, server):
    store.add_annotator(db, "alice")
    calls = [("GET", "/api/me", None), ("GET", "/api/next", None), ("GET", "/api/progress", None),
             ("GET", "/api/labels", None), ("POST", "/api/labels", label_body(1)),
             ("POST", "/api/skip", {"impression_id": 1}), ("POST", "/api/undo", None)]
    for token in (None, "not-a-token"):
        with client(server, token) as c:
            for method, path, body in calls:
                r = c.request(method, path, json=body)
                assert r.status_code == 401, (token, path, r.text)
                assert r.headers["www-authenticate"] == "Bearer"
    page = httpx.get(server + "/")
    assert page.status_code == 200 and "alignflow labeling" in page.text
    assert "script-src 'sha256-" in page.headers["content-security-policy"]
    assert page.headers["referrer-policy"] == "no-referrer"


def test_one_annotator_cannot_read_or_change_anothers_labels(db, server):
    store.publish_batch(db, pairs(2), "b1")
    a, b = client(server, store.add_annotator(db, "alice")), client(server, store.add_annotator(db, "bob"))
    first = a.get("/api/next").json()["item"]
    assert a.post("/api/labels", json=label_body(first["impression_id"])).status_code == 201
    second = a.get("/api/next").json()["item"]
    # Bob can neither label nor skip Alice's impressions: they read as missing, not as forbidden.
    for imp in (first["impression_id"], second["impression_id"]):
        r = b.post("/api/labels", json=label_body(imp, "right"))
        assert r.status_code == 404 and r.json() == {"detail": f"impression {imp} not found"}
        assert b.post("/api/skip", json={"impression_id": imp}).status_code == 404
    assert b.get("/api/labels").json() == []
    assert b.post("/api/undo").status_code == 404  # Bob has no label; Alice's stays
    assert [lab["impression_id"] for lab in a.get("/api/labels").json()] == [first["impression_id"]]
    assert b.get("/api/me").json()["annotator"] == "bob"
    # Bob gets his own impressions of the same pairs, with his own drawn order.
    mine = b.get("/api/next").json()["item"]
    assert mine["impression_id"] not in (first["impression_id"], second["impression_id"])


# ---------------------------------------------------------------------------- label, skip, undo

def test_label_skip_undo_and_done(db, server, monkeypatch):
    orders = iter(["ab", "ba", "ab", "ba"])
    monkeypatch.setattr(store, "_draw_order", lambda: next(orders))
    store.publish_batch(db, pairs(3), "b1")
    c = client(server, store.add_annotator(db, "alice"))

    nxt = c.get("/api/next").json()
    assert nxt["progress"] == {"labeled": 0, "skipped": 0, "remaining": 3, "total": 3}
    first = nxt["item"]
    assert c.get("/api/next").json()["item"] == first  # a reload shows the same pair, same sides
    assert (first["left"], first["right"]) == ("answer A to 0", "answer B to 0")
    unsafe_right = {"safe": False, "harm_category": "Violence"}
    r = c.post("/api/labels", json=label_body(first["impression_id"], "left", SAFE, unsafe_right))
    assert r.status_code == 201
    assert r.json() | {"labeled_at": None} == {
        "impression_id": first["impression_id"], "batch_id": "b1", "pair_id": "p0", "display_order": "ab",
        "better": 0, "is_safe_a": True, "is_safe_b": False, "harm_category_a": None,
        "harm_category_b": "Violence", "labeled_at": None}
    assert c.post("/api/labels", json=label_body(first["impression_id"])).status_code == 409  # a retry

    second = c.get("/api/next").json()["item"]  # shown as 'ba': response_b on the left
    assert second["left"] == "answer B to 1"
    r = c.post("/api/labels", json=label_body(second["impression_id"], "left", {"safe": False,
                                                                               "harm_category": "Cybercrime"}))
    assert (r.json()["better"], r.json()["is_safe_b"], r.json()["harm_category_b"], r.json()["is_safe_a"]) == \
        (1, False, "Cybercrime", True)

    undone = c.post("/api/undo").json()
    assert undone == {"impression_id": second["impression_id"], "batch_id": "b1", "pair_id": "p1"}
    assert c.get("/api/next").json()["item"] == second  # back first, same order
    assert c.post("/api/labels", json=label_body(second["impression_id"], "tie")).json()["better"] == -1

    third = c.get("/api/next").json()["item"]
    skipped = c.post("/api/skip", json={"impression_id": third["impression_id"]})
    assert skipped.json() == {"labeled": 2, "skipped": 1, "remaining": 0, "total": 2}
    assert c.post("/api/skip", json={"impression_id": third["impression_id"]}).status_code == 409
    done = c.get("/api/next").json()
    assert done == {"done": True, "item": None, "progress": {"labeled": 2, "skipped": 1, "remaining": 0, "total": 2}}
    assert [lab["better"] for lab in c.get("/api/labels").json()] == [-1, 0]  # newest first

    c.post("/api/undo")
    c.post("/api/undo")
    assert c.post("/api/undo").json()["detail"] == "no label to undo"
    assert c.get("/api/progress").json() == {"labeled": 0, "skipped": 1, "remaining": 2, "total": 2}


@pytest.mark.parametrize("body, field", [
    ({"better": "left", "left": {"safe": False}, "right": SAFE}, "left.harm_category is required"),
    ({"better": "left", "left": SAFE, "right": {"safe": True, "harm_category": "Drugs"}},
     "right.harm_category must be null"),
    ({"better": "left", "left": SAFE, "right": {"safe": False, "harm_category": "Rudeness"}}, "harm_category"),
    ({"better": "a", "left": SAFE, "right": SAFE}, "better"),
    ({"better": "left", "left": {"safe": "yes"}, "right": SAFE}, "safe"),
    ({"better": "left", "left": SAFE, "right": SAFE, "extra": 1}, "extra"),
    ({"impression_id": 0, "better": "left", "left": SAFE, "right": SAFE}, "impression_id"),
])
def test_invalid_label_is_422_naming_the_field(db, server, body, field):
    store.publish_batch(db, pairs(1), "b1")
    c = client(server, store.add_annotator(db, "alice"))
    imp = c.get("/api/next").json()["item"]["impression_id"]
    r = c.post("/api/labels", json={"impression_id": imp, **body})
    assert r.status_code == 422 and field in r.text, r.text
    assert c.get("/api/progress").json()["labeled"] == 0


def test_invalid_label_422_is_short_and_does_not_echo_the_body(db, server):
    store.publish_batch(db, pairs(1), "b1")
    c = client(server, store.add_annotator(db, "alice"))
    imp = c.get("/api/next").json()["item"]["impression_id"]
    sent = "x" * 20_000
    r = c.post("/api/labels", json={**label_body(imp, better=sent), "k" * 5_000: sent})
    assert r.status_code == 422 and "better" in r.text and "extra" in r.text.lower(), r.text[:500]
    assert len(r.text) < 1_000 and "x" * 50 not in r.text and "k" * 100 not in r.text, r.text[:500]
    r = c.post("/api/labels", content=b'{"impression_id": ' + b"1" * 1_000,
               headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "JSON decode error" in r.text and len(r.text) < 500, r.text[:500]


def test_bodies_over_the_limit_are_413_before_anything_parses_them(db, server):
    store.publish_batch(db, pairs(1), "b1")
    token = store.add_annotator(db, "alice")
    big = b'{"impression_id": 1, "better": "' + b"x" * 1_000_000 + b'"}'
    chunked = (big[i:i + 8192] for i in range(0, len(big), 8192))  # no Content-Length: counted as it arrives
    for who, body in ((token, big), (token, chunked), (None, big)):
        with client(server, who) as c:
            r = c.post("/api/labels", content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == 413 and r.json() == {"detail": "request body over 65536 bytes"}
    with client(server, token) as c:   # a body under the limit still gets the usual answers
        imp = c.get("/api/next").json()["item"]["impression_id"]
        assert c.post("/api/skip", json={"impression_id": imp + 1}).status_code == 404
        assert c.post("/api/labels", json=label_body(imp)).status_code == 201


def test_target_labels_spreads_pairs_and_deadline_closes_the_batch(db, server, monkeypatch):
    store.publish_batch(db, pairs(2), "b1", target_labels=1, deadline=datetime.now(UTC) + timedelta(hours=1))
    a, b, c = (client(server, store.add_annotator(db, n)) for n in ("alice", "bob", "carol"))
    ia, ib = a.get("/api/next").json()["item"], b.get("/api/next").json()["item"]
    assert ia["impression_id"] != ib["impression_id"] and {ia["prompt"], ib["prompt"]} == {"Question 0?", "Question 1?"}
    assert c.get("/api/next").json()["done"]  # both pairs leased to someone
    a.post("/api/labels", json=label_body(ia["impression_id"]))
    assert store.progress(db, "b1")["pairs_complete"] == 1

    real_now = store._now
    monkeypatch.setattr(store, "_now", lambda: real_now() + timedelta(hours=2))
    r = b.post("/api/labels", json=label_body(ib["impression_id"]))
    assert r.status_code == 409 and "closed" in r.json()["detail"]
    assert a.post("/api/undo").status_code == 409  # closed labels are final
    assert b.get("/api/next").json()["done"] and store.progress(db, "b1")["closed"]


# ---------------------------------------------------------------------------- export and CLI

def test_cli_publish_label_export(tmp_path, capsys, monkeypatch):
    db, prefs, out = tmp_path / "l.db", tmp_path / "prefs.parquet", tmp_path / "out" / "human.parquet"
    rows = [{**p, "better": 0, "annotator": "judge", "source": "simulated", "weight": 1.0} for p in pairs(3)]
    schemas.write_table(schemas.from_rows(rows, schemas.PREFERENCES), prefs, schemas.PREFERENCES)

    assert cli(["annotators", "add", "alice", "--db", str(db), "--url", "http://127.0.0.1:9999"]) == 0
    printed = capsys.readouterr().out
    token = printed.split("\n")[1].strip()
    assert f"Page: http://127.0.0.1:9999/?token={token}" in printed and store.authenticate(db, token) == "alice"
    assert cli(["annotators", "add", "alice", "--db", str(db)]) == 2
    assert "already exists" in capsys.readouterr().out
    assert cli(["label", "publish", "--db", str(db), "--preferences", str(prefs), "--batch", "b1"]) == 0
    # An error is one line a user can grep, however narrow the terminal and however long the path.
    monkeypatch.setenv("COLUMNS", "40")
    missing = tmp_path / ("a-long-folder-name-" * 6) / "nope.parquet"
    assert cli(["label", "publish", "--db", str(db), "--preferences", str(missing), "--batch", "b2"]) == 2
    error_lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("error:")]
    assert len(error_lines) == 1 and f"--preferences {missing}: cannot read Parquet" in error_lines[0], error_lines

    orders = iter(["ab", "ba", "ba"])
    monkeypatch.setattr(store, "_draw_order", lambda: next(orders))
    unsafe = {"safe": False, "harm_category": "Privacy Violation"}
    with thread_server(db) as url, client(url, token) as c:
        for better, left, right in [("left", SAFE, unsafe), ("tie", SAFE, SAFE), ("right", unsafe, SAFE)]:
            imp = c.get("/api/next").json()["item"]["impression_id"]
            assert c.post("/api/labels", json=label_body(imp, better, left, right)).status_code == 201
    assert cli(["label", "export", "--db", str(db), "--batch", "b1", "--out", str(out)]) == 0
    assert "wrote 3 labels of 3 pairs by 1 annotator(s)" in capsys.readouterr().out

    got = schemas.read_table(out, schemas.PREFERENCES).to_pylist()
    assert [(r["pair_id"], r["display_order"], r["better"], r["is_safe_a"], r["is_safe_b"], r["harm_category_a"],
             r["harm_category_b"], r["safer"]) for r in got] == [
        ("p0", "ab", 0, True, False, None, "Privacy Violation", 0),
        ("p1", "ba", -1, True, True, None, None, None),
        ("p2", "ba", 0, True, False, None, "Privacy Violation", 0),  # right = response_a when shown 'ba'
    ]
    assert {(r["annotator"], r["source"], r["weight"]) for r in got} == {("alice", "human", 1.0)}
    assert all(r["labeled_at"] is not None and r["judge_better"] is None for r in got)
    assert cli(["label", "export", "--db", str(db), "--batch", "zz", "--out", str(out)]) == 2
    assert "batch 'zz' does not exist" in capsys.readouterr().out
    assert cli(["annotators", "list", "--db", str(db)]) == 0
    assert "alice" in capsys.readouterr().out


# ---------------------------------------------------------------------------- load

def test_50_concurrent_annotators_store_exactly_1000_labels(tmp_path):
    db = store.init_db(tmp_path / "load.db")
    store.publish_batch(db, pairs(20), "load")
    tokens = {f"annotator-{i:02d}": store.add_annotator(db, f"annotator-{i:02d}") for i in range(50)}
    errors: list[str] = []
    start = threading.Barrier(50)

    def work(token: str) -> None:
        try:
            with client(url, token) as c:
                start.wait()
                while not (nxt := c.get("/api/next").json())["done"]:
                    body = label_body(nxt["item"]["impression_id"], "tie")
                    assert c.post("/api/labels", json=body).status_code == 201
                    if nxt["progress"]["labeled"] == 0:  # a client retrying a request that already landed
                        assert c.post("/api/labels", json=body).status_code == 409
                assert nxt["progress"] == {"labeled": 20, "skipped": 0, "remaining": 0, "total": 20}
        except Exception as e:  # noqa: BLE001 - a thread's failure must reach the test, not vanish
            errors.append(repr(e))

    with cli_server(db) as url:
        t0 = time.monotonic()
        threads = [threading.Thread(target=work, args=(tok,)) for tok in tokens.values()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        elapsed = time.monotonic() - t0
    assert not any(t.is_alive() for t in threads), "annotators still running after 120 s"
    assert not errors, errors[:3]
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*), COUNT(DISTINCT item_id || '/' || annotator) FROM labels").fetchone() \
            == (1000, 1000)
    table = store.export_labels(db, "load")
    assert table.num_rows == 1000
    assert Counter(table.column("annotator").to_pylist()) == {name: 20 for name in tokens}
    assert Counter(table.column("pair_id").to_pylist()) == {f"p{i}": 50 for i in range(20)}
    print(f"1,000 labels by 50 concurrent annotators in {elapsed:.1f} s")


# ---------------------------------------------------------------------------- fuzz

def test_fuzzed_api_never_answers_5xx_and_matches_its_openapi(tmp_path):
    """Schemathesis generates valid (positive) and invalid (negative) requests from /openapi.json."""
    db = store.init_db(tmp_path / "fuzz.db")
    store.publish_batch(db, pairs(50), "fuzz")
    auth = {"Authorization": f"Bearer {store.add_annotator(db, 'fuzzer')}"}
    store.next_item(db, "fuzzer")  # impression 1 is open, so generated labels and skips can land
    with thread_server(db) as url:
        # Loaded and driven here rather than by schemathesis' pytest plugin: its lazy fixture loader
        # breaks on pytest 9 (no Function._nodeid), and the schema needs the running server anyway.
        schema = schemathesis.openapi.from_url(url + "/openapi.json")
        cases = st.one_of([schema.as_strategy(generation_mode=mode) for mode in GenerationMode])

        @given(case=cases)
        @settings(max_examples=int(os.environ.get("LABELING_FUZZ_EXAMPLES", "300")), deadline=None,
                  database=None, suppress_health_check=list(HealthCheck))
        def conforms(case) -> None:
            # Checks that hold for every request: no 5xx; each status code, content type and body is
            # the documented one. (Not schemathesis' data acceptance checks: JSON Schema cannot say
            # that a harm category is required exactly when safe is false, it counts 1.0 as an
            # integer id, and unknown query parameters are ignored as HTTP APIs usually do.)
            case.call_and_validate(base_url=url, headers=auth, checks=CONFORMANCE)

        conforms()
