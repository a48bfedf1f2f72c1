"""Any causal LM: the tiny pipeline end to end on a random 2-layer GPT-2 (SmolLM2's tokenizer),
with the LoRA targets chosen per architecture ("auto"); Gemma's and an unlisted architecture's
targets. The Qwen2 pipeline is test_flow.py's imported-preferences run (one run for both, to keep
the suite short); the Llama runs are everywhere else in the suite."""
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.mark.parametrize("model, targets", [("tiny:gpt2", {"c_attn", "c_proj", "c_fc"})])
def test_the_pipeline_runs_on_other_architectures(ray_local, tiny_config, tmp_path, model, targets):
    from flows.pipeline import rlhf_pipeline
    cfg = tiny_config(f"run.output_dir={tmp_path}", f"policy.model={model}", "run.iterations=1", "ppo.steps=1",
                      "data.train_prompts_per_iter=4", "warmup.prompts=4", "feedback.responses_per_prompt=2",
                      "ppo.rollout_batch_size=4", "data.eval_harmful=2", "data.eval_benign=1", "data.eval_borderline=1")
    out = rlhf_pipeline(cfg, show_progress=False)
    run = Path(out["run_dir"])
    assert json.loads((run / "manifest.json").read_text())["status"] == "completed"
    adapter = run / "iter_1" / "policy_adapter"
    assert set(json.loads((adapter / "adapter_config.json").read_text())["target_modules"]) == targets
    lora_b = [v for k, v in load_file(str(adapter / "adapter_model.safetensors")).items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)          # PPO trained this architecture
    assert (adapter / "merged_00.safetensors").is_file()               # and so did the supervised round


def test_lora_targets_per_architecture_and_for_an_unlisted_one(tiny_config):
    from transformers import AutoModelForCausalLM

    from rlhf_core.models import resolve_model_path
    from rlhf_core.policy import Policy, lora_target_names
    cfg = tiny_config("policy.model=tiny:gemma")
    policy = Policy(resolve_model_path("tiny:gemma"), cfg.policy)
    assert set(policy.lora_config.target_modules) == PROJECTIONS
    assert policy.generate(["How do I bake bread?"], greedy=True).texts

    # an architecture the table does not list: every linear layer but the output head
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny:gemma"))
    model.config.model_type = "not-listed"
    assert set(lora_target_names(model, "auto")) == PROJECTIONS
    with pytest.raises(ValueError, match="match no module"):
        lora_target_names(model, ["c_attn"])
