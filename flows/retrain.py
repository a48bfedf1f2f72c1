"""The `retrain` flow: the scheduled job that keeps the production policy learning from people.

    new          ← labels in feedback.human.db after the watermark   # only what arrived since the last retrain
    if fewer than retrain.min_new_labels: finish (skipped)           # no Ray, no model loaded
    policy       ← the production policy (or the base model if none is in production yet)
    reward_model ← train on the new labels, warm-started from production's reward model
    policy'      ← PPO against it, from the production policy
    evaluate(policy'); register it with its lineage; gate; promote if it passes
    watermark    ← the newest label used                             # the next run starts after it

A seeded, deterministic job: deploy it with `deploy/prefect.yaml` (weekly cron, process work pool).
"""
from __future__ import annotations

import os
from pathlib import Path

from prefect import flow

from labeling import store
from rlhf_core.config import load_config
from rlhf_core.registry import Registry


class RetrainError(RuntimeError):
    pass


def _record_labels(st, labels) -> Path:
    """The new labels as iteration 1's preferences, recorded with their annotators (lineage)."""
    from collections import Counter

    from rlhf_core import schemas
    path = schemas.write_table(labels, st.iter_dir(1) / "human_labels.parquet", schemas.PREFERENCES)
    sha = schemas.file_sha256(path)
    per_person = Counter(r["annotator"] for r in labels.to_pylist())
    st.record(1, "preferences", {"path": str(path), "sha256": sha, "annotator": "human", "count": labels.num_rows})
    st.record(1, "human_feedback", {"status": "completed", "labels": labels.num_rows, "human_labels": str(path),
                                    "human_labels_sha256": sha, "annotators": dict(sorted(per_person.items()))})
    return path


@flow(name="alignflow_retrain", log_prints=True)
def retrain(config_path: str | None = None, overrides: list[str] | None = None,
            show_progress: bool | None = False) -> dict:
    """Retrain on the feedback that arrived since the last retrain, from the production policy."""
    cfg = load_config(config_path, list(overrides or []))
    db = cfg.feedback.human.db
    if not db:
        raise RetrainError("retrain learns from people's labels: set feedback.human.db to the labeling database")
    source = str(Path(db).resolve())
    registry = Registry(cfg.registry_path())
    after = registry.watermark(source)
    labels, newest = store.export_labels_after(db, after) if os.path.exists(db) else (None, after)
    n = 0 if labels is None else labels.num_rows
    if n < cfg.retrain.min_new_labels:
        print(f"retrain: {n} new label(s) in {db} since label id {after}; retrain.min_new_labels is "
              f"{cfg.retrain.min_new_labels}: nothing to do until more arrive")
        return {"status": "skipped", "new_labels": n, "watermark": after}

    # only now the heavy imports (torch, Ray, transformers): a skipped run stays a second
    from flows.pipeline import (
        evaluate,
        managed_run,
        register_policy,
        start_workers,
        train_reward_model,
        update_policy,
        write_report,
    )
    from flows.report import retrain_markdown

    parent = registry.production()
    cfg.run.name, cfg.run.iterations = "retrain", 1
    cfg.feedback.human.enabled = False       # the labels are already here; nobody is waited for
    with managed_run(cfg, None, show_progress, "alignflow_retrain") as st:
        st.manifest["retrain"] = {"parent": parent["version"] if parent else None, "source": source,
                                  "labels_after_id": after, "labels_up_to_id": newest, "new_labels": n}
        path = _record_labels(st, labels)
        if parent and parent["lineage"].get("reward_model"):
            # train_reward_model warm-starts from iter_0/reward_model: production's, linked in
            st.iter_dir(0).joinpath("reward_model").symlink_to(Path(parent["lineage"]["reward_model"]).resolve())
        start_workers(st.run_id)
        results = {0: parent["metrics"]} if parent else {0: evaluate(st.run_id, 0)}
        if parent:
            st.workers.load_policy(parent["lineage"]["adapter"])
            print(f"retrain: from production policy {parent['version']}")
        else:
            print("retrain: no production policy in the registry yet; starting from the base model")
        train_reward_model(st.run_id, 1, str(path))
        update_policy(st.run_id, 1)
        results[1] = evaluate(st.run_id, 1)
        st.manifest["final"] = {"metrics": results[1], "base": results[0], "iteration": 1,
                                "adapter": st.manifest["iterations"]["1"]["policy"]["adapter"]}
        st.manifest["status"] = "completed"
        st.save_manifest()
        entry = register_policy(st.run_id, 1)
        registry.set_watermark(source, newest, st.run_id)
        write_report(st, retrain_markdown(st, results, st.manifest["retrain"]["parent"], entry),
                     "alignflow retrain report")
        print(f"retrain: {n} new labels used (ids {after + 1}..{newest}); {entry['version']} is {entry['stage']}")
        return {"status": "completed", "run_id": st.run_id, "run_dir": str(st.run_dir), "new_labels": n,
                "parent": parent["version"] if parent else None, "version": entry["version"],
                "stage": entry["stage"], "results": results}
