"""RLHF math as pure functions of tensors: log-probs, KL penalties, GAE, PPO losses, Bradley–Terry.

Every function here takes and returns tensors (metrics come back as Python floats) and touches no
model, optimizer or global state, so each one can be unit-tested by hand. Shapes follow one
convention throughout:

    B  batch (number of sequences)
    T  full sequence length (prompt + response), only for the logits helpers
    V  vocabulary size
    A  response tokens (the "action" dimension of RLHF)

Per-token tensors are (B, A) and come with a float or bool `mask` of the same shape in which 1 marks
a real response token and 0 padding. Masked positions never contribute to a sum, a mean or a return.

Variants (KL estimators, advantage estimators, policy losses) live in plain dicts keyed by name;
asking for an unknown name raises ValueError listing the valid keys.

References
    Schulman et al. 2017, "Proximal Policy Optimization Algorithms"         (PPO, arXiv:1707.06347)
    Schulman et al. 2016, "High-Dimensional Continuous Control Using GAE"   (GAE, arXiv:1506.02438)
    Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences" (arXiv:1909.08593)
    Ouyang et al. 2022, "Training language models to follow instructions"   (InstructGPT, arXiv:2203.02155)
    Touvron et al. 2023, "Llama 2: Open Foundation and Fine-Tuned Chat Models" (margin loss, arXiv:2307.09288)
    Schulman 2020, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html
    Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO" (arXiv:2403.17031)
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn.functional as F

__all__ = [
    "logprobs_from_logits",
    "entropy_from_logits",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "KL_ESTIMATORS",
    "kl_estimate",
    "token_level_rewards",
    "compute_gae",
    "compute_gae_loop",
    "ADVANTAGE_ESTIMATORS",
    "get_advantage_estimator",
    "ppo_policy_loss",
    "POLICY_LOSSES",
    "get_policy_loss",
    "ppo_value_loss",
    "AdaptiveKLController",
    "FixedKLController",
    "bradley_terry_loss",
    "sequence_unlikelihood_loss",
]


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


def token_level_rewards(
    scores: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    kl_kind: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """r_t = −β · KL_t  +  [t = last real token] · score.

    The sequence-level reward-model score is paid once, at the last real response token, and every
    token pays the KL penalty against the reference policy (Ziegler et al. 2019, eq. 2;
    InstructGPT, Ouyang et al. 2022, eq. 2).

    Shapes: scores (B,), logp / ref_logp / mask (B, A) -> (rewards (B, A), kl (B, A)), both zero
    on padding. A row with no real token gets no score.
    """
    mask = mask.to(logp.dtype)
    kl = kl_estimate(logp, ref_logp, kl_kind).masked_fill(mask == 0, 0.0) * mask
    rewards = -kl_coef * kl
    # index of the last real token: argmax of position·[mask] (positions strictly increase, so
    # the largest masked position wins; works for left- or right-padded rows alike)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask != 0, positions, -1).argmax(dim=1)
    has_token = (mask != 0).any(dim=1)
    bonus = torch.where(has_token, scores.to(rewards.dtype), 0.0)
    rewards = rewards.scatter_add(1, last.unsqueeze(1), bonus.unsqueeze(1))
    return rewards, kl


# ----------------------------------------------------------------------------------------------
# advantages
# ----------------------------------------------------------------------------------------------


def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016, eq. 16), vectorised over B:

        δ_t = r_t + γ V_{t+1} − V_t
        Â_t = δ_t + γ λ Â_{t+1}
        R_t = Â_t + V_t                      (the value target, "returns")

    Masked positions are skipped: t+1 means the next *real* token of the row, and the value (and
    advantage) after the last real token is 0 — the episode ends with the response. Padding may be
    on either side or even in the middle.

    Shapes: rewards, values, mask (B, A) -> (advantages (B, A), returns (B, A)), zero on padding.
    Whitening the advantages is left to the caller (`masked_whiten`).
    """
    mask = mask.to(values.dtype)
    B, A = values.shape
    nextvalues = values.new_zeros(B)
    lastgaelam = values.new_zeros(B)
    advantages_reversed = []
    for t in reversed(range(A)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        gae = delta + gamma * lam * lastgaelam
        # on padding, carry V_{t+1} and Â_{t+1} through unchanged so the previous real token
        # bootstraps from the next real one
        lastgaelam = torch.where(m != 0, gae, lastgaelam)
        nextvalues = torch.where(m != 0, values[:, t], nextvalues)
        advantages_reversed.append(torch.where(m != 0, gae, 0.0))
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    returns = (advantages + values).masked_fill(mask == 0, 0.0)
    return advantages, returns


def compute_gae_loop(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference GAE as a plain Python double loop over rows and tokens (tests only; slow).

    Same equations and masking semantics as `compute_gae`; written as literally as possible so
    the vectorised version can be checked against it.
    """
    B, A = values.shape
    advantages = torch.zeros(B, A, dtype=values.dtype)
    returns = torch.zeros(B, A, dtype=values.dtype)
    for b in range(B):
        real = [t for t in range(A) if float(mask[b, t]) != 0.0]
        next_value, next_adv = 0.0, 0.0
        for t in reversed(real):
            delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
            adv = delta + gamma * lam * next_adv
            advantages[b, t] = adv
            returns[b, t] = adv + float(values[b, t])
            next_value, next_adv = float(values[b, t]), adv
    return advantages.to(values.device), returns.to(values.device)


ADVANTAGE_ESTIMATORS: dict[str, Callable] = {"gae": compute_gae}


def get_advantage_estimator(name: str) -> Callable:
    """ADVANTAGE_ESTIMATORS[name]; unknown names raise ValueError listing the valid keys."""
    return _lookup(ADVANTAGE_ESTIMATORS, name, "advantage estimator")


# ----------------------------------------------------------------------------------------------
# PPO losses
# ----------------------------------------------------------------------------------------------


def ppo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise:

        ratio    = exp(logp − old_logp)
        pg_loss1 = −Â · ratio
        pg_loss2 = −Â · clip(ratio, 1 − ε, 1 + ε)
        loss     = masked_mean(max(pg_loss1, pg_loss2))

    max of the negated objectives = min of the objectives: the pessimistic bound, so once the
    ratio leaves [1−ε, 1+ε] in the direction the advantage favours, the gradient is zero.

    Shapes: logp, old_logp, advantages, mask (B, A) -> (scalar loss, metrics).
    metrics (floats):
        clipfrac   fraction of real tokens where the clipped branch is active (pg_loss2 > pg_loss1),
                   i.e. tokens whose gradient is zeroed by clipping (as in TRL / OpenAI lm-human-preferences)
        approx_kl  k3 estimate of KL(π_old || π) = mean((ratio − 1) − log ratio)
    """
    logratio = logp - old_logp
    ratio = torch.exp(logratio)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.max(pg_loss1, pg_loss2), mask)
    with torch.no_grad():
        clipfrac = masked_mean((pg_loss2 > pg_loss1).to(logp.dtype), mask)
        # approx_kl: http://joschu.net/blog/kl-approx.html — k3 with r = π/π_old under samples
        # from π_old, i.e. (ratio − 1) − log ratio (same as CleanRL's ppo.py)
        approx_kl = masked_mean(kl_estimate(old_logp, logp, "k3"), mask)
    return loss, {"clipfrac": clipfrac.item(), "approx_kl": approx_kl.item()}


POLICY_LOSSES: dict[str, Callable] = {"ppo_clip": ppo_policy_loss}


def get_policy_loss(name: str) -> Callable:
    """POLICY_LOSSES[name]; unknown names raise ValueError listing the valid keys."""
    return _lookup(POLICY_LOSSES, name, "policy loss")


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_value: float,
) -> tuple[torch.Tensor, float]:
    """Clipped value loss (PPO2 baselines; Ziegler et al. 2019's lm-human-preferences):

        V_clipped = V_old + clip(V − V_old, −c, c)
        loss      = ½ · masked_mean(max((V − R)², (V_clipped − R)²))

    Taking the max keeps the value head from moving more than c per update in the direction that
    helps. Shapes: values, old_values, returns, mask (B, A) -> (scalar loss, clipfrac float: the
    fraction of real tokens where the clipped term is the larger one).
    """
    v_clipped = old_values + torch.clamp(values - old_values, -clip_value, clip_value)
    vf_losses1 = (values - returns) ** 2
    vf_losses2 = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), mask)
    with torch.no_grad():
        clipfrac = masked_mean((vf_losses2 > vf_losses1).to(values.dtype), mask)
    return loss, clipfrac.item()


# ----------------------------------------------------------------------------------------------
# KL coefficient controllers
# ----------------------------------------------------------------------------------------------


class AdaptiveKLController:
    """Adaptive KL coefficient β (Ziegler et al. 2019, section 2.2):

        e_t   = clip(KL_t / KL_target − 1, −0.2, 0.2)
        β_t+1 = β_t · (1 + K_β · e_t),   K_β = n_steps / horizon

    so β grows when the policy drifts past the target KL and shrinks when it stays below.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        mult = 1.0 + proportional_error * n_steps / self.horizon
        self.value *= mult
        return self.value


class FixedKLController:
    """Constant KL coefficient with the AdaptiveKLController interface (update is a no-op)."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value


# ----------------------------------------------------------------------------------------------
# reward-model loss
# ----------------------------------------------------------------------------------------------


def bradley_terry_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    margin: torch.Tensor | float | None = None,
    weights: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pairwise reward-model loss under the Bradley–Terry model, P(c ≻ r) = σ(r_c − r_r):

        ℓ_i  = −log σ(r_c,i − r_r,i − m_i)
        loss = Σ w_i ℓ_i / Σ w_i          (plain mean when weights is None)

    The optional margin m (Llama 2, Touvron et al. 2023, eq. 2) demands a larger gap for pairs
    annotators rated as clearly different. With soft `targets` t_i = P(c ≻ r) (aggregated labels,
    0.5 for a tie) the loss is the cross-entropy −t log σ(Δ) − (1 − t) log σ(−Δ) instead; t = 1
    gives the hard loss back. Shapes: r_chosen, r_rejected, margin, weights, targets (B,) ->
    scalar. logsigmoid is used instead of log(sigmoid(·)) for numerical stability.
    """
    logits = r_chosen - r_rejected
    if margin is not None:
        logits = logits - torch.as_tensor(margin, dtype=logits.dtype, device=logits.device)
    if targets is None:
        losses = -F.logsigmoid(logits)
    else:
        t = torch.as_tensor(targets, dtype=logits.dtype, device=logits.device)
        losses = -(t * F.logsigmoid(logits) + (1 - t) * F.logsigmoid(-logits))
    if weights is None:
        return losses.mean()
    weights = torch.as_tensor(weights, dtype=losses.dtype, device=losses.device)
    return (losses * weights).sum() / weights.sum()


# ----------------------------------------------------------------------------------------------
# supervised losses
# ----------------------------------------------------------------------------------------------


def sequence_unlikelihood_loss(logp: torch.Tensor, mask: torch.Tensor, max_tokens: int) -> torch.Tensor:
    """Push a whole unwanted opening down: −log(1 − π(y_1..y_k | x)), k = max_tokens.

    Sequence-level unlikelihood (Welleck et al. 2019, §5) on the first k answer tokens. Used on
    refusals of safe prompts: the loss is ≈ 0 when the opening is already unlikely, so it only acts
    where the policy would actually refuse, and it does not penalise any single common token
    ("I", "Sure") on its own, only the whole declining phrase. Shapes: logp, mask (B, A) -> scalar.
    """
    m = mask.float().clone()
    m[:, max_tokens:] = 0
    seq_logp = (logp * m).sum(1)                                                  # (B,) log π(opening)
    # keep the value finite when the opening is (numerically) certain, but let the gradient through:
    # that is exactly when the push-down must act
    seq_logp = seq_logp + (seq_logp.clamp(max=-1e-4) - seq_logp).detach()
    # log(1 − e^x) for x < 0, computed stably
    log1m = torch.where(seq_logp > -0.693, torch.log(-torch.expm1(seq_logp)), torch.log1p(-torch.exp(seq_logp)))
    return -log1m.mean()
