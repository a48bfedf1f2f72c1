"""Confidence intervals for the rates every evaluation table reports.

A held-out rate of 12 out of 50 prompts is 24 %, but anything from about 14 % to 37 % is
consistent with it: tables that show a point estimate alone invite reading noise as progress.
The Wilson score interval (Wilson 1927; recommended over the normal "Wald" interval by Brown, Cai
& DasGupta 2001, "Interval Estimation for a Binomial Proportion") stays inside [0, 1] and keeps
close to its nominal coverage for small n and rates near 0 or 1, which is where safety rates live.
"""
from __future__ import annotations

import math

Z95 = 1.959963984540054   # the standard normal's 97.5 % quantile


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials, as fractions in [0, 1]; (nan, nan) if n = 0.

        centre = (p + z²/2n) / (1 + z²/n),  half = z / (1 + z²/n) · sqrt(p(1-p)/n + z²/4n²)
    """
    if n <= 0:
        return (math.nan, math.nan)
    if not 0 <= k <= n:
        raise ValueError(f"wilson_interval: need 0 <= k <= n, got k={k}, n={n}")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


def rate_with_interval(flags: list[bool]) -> dict:
    """{"rate": %, "ci": [low %, high %], "k": hits, "n": trials} of a list of booleans (NaN when empty)."""
    n, k = len(flags), int(sum(bool(f) for f in flags))
    lo, hi = wilson_interval(k, n)
    return {"rate": 100.0 * k / n if n else math.nan, "ci": [100.0 * lo, 100.0 * hi], "k": k, "n": n}
