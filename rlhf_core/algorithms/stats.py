"""Log-probabilities, entropy, masked statistics and per-token KL estimators.

Shapes: B batch, T full sequence (prompt + response), V vocabulary, A response tokens. Per-token
tensors are (B, A) with a `mask` of the same shape, 1 on real response tokens and 0 on padding.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F


def _lookup(registry: Mapping[str, Callable], name: str, what: str) -> Callable:
    """Return registry[name]; an unknown name raises ValueError listing the valid keys."""
    try:
        return registry[name]
    except KeyError:
        raise ValueError(f"unknown {what} {name!r}; valid: {sorted(registry)}") from None


# ----------------------------------------------------------------------------------------------
# log-probabilities and entropy
# ----------------------------------------------------------------------------------------------


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log π(label_t | ·) = logits[label_t] − logsumexp(logits), gathered per token.

    Shapes: logits (B, T, V), labels (B, T) integer ids -> (B, T).

    A plain `log_softmax(logits).gather(...)` materialises a second (B, T, V) tensor, which for a
    50k-token vocabulary is the largest allocation of a PPO step. For float32/float64 we gather the
    label logit and subtract a row-wise logsumexp instead (one (T, V) temporary at a time); for
    half precision logsumexp is less accurate, so we fall back to log_softmax one row at a time.
    (Same trick as TRL's `selective_log_softmax`.)
    """
    if logits.dtype in (torch.float32, torch.float64):
        label_logits = torch.gather(logits, dim=-1, index=labels.unsqueeze(-1)).squeeze(-1)
        # loop over B so only one row's (T, V) exp-buffer is alive at once
        logsumexp = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
        return label_logits - logsumexp
    rows = []
    for row_logits, row_labels in zip(logits, labels):
        row_logp = F.log_softmax(row_logits, dim=-1)
        rows.append(row_logp.gather(dim=-1, index=row_labels.unsqueeze(-1)).squeeze(-1))
    return torch.stack(rows)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H(π) = logsumexp(z) − Σ_v softmax(z)_v · z_v, per token.

    Shapes: logits (B, T, V) -> (B, T).

    This identity avoids forming log(softmax) (and its −inf·0 for underflowed probabilities);
    computed row by row for the same memory reason as `logprobs_from_logits`.
    """
    rows = []
    for row in logits:
        pd = F.softmax(row, dim=-1)
        rows.append(torch.logsumexp(row, dim=-1) - torch.sum(pd * row, dim=-1))
    return torch.stack(rows)


# ----------------------------------------------------------------------------------------------
# masked statistics
# ----------------------------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Σ x·m / Σ m over `dim` (all elements when None).

    Shapes: x and mask broadcastable, typically (B, A) -> scalar, or (B,) / (A,) with `dim`.

    Padded positions are zeroed with masked_fill before multiplying, so a nan/inf sitting under
    the mask (e.g. a log-prob of a pad token) cannot leak into the mean. An all-zero mask gives 0
    instead of nan.
    """
    mask = mask.to(x.dtype)
    x = x.masked_fill(mask == 0, 0.0)
    total = (x * mask).sum() if dim is None else (x * mask).sum(dim=dim)
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    return total / count.clamp_min(torch.finfo(x.dtype).tiny)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Var[x] over masked elements: mean((x − μ)²), with Bessel's n/(n−1) when `unbiased`.

    Shapes: x, mask (B, A) -> scalar.
    """
    mean = masked_mean(x, mask)
    variance = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.to(x.dtype).sum()
        if n > 1:  # a single element has no sample variance; leave the biased value (0)
            variance = variance * n / (n - 1)
    return variance


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """(x − μ) / √(σ² + eps) over masked elements; with shift_mean=False the mean is added back
    (only rescaling, as done for rewards in Ziegler et al. 2019 / TRL). Padded positions return 0.

    Shapes: x, mask (B, A) -> (B, A).
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened.masked_fill(mask == 0, 0.0)


# ----------------------------------------------------------------------------------------------
# KL penalty and per-token rewards
# ----------------------------------------------------------------------------------------------

# Per-token estimators of KL(π || π_ref) from samples of π: http://joschu.net/blog/kl-approx.html
# With log r = log π_ref − log π:
#   k1 = −log r               unbiased, high variance, can be negative per token
#   k2 = ½ (log r)²           biased, low variance, ≥ 0
#   k3 = (r − 1) − log r      unbiased, low variance, ≥ 0 (since log r ≤ r − 1)
KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "k1": lambda logp, ref_logp: logp - ref_logp,
    "k2": lambda logp, ref_logp: 0.5 * (logp - ref_logp) ** 2,
    # expm1 keeps (r − 1) exact when r ≈ 1, i.e. when the policy is still close to the reference
    "k3": lambda logp, ref_logp: torch.expm1(ref_logp - logp) - (ref_logp - logp),
}


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(π || π_ref), `kind` in KL_ESTIMATORS ("k1", "k2", "k3").

    k1 = logp − ref_logp;  k2 = ½ (logp − ref_logp)²;  k3 = (r − 1) − log r,  r = exp(ref_logp − logp).
    Schulman, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html

    Shapes: logp, ref_logp (B, A) log-probs of the sampled tokens -> (B, A).
    """
    return _lookup(KL_ESTIMATORS, kind, "KL estimator")(logp, ref_logp)
