"""The aligned policy as a plain Hugging Face model folder, for use outside alignflow.

A run's `policy_adapter/` is not a standalone PEFT adapter: the supervised rounds' adapters were
folded into the base weights (`merged_NN.safetensors`, oldest first) before the current LoRA
adapter (`adapter_model.safetensors`) trained on top of them. Loaded the usual way
(`PeftModel.from_pretrained(base, dir)`), PEFT silently skips the merged files and gives another
model. An export rebuilds the policy exactly as the run's workers do (`Policy.apply_stack`), folds
the current adapter in too, and writes what `AutoModelForCausalLM.from_pretrained` reads with
nothing else installed: merged safetensors in float32 (the precision the run trained and
evaluated in, so greedy answers are the policy's own), the tokenizer with its chat template, the
generation config, and a model card with the lineage and the evaluation.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from rlhf_core.io import atomic_dir

ADAPTER_README = """\
# Not a standalone PEFT adapter

This LoRA adapter trained on top of the base model with the `merged_NN.safetensors` adapters
folded in (the supervised rounds, oldest first). `PeftModel.from_pretrained(base, this_folder)`
skips those files and gives a different model. For a model to use outside alignflow, run

    alignflow export <run folder or registry version> --out DIR

and load DIR with `AutoModelForCausalLM.from_pretrained(DIR)`.
"""


class ExportError(ValueError):
    pass


def check_adapter_folder(adapter: str | os.PathLike) -> Path:
    adapter = Path(adapter)
    if not (adapter / "adapter_model.safetensors").is_file() or not (adapter / "adapter_config.json").is_file():
        raise ExportError(f"{adapter}: not a policy adapter folder (no adapter_model.safetensors and "
                          "adapter_config.json); was the run's folder moved or cleaned?")
    return adapter


def export_policy(base_model: str, adapter: str | os.PathLike, policy_cfg, out: str | os.PathLike,
                  card: str) -> Path:
    """Write the policy of `adapter` (on `base_model`, with the run's `policy_cfg`) to `out` as a
    plain HF folder with `card` as its README.md. Written beside `out`, then renamed onto it."""
    import torch
    from safetensors.torch import load_file

    from rlhf_core.policy import Policy
    adapter = check_adapter_folder(adapter)
    out = Path(out)
    policy = Policy(base_model, policy_cfg)
    merged = [load_file(str(f)) for f in sorted(adapter.glob("merged_*.safetensors"))]
    policy.apply_stack(merged, load_file(str(adapter / "adapter_model.safetensors")))
    model = policy.model.merge_and_unload()
    model.config.use_cache = True
    gen = model.generation_config
    gen.pad_token_id = policy.tokenizer.pad_token_id
    gen.eos_token_id = gen.eos_token_id if gen.eos_token_id is not None else policy.eos_id
    with atomic_dir(out) as tmp, torch.no_grad():
        model.save_pretrained(tmp, safe_serialization=True)
        policy.tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(card, encoding="utf-8")
    return out


def model_card(lineage: dict, metrics: dict, version: str | None) -> str:
    """README.md of an exported model: where it came from and how it was measured."""
    import math
    names = {"unsafe_compliance": "unsafe compliance, harmful prompts",
             "over_refusal": "over-refusal, safe prompts",
             "degeneration_safe": "degenerate answers to safe prompts"}
    rows = []
    for set_name, per in (metrics.get("sets") or {}).items():
        for key, label in names.items():
            m = per.get(key)
            if m and m.get("n") and not math.isnan(m["rate"]):
                rows.append(f"| {set_name.replace('_', '-')} | {label} | {m['rate']:.1f} % "
                            f"[{m['ci'][0]:.0f}–{m['ci'][1]:.0f}] | {m['n']} |")
    front = {"library_name": "transformers", "pipeline_tag": "text-generation", "tags": ["alignflow", "rlhf"]}
    lines = ["---", *(f"{k}: {json.dumps(v)}" for k, v in front.items()), "---", "",
             f"# {version or lineage.get('run_id', 'alignflow policy')}", "",
             "A causal LM aligned with alignflow (RLHF against harmful compliance and over-refusal): the base "
             "model with every adapter of the run folded in. Load it with "
             "`AutoModelForCausalLM.from_pretrained(this_folder)`. alignflow evaluated it with greedy decoding "
             "and the tokenizer's chat template.", "",
             "## Evaluation", "",
             "Read by alignflow's evaluation judge (not the one training used); Wilson 95 % intervals. The "
             "generalisation set is phrased unlike the training prompts; the in-distribution set is held out "
             "from the training sources.", "",
             "| prompt set | metric | rate | prompts |", "|---|---|---|---|",
             *(rows or ["| – | none recorded | | |"]), "",
             "## Lineage", "", "```json", json.dumps(lineage, indent=2, sort_keys=True), "```", ""]
    return "\n".join(lines)
