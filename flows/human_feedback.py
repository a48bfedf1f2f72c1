"""The `collect_human_feedback` stage: people label some of an iteration's pairs on the labeling page.

    pairs      ← the simulated preferences of this iteration
    batch      ← publish(select(pairs))                 # uncertainty under the last reward model, or random
    wait until batch has min_labels, or the deadline    # the page is served meanwhile; live progress artifact
    at the deadline: fail, or keep the simulated label of every pair nobody labeled
    preferences← human labels ∪ simulated labels of the other pairs, weighted by source

Writes iter_<k>/human_labels.parquet (every person's label, as given) and
iter_<k>/mixed_preferences.parquet (what the reward model trains on); preferences.parquet keeps the
simulated labels, so the manifest can say exactly whose judgement the model learned.
"""
from __future__ import annotations

import socket
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

from flows import artifacts
from flows.run_state import RUNS, stage
from labeling import store
from labeling.serving import serve_in_thread
from rlhf_core import schemas
from rlhf_core.active import select_pairs
from rlhf_core.agreement import agreement_report
from rlhf_core.config import AlignflowConfig
from rlhf_core.feedback import mix_feedback


class HumanFeedbackError(RuntimeError):
    """People's labels could not be collected as configured (the message says why and what to do)."""


def check_ready(cfg: AlignflowConfig) -> None:
    """Before any compute: the database exists, has annotators, and the page's port is free.

    Raises HumanFeedbackError naming the config key.
    """
    h = cfg.feedback.human
    if not h.enabled:
        return
    db = Path(h.db)
    if not db.is_file():
        raise HumanFeedbackError(f"feedback.human.db: {db} does not exist; register annotators first with "
                                 f"`alignflow annotators add NAME --db {db}`")
    try:
        store.init_db(db)
        people = store.list_annotators(db)
    except Exception as e:  # noqa: BLE001 - any failure to read it is a bad database path
        raise HumanFeedbackError(f"feedback.human.db: {db} is not a labeling database: {e}") from e
    if not people:
        raise HumanFeedbackError(f"feedback.human.db: {db} has no annotators; add one with "
                                 f"`alignflow annotators add NAME --db {db}`")
    if h.serve and h.port != 0:
        with socket.socket() as s:
            try:
                s.bind((h.host, h.port))
            except OSError as e:
                raise HumanFeedbackError(f"feedback.human.port: cannot serve the labeling page on {h.host}:{h.port} "
                                         f"({e.strerror}); choose another port, or serve=false if "
                                         "`alignflow label serve` already runs there") from e


def _select(st, k: int, pairs: list[dict]) -> tuple[list[dict], str]:
    """The pairs people should see, and the strategy that chose them."""
    h = st.cfg.feedback.human
    n = min(h.pairs, len(pairs))
    seed = st.cfg.run.seed * 31 + k
    if h.selection != "random" and k > 1:
        # The reward-model actor still holds the previous iteration's model(s) at this point.
        texts = [p["prompt"] for p in pairs]
        members = np.asarray(st.workers.reward_members(texts + texts, [p["response_a"] for p in pairs]
                                                       + [p["response_b"] for p in pairs]))   # (E, 2N)
        idx = select_pairs(members[:, : len(pairs)], members[:, len(pairs):], n, h.selection, seed=seed)
        return [pairs[i] for i in idx], h.selection
    zeros = np.zeros(len(pairs))
    return [pairs[i] for i in select_pairs(zeros, zeros, n, "random", seed=seed)], "random"


def _wait(st, k: int, batch_id: str, need: int, deadline: datetime, url: str) -> None:
    """Poll the batch until `need` labels or the deadline; mirror progress in the terminal and the UI."""
    h = st.cfg.feedback.human
    key = artifacts.artifact_key(st.run_id, f"iter-{k}-human-labels")
    artifacts.link(key + "-page", url, "Open the labeling page",
                   f"iteration {k}: {need} labels wanted by {deadline:%Y-%m-%d %H:%M} UTC (batch {batch_id})")
    bar = artifacts.progress(key, 0.0, f"iteration {k}: human labels of batch {batch_id}")
    print(f"iteration {k}: waiting for {need} human labels on {url} (batch {batch_id}) "
          f"until {deadline:%H:%M:%S} UTC")
    seen = 0
    with st.progress.task(f"iter {k}: human labels", need) as adv:
        while True:
            p = store.progress(h.db, batch_id)
            if p["labels"] > seen:
                adv(min(p["labels"], need) - min(seen, need))
                seen = p["labels"]
                artifacts.update_progress(bar, 100.0 * seen / need,
                                          f"iteration {k}: {seen}/{need} human labels of batch {batch_id}")
            if seen >= need or datetime.now(UTC) >= deadline:
                return
            time.sleep(min(h.poll_seconds, max(0.0, (deadline - datetime.now(UTC)).total_seconds())))


@stage
def collect_human_feedback(run_id: str, k: int, preferences_path: str) -> str:
    """Publish pairs to people, wait for their labels, mix them with the simulated ones."""
    st = RUNS[run_id]
    if (rec := st.done(k, "human_feedback")) is not None and rec["status"] == "completed":
        return rec["path"]
    h, d = st.cfg.feedback.human, st.iter_dir(k)
    simulated = schemas.read_table(preferences_path, schemas.PREFERENCES).to_pylist()
    chosen, strategy = _select(st, k, simulated)
    batch_id = f"{run_id}-iter{k}"
    t0 = datetime.now(UTC)
    deadline = t0 + timedelta(minutes=h.deadline_minutes)
    try:
        store.publish_batch(h.db, chosen, batch_id, target_labels=h.labels_per_pair, deadline=deadline)
    except store.Conflict:   # published before an interruption (`alignflow resume`): its labels count
        print(f"iteration {k}: batch {batch_id} was published before the interruption; waiting on it again")
    need = h.min_labels or len(chosen) * h.labels_per_pair
    if h.serve:
        from labeling.app import create_app
        with serve_in_thread(create_app(h.db), h.host, h.port) as served:
            _wait(st, k, batch_id, need, deadline, h.url or served + "/")
    else:
        _wait(st, k, batch_id, need, deadline, h.url or f"http://{h.host}:{h.port}/")
    store.close_batch(h.db, batch_id)  # labels arriving after this point would be ignored anyway
    p = store.progress(h.db, batch_id)  # final counts: labels may have come in since the last poll
    human = store.export_labels(h.db, batch_id)
    hpath = schemas.write_table(human, d / "human_labels.parquet", schemas.PREFERENCES)
    human = human.to_pylist()
    waited = (datetime.now(UTC) - t0).total_seconds()
    record = {"batch_id": batch_id, "db": str(Path(h.db).resolve()), "selection": strategy,
              "published_pairs": len(chosen), "labels_wanted": need, "labels": len(human),
              "annotators": p["annotators"], "skipped": p["skipped"], "waited_s": round(waited, 1),
              "deadline_reached": len(human) < need, "human_labels": str(hpath),
              "human_labels_sha256": schemas.file_sha256(hpath)}
    if len(human) < need and h.on_deadline == "fail":
        st.record(k, "human_feedback", dict(record, status="failed"))
        raise HumanFeedbackError(
            f"iteration {k}: {len(human)} of {need} human labels by the deadline ({h.deadline_minutes:g} min; "
            f"batch {batch_id} in {h.db}). The labels given are in {hpath}. Raise feedback.human.deadline_minutes, "
            "lower feedback.human.min_labels, or set feedback.human.on_deadline=simulate.")
    rows, provenance = mix_feedback(simulated, human, st.cfg.feedback.source_weights)
    path = schemas.write_table(schemas.from_rows(rows, schemas.PREFERENCES), d / "mixed_preferences.parquet",
                               schemas.PREFERENCES)
    if any(n > 1 for n in Counter(r["pair_id"] for r in human).values()):
        provenance["agreement"] = agreement_report(human)
    st.record(k, "human_feedback", dict(record, status="completed", path=str(path),
                                        sha256=schemas.file_sha256(path), provenance=provenance))
    print(f"iteration {k}: {len(human)} human labels from {len(p['annotators'])} annotator(s) on "
          f"{provenance['pairs']['human']} pairs; {provenance['pairs']['simulated_only']} pairs keep simulated labels")
    return str(path)

