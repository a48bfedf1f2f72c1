"""People's labels in the loop: mixing with simulated labels, the `collect_human_feedback` stage's
wait / deadline / fail behaviour against the real labeling server, and its checks before compute."""
import socket
import threading
import time
from pathlib import Path

import pytest
from labelers import label_via_http

from flows.human_feedback import HumanFeedbackError, check_ready, collect_human_feedback
from flows.progress import ProgressUI
from flows.run_state import RUNS, RunState
from labeling import store
from labeling.app import create_app
from labeling.serving import serve_in_thread
from rlhf_core import schemas
from rlhf_core.config import ConfigError
from rlhf_core.feedback import mix_feedback


def _simulated(n: int) -> list[dict]:
    return [{"pair_id": f"p{i}-1-0-1", "prompt_id": f"p{i}", "prompt": f"question {i}?",
             "response_a": f"answer A{i}", "response_b": f"answer B{i}", "better": i % 2, "judge_better": i % 2,
             "flipped": False, "score_a": 0.5, "score_b": 0.1, "is_safe_a": True, "is_safe_b": True,
             "annotator": "constitution-judge-v1/flip0.25/seed0", "source": "simulated", "weight": 1.0}
            for i in range(n)]


def _human(pair: dict, who: str, better: int) -> dict:
    return {k: pair[k] for k in ("pair_id", "prompt_id", "prompt", "response_a", "response_b")} | {
        "better": better, "is_safe_a": True, "is_safe_b": better != 0, "annotator": who, "source": "human",
        "display_order": "ba", "weight": 1.0}


def test_mix_feedback_replaces_labeled_pairs_and_weighs_by_source():
    sim = _simulated(4)
    human = [_human(sim[1], "ann", 1), _human(sim[1], "bob", 0), _human(sim[2], "ann", 0)]
    rows, prov = mix_feedback(sim, human, {"simulated": 0.5, "human": 2.0})
    assert sorted(r["pair_id"] for r in rows if r["source"] == "simulated") == [sim[0]["pair_id"], sim[3]["pair_id"]]
    assert [r["annotator"] for r in rows if r["source"] == "human"] == ["ann", "bob", "ann"]
    assert {r["source"]: r["weight"] for r in rows} == {"simulated": 0.5, "human": 2.0}
    # a person's row keeps the judge's view of the pair (for accuracy-vs-judge), never a flip flag
    h = next(r for r in rows if r["annotator"] == "bob")
    assert h["judge_better"] == 1 and h["score_a"] == 0.5 and h["flipped"] is None and h["display_order"] == "ba"
    assert prov["rows"] == {"human": 3, "simulated": 2} and prov["pairs"] == {"human": 2, "simulated_only": 2}
    assert prov["human_labels_per_annotator"] == {"ann": 2, "bob": 1}
    assert prov["human_agrees_with_judge"] == pytest.approx(2 / 3)   # judge: pair 1 → b, pair 2 → a
    schemas.from_rows(rows, schemas.PREFERENCES)
    with pytest.raises(ValueError, match="not in this iteration's pairs"):
        mix_feedback(sim[:1], human, {})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def run(tmp_path, tiny_config):
    """A run with 6 simulated pairs in iteration 1 and a labeling database with two annotators."""
    db = tmp_path / "labels.db"
    store.init_db(db)
    tokens = {name: store.add_annotator(db, name) for name in ("ann", "bob")}

    def make(*overrides):
        cfg = tiny_config("feedback.human.enabled=true", f"feedback.human.db={db}", "feedback.human.poll_seconds=0.1",
                          *overrides)
        st = RunState(run_id=f"hf-{len(RUNS)}-{time.time_ns()}", run_dir=tmp_path / "run", cfg=cfg)
        st.progress = ProgressUI(False)
        RUNS[st.run_id] = st
        path = schemas.write_table(schemas.from_rows(_simulated(6), schemas.PREFERENCES),
                                   st.iter_dir(1) / "preferences.parquet", schemas.PREFERENCES)
        return st, str(path)

    yield make, db, tokens
    for key in [k for k in RUNS if k.startswith("hf-")]:
        RUNS.pop(key)


def test_stage_waits_for_labels_then_mixes(run):
    """serve=false: the page runs elsewhere (here: this test's server); the stage only polls the database."""
    make, db, tokens = run
    st, prefs = make("feedback.human.serve=false", "feedback.human.pairs=4", "feedback.human.min_labels=3",
                     "feedback.human.deadline_minutes=2", "feedback.source_weights.human=3")
    stop = threading.Event()
    with serve_in_thread(create_app(db)) as url:
        worker = threading.Thread(target=label_via_http, args=(url, tokens["ann"], stop, 3))
        worker.start()
        t0 = time.monotonic()
        out = collect_human_feedback.fn(st.run_id, 1, prefs)
        stop.set()
        worker.join(10)
    assert time.monotonic() - t0 < 60, "the stage must stop waiting once min_labels arrived"
    rows = schemas.read_table(out, schemas.PREFERENCES).to_pylist()
    human = [r for r in rows if r["source"] == "human"]
    assert len(human) == 3 and all(r["annotator"] == "ann" and r["weight"] == 3.0 for r in human)
    assert len(rows) == 3 + 3 and {r["pair_id"] for r in rows} == {p["pair_id"] for p in _simulated(6)}
    rec = st.manifest["iterations"]["1"]["human_feedback"]
    assert rec["status"] == "completed" and rec["selection"] == "random" and rec["published_pairs"] == 4
    assert rec["labels"] == 3 and not rec["deadline_reached"] and rec["provenance"]["pairs"]["human"] == 3
    assert Path(rec["human_labels"]).exists() and Path(st.run_dir / "iter_1" / "preferences.parquet").exists()
    p = store.progress(db, rec["batch_id"])
    assert p["closed"], "the batch closes once the stage has what it needs"


def test_deadline_fails_clearly_or_fills_with_simulated_labels(run):
    make, db, tokens = run
    st, prefs = make("feedback.human.on_deadline=fail", "feedback.human.deadline_minutes=0.02",
                     f"feedback.human.port={_free_port()}")
    with pytest.raises(HumanFeedbackError, match=r"0 of 6 human labels by the deadline.*on_deadline=simulate"):
        collect_human_feedback.fn(st.run_id, 1, prefs)
    assert st.manifest["iterations"]["1"]["human_feedback"]["status"] == "failed"
    assert not (st.run_dir / "iter_1" / "mixed_preferences.parquet").exists()

    # simulate: the page is served by the stage itself; one person labels one pair before the deadline
    port = _free_port()
    st, prefs = make("feedback.human.on_deadline=simulate", "feedback.human.deadline_minutes=0.1",
                     f"feedback.human.port={port}", "feedback.human.labels_per_pair=2")
    stop = threading.Event()

    # the stage starts the server; the annotator retries until it listens
    worker = threading.Thread(target=label_via_http, args=(f"http://127.0.0.1:{port}", tokens["bob"], stop, 1))
    worker.start()
    out = collect_human_feedback.fn(st.run_id, 1, prefs)
    stop.set()
    worker.join(10)
    rows = schemas.read_table(out, schemas.PREFERENCES).to_pylist()
    assert [r["source"] for r in rows].count("human") == 1 and len(rows) == 6
    rec = st.manifest["iterations"]["1"]["human_feedback"]
    assert rec["deadline_reached"] and rec["labels_wanted"] == 12 and rec["annotators"] == {"bob": 1}


def test_checks_before_any_compute(tmp_path, tiny_config, run):
    _, db, _ = run
    with pytest.raises(ConfigError, match=r"feedback\.human.*db: required when enabled"):
        tiny_config("feedback.human.enabled=true")
    with pytest.raises(ConfigError, match=r"unknown source 'people'"):
        tiny_config("feedback.source_weights.people=1")
    missing = tmp_path / "nope.db"
    with pytest.raises(HumanFeedbackError, match=rf"feedback.human.db: {missing} does not exist"):
        check_ready(tiny_config("feedback.human.enabled=true", f"feedback.human.db={missing}"))
    empty = tmp_path / "empty.db"
    store.init_db(empty)
    with pytest.raises(HumanFeedbackError, match="has no annotators"):
        check_ready(tiny_config("feedback.human.enabled=true", f"feedback.human.db={empty}"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(HumanFeedbackError, match=f"feedback.human.port: cannot serve .*127.0.0.1:{port}"):
            check_ready(tiny_config("feedback.human.enabled=true", f"feedback.human.db={db}",
                                    f"feedback.human.port={port}"))
    check_ready(tiny_config("feedback.human.enabled=true", f"feedback.human.db={db}", "feedback.human.port=0"))
