"""Micro-benchmark (not a test): greedy decoding of one batch through the policy's LoRA-wrapped
model with the adapter separate (three matmuls per adapted layer), folded into the weights
(`Policy.fold_adapter`, what rollout workers do), and a plain transformers model without peft.

32 training prompts of the default run, 48 new tokens forced, 2 torch threads, best of 2.

    python bench/fold_micro.py
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def best_of(fn, n: int = 2) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from rlhf_core.config import load_config
    from rlhf_core.models import smollm2_folder
    from rlhf_core.policy import Policy
    from rlhf_core.prompts import build_prompt_table
    torch.set_num_threads(2)
    cfg = load_config(None, [])
    prompts = [r["prompt"] for r in build_prompt_table(cfg.data).to_pylist() if r["split"] == "train"][:32]
    path = str(smollm2_folder())
    policy = Policy(path, cfg.policy, device="cpu", seed=0)
    q, m = policy.encode_queries(prompts)
    kw = dict(do_sample=False, max_new_tokens=48, min_new_tokens=48, pad_token_id=policy.tokenizer.pad_token_id,
              eos_token_id=policy.eos_id)
    results = {"peft, adapter separate": best_of(lambda: policy.model.generate(input_ids=q, attention_mask=m, **kw))}
    policy.fold_adapter(True)
    results["peft, adapter folded"] = best_of(lambda: policy.model.generate(input_ids=q, attention_mask=m, **kw))
    policy.fold_adapter(False)
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        results["plain transformers, no peft"] = best_of(lambda: plain.generate(input_ids=q, attention_mask=m, **kw))
    print("| model | seconds (32 × 48 tokens) |\n|---|---|")
    for name, s in results.items():
        print(f"| {name} | {s:.1f} |")


if __name__ == "__main__":
    main()
