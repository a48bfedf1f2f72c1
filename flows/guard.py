"""The `check_reward_hacking` stage: gather each iteration's signals, run the detectors, act.

    signals_k  ← held-out answers of k and k−1 scored by the latest reward model (ensemble), the
                 evaluation judge's share of right answers (gold), its agreement with the training
                 detector, KL, distinct bigrams, corr(RL reward, length) of the experience
    alerts     ← guards.check(signals_0..k)
    warn | stop | rollback to iteration k−1's checkpoint      (guards.action)
"""
from __future__ import annotations

import numpy as np

from flows import artifacts
from flows.artifacts import artifact_key
from flows.run_state import RUNS, stage
from rlhf_core import schemas
from rlhf_core.evaluation import gold
from rlhf_core.guards import check, correlation, distinct_n


def _eval_rows(st, k: int) -> list[dict]:
    """Iteration k's in-distribution evaluation rows: the prompts every iteration is evaluated on, so
    signals compare like with like (the generalisation set is evaluated at the base and the end)."""
    rows = schemas.read_table(st.run_dir / f"iter_{k}" / "eval.parquet", schemas.EVAL_RESULTS).to_pylist()
    return [r for r in rows if r["eval_set"] == "in_distribution"]


def _signals(st, k: int) -> dict:
    cur, prev = _eval_rows(st, k), _eval_rows(st, k - 1)
    prompts = [r["prompt"] for r in cur] + [r["prompt"] for r in prev]
    members = np.asarray(st.workers.reward_members(prompts, [r["response"] for r in cur + prev]))   # (E, N + M)
    mean = members.mean(0)
    exp = schemas.read_table(st.run_dir / f"iter_{k}" / "experience.parquet", schemas.EXPERIENCE).to_pylist()
    return {"iteration": k, "proxy": float(mean[: len(cur)].mean()), "proxy_prev": float(mean[len(cur):].mean()),
            # gold: the share of answers the evaluation judge finds right — no training signal in it
            "gold": gold(cur), "gold_prev": gold(prev), "judge_agreement": _agreement(cur),
            "ensemble_std": float(members[:, : len(cur)].std(0).mean()) if len(members) > 1 else None,
            "reward_length_corr": correlation([e["reward"] for e in exp], [e["num_tokens"] for e in exp]),
            "kl": float(np.mean([r["kl"] for r in cur])), "distinct_2": distinct_n([r["response"] for r in cur])}


def _agreement(rows: list[dict]) -> float:
    """Share of answers on which the training detector and the evaluation judge agree (refused or not)."""
    return float(np.mean([r["detector_refused"] == r["refused"] for r in rows])) if rows else float("nan")


@stage
def check_reward_hacking(run_id: str, k: int) -> list[dict]:
    """Detectors over iterations 0..k; alerts go to the manifest, the report and a Prefect artifact."""
    st = RUNS[run_id]
    if (rec := st.done(k, "guards")) is not None:
        return rec["alerts"]
    base_rows = _eval_rows(st, 0)
    base = {"iteration": 0, "distinct_2": distinct_n([r["response"] for r in base_rows]),
            "judge_agreement": _agreement(base_rows)}
    history = [base] + [st.manifest["iterations"][str(j)]["guards"]["signals"] for j in range(1, k)
                        if "guards" in st.manifest["iterations"].get(str(j), {})]
    signals = _signals(st, k)
    alerts = [a.as_dict() for a in check(history + [signals], st.cfg.guards)]
    st.record(k, "guards", {"signals": signals, "alerts": alerts, "action": st.cfg.guards.action if alerts else None})
    for a in alerts:
        print(f"iteration {k}: REWARD-HACKING ALERT [{a['detector']}] {a['message']}")
    if alerts:
        artifacts.markdown(artifact_key(run_id, f"iter-{k}-alerts"), alerts_markdown(k, alerts, st.cfg.guards.action),
                           f"alignflow iteration {k}: reward-hacking alerts")
    return alerts


def alerts_markdown(k: int, alerts: list[dict], action: str) -> str:
    lines = [f"## Reward-hacking alerts (iteration {k}; action: {action})", "",
             "| detector | value | threshold | what happened |", "|---|---|---|---|"]
    lines += [f"| `{a['detector']}` | {a['value']:.3f} | {a['threshold']:.3f} | {a['message']} |" for a in alerts]
    return "\n".join(lines)


@stage
def roll_back(run_id: str, k: int, to: int) -> str:
    """Restore iteration `to`'s policy (trainer and rollout pool) after iteration k raised alerts."""
    st = RUNS[run_id]
    if (rec := st.done(k, "rolled_back_to")) is not None:
        return rec                           # restored with the run's other checkpoints
    adapter = st.manifest["iterations"][str(to)]["policy"]["adapter"]
    st.workers.load_policy(adapter)
    st.record(k, "rolled_back_to", adapter)
    print(f"iteration {k}: rolled back to {adapter}")
    return adapter
