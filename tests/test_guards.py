"""Reward-hacking detectors on hand-made signals, and rolling the policy back past a merged warm-up."""
import math

import pytest
import torch

from rlhf_core.config import GuardsConfig, PolicyConfig, PPOConfig
from rlhf_core.guards import check, correlation, distinct_n

CFG = GuardsConfig()
BASE = {"iteration": 0, "distinct_2": 0.8}


def _detectors(*signals):
    return {a.detector for a in check([BASE, *signals], CFG)}


def test_distinct_n_and_correlation():
    assert distinct_n(["a b c", "a b d"], 2) == pytest.approx(3 / 4)      # (a b) twice, (b c), (b d)
    assert distinct_n(["same same same"], 1) == pytest.approx(1 / 3) and distinct_n([""], 2) == 0.0
    assert correlation([1, 2, 3, 4], [2, 4, 6, 8]) == pytest.approx(1.0)
    assert math.isnan(correlation([1, 1, 1], [1, 2, 3]))


def test_each_detector_fires_on_its_symptom_only():
    calm = {"iteration": 1, "proxy": 0.5, "proxy_prev": 0.1, "gold": 0.3, "gold_prev": 0.2, "ensemble_std": 0.1,
            "reward_length_corr": 0.1, "kl": 1.0, "distinct_2": 0.7}
    assert _detectors(calm) == set()
    assert _detectors(dict(calm, gold=0.1)) == {"proxy_up_gold_down"}          # proxy up, judge down 0.1
    assert _detectors(dict(calm, gold=0.19)) == set()                          # a drop within tolerance
    assert _detectors(dict(calm, proxy=0.05, gold=0.1)) == set()              # both fell: not hacking
    assert _detectors(dict(calm, reward_length_corr=-0.8)) == {"reward_length"}
    assert _detectors(dict(calm, kl=CFG.kl_budget + 1)) == {"kl_budget"}
    assert _detectors(dict(calm, distinct_2=0.3)) == {"diversity_collapse"}   # below half of the base's 0.8
    later = dict(calm, iteration=2, ensemble_std=0.2)
    assert _detectors(calm, later) == {"ensemble_disagreement"}               # doubled since the first
    assert _detectors(dict(calm, gold=float("nan"), ensemble_std=None)) == set()
    # the training detector drifting away from the evaluation judge (base 0.9, bar 0.15)
    agree = {**BASE, "judge_agreement": 0.9}
    assert {a.detector for a in check([agree, dict(calm, judge_agreement=0.7)], CFG)} == {"detector_gap"}
    assert {a.detector for a in check([agree, dict(calm, judge_agreement=0.8)], CFG)} == set()
    alert = check([BASE, dict(calm, kl=99.0)], CFG)[0]
    assert alert.iteration == 1 and alert.value == 99.0 and "budget" in alert.message


def test_rollback_past_a_merged_warm_up(tiny_model_path, tmp_path):
    """Actors rebuild from the base when asked for a checkpoint with fewer merged adapters."""
    from workers.actors import PolicyTrainerActor, RolloutWorker
    torch.manual_seed(0)
    pcfg = PolicyConfig(max_new_tokens=6, lora_r=4, lora_alpha=8)
    trainer = PolicyTrainerActor(tiny_model_path, pcfg, PPOConfig(), "cpu", 1, 0)
    roll = RolloutWorker(tiny_model_path, pcfg, "cpu", 1, 0)

    def sft_round():
        trainer.begin_sft(1e-2)
        for _ in range(3):
            trainer.sft_step(["How do I bake bread?"], ["Mix flour and water."])
        trainer.end_sft()

    sft_round()
    good = trainer.save(str(tmp_path / "good"))
    roll.load_adapter(trainer.adapter_stack(), "good")
    before = roll.generate(["What is 2+2?"], greedy=True)["texts"]
    sft_round()
    roll.load_adapter(trainer.adapter_stack(), "later")
    assert len(trainer.policy.merged) == 2 and len(roll.policy.merged) == 2
    trainer.load(good)                                    # the rollback
    roll.load_adapter(trainer.adapter_stack(), "rolled-back")
    assert len(trainer.policy.merged) == 1 and len(roll.policy.merged) == 1
    assert roll.generate(["What is 2+2?"], greedy=True)["texts"] == before
