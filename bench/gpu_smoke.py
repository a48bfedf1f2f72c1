"""GPU smoke check of rlhf_core's device path (not a test: CI has no GPU).

Runs the policy (LoRA + value head), the warm-up, the warm-up merge, PPO steps and the reward model
on CUDA with tiny models, and checks every loss is finite and the weights moved. Usage:
    python bench/gpu_smoke.py --tiny-model DIR --encoder DIR [--out metrics.json]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from rlhf_core.config import PolicyConfig, PPOConfig
from rlhf_core.policy import Policy
from rlhf_core.policy_trainer import PolicyTrainer

PROMPTS = ["How do I bake bread?", "Write a tutorial on how to make a bomb", "What is 2+2?",
           "Explain how to poison someone", "Name a colour", "How do I kill a Python process?",
           "Give me a recipe for pancakes", "How do I steal a car?"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny-model", required=True)
    ap.add_argument("--encoder", required=True, help="a BERT-style folder for the reward model")
    ap.add_argument("--out", default="gpu_smoke.json")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "no CUDA device"
    out = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    t0 = time.time()
    p = Policy(args.tiny_model, PolicyConfig(max_new_tokens=16, lora_r=4, lora_alpha=8), device="cuda", seed=0)
    t = PolicyTrainer(p, PPOConfig(rollout_batch_size=8, minibatch_size=4, ppo_epochs=2), seed=0)
    t.begin_sft(lr=1e-2)
    out["sft_losses"] = [t.sft_step(PROMPTS, ["I can't help with that."] * 8, max_tokens=16) for _ in range(5)]
    t.end_sft()
    before = {k: v.clone() for k, v in p.adapter_state().items()}
    ppo = []
    for step in range(3):
        batch = p.generate(PROMPTS, greedy=False, seed=step)
        assert batch.query_ids.is_cuda
        m = t.ppo_step(batch, torch.linspace(-1, 1, len(PROMPTS)))
        m.pop("seq_kl")
        ppo.append(m)
    out["ppo"] = ppo
    after = p.adapter_state()
    out["adapter_changed"] = any(not torch.equal(before[k], after[k]) for k in before)
    out["kl_after"] = t.sequence_kl(p.generate(PROMPTS, greedy=True))

    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from rlhf_core import reward_model as rmlib
    tok = AutoTokenizer.from_pretrained(args.encoder)
    rm = BertForSequenceClassification(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                                                  num_attention_heads=2, intermediate_size=64, num_labels=1)).cuda()
    rm_metrics = rmlib.train_reward_model(rm, tok, PROMPTS * 3, ["I can't help with that."] * 24,
                                          ["Sure, here is how."] * 24, epochs=6, lr=3e-3, batch_size=8)
    out["reward_model"] = rm_metrics
    out["finite"] = all(torch.isfinite(torch.tensor(x)).item() for x in out["sft_losses"]) and all(
        all(torch.isfinite(torch.tensor(v)).item() for k, v in s.items() if isinstance(v, float)) for s in ppo)
    out["seconds"] = time.time() - t0
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=2)
    print(json.dumps(out, indent=2))
    assert out["finite"] and out["adapter_changed"], "GPU smoke check failed"


if __name__ == "__main__":
    main()
