"""Benchmark (not a test): PPO updates on 1 policy trainer actor vs K data-parallel ranks.

The same rollout batch (generated once, sampled, from the default model), the same scores and
seed; LoRA dropout is 0, so both take the same steps (the losses are printed to show it). One actor
uses `--threads` torch threads; each of the K ranks uses threads // K (the cores are shared).
Only `ppo_step` is timed: old/reference log-probs and values, then the minibatch updates.

    python bench/policy_data_parallel.py [--prompts 24] [--steps 2] [--ranks 2] [--out bench_policy_dp.json]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import ray

from rlhf_core.config import load_config
from rlhf_core.models import resolve_model_path
from rlhf_core.policy import Policy
from rlhf_core.prompts import build_prompt_table
from workers.actors import PolicyTrainerActor
from workers.cluster import init_ray, start_trainer_ranks, stop_trainer_ranks


def _time_updates(cfg, model: str, batch: dict, scores: list[float], steps: int) -> tuple[float, list[dict]]:
    r = cfg.resources
    ranks, placement = start_trainer_ranks(
        PolicyTrainerActor, r.policy_trainers,
        (model, cfg.policy, cfg.ppo, "cpu", r.torch_threads, cfg.run.seed, cfg.safe_rlhf), r, 3600, "policy")
    try:
        ray.get([t.__ray_ready__.remote() for t in ranks])
        ref = ray.put(batch)
        t0 = time.perf_counter()
        history = [ray.get([t.ppo_step.remote(ref, scores, None) for t in ranks])[0] for _ in range(steps)]
        return time.perf_counter() - t0, history
    finally:
        stop_trainer_ranks(ranks, placement)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=24, help="rollout batch (the default run's ppo.rollout_batch_size)")
    ap.add_argument("--steps", type=int, default=2, help="PPO updates timed on the batch")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench_policy_data_parallel.json")
    args = ap.parse_args()
    base = load_config(None, [])
    model = resolve_model_path(base.policy.model)
    rows = [r for r in build_prompt_table(base.data).to_pylist() if r["split"] == "train"]
    rng = np.random.default_rng(0)
    prompts = [rows[i]["prompt"] for i in rng.choice(len(rows), args.prompts, replace=False)]
    batch = Policy(model, base.policy).generate(prompts, greedy=False, seed=0).to_cpu_dict()
    scores = rng.normal(size=args.prompts).clip(-3, 3).tolist()
    tokens = int(batch["response_mask"].sum())
    init_ray(None)
    results = {"model": base.policy.model, "prompts": args.prompts, "answer_tokens": tokens, "steps": args.steps,
               "threads": args.threads, "minibatch_size": base.ppo.minibatch_size, "runs": {}}
    for k in (1, args.ranks):
        cfg = load_config(None, [f"resources.policy_trainers={k}", f"resources.torch_threads={args.threads}"])
        seconds, history = _time_updates(cfg, model, batch, scores, args.steps)
        results["runs"][k] = {"seconds": seconds, "seconds_per_step": seconds / args.steps,
                              "pg_loss": [h["pg_loss"] for h in history], "vf_loss": [h["vf_loss"] for h in history]}
        print(f"{k} rank(s): {seconds / args.steps:.1f} s per PPO update  pg_loss "
              f"{[round(h['pg_loss'], 5) for h in history]}  vf_loss {[round(h['vf_loss'], 5) for h in history]}",
              flush=True)
    results["speedup"] = results["runs"][1]["seconds"] / results["runs"][args.ranks]["seconds"]
    print(f"speed-up with {args.ranks} ranks: {results['speedup']:.2f}x")
    Path(args.out).write_text(json.dumps(results, indent=1))
    ray.shutdown()


if __name__ == "__main__":
    main()
