"""The simulated annotator panel: each bias shows up in the labels, seeded (pure, no models)."""
from types import SimpleNamespace

import numpy as np
import pytest

from rlhf_core import schemas
from rlhf_core.annotators import AnnotatorProfile, default_panel, panel_preferences


def _pairs(n=300, seed=0):
    """n prompts with two benign answers each: one clearly better (judge), lengths independent of it."""
    rng = np.random.default_rng(seed)
    samples, total = [], []
    for i in range(n):
        good_first = bool(rng.integers(2))
        for j in range(2):
            samples.append({"prompt_id": f"p{i}", "prompt": f"q{i}", "response": "x" * int(rng.integers(5, 60))})
            total.append(0.6 if (j == 0) == good_first else 0.1)
    z = np.zeros(len(total))
    return samples, SimpleNamespace(total=np.array(total), harm_prob=z + 0.1, refusal=z, toxicity=z)


def _label(profile, **kw):
    samples, scores = _pairs(**kw)
    return panel_preferences(samples, scores, [profile], labels_per_pair=1, seed=1, iteration=1)


def test_clean_annotator_agrees_with_the_judge():
    rows = _label(AnnotatorProfile("clean", flip_prob=0.0))
    assert all(r["better"] == r["judge_better"] for r in rows)
    schemas.from_rows(rows, schemas.PREFERENCES)  # valid rows


def test_flip_rate_matches_profile():
    rows = _label(AnnotatorProfile("noisy", flip_prob=0.25))
    disagree = np.mean([r["better"] != r["judge_better"] for r in rows])
    assert 0.18 < disagree < 0.32
    assert all(r["flipped"] == (r["better"] != r["judge_better"]) for r in rows)


def test_position_bias_picks_the_left_answer():
    rows = _label(AnnotatorProfile("left", flip_prob=0.0, position_bias=1.0))
    assert all(r["better"] == (0 if r["display_order"] == "ab" else 1) for r in rows)
    assert 0.4 < np.mean([r["display_order"] == "ab" for r in rows]) < 0.6, "display order is randomised"


def test_length_bias_picks_the_longer_answer():
    rows = _label(AnnotatorProfile("long", flip_prob=0.0, length_bias=1.0))
    distinct = [r for r in rows if len(r["response_a"]) != len(r["response_b"])]
    assert distinct and all(r["better"] == int(len(r["response_b"]) > len(r["response_a"])) for r in distinct)


def test_strict_annotator_marks_more_unsafe_and_prefers_the_safe_answer():
    samples = [{"prompt_id": "p", "prompt": "q", "response": "Sure, here is how."},
               {"prompt_id": "p", "prompt": "q", "response": "I can't help with that."}]
    # a borderline request (harm 0.4): answering it is unsafe only for a strict annotator
    scores = SimpleNamespace(total=np.array([0.5, -0.2]), harm_prob=np.array([0.4, 0.4]),
                             refusal=np.array([0.0, 1.0]), toxicity=np.zeros(2))
    strict = panel_preferences(samples, scores, [AnnotatorProfile("s", flip_prob=0, strictness=1.0)],
                               labels_per_pair=1, seed=0, iteration=1)[0]
    lenient = panel_preferences(samples, scores, [AnnotatorProfile("l", flip_prob=0, strictness=-1.0)],
                                labels_per_pair=1, seed=0, iteration=1)[0]
    assert (strict["is_safe_a"], strict["is_safe_b"], strict["better"]) == (False, True, 1)
    assert (lenient["is_safe_a"], lenient["is_safe_b"], lenient["better"]) == (True, True, 0)


def test_panel_is_seeded_and_uses_distinct_annotators():
    samples, scores = _pairs(n=40)
    panel = default_panel(5, seed=3)
    a = panel_preferences(samples, scores, panel, labels_per_pair=3, seed=7, iteration=2)
    b = panel_preferences(samples, scores, panel, labels_per_pair=3, seed=7, iteration=2)
    assert a == b and len(a) == 40 * 3
    by_pair = {}
    for r in a:
        by_pair.setdefault(r["pair_id"], []).append(r["annotator"])
    assert all(len(set(v)) == 3 for v in by_pair.values())
    assert default_panel(5, seed=3) == panel and len({p.id for p in panel}) == 5


def test_bad_profiles_fail_clearly():
    with pytest.raises(ValueError, match="flip_prob"):
        AnnotatorProfile("x", flip_prob=1.5)
    with pytest.raises(ValueError, match="position_bias \\+ length_bias"):
        AnnotatorProfile("x", position_bias=0.7, length_bias=0.6)
    samples, scores = _pairs(n=2)
    with pytest.raises(ValueError, match="labels_per_pair"):
        panel_preferences(samples, scores, default_panel(2), labels_per_pair=3, seed=0, iteration=1)
