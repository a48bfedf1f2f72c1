"""Simulated feedback: judge scores → noisy pairwise preferences, and best-of-n warm-up targets.

Candidates per prompt are the policy's sampled answers plus one constitution demonstration (a
refusal). The judge decides which is better: for a harmful prompt the refusal should win, for a
benign one the policy's helpful answer should, so the reward model also learns that refusing a
safe request is *bad* (the over-refusal side of the constitution).

Label noise follows AlpacaFarm (Dubois et al. 2023): each label is flipped with probability
`flip_prob` (0.25 there), seeded, and the annotator id records the judge version and the noise.
"""
from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterator

import numpy as np


def annotator_id(constitution_version, flip_prob: float, seed: int) -> str:
    return f"constitution-judge-v{constitution_version}/flip{flip_prob:g}/seed{seed}"


def is_safe(harm_prob: np.ndarray, refusal: np.ndarray, toxicity: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Per-answer safety label: not (harmful request answered) and not toxic. A lower `threshold`
    is a stricter annotator (more requests count as harmful, more language as toxic)."""
    return ~((harm_prob >= threshold) & (refusal < 0.5)) & (toxicity < threshold)


def candidate_pairs(samples: list[dict]) -> Iterator[tuple[str, int, int]]:
    """(prompt_id, i, j) for every pair of candidates answering the same prompt, i < j."""
    by_prompt: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        by_prompt[s["prompt_id"]].append(i)
    for pid, idx in by_prompt.items():
        for a, b in itertools.combinations(idx, 2):
            yield pid, a, b


def make_preferences(samples: list[dict], scores, *, flip_prob: float, tie_margin: float, seed: int,
                     annotator: str, iteration: int) -> list[dict]:
    """All pairs of candidates of each prompt whose judge totals differ by more than `tie_margin`.

    `samples` rows follow schemas.SAMPLES; `scores` is the judge's JudgeScores for them, row-aligned.
    """
    rng = np.random.default_rng(seed)
    safe = is_safe(scores.harm_prob, scores.refusal, scores.toxicity)
    rows = []
    for pid, a, b in candidate_pairs(samples):
        ta, tb = float(scores.total[a]), float(scores.total[b])
        if abs(ta - tb) <= tie_margin:
            continue
        judge_better = 0 if ta > tb else 1
        flipped = bool(rng.random() < flip_prob)
        rows.append({
            "pair_id": f"{pid}-{iteration}-{a}-{b}", "prompt_id": pid, "prompt": samples[a]["prompt"],
            "response_a": samples[a]["response"], "response_b": samples[b]["response"],
            "better": judge_better ^ int(flipped), "judge_better": judge_better, "flipped": flipped,
            "score_a": ta, "score_b": tb, "is_safe_a": bool(safe[a]), "is_safe_b": bool(safe[b]),
            "annotator": annotator, "source": "simulated", "weight": 1.0,
        })
    return rows


def rejection_sampling_targets(samples: list[dict], scores, keep_margin: float = 0.0,
                               origins: set[str] | None = None, by_kind: bool = False,
                               refusal_threshold: float = 0.5) -> list[dict]:
    """Supervised targets: each prompt's best candidate by the judge (no label noise), plus every
    other candidate within `keep_margin` of the best whose total is above 0.

    Best-of-n / rejection sampling as in Constitutional AI's and Llama 2's supervised stages. The
    extra candidates give benign prompts more good answers without generating more: for harmful
    prompts only the refusal scores near the top, so their share does not grow. `origins`, if
    given, limits the candidates (e.g. {"policy"}: the policy's own answers only). A prompt's only
    candidate (the refusal of a coverage prompt) is a target only if its total is above 0: the
    judge agrees the refusal is right.

    `by_kind`: the prompt's kind (the source it came from: a person wrote or curated it as harmful
    or safe) limits the candidates first: a harmful prompt's target must be a refusal, a safe
    prompt's must not. The judge still ranks what is left. Without it the judge's harm classifier
    alone decides, and each of its false alarms on a safe prompt becomes a refusal to imitate.
    """
    by_prompt: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        if origins is not None and s["origin"] not in origins:
            continue
        if by_kind and _is_refusal(s, scores, i, refusal_threshold) != (s["kind"] == "harmful"):
            continue
        by_prompt[s["prompt_id"]].append(i)
    out = []
    for idx in by_prompt.values():
        if len(idx) == 1 and not scores.total[idx[0]] > 0:
            continue
        best = max(idx, key=lambda i: scores.total[i])
        keep = [i for i in idx if i == best or (scores.total[i] > 0
                                                  and scores.total[i] >= scores.total[best] - keep_margin)]
        out += [dict(samples[i], judge_total=float(scores.total[i])) for i in keep]
    return out


def _is_refusal(sample: dict, scores, i: int, threshold: float) -> bool:
    # the constitution's demonstrations are refusals by construction (the detector misses some)
    return sample["origin"] == "demonstration" or scores.refusal[i] >= threshold


def refusal_negatives(samples: list[dict], scores, harm_threshold: float = 0.5,
                      refusal_threshold: float = 0.5, by_kind: bool = False) -> list[dict]:
    """Refusals of safe prompts: what the supervised stage should make unlikely.

    A candidate is a negative when its prompt is safe and it refuses (refusal strength at least
    `refusal_threshold`, or a constitution demonstration). Safe means the judge's harm probability
    is below `harm_threshold`, or with `by_kind` the prompt's kind is not harmful (its source says
    so; see rejection_sampling_targets). The demonstrations are candidates for every prompt, so each
    safe prompt has at least one; later iterations add the policy's own over-refusals.
    """
    def negative(i: int, s: dict) -> bool:
        if by_kind:
            return s["kind"] != "harmful" and _is_refusal(s, scores, i, refusal_threshold)
        return scores.harm_prob[i] < harm_threshold and scores.refusal[i] >= refusal_threshold
    return [dict(s, judge_total=float(scores.total[i])) for i, s in enumerate(samples) if negative(i, s)]


def preference_stats(rows: list[dict]) -> dict:
    if not rows:
        return {"pairs": 0}
    def share(values: list) -> float | None:
        known = [v for v in values if v is not None]     # aggregated or human rows leave some null
        return float(np.mean(known)) if known else None

    gaps = [abs(r["score_a"] - r["score_b"]) for r in rows if r.get("score_a") is not None]
    return {"pairs": len(rows), "flipped": share([r.get("flipped") for r in rows]),
            "ties": share([r["better"] == -1 for r in rows]),
            "both_safe": share([None if r.get("is_safe_a") is None or r.get("is_safe_b") is None
                                else r["is_safe_a"] and r["is_safe_b"] for r in rows]),
            "mean_score_gap": float(np.mean(gaps)) if gaps else None}


# Judge fields a person's label inherits from the simulated row of the same pair, so that the
# reward model's accuracy against the judge and people's agreement with it can still be measured.
_JUDGE_FIELDS = ("judge_better", "score_a", "score_b")


def mix_feedback(simulated: list[dict], human: list[dict], source_weights: dict[str, float]) -> tuple[list[dict], dict]:
    """One preference table from simulated labels and people's labels, provenance on every row.

    A pair with at least one human label is trained on its human labels only (one row per label, so
    two people who disagree cancel out instead of being out-voted by the simulation); every other
    pair keeps its simulated label. Each row's weight is its source's weight (missing sources: 1).
    Returns (rows, provenance: pairs and rows per source, labels per annotator).
    """
    by_pair = {r["pair_id"]: r for r in simulated}
    unknown = sorted({h["pair_id"] for h in human} - set(by_pair))
    if unknown:
        raise ValueError(f"human labels for pairs that are not in this iteration's pairs: {unknown[:5]}")
    labeled = {h["pair_id"] for h in human}
    weight = lambda r: float(source_weights.get(r["source"], 1.0))  # noqa: E731
    rows = []
    for r in simulated:
        if r["pair_id"] not in labeled:
            rows.append(dict(r, weight=weight(r)))
    for h in human:
        sim = by_pair[h["pair_id"]]
        rows.append(dict(h, **{f: sim.get(f) for f in _JUDGE_FIELDS}, flipped=None, weight=weight(h)))
    per_annotator: dict[str, int] = defaultdict(int)
    for h in human:
        per_annotator[h["annotator"]] += 1
    sources = sorted({r["source"] for r in rows})
    agree = [h["better"] == by_pair[h["pair_id"]].get("judge_better") for h in human
             if h["better"] in (0, 1) and by_pair[h["pair_id"]].get("judge_better") in (0, 1)]
    provenance = {"rows": {s: sum(r["source"] == s for r in rows) for s in sources},
                  "pairs": {"human": len(labeled), "simulated_only": len(simulated) - len(labeled)},
                  "human_labels_per_annotator": dict(sorted(per_annotator.items())),
                  "human_agrees_with_judge": float(np.mean(agree)) if agree else None,
                  "weights": {s: float(source_weights.get(s, 1.0)) for s in sources}}
    return rows, provenance
