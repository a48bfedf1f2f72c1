"""Benchmark (not a test): generation tokens/s of the rollout pool against a plain generate loop.

The same model (`policy.model`, default SmolLM2-135M-Instruct), the same prompts (`--prompts` of
the default run's training split, chat template), greedy decoding up to `policy.max_new_tokens`
(the same answers on both sides, so the same work; `--sample` samples at `policy.temperature`,
where the two sides draw different answers and a batch's longest answer sets its cost), batches
of the pool's chunk size:

- ours: `RLHFWorkers.generate` — prompts sorted by length, chunks sent to the rollout actor(s),
  answers and token ids back through Ray's object store, merged and put back in order; the LoRA
  adapter is on (as in the pipeline's sampling stage; it starts at zero, so answers match the base);
- plain, sorted: one process, `model.generate` over the same length-sorted batches, no Ray;
- plain, input order: the loop a user writes first (batches in the order given).

Tokens counted: answer tokens up to and including the first end-of-turn token. The plain loops
run first in this process with `resources.torch_threads` threads, then Ray starts.

    python bench/rollout_throughput.py [--prompts 192] [--set key=value ...] [--out docs/rollout_bench.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def plain_generate(cfg, prompts: list[str], batch: int, sort: bool, seed: int, sample: bool) -> tuple[float, int]:
    """(seconds, answer tokens) of a plain transformers loop."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_core.models import resolve_model_path
    path = resolve_model_path(cfg.policy.model)
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    order = sorted(range(len(texts)), key=lambda i: len(prompts[i])) if sort else list(range(len(texts)))
    eos = tok.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tok.get_vocab() else tok.eos_token_id
    torch.manual_seed(seed)
    n_tokens, t0 = 0, time.perf_counter()
    with torch.no_grad():
        for s in range(0, len(order), batch):
            enc = tok([texts[i] for i in order[s: s + batch]], return_tensors="pt", padding=True,
                      truncation=True, max_length=cfg.policy.max_prompt_tokens)
            sampling = dict(do_sample=True, temperature=cfg.policy.temperature, top_p=cfg.policy.top_p, top_k=0) \
                if sample else dict(do_sample=False)
            out = model.generate(**enc, **sampling, max_new_tokens=cfg.policy.max_new_tokens,
                                 pad_token_id=tok.pad_token_id, eos_token_id=eos)
            answer = out[:, enc["input_ids"].shape[1]:]
            for row in answer.tolist():
                n_tokens += row.index(eos) + 1 if eos in row else len(row)
    return time.perf_counter() - t0, n_tokens


def ours_generate(cfg, prompts: list[str], seeds: list[int], sample: bool) -> list[tuple[float, int]]:
    from rlhf_core.models import resolve_encoder_path, resolve_model_path
    from workers.cluster import init_ray
    from workers.controller import RLHFWorkers
    init_ray(None)
    w = RLHFWorkers(cfg, resolve_model_path(cfg.policy.model), resolve_encoder_path(cfg.feedback.encoder),
                    resolve_encoder_path(resolve_model_path(cfg.reward_model.model)))
    runs = []
    try:
        w.sync_adapter("bench")                     # the adapter on, as in the sampling stage
        for seed in seeds:
            t0 = time.perf_counter()
            roll = w.generate(prompts, greedy=not sample, seed=seed)
            runs.append((time.perf_counter() - t0, int(sum(roll["num_tokens"]))))
    finally:
        w.shutdown()
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=192)
    ap.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    ap.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    ap.add_argument("--repeats", type=int, default=2, help="timed passes per variant (the best is kept)")
    ap.add_argument("--variants", default="plain,sorted,ours", help="comma-separated subset of plain,sorted,ours")
    ap.add_argument("--out", default="docs/rollout_bench.json")
    args = ap.parse_args()

    import numpy as np
    import torch

    from rlhf_core.config import load_config
    from rlhf_core.prompts import build_prompt_table
    from workers.controller import GEN_CHUNK
    cfg = load_config(None, args.overrides)
    rows = [r for r in build_prompt_table(cfg.data).to_pylist() if r["split"] == "train"]
    rng = np.random.default_rng(0)
    prompts = [rows[i]["prompt"] for i in rng.choice(len(rows), args.prompts, replace=len(rows) < args.prompts)]
    torch.set_num_threads(cfg.resources.torch_threads)

    seeds = list(range(args.repeats))
    variants = {"plain, input order": lambda: [plain_generate(cfg, prompts, GEN_CHUNK, False, s, args.sample) for s in seeds],
                "plain, length-sorted": lambda: [plain_generate(cfg, prompts, GEN_CHUNK, True, s, args.sample) for s in seeds],
                "alignflow rollout pool": lambda: ours_generate(cfg, prompts, seeds, args.sample)}
    wanted = {"plain": "plain, input order", "sorted": "plain, length-sorted", "ours": "alignflow rollout pool"}
    variants = {wanted[v]: variants[wanted[v]] for v in args.variants.split(",")}
    results = {"prompts": len(prompts), "batch": GEN_CHUNK, "max_new_tokens": cfg.policy.max_new_tokens,
               "model": cfg.policy.model, "rollout_workers": cfg.resources.rollout_workers,
               "torch_threads": cfg.resources.torch_threads, "decoding": "sampled" if args.sample else "greedy",
               "variants": {}}
    for name, fn in variants.items():
        runs = fn()
        best = max(runs, key=lambda r: r[1] / r[0])
        results["variants"][name] = {"seconds": best[0], "tokens": best[1], "tokens_per_s": best[1] / best[0],
                                     "runs": [{"seconds": s, "tokens": n} for s, n in runs]}
        print(f"{name}: {best[1]} tokens in {best[0]:.1f} s = {best[1] / best[0]:.1f} tokens/s", flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    ours = results["variants"].get("alignflow rollout pool", {}).get("tokens_per_s", float("nan"))
    print("\n| variant | tokens | seconds | tokens/s | ours ÷ this |\n|---|---|---|---|---|")
    for name, v in results["variants"].items():
        print(f"| {name} | {v['tokens']} | {v['seconds']:.1f} | {v['tokens_per_s']:.1f} "
              f"| {ours / v['tokens_per_s']:.2f}× |")


if __name__ == "__main__":
    main()
