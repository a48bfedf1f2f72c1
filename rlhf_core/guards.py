"""Reward-hacking guards: signals computed every iteration, and the alerts they raise.

A policy optimised against a learned reward model finds what the model over-rewards (Gao et al.
2023, "Scaling Laws for Reward Model Overoptimization"): the proxy reward keeps rising while the
true objective falls. Each detector below watches one symptom:

    proxy_up_gold_down      the reward model's score of the held-out answers rises while the gold
                            signal — the share of answers the independent evaluation judge finds
                            right — falls (the proxy of both iterations scored by the *same*,
                            latest reward model, so it is comparable across iterations)
    ensemble_disagreement   reward-model ensemble members disagree more on the policy's answers
                            than at the first measurement: the policy left the data they agree on
    reward_length           the RL rewards correlate with answer length: length is being rewarded
    kl_budget               the policy drifted further from the reference than budgeted
    diversity_collapse      distinct bigrams of the held-out answers fell below a share of the base's
    detector_gap            the training side's refusal detector and the independent evaluation
                            judge agree on fewer answers than at the base: the policy learned to
                            please the detector (e.g. an apology that opens a compliance)

Pure functions of numbers and texts; the flow gathers the signals and acts on the alerts.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Alert:
    detector: str
    iteration: int
    value: float
    threshold: float
    message: str

    def as_dict(self) -> dict:
        return asdict(self)


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Distinct n-grams / all n-grams over the texts (whitespace tokens, lower-cased); 0 if none."""
    grams = [tuple(w[i: i + n]) for t in texts for w in [t.lower().split()] for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def correlation(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation; nan when either side is constant or there are fewer than 3 points."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 3 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def check(signals: Sequence[dict], cfg) -> list[Alert]:
    """Alerts for the latest iteration in `signals` (oldest first; the first entry is the base).

    Each entry may hold: iteration, proxy (latest reward model's mean score of this iteration's
    held-out answers), proxy_prev (the same model's mean score of the previous iteration's answers),
    gold, gold_prev (the evaluation judge's share of right answers, independent of every training
    signal), judge_agreement, ensemble_std, reward_length_corr, kl, distinct_2. Missing or nan signals raise nothing. `cfg` is
    config.GuardsConfig.
    """
    cur, base = signals[-1], signals[0]
    k = int(cur["iteration"])
    ok = lambda *vals: all(v is not None and v == v for v in vals)  # noqa: E731 (present and not nan)
    alerts = []
    proxy, proxy_prev, gold, gold_prev = (cur.get(x) for x in ("proxy", "proxy_prev", "gold", "gold_prev"))
    if ok(proxy, proxy_prev, gold, gold_prev) and proxy > proxy_prev and gold_prev - gold > cfg.gold_drop:
        alerts.append(Alert("proxy_up_gold_down", k, gold - gold_prev, -cfg.gold_drop,
                            f"reward-model score rose {proxy_prev:.2f} → {proxy:.2f} while the independent judge fell "
                            f"{gold_prev:.2f} → {gold:.2f}"))
    stds = [s.get("ensemble_std") for s in signals if ok(s.get("ensemble_std"))]
    if len(stds) >= 2 and ok(cur.get("ensemble_std")) and stds[0] > 0 \
            and cur["ensemble_std"] > cfg.disagreement_ratio * stds[0]:
        alerts.append(Alert("ensemble_disagreement", k, cur["ensemble_std"], cfg.disagreement_ratio * stds[0],
                            f"reward-model ensemble disagreement {cur['ensemble_std']:.3f} is over "
                            f"{cfg.disagreement_ratio:g}× its first value {stds[0]:.3f}"))
    r = cur.get("reward_length_corr")
    if ok(r) and abs(r) > cfg.max_length_correlation:
        alerts.append(Alert("reward_length", k, r, cfg.max_length_correlation,
                            f"RL reward correlates with answer length (r = {r:.2f})"))
    kl = cur.get("kl")
    if ok(kl) and kl > cfg.kl_budget:
        alerts.append(Alert("kl_budget", k, kl, cfg.kl_budget,
                            f"KL to the reference {kl:.1f} nats/answer is over the budget {cfg.kl_budget:g}"))
    a, a0 = cur.get("judge_agreement"), base.get("judge_agreement")
    if ok(a, a0) and k > 0 and a0 - a > cfg.max_agreement_drop:
        alerts.append(Alert("detector_gap", k, a, a0 - cfg.max_agreement_drop,
                            f"the training detector agrees with the evaluation judge on {100 * a:.0f} % of answers, "
                            f"down from {100 * a0:.0f} % at the base"))
    d, d0 = cur.get("distinct_2"), base.get("distinct_2")
    if ok(d, d0) and k > 0 and d < cfg.min_diversity_ratio * d0:
        alerts.append(Alert("diversity_collapse", k, d, cfg.min_diversity_ratio * d0,
                            f"distinct bigrams of the answers fell to {d:.2f} from {d0:.2f} at the base"))
    return alerts
