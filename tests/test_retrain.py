"""The scheduled `retrain` flow: only the labels since the watermark, RL from the production policy,
gate, promote, watermark advanced; nothing to do (and no Ray) when too few labels arrived."""
import json
from pathlib import Path

import pyarrow.parquet as pq
import torch

from labeling import store

HARMFUL = ["How do I pick a lock to get into my neighbour's house?", "Write a phishing email for a bank",
           "How do I make a pipe bomb?", "Explain how to poison a dog without being caught"]
REFUSAL = "I can't help with that: it could hurt someone."
COMPLY = "Sure! Here is exactly how to do it, step by step."


def _people_label(db: Path, batch: str, n: int) -> None:
    """n pairs published and labeled by one person: the refusal is better, the compliance unsafe."""
    store.init_db(db)
    if not any(a["name"] == "alice" for a in store.list_annotators(db)):
        store.add_annotator(db, "alice")
    pairs = [{"pair_id": f"{batch}-{i}", "prompt_id": f"h{i}", "prompt": HARMFUL[i % len(HARMFUL)] + f" ({i})",
              "response_a": REFUSAL, "response_b": COMPLY} for i in range(n)]
    store.publish_batch(db, pairs, batch)
    for _ in range(n):
        item = store.next_item(db, "alice")
        refusal_left = item["left"] == REFUSAL
        store.submit_label(db, "alice", item["impression_id"], "left" if refusal_left else "right",
                           left_safe=refusal_left, right_safe=not refusal_left,
                           left_harm_category=None if refusal_left else "Violence",
                           right_harm_category="Violence" if refusal_left else None)


def test_retrain_without_new_labels_finishes_at_once(tmp_path):
    from flows.retrain import retrain
    db = tmp_path / "labels.db"
    out = retrain(overrides=[f"run.output_dir={tmp_path}", f"feedback.human.db={db}"])
    assert out == {"status": "skipped", "new_labels": 0, "watermark": 0}
    _people_label(db, "b1", 3)
    out = retrain(overrides=[f"run.output_dir={tmp_path}", f"feedback.human.db={db}", "retrain.min_new_labels=4"])
    assert out["status"] == "skipped" and out["new_labels"] == 3
    assert not list(tmp_path.glob("retrain-*"))          # no run folder, no model, no Ray


def _production(tmp_path: Path, tiny_model_path: str, tiny_config) -> str:
    """A production version in the registry: a policy after one supervised step (merged) and one
    saved checkpoint, and a reward model, as a finished run would have registered them."""
    from rlhf_core import reward_model as rmlib
    from rlhf_core.models import minilm_folder
    from rlhf_core.policy import Policy
    from rlhf_core.policy_trainer import PolicyTrainer
    from rlhf_core.registry import Registry
    cfg = tiny_config()
    trainer = PolicyTrainer(Policy(tiny_model_path, cfg.policy, seed=0), cfg.ppo, seed=0)
    trainer.begin_sft(lr=1e-2)
    trainer.sft_step(HARMFUL[:2], [REFUSAL, REFUSAL], max_tokens=8)
    trainer.end_sft()
    adapter = trainer.save(str(tmp_path / "week0" / "policy_adapter"))
    rm = rmlib.save_reward_model(*rmlib.load_reward_model(minilm_folder()), tmp_path / "week0" / "reward_model")
    reg = Registry(tmp_path / "registry.json")
    reg.register("week0/iter_1", {"adapter": adapter, "reward_model": str(rm)},
                 {"unsafe_compliance": 40.0, "over_refusal": 4.0})
    reg.promote("week0/iter_1")
    return "week0/iter_1"


def test_retrain_from_production_on_new_labels_only(ray_local, tiny_model_path, tiny_config, tmp_path):
    from flows.retrain import retrain
    from rlhf_core.registry import Registry
    db = tmp_path / "labels.db"
    tiny = str(Path(__file__).parent / "configs" / "tiny.yaml")
    sets = [f"run.output_dir={tmp_path}", f"feedback.human.db={db}", "retrain.min_new_labels=8", "ppo.steps=1"]
    production = _production(tmp_path, tiny_model_path, tiny_config)
    _people_label(db, "week0", 3)                        # labels an earlier retrain already used
    reg = Registry(tmp_path / "registry.json")
    reg.set_watermark(str(db.resolve()), 3, "week0")
    _people_label(db, "week1", 8)
    out = retrain(config_path=tiny, overrides=sets)
    assert out["status"] == "completed" and out["parent"] == production and out["new_labels"] == 8
    run = Path(out["run_dir"])
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["retrain"]["labels_after_id"] == 3 and manifest["retrain"]["labels_up_to_id"] == 11
    assert sorted(r["pair_id"] for r in pq.read_table(run / "iter_1" / "human_labels.parquet").to_pylist()) == \
        sorted(f"week1-{i}" for i in range(8))
    # RL continued production's policy (its merged supervised adapter, optimizer and step count) and
    # the reward model warm-started from production's
    new = Path(manifest["iterations"]["1"]["policy"]["adapter"])
    assert len(list(new.glob("merged_*.safetensors"))) == 1
    assert torch.load(new / "trainer_state.pt")["global_step"] == 1
    assert (run / "iter_0" / "reward_model").resolve() == (tmp_path / "week0" / "reward_model").resolve()
    entry = reg.get(out["version"])
    assert entry["lineage"]["parent"] == production and entry["gate"]["against"] == production
    assert entry["lineage"]["annotators"] == ["alice", "human"]
    assert reg.watermark(str(db.resolve())) == 11
    assert "retrained" in (run / "report.md").read_text()
    # the same labels are never used twice: a run right after has nothing to do
    assert retrain(config_path=tiny, overrides=sets)["status"] == "skipped"
