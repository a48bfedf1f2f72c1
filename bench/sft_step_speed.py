"""Benchmark (not a test): seconds per supervised step, with and without unlikelihood negatives.

Three ways over the same batches of 8 targets from a run's `iter_1/warmup_targets.parquet`:
no negatives; each safe prompt's refusal opening scored by a separate forward pass (prompt run
twice); and scored against the targets' shared prompt pass (`Policy.forward_shared_prompts`, what
`PolicyTrainer.sft_step` does). Run it on an otherwise idle machine:

    python bench/sft_step_speed.py --run runs/<run_id> [--steps 5] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from rlhf_core import schemas
from rlhf_core.algorithms import masked_mean, sequence_unlikelihood_loss
from rlhf_core.config import AlignflowConfig
from rlhf_core.judge import load_constitution
from rlhf_core.models import resolve_model_path
from rlhf_core.policy import Policy, RolloutBatch
from rlhf_core.policy_trainer import PolicyTrainer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a run folder with iter_1/warmup_targets.parquet")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per variant (after one warm-up step)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = AlignflowConfig()
    policy = Policy(resolve_model_path(cfg.policy.model), cfg.policy, seed=0)
    trainer = PolicyTrainer(policy, cfg.ppo, seed=0)
    trainer.begin_sft(cfg.warmup.lr)
    k, width = cfg.warmup.unlikelihood_tokens, cfg.policy.max_new_tokens
    targets = schemas.read_table(Path(args.run) / "iter_1" / "warmup_targets.parquet", schemas.SAMPLES).to_pylist()
    refusal = load_constitution().refusal_demonstrations[0]
    order = np.random.default_rng(0).permutation(len(targets))
    batches = [[targets[i] for i in order[s: s + 8]] for s in range(0, 8 * (args.steps + 1), 8)]

    def negatives(b):
        return [(t["prompt"], refusal) for t in b if t["kind"] != "harmful"]

    def separate(b):   # the negatives' prompts go through the model a second time
        p = policy
        q, qm = p.encode_queries([t["prompt"] for t in b])
        r, rm = p.encode_responses([t["response"] for t in b], width)
        p.model.train()
        loss = -masked_mean(p.forward(RolloutBatch(q, qm, r, rm, []))["logp"], rm.float())
        negs = negatives(b)
        nq, nqm = p.encode_queries([n[0] for n in negs])
        nr, nm = p.encode_responses([n[1] for n in negs], k + 1)
        nm[:, k:] = 0
        loss = loss + sequence_unlikelihood_loss(p.forward(RolloutBatch(nq, nqm, nr, nm, []))["logp"], nm, k)
        trainer.sft_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        trainer.sft_optimizer.step()
        p.model.eval()

    variants = {
        "no_negatives": lambda b: trainer.sft_step([t["prompt"] for t in b], [t["response"] for t in b], width),
        "separate_forward": separate,
        "shared_prompt": lambda b: trainer.sft_step([t["prompt"] for t in b], [t["response"] for t in b], width,
                                                    negatives=negatives(b), unlikelihood_coef=1.0,
                                                    unlikelihood_tokens=k),
    }
    result = {}
    for name, step in variants.items():
        step(batches[0])
        t0 = time.perf_counter()
        for b in batches[1:]:
            step(b)
        result[name] = (time.perf_counter() - t0) / args.steps
        print(f"{name:18s} {result[name]:.2f} s/step", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
