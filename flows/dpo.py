"""The `alignflow_dpo` flow: offline preference optimisation from a preference file.

    prompts      ← prepare(config)                      # the held-out split, validated first
    pairs        ← read(preferences) minus held-out prompts and ties
    evaluate(base)                                      # iteration 0
    adapter      ← DPO / IPO / cDPO on the pairs        # reference log-probs once, cached
    evaluate(adapter)                                   # iteration 1: same held-out sets as `run`

The same actors and evaluation as `rlhf_pipeline`, so the before/after table compares directly.
"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
from prefect import flow

from flows import report
from flows.pipeline import evaluate, managed_run, start_workers, write_report
from flows.run_state import RUNS, stage
from rlhf_core import schemas
from rlhf_core.dpo import preference_pairs
from rlhf_core.models import cache_dir


def read_pairs(path: str | Path) -> list[dict]:
    """Preference rows from a Parquet file, validated (SchemaError names the file and column)."""
    try:
        return schemas.read_table(path, schemas.PREFERENCES).to_pylist()
    except schemas.SchemaError:
        raise
    except (OSError, pa.ArrowException) as e:
        raise schemas.SchemaError(f"{path}: cannot read a preference Parquet file: {e}") from e


@stage
def train_dpo(run_id: str, preferences_path: str) -> dict:
    """DPO-family training of the policy adapter on the file's pairs (held-out prompts removed)."""
    st = RUNS[run_id]
    rows = read_pairs(preferences_path)
    held_out = {r["prompt"] for r in st.prompts if r["split"] == "eval"}
    train = [r for r in rows if r["prompt"] not in held_out]
    prompts, chosen, rejected, ties = preference_pairs(train)
    if len(prompts) < 2:
        raise ValueError(f"{preferences_path}: {len(prompts)} usable pairs after removing {len(rows) - len(train)} "
                         f"with held-out prompts and {ties} ties; DPO needs at least 2")
    d = st.cfg.dpo
    steps = d.epochs * -(-len(prompts) // d.batch_size)
    cache = cache_dir() / "dpo_reference" / f"{Path(st.manifest['models']['policy']).name}.parquet"
    with st.progress.task(f"{d.loss}: reference log-probs", len(prompts)) as ref_adv, \
            st.progress.task(f"{d.loss}: train", steps) as adv:
        metrics = st.workers.dpo(prompts, chosen, rejected, cache=str(cache), model_id=st.manifest["models"]["policy"],
                                 progress_ref=ref_adv, progress=adv)
    dest = st.iter_dir(1) / "policy_adapter"
    adapter = st.workers.save_policy(str(dest))
    metrics.update(loss_name=d.loss, beta=d.beta, label_smoothing=d.label_smoothing, adapter=adapter,
                   preferences=str(preferences_path), preferences_sha256=schemas.file_sha256(preferences_path),
                   dropped_heldout_prompts=len(rows) - len(train), dropped_ties=ties, reference_cache=str(cache))
    st.record(1, "dpo", metrics)
    print(f"{d.loss}: {metrics['steps']} steps on {len(prompts)} pairs, loss {metrics['loss_first_epoch']:.3f} → "
          f"{metrics['loss_last_epoch']:.3f}, implicit-reward accuracy {metrics['reward_accuracy_last_epoch']:.2f}")
    return metrics


@flow(name="alignflow_dpo", log_prints=True)
def dpo_flow(cfg, run_id: str | None = None, show_progress: bool | None = None) -> dict:
    """Evaluate the base, train the adapter by DPO/IPO on `dpo.preferences`, evaluate again."""
    if not cfg.dpo.preferences:
        raise ValueError("dpo.preferences: no preference file given (alignflow dpo --preferences FILE)")
    read_pairs(cfg.dpo.preferences)      # a bad file fails here, before any actor starts
    # The CLI prepares (validates) the run before Prefect starts; a direct call prepares it here.
    with managed_run(cfg, run_id, show_progress, "alignflow_dpo") as st:
        start_workers(st.run_id)
        results = {0: evaluate(st.run_id, 0)}
        train_dpo(st.run_id, cfg.dpo.preferences)
        results[1] = evaluate(st.run_id, 1, use_adapter=True, with_reward_model=False)
        write_report(st, report.final_markdown(st, results), "alignflow DPO report")
        st.manifest.update(status="completed", final={"metrics": results[1], "base": results[0],
                                                      "adapter": st.manifest["iterations"]["1"]["dpo"]["adapter"]})
        st.save_manifest()
        return {"run_id": st.run_id, "run_dir": str(st.run_dir), "results": results}
