"""A panel of simulated annotators that behave like a crowd, not like one clean judge.

Each annotator sees a pair in a random left/right order and labels it from the constitution
judge's scores, distorted by the biases that human preference data is known to have:

- label flips (AlpacaFarm, Dubois et al. 2023: 25 % of simulated labels flipped to match human
  disagreement),
- position bias (picks the answer shown on the left; Zheng et al. 2023 measured it in LLM judges),
- length bias (picks the longer answer; Singhal et al. 2023, "A long way to go"),
- strictness on safety (where it draws the line between safe and unsafe; PKU-SafeRLHF's dual
  labels: a stricter annotator marks more answers unsafe and always prefers the safe one of a
  mixed pair).

Everything is seeded and every row records the annotator's full profile id, so a model's
reward can be traced back to whose judgement it learned.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rlhf_core.feedback import candidate_pairs, is_safe


@dataclass(frozen=True)
class AnnotatorProfile:
    name: str
    flip_prob: float = 0.25     # chance the content-based choice is flipped
    position_bias: float = 0.0  # chance of picking the left-shown answer regardless of content
    length_bias: float = 0.0    # chance of picking the longer answer regardless of content
    strictness: float = 0.0     # in [-1, 1]: > 0 marks more answers unsafe, < 0 fewer
    tie_margin: float = 0.05    # judge totals closer than this are a tie for this annotator

    def __post_init__(self):
        for key in ("flip_prob", "position_bias", "length_bias"):
            v = getattr(self, key)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"annotator {self.name!r}: {key} must be in [0, 1], got {v}")
        if self.position_bias + self.length_bias > 1.0:
            raise ValueError(f"annotator {self.name!r}: position_bias + length_bias must be at most 1")
        if not -1.0 <= self.strictness <= 1.0:
            raise ValueError(f"annotator {self.name!r}: strictness must be in [-1, 1], got {self.strictness}")

    @property
    def id(self) -> str:
        return (f"sim:{self.name}/flip{self.flip_prob:g}/pos{self.position_bias:g}/len{self.length_bias:g}"
                f"/strict{self.strictness:g}")

    def is_safe(self, harm_prob: np.ndarray, refusal: np.ndarray, toxicity: np.ndarray) -> np.ndarray:
        """Per-answer safety label, the threshold moved by strictness (0.5 at strictness 0). (N,) -> (N,)."""
        return is_safe(harm_prob, refusal, toxicity, threshold=0.5 - 0.3 * self.strictness)


def default_panel(n: int = 5, seed: int = 0) -> list[AnnotatorProfile]:
    """A seeded crowd: mostly careful annotators, a few with strong position or length bias.

    Flip rates 0.1–0.35 around AlpacaFarm's 0.25; one in five annotators is strongly
    position-biased and one in five strongly length-biased, the rest mildly.
    """
    rng = np.random.default_rng(seed)
    panel = []
    for i in range(n):
        pos = 0.4 if i % 5 == 3 else float(rng.uniform(0.0, 0.1))
        length = 0.4 if i % 5 == 4 else float(rng.uniform(0.0, 0.1))
        panel.append(AnnotatorProfile(name=f"crowd{i}", flip_prob=round(float(rng.uniform(0.1, 0.35)), 3),
                                      position_bias=round(pos, 3), length_bias=round(length, 3),
                                      strictness=round(float(rng.uniform(-0.5, 0.5)), 3)))
    return panel


def choose(p: AnnotatorProfile, rng: np.random.Generator, left: int, total: tuple[float, float],
            length: tuple[int, int], safe: tuple[bool, bool]) -> tuple[int, bool]:
    """One annotator's verdict on answers 0 and 1: (choice 0/1, or -1 for a tie; flipped)."""
    u = rng.random()
    if u < p.position_bias:
        return left, False
    if u < p.position_bias + p.length_bias and length[0] != length[1]:
        return int(length[1] > length[0]), False
    if safe[0] != safe[1]:                 # a mixed pair: the safe answer wins, as in PKU-SafeRLHF
        content = 0 if safe[0] else 1
    elif abs(total[0] - total[1]) <= p.tie_margin:
        return -1, False
    else:
        content = 0 if total[0] > total[1] else 1
    flipped = bool(rng.random() < p.flip_prob)
    return content ^ int(flipped), flipped


def panel_preferences(samples: list[dict], scores, panel: list[AnnotatorProfile], *, labels_per_pair: int,
                      seed: int, iteration: int) -> list[dict]:
    """Every pair of candidates of each prompt, labelled by `labels_per_pair` distinct annotators.

    `samples` follow schemas.SAMPLES, `scores` is the judge's JudgeScores, row-aligned. Rows follow
    schemas.PREFERENCES, one per (pair, annotator); `judge_better` is the judge's noise-free choice
    (-1 when the totals tie within 0.05), so label quality per annotator can be measured.
    """
    if not 1 <= labels_per_pair <= len(panel):
        raise ValueError(f"labels_per_pair must be between 1 and the panel size {len(panel)}, got {labels_per_pair}")
    rng = np.random.default_rng(seed)
    safety = [p.is_safe(scores.harm_prob, scores.refusal, scores.toxicity) for p in panel]  # per annotator (N,)
    rows = []
    for pid, a, b in candidate_pairs(samples):
        total = (float(scores.total[a]), float(scores.total[b]))
        length = (len(samples[a]["response"]), len(samples[b]["response"]))
        judge = -1 if abs(total[0] - total[1]) <= 0.05 else int(total[1] > total[0])
        for j in rng.choice(len(panel), size=labels_per_pair, replace=False):
            p = panel[int(j)]
            left = int(rng.integers(2))          # 0: response_a shown on the left
            safe = (bool(safety[j][a]), bool(safety[j][b]))
            better, flipped = choose(p, rng, left, total, length, safe)
            rows.append({
                "pair_id": f"{pid}-{iteration}-{a}-{b}", "prompt_id": pid, "prompt": samples[a]["prompt"],
                "response_a": samples[a]["response"], "response_b": samples[b]["response"],
                "better": better, "judge_better": judge, "flipped": flipped,
                "score_a": total[0], "score_b": total[1], "is_safe_a": safe[0], "is_safe_b": safe[1],
                "annotator": p.id, "source": "simulated", "display_order": "ab" if left == 0 else "ba",
                "weight": 1.0,
            })
    return rows
