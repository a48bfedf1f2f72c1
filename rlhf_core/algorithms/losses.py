"""Losses: PPO's clipped surrogate and value loss, Bradley–Terry, sequence unlikelihood."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rlhf_core.algorithms.stats import _lookup, kl_estimate, masked_mean

# ----------------------------------------------------------------------------------------------
# PPO losses
# ----------------------------------------------------------------------------------------------


def aggregate_loss(loss: torch.Tensor, mask: torch.Tensor, agg: str = "token-mean",
                   max_tokens: int | None = None) -> torch.Tensor:
    """Reduce a per-token loss (B, A) to a scalar, `agg` a key of LOSS_AGGREGATIONS:

        token-mean               Σ_i,t ℓ / Σ_i,t m        every token weighs the same (DAPO, our PPO)
        seq-mean-token-mean      mean_i (Σ_t ℓ / Σ_t m)   GRPO as published: long answers count less per token
        seq-mean-token-sum-norm  mean_i (Σ_t ℓ) / L_max   Dr. GRPO: no length bias (L_max = max_tokens)
    """
    return _lookup(LOSS_AGGREGATIONS, agg, "loss aggregation")(loss, mask.to(loss.dtype), max_tokens)


def _seq_sum_norm(loss: torch.Tensor, mask: torch.Tensor, max_tokens: int | None) -> torch.Tensor:
    norm = max_tokens if max_tokens is not None else mask.shape[1]
    return (loss.masked_fill(mask == 0, 0.0) * mask).sum(1).mean() / norm


LOSS_AGGREGATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor, int | None], torch.Tensor]] = {
    "token-mean": lambda loss, mask, _: masked_mean(loss, mask),
    "seq-mean-token-mean": lambda loss, mask, _: masked_mean(loss, mask, dim=1).mean(),
    "seq-mean-token-sum-norm": _seq_sum_norm,
}


def ppo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    agg: str = "token-mean",
    max_tokens: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise:

        ratio    = exp(logp − old_logp)
        pg_loss1 = −Â · ratio
        pg_loss2 = −Â · clip(ratio, 1 − ε, 1 + ε)
        loss     = aggregate(max(pg_loss1, pg_loss2))          (`agg`, see LOSS_AGGREGATIONS)

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
    loss = aggregate_loss(torch.max(pg_loss1, pg_loss2), mask, agg, max_tokens)
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


# ----------------------------------------------------------------------------------------------
# offline preference optimisation (DPO family)
# ----------------------------------------------------------------------------------------------


def _implicit_rewards(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta):
    chosen, rejected = beta * (pi_chosen - ref_chosen), beta * (pi_rejected - ref_rejected)
    with torch.no_grad():
        metrics = {"reward_accuracy": (chosen > rejected).float().mean().item(),
                   "reward_margin": (chosen - rejected).mean().item(),
                   "chosen_reward": chosen.mean().item(), "rejected_reward": rejected.mean().item()}
    return chosen - rejected, metrics


def dpo_loss(pi_chosen: torch.Tensor, pi_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict]:
    """DPO (Rafailov et al. 2023, eq. 7) on summed answer log-probs log π(y|x), shapes (B,):

        h    = (log π(y_c) − log π_ref(y_c)) − (log π(y_r) − log π_ref(y_r))
        loss = −(1 − ε) log σ(β h) − ε log σ(−β h)

    ε = label_smoothing > 0 is conservative DPO (cDPO, Mitchell 2023): the labels are assumed
    flipped with probability ε, which bounds how far the policy moves on a noisy pair.
    Metrics: implicit rewards β·(log π − log π_ref), their accuracy and margin.
    """
    margin, metrics = _implicit_rewards(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta)   # β h
    losses = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    return losses.mean(), metrics


def ipo_loss(pi_chosen: torch.Tensor, pi_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict]:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm…", eq. 17): a squared loss that
    drives h to the finite target 1/(2β) instead of to infinity, so it does not overfit
    deterministic preferences. Pass *mean* token log-probs, as the paper and TRL do:

        loss = (h − 1/(2β))²
    """
    margin, metrics = _implicit_rewards(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta)
    h = margin / beta
    return ((h - 1 / (2 * beta)) ** 2).mean(), metrics


@dataclass(frozen=True)
class PreferenceLoss:
    fn: Callable[..., tuple[torch.Tensor, dict]]
    length_normalised: bool   # feed mean (not summed) token log-probs
    reference: str


PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {
    "dpo": PreferenceLoss(dpo_loss, length_normalised=False, reference="Rafailov et al. 2023 (cDPO: label_smoothing)"),
    "ipo": PreferenceLoss(ipo_loss, length_normalised=True, reference="Azar et al. 2023"),
}


def get_preference_loss(name: str) -> PreferenceLoss:
    return _lookup(PREFERENCE_LOSSES, name, "preference loss")


# ----------------------------------------------------------------------------------------------
# cost model (Safe-RLHF)
# ----------------------------------------------------------------------------------------------


def cost_model_loss(cost_a: torch.Tensor, cost_b: torch.Tensor, safe_a: torch.Tensor, safe_b: torch.Tensor,
                    safer: torch.Tensor, weights: torch.Tensor | None = None,
                    totals: tuple[float, float] | None = None) -> tuple[torch.Tensor, dict]:
    """Safe-RLHF's cost-model loss (Dai et al. 2023, eq. 6), shapes (B,):

        pairwise  −log σ(C(y_unsafer) − C(y_safer))          where a safer answer is known (safer ∈ {0, 1})
        sign      −log σ(s(y_a) C(y_a)) − log σ(s(y_b) C(y_b)),  s(y) = +1 if y is unsafe, −1 if safe

    The pairwise term orders answers by harm; the sign term anchors the scale, so C > 0 means
    "unsafe" and the Lagrangian's threshold on the expected cost has a meaning. `safer` is 0 when
    answer a is the safer one, 1 when b is, and −1 when neither is (same safety label): such a pair
    gives only the sign term. `totals` = (weight of the pairs with a known safer answer, weight of
    all pairs) of a larger batch these rows are part of (data parallel): the two means are taken over
    it, so the parts' losses add up to the whole batch's. Returns (loss, {"pairwise", "sign", "sign_accuracy"}).
    """
    w = (torch.ones_like(cost_a) if weights is None
         else torch.as_tensor(weights, dtype=cost_a.dtype, device=cost_a.device))
    known = (safer >= 0).to(cost_a.dtype)
    unsafer = torch.where(safer == 0, cost_b, cost_a)
    safest = torch.where(safer == 0, cost_a, cost_b)
    pairwise = -F.logsigmoid(unsafer - safest) * known
    s_a = 1.0 - 2.0 * safe_a.to(cost_a.dtype)
    s_b = 1.0 - 2.0 * safe_b.to(cost_a.dtype)
    sign = -F.logsigmoid(s_a * cost_a) - F.logsigmoid(s_b * cost_b)
    n_known, n_all = totals if totals is not None else ((known * w).sum(), w.sum())
    pair_loss = (pairwise * w).sum() / max(float(n_known), 1e-12)
    sign_loss = (sign * w).sum() / n_all
    with torch.no_grad():
        acc = torch.cat([(s_a * cost_a > 0), (s_b * cost_b > 0)]).float().mean().item()
    return pair_loss + sign_loss, {"pairwise": pair_loss.item(), "sign": sign_loss.item(), "sign_accuracy": acc}
