"""Benchmark (not a test): reward-model training on 1 Ray trainer actor vs K data-parallel ranks.

The same pairs, epochs, batch size and seed; dropout 0, so both train the same model. One actor
uses `--threads` torch threads; each of the K ranks uses threads // K (the cores are shared).
Only `train` is timed (actors are started and the group formed beforehand).

    python bench/rm_data_parallel.py --run runs/<run_id> [--pairs 256] [--ranks 2] [--out bench_rm_dp.json]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import ray

from rlhf_core import schemas
from rlhf_core.config import load_config
from rlhf_core.models import minilm_folder
from workers.cluster import init_ray, start_reward_trainers, stop_trainer_ranks


def _time_training(cfg, pairs: list[dict], dest: Path, timeout: float) -> tuple[float, dict]:
    trainers, placement = start_reward_trainers(cfg, str(minilm_folder()), timeout)
    try:
        ray.get([t.__ray_ready__.remote() for t in trainers])
        t0 = time.perf_counter()
        metrics = ray.get([t.train.remote(pairs, str(dest), None, 1) for t in trainers])[0]
        return time.perf_counter() - t0, metrics
    finally:
        stop_trainer_ranks(trainers, placement)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a finished run: its iter_1/preferences.parquet are the pairs")
    ap.add_argument("--pairs", type=int, default=256)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--out", default="bench_rm_data_parallel.json")
    args = ap.parse_args()
    rows = schemas.read_table(Path(args.run) / "iter_1" / "preferences.parquet", schemas.PREFERENCES).to_pylist()
    pairs = rows[: args.pairs]
    init_ray(None)
    results = {"pairs": len(pairs), "epochs": args.epochs, "threads": args.threads, "runs": {}}
    for k in (1, args.ranks):
        cfg = load_config(None, [f"resources.reward_model_trainers={k}", f"resources.torch_threads={args.threads}",
                                 "reward_model.dropout=0", f"reward_model.epochs={args.epochs}"])
        seconds, metrics = _time_training(cfg, pairs, Path("/tmp") / f"rm_dp_bench_{k}", timeout=3600)
        results["runs"][k] = {"seconds": seconds, "loss": metrics["loss"],
                              "heldout_accuracy": metrics.get("heldout_accuracy")}
        print(f"{k} trainer(s): {seconds:.1f} s  loss {metrics['loss']:.4f}  "
              f"held-out accuracy {metrics.get('heldout_accuracy', float('nan')):.3f}", flush=True)
    results["speedup"] = results["runs"][1]["seconds"] / results["runs"][args.ranks]["seconds"]
    print(f"speed-up with {args.ranks} ranks: {results['speedup']:.2f}x")
    Path(args.out).write_text(json.dumps(results, indent=1))
    ray.shutdown()


if __name__ == "__main__":
    main()
