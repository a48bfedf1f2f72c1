"""Active selection: which pairs are worth a person's time.

Labels cost money, and a label the reward model could have predicted teaches it little. Each
strategy scores candidate pairs from reward-model scores and picks the top k:

- "uncertainty": P(a ≻ b) = σ(r_a − r_b) closest to ½ (uncertainty sampling, Lewis & Gale 1994);
- "disagreement": the spread of r_a − r_b across an ensemble of reward models (query by
  committee, Seung et al. 1992; Christiano et al. 2017 used ensemble variance to pick clips);
- "random": the baseline every active method must beat.

Pure numpy; the selection is seeded and deterministic.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np


def _uncertainty(margins: np.ndarray) -> np.ndarray:
    """margins (E, N) of r_a − r_b per ensemble member -> (N,) closeness of the mean P(a ≻ b) to ½."""
    p = 1.0 / (1.0 + np.exp(-margins.mean(0)))
    return -np.abs(p - 0.5)


def _disagreement(margins: np.ndarray) -> np.ndarray:
    if margins.shape[0] < 2:
        raise ValueError("'disagreement' needs scores from at least 2 reward models (an ensemble)")
    return margins.std(0)


SELECTION_STRATEGIES: dict[str, Callable[[np.ndarray], np.ndarray] | None] = {
    "uncertainty": _uncertainty,
    "disagreement": _disagreement,
    "random": None,
}


def select_pairs(scores_a: np.ndarray, scores_b: np.ndarray, k: int, strategy: str = "uncertainty",
                 seed: int = 0) -> np.ndarray:
    """Indices of the k pairs to label, most informative first.

    scores_a, scores_b: reward-model scores of each pair's two answers, shape (N,) for one model or
    (E, N) for an ensemble of E. Ties in the informativeness score are broken at random (seeded),
    so a flat score does not silently fall back to "the first k".
    """
    if strategy not in SELECTION_STRATEGIES:
        raise ValueError(f"unknown selection strategy {strategy!r}; valid: {sorted(SELECTION_STRATEGIES)}")
    margins = np.atleast_2d(np.asarray(scores_a, dtype=float) - np.asarray(scores_b, dtype=float))   # (E, N)
    n = margins.shape[1]
    if not 0 <= k <= n:
        raise ValueError(f"cannot select {k} of {n} pairs")
    rng = np.random.default_rng(seed)
    tiebreak = rng.random(n)
    fn = SELECTION_STRATEGIES[strategy]
    if fn is None:
        return rng.permutation(n)[:k]
    value = fn(margins)
    return np.lexsort((tiebreak, -value))[:k]     # by value descending, then the random tiebreak
