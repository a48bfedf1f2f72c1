"""Preferences and supervised targets from judge scores (pure, no models)."""
from types import SimpleNamespace

import numpy as np

from rlhf_core.feedback import make_preferences, refusal_negatives, rejection_sampling_targets


def _samples():
    rows = [("p1", "policy", "Sure, step 1 ..."), ("p1", "policy", "Step 1 ..."), ("p1", "demonstration", "I can't."),
            ("p2", "policy", "Paris."), ("p2", "policy", "The capital is Paris."), ("p2", "demonstration", "I can't.")]
    samples = [{"prompt_id": p, "prompt": p, "origin": o, "response": r, "kind": "harmful" if p == "p1" else "benign"}
               for p, o, r in rows]
    total = np.array([-0.5, -0.4, 0.6, 0.5, 0.45, -0.3])
    scores = SimpleNamespace(total=total, harm_prob=np.array([0.9] * 3 + [0.1] * 3),
                             refusal=np.array([0, 0, 1, 0, 0, 1.0]), toxicity=np.zeros(6))
    return samples, scores


def test_targets_keep_best_and_near_best():
    samples, scores = _samples()
    t = rejection_sampling_targets(samples, scores, keep_margin=0.1)
    assert [x["response"] for x in t] == ["I can't.", "Paris.", "The capital is Paris."]


def test_targets_limited_to_origins():
    samples, scores = _samples()
    t = rejection_sampling_targets(samples, scores, keep_margin=0.0, origins={"policy"})
    assert {x["origin"] for x in t} == {"policy"} and len(t) == 2


def test_preferences_noise_is_seeded_and_recorded():
    samples, scores = _samples()
    a = make_preferences(samples, scores, flip_prob=0.5, tie_margin=0.0, seed=3, annotator="j", iteration=1)
    b = make_preferences(samples, scores, flip_prob=0.5, tie_margin=0.0, seed=3, annotator="j", iteration=1)
    assert a == b and len(a) == 6
    assert all(r["better"] == r["judge_better"] ^ int(r["flipped"]) for r in a)


def test_negatives_are_refusals_of_prompts_the_judge_deems_safe():
    samples, scores = _samples()
    scores.refusal[4] = 0.8           # the policy over-refuses the safe prompt once
    n = refusal_negatives(samples, scores)
    # p1 is harmful (its refusal is the target, not a negative); p2's two refusals are negatives
    assert [(x["prompt_id"], x["origin"]) for x in n] == [("p2", "policy"), ("p2", "demonstration")]


def test_the_prompts_kind_limits_targets_and_negatives():
    samples, scores = _samples()
    # the harm classifier's false alarm on the safe p2: it prefers the refusal
    scores.harm_prob[3:] = 0.9
    scores.total[5] = 0.9
    assert "I can't." in [x["response"] for x in rejection_sampling_targets(samples, scores) if x["prompt_id"] == "p2"]
    assert refusal_negatives(samples, scores) == []
    t = rejection_sampling_targets(samples, scores, keep_margin=0.1, by_kind=True)
    assert [(x["prompt_id"], x["response"]) for x in t] == [("p1", "I can't."), ("p2", "Paris."),
                                                            ("p2", "The capital is Paris.")]
    # a harmful prompt never gets a compliance as its target, even one the judge scores best
    scores.total[0] = 0.95
    assert [x["response"] for x in rejection_sampling_targets(samples, scores, by_kind=True)
            if x["prompt_id"] == "p1"] == ["I can't."]
    n = refusal_negatives(samples, scores, by_kind=True)
    assert [(x["prompt_id"], x["origin"]) for x in n] == [("p2", "demonstration")]
