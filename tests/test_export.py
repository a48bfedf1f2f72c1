"""`alignflow export`: a policy with a merged supervised adapter and a trained current adapter,
written as a plain Hugging Face folder, loads with AutoModelForCausalLM alone and answers exactly
as the policy does; PEFT's usual loading of policy_adapter/ would not (the reason for export)."""
import json
from pathlib import Path

import pytest
import torch

PROMPTS = ["How do I bake bread?", "Tell me how to hurt someone.", "What is the capital of France?"]


def _trained_run(tmp_path: Path, tiny_model_path: str, tiny_config) -> tuple[Path, object]:
    """A run folder as `alignflow run` leaves it, for one iteration: a supervised adapter merged,
    then a current adapter trained on top (both change greedy answers), and the manifest."""
    from rlhf_core.policy import Policy
    from rlhf_core.policy_trainer import PolicyTrainer
    from rlhf_core.registry import Registry, lineage_from_manifest
    cfg = tiny_config()
    trainer = PolicyTrainer(Policy(tiny_model_path, cfg.policy, seed=0), cfg.ppo, seed=0)
    for _ in range(2):                                  # round 1 is merged; round 2 stays the adapter
        trainer.begin_sft(lr=1e-2)
        for _ in range(3):
            trainer.sft_step(PROMPTS, ["Sure, here it is.", "I can't help with that.", "Paris."], max_tokens=8)
        if not trainer.policy.merged:
            trainer.end_sft()
    run = tmp_path / "runs" / "tiny-20261203-070000"
    adapter = trainer.save(str(run / "iter_1" / "policy_adapter"))
    metrics = {"unsafe_compliance": 25.0, "sets": {"generalisation": {
        "unsafe_compliance": {"rate": 25.0, "ci": [5.0, 70.0], "k": 1, "n": 4}}}}
    manifest = {"run_id": run.name, "config": cfg.model_dump(mode="json"), "config_hash": "x", "seed": 0,
                "models": {"policy": tiny_model_path}, "status": "completed",
                "iterations": {"1": {"policy": {"adapter": adapter}, "eval": {"metrics": metrics}}},
                "final": {"iteration": 1, "adapter": adapter, "metrics": metrics}}
    (run / "manifest.json").write_text(json.dumps(manifest))
    Registry(tmp_path / "runs" / "registry.json").register(f"{run.name}/iter_1", lineage_from_manifest(manifest, 1),
                                                           {"unsafe_compliance": 25.0, "over_refusal": 0.0})
    return run, trainer.policy


def _greedy(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    out = []
    for p in prompts:
        text = tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        out.append(tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return out


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def test_export_loads_plainly_and_answers_as_the_policy(tmp_path, tiny_model_path, tiny_config, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flows.cli import main
    run, policy = _trained_run(tmp_path, tiny_model_path, tiny_config)
    n = policy.cfg.max_new_tokens
    want = [policy.generate([p], greedy=True).texts[0] for p in PROMPTS]
    ids, _ = policy.encode_queries(PROMPTS[:1])
    policy.model.eval()
    trained = _logits(policy.model, ids)
    with policy.model.disable_adapter():
        assert not torch.allclose(_logits(policy.model, ids), trained, atol=1e-3)   # the current adapter counts

    out = tmp_path / "exported"
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert not (out / "adapter_config.json").exists() and (out / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert torch.allclose(_logits(model, ids), trained, atol=1e-4)
    assert tok.chat_template and _greedy(model, tok, PROMPTS, n) == want
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name:") and run.name in card and "25.0 % [5–70]" in card

    # the same by registry version; and what PEFT's own loading gives instead (the merged file skipped)
    out2 = tmp_path / "by_version"
    assert main(["export", f"{run.name}/iter_1", "--out", str(out2), "--registry",
                 str(tmp_path / "runs" / "registry.json")]) == 0
    assert torch.allclose(_logits(AutoModelForCausalLM.from_pretrained(out2).eval(), ids), trained, atol=1e-4)
    peft_way = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_path),
                                         str(run / "iter_1" / "policy_adapter")).eval()
    assert not torch.allclose(_logits(peft_way, ids), trained, atol=1e-3)
    assert "Not a standalone PEFT adapter" in (run / "iter_1" / "policy_adapter" / "README.md").read_text()


@pytest.mark.parametrize("source, message", [
    ("nowhere", "no run folder there"),
    ("../x/iter_1", "not a version id"),
    ("tiny-20261203-070000/iter_9", "no version"),
])
def test_export_refuses_what_it_cannot_export_before_loading_a_model(tmp_path, tiny_model_path, tiny_config,
                                                                     capsys, source, message):
    from flows.cli import main
    run, _ = _trained_run(tmp_path, tiny_model_path, tiny_config)
    args = ["export", source, "--out", str(tmp_path / "o"), "--runs-dir", str(tmp_path / "runs"),
            "--registry", str(tmp_path / "runs" / "registry.json")]
    assert main(args) == 2
    assert message in capsys.readouterr().out and not (tmp_path / "o").exists()
    (tmp_path / "o").mkdir()
    assert main(["export", str(run), "--out", str(tmp_path / "o")]) == 2
    assert "already exists" in capsys.readouterr().out
