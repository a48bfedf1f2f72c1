"""Active selection of pairs for labelling (pure)."""
import numpy as np
import pytest

from rlhf_core.active import select_pairs


def test_uncertainty_picks_the_closest_calls():
    a = np.array([3.0, 0.1, -2.0, 0.0, 1.0])
    b = np.zeros(5)
    assert select_pairs(a, b, 2, "uncertainty").tolist() == [3, 1]


def test_disagreement_picks_where_the_ensemble_splits():
    a = np.array([[1.0, 1.0, 0.0], [1.0, -1.0, 0.2], [1.0, 3.0, -0.2]])   # (E=3, N=3)
    b = np.zeros((3, 3))
    assert select_pairs(a, b, 1, "disagreement").tolist() == [1]
    with pytest.raises(ValueError, match="at least 2 reward models"):
        select_pairs(a[0], b[0], 1, "disagreement")


def test_random_is_seeded_and_ties_do_not_mean_first_k():
    a, b = np.zeros(100), np.zeros(100)          # every pair equally uncertain
    picked = select_pairs(a, b, 10, "uncertainty", seed=1)
    assert sorted(picked.tolist()) != list(range(10))
    assert select_pairs(a, b, 10, "random", seed=3).tolist() == select_pairs(a, b, 10, "random", seed=3).tolist()
    assert len(set(select_pairs(a, b, 100, "random").tolist())) == 100


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="valid: \\['disagreement', 'random', 'uncertainty'\\]"):
        select_pairs(np.zeros(3), np.zeros(3), 1, "entropy")
    with pytest.raises(ValueError, match="cannot select 4 of 3"):
        select_pairs(np.zeros(3), np.zeros(3), 4)
