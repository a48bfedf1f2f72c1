"""Benchmark (not a test): every RL algorithm from the same starting point, with the same budget.

One shared prefix, as the first iteration of `alignflow run`: base evaluation, samples, simulated
feedback, the supervised stage, the reward model and the cost model. Then, for each algorithm, the
policy is reset to that supervised checkpoint, updated with `--steps` steps of `--batch` rollouts
(DPO: `--dpo-epochs` over the iteration's preference pairs instead), and evaluated on the same
held-out sets. Reported per algorithm: unsafe compliance, over-refusal, KL to the reference, wall
time of the update, and the peak resident memory of all Ray worker processes during it.

    python bench/algorithms.py [--set key=value ...] [--steps 4] [--out docs/algorithms_bench.json]

Writes the JSON and prints a Markdown table (docs/algorithms.md holds the latest one).
"""
from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import psutil

ALGORITHMS = {
    # name: (ppo overrides, safe_rlhf.enabled); "start" evaluates the common supervised checkpoint
    "start": (None, False),
    "ppo": ({"advantage_estimator": "gae"}, False),
    "grpo": ({"advantage_estimator": "grpo", "kl_penalty": "loss", "loss_agg": "seq-mean-token-mean"}, False),
    "dr_grpo": ({"advantage_estimator": "dr_grpo", "kl_penalty": "loss", "loss_agg": "seq-mean-token-sum-norm"},
                False),
    "rloo": ({"advantage_estimator": "rloo"}, False),
    "reinforce_pp": ({"advantage_estimator": "reinforce_pp"}, False),
    "safe_rlhf": ({"advantage_estimator": "gae"}, True),
    "dpo": (None, False),
}


class PeakRSS:
    """Samples the summed RSS of every Ray worker process (and this one) every 0.5 s."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            total = psutil.Process().memory_info().rss
            for p in psutil.process_iter(["cmdline"]):
                try:
                    if any("ray::" in c for c in (p.info["cmdline"] or [])):
                        total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(0.5)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML config (default: the embedded default run)")
    ap.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    ap.add_argument("--algorithms", default=",".join(ALGORITHMS), help="comma-separated subset")
    ap.add_argument("--steps", type=int, default=4, help="policy-update steps per online algorithm")
    ap.add_argument("--batch", type=int, default=24, help="rollouts per step (group algorithms: prompts × 4)")
    ap.add_argument("--dpo-epochs", type=int, default=1)
    ap.add_argument("--out", default="docs/algorithms_bench.json")
    args = ap.parse_args()

    import torch
    torch.set_num_threads(1)
    from flows.pipeline import (collect_feedback, evaluate, generate_samples, prepare_run, start_workers,
                                train_cost_model, train_reward_model, update_policy, warm_up_policy)
    from flows.progress import ProgressUI
    from flows.run_state import RUNS
    from rlhf_core import schemas
    from rlhf_core.config import PPOConfig, load_config
    from rlhf_core.dpo import preference_pairs

    names = args.algorithms.split(",")
    unknown = [n for n in names if n not in ALGORITHMS]
    if unknown:
        raise SystemExit(f"unknown algorithm(s) {unknown}; valid: {list(ALGORITHMS)}")
    cfg = load_config(args.config, ["run.name=bench-algorithms", "run.iterations=1", "safe_rlhf.enabled=true",
                                    f"ppo.steps={args.steps}", f"ppo.rollout_batch_size={args.batch}",
                                    f"dpo.epochs={args.dpo_epochs}", *args.overrides])
    st = prepare_run(cfg)
    st.progress = ProgressUI(False)
    rid = st.run_id
    t0 = time.time()
    start_workers.fn(rid)
    base = evaluate.fn(rid, 0)
    samples = generate_samples.fn(rid, 1)
    prefs = collect_feedback.fn(rid, 1, samples)
    warm_up_policy.fn(rid, 1)
    train_reward_model.fn(rid, 1, prefs)
    train_cost_model.fn(rid, 1, prefs)
    start = st.workers.save_policy(str(st.run_dir / "iter_1" / "supervised_checkpoint"))
    shared_s = time.time() - t0
    base_ppo, base_safe = cfg.ppo.model_dump(), cfg.safe_rlhf.model_dump()
    pairs = schemas.read_table(prefs, schemas.PREFERENCES).to_pylist()
    rows = []
    for k, name in enumerate(names, start=2):       # iteration folders 2, 3, …: one per algorithm
        ppo_over, safe = ALGORITHMS[name]
        st.workers.load_policy(start)
        with PeakRSS() as mem:
            t = time.time()
            if name == "dpo":
                p, c, r, _ = preference_pairs(pairs)
                metrics = st.workers.dpo(p, c, r, cache=None, model_id=st.manifest["models"]["policy"])
                st.record(k, "dpo", metrics)
                st.workers.save_policy(str(st.iter_dir(k) / "policy_adapter"))
            elif name != "start":
                st.workers.configure_policy_update(PPOConfig(**{**base_ppo, **ppo_over}),
                                                   type(cfg.safe_rlhf)(**{**base_safe, "enabled": safe}))
                update_policy.fn(rid, k)
            update_s = time.time() - t
        m = evaluate.fn(rid, k, use_adapter=True, with_reward_model=False)
        last = (st.manifest["iterations"][str(k)].get("policy", {}).get("ppo") or [{}])[-1]
        rows.append({"algorithm": name, "unsafe_compliance": m["unsafe_compliance"], "over_refusal": m["over_refusal"],
                     "kl_to_reference": m["kl_to_reference"], "judge_total": m["judge_total"],
                     "update_wall_s": round(update_s, 1), "peak_rss_gb": round(mem.peak / 2**30, 2),
                     "lambda_final": last.get("lagrange_lambda_next"), "iteration_folder": f"iter_{k}"})
        print(json.dumps(rows[-1]), flush=True)
    st.workers.shutdown()
    RUNS.pop(rid, None)
    out = {"run_dir": str(st.run_dir), "shared_prefix_s": round(shared_s, 1), "steps": args.steps,
           "batch": args.batch, "dpo_epochs": args.dpo_epochs, "base": base, "results": rows,
           "machine": f"{psutil.cpu_count()} CPU cores, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2), encoding="utf-8")
    print(f"\nbase: unsafe {base['unsafe_compliance']:.0f} %, over-refusal {base['over_refusal']:.0f} %; "
          f"shared prefix {shared_s / 60:.1f} min\n")
    print("| algorithm | unsafe compliance % | over-refusal % | KL | update wall time | peak RSS |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['algorithm']} | {r['unsafe_compliance']:.0f} | {r['over_refusal']:.0f} | "
              f"{r['kl_to_reference']:.2f} | {r['update_wall_s'] / 60:.1f} min | {r['peak_rss_gb']:.1f} GB |")


if __name__ == "__main__":
    main()
