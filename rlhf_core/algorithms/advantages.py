"""Per-token rewards and advantage estimators.

Every estimator in ADVANTAGE_ESTIMATORS has one signature, so the trainer never branches on the
algorithm's name: estimator(rewards, mask, values=..., group_size=..., gamma=..., lam=...) ->
(advantages, returns), all (B, A) and zero on padding. `rewards` are per-token rewards from
`token_level_rewards` (the sequence score on the last real token, minus β·KL per token when the KL
penalty is part of the reward). Group estimators expect the `group_size` answers of one prompt in
consecutive rows.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rlhf_core.algorithms.stats import _lookup, kl_estimate, masked_whiten


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


def _sequence_returns(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """R_i = Σ_t r_i,t over real tokens: the score minus the summed KL penalty. (B, A) -> (B,)."""
    return (rewards * mask.to(rewards.dtype)).sum(dim=1)


def _groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) -> (B / k, k): the k answers of one prompt sit in consecutive rows."""
    if group_size < 2:
        raise ValueError(f"group estimators need group_size >= 2 answers per prompt, got {group_size}")
    if x.shape[0] % group_size:
        raise ValueError(f"batch of {x.shape[0]} answers is not a whole number of groups of {group_size}")
    return x.view(-1, group_size)


def _per_token(seq_adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A sequence-level advantage (B,) paid on every real token: (B, A), zero on padding."""
    return seq_adv.unsqueeze(1) * mask.to(seq_adv.dtype)


def grpo_advantages(rewards: torch.Tensor, mask: torch.Tensor, group_size: int, scale: bool = True,
                    eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO (Shao et al. 2024, DeepSeekMath §4.1.2), outcome supervision:

        Â_i = (R_i − mean(R_group)) / (std(R_group) + ε)      on every token of answer i

    std is the unbiased sample std (as TRL). `scale=False` is Dr. GRPO (Liu et al. 2025,
    "Understanding R1-Zero-Like Training"): no division by the std, which up-weights prompts whose
    answers all score alike. Returns (advantages, returns = R_i per token).
    """
    R = _sequence_returns(rewards, mask)
    g = _groups(R, group_size)
    centred = g - g.mean(dim=1, keepdim=True)
    adv = centred / (g.std(dim=1, keepdim=True) + eps) if scale else centred
    return _per_token(adv.reshape(-1), mask), _per_token(R, mask)


def rloo_advantages(rewards: torch.Tensor, mask: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RLOO (Ahmadian et al. 2024, "Back to Basics", eq. 3; Kool et al. 2019): the baseline of each
    answer is the mean return of the *other* k − 1 answers to the same prompt,

        Â_i = R_i − 1/(k−1) · Σ_{j≠i} R_j  =  k/(k−1) · (R_i − mean(R_group)).
    """
    R = _sequence_returns(rewards, mask)
    g = _groups(R, group_size)
    k = group_size
    baseline = (g.sum(dim=1, keepdim=True) - g) / (k - 1)
    return _per_token((g - baseline).reshape(-1), mask), _per_token(R, mask)


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = Σ_{s ≥ t} γ^(s−t) r_s over the real tokens of each row (padding skipped, zero there)."""
    mask = mask.to(rewards.dtype)
    running = rewards.new_zeros(rewards.shape[0])
    out = []
    for t in reversed(range(rewards.shape[1])):
        running = torch.where(mask[:, t] != 0, rewards[:, t] + gamma * running, running)
        out.append(running * mask[:, t])
    return torch.stack(out[::-1], dim=1)


def reinforce_pp_advantages(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                            group_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ (Hu 2025, arXiv:2501.03262): token-level returns of the KL-penalised rewards,
    normalised over the whole batch (no critic, no per-prompt baseline):

        G_t = Σ_{s ≥ t} γ^(s−t) r_s,     Â_t = (G_t − mean_batch(G)) / std_batch(G)

    With group_size > 1 this is REINFORCE++-baseline: the group's mean return is subtracted from
    each answer's returns before the batch normalisation.
    """
    G = discounted_returns(rewards, mask, gamma)
    centred = G
    if group_size > 1:
        group_mean = _groups(_sequence_returns(rewards, mask), group_size).mean(dim=1)
        centred = G - group_mean.repeat_interleave(group_size).unsqueeze(1) * mask.to(G.dtype)
    return masked_whiten(centred, mask), G


@dataclass(frozen=True)
class AdvantageEstimator:
    """An estimator and what the trainer must provide and do around it."""
    fn: Callable[..., tuple[torch.Tensor, torch.Tensor]]  # (rewards, mask, values, group_size, gamma, lam)
    critic: bool          # needs a value head (and trains it on the returns)
    grouped: bool         # needs group_size ≥ 2 answers per prompt in consecutive rows
    whiten: bool          # the trainer whitens the advantages over the batch afterwards
    reference: str        # paper, for the docs


ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {
    "gae": AdvantageEstimator(
        lambda rewards, mask, values, group_size, gamma, lam: compute_gae(rewards, values, mask, gamma, lam),
        critic=True, grouped=False, whiten=True, reference="Schulman et al. 2016 (GAE); PPO, Ziegler et al. 2019"),
    "grpo": AdvantageEstimator(
        lambda rewards, mask, values, group_size, gamma, lam: grpo_advantages(rewards, mask, group_size),
        critic=False, grouped=True, whiten=False, reference="Shao et al. 2024 (DeepSeekMath)"),
    "dr_grpo": AdvantageEstimator(
        lambda rewards, mask, values, group_size, gamma, lam: grpo_advantages(rewards, mask, group_size, scale=False),
        critic=False, grouped=True, whiten=False, reference="Liu et al. 2025 (Dr. GRPO)"),
    "rloo": AdvantageEstimator(
        lambda rewards, mask, values, group_size, gamma, lam: rloo_advantages(rewards, mask, group_size),
        critic=False, grouped=True, whiten=False, reference="Ahmadian et al. 2024 (RLOO)"),
    "reinforce_pp": AdvantageEstimator(
        lambda rewards, mask, values, group_size, gamma, lam: reinforce_pp_advantages(rewards, mask, gamma),
        critic=False, grouped=False, whiten=False, reference="Hu 2025 (REINFORCE++)"),
    "reinforce_pp_baseline": AdvantageEstimator(
        lambda rewards, mask, values, group_size, gamma, lam: reinforce_pp_advantages(rewards, mask, gamma,
                                                                                      group_size),
        critic=False, grouped=True, whiten=False, reference="Hu 2025 (REINFORCE++-baseline)"),
}


def get_advantage_estimator(name: str) -> AdvantageEstimator:
    """ADVANTAGE_ESTIMATORS[name]; unknown names raise ValueError listing the valid keys."""
    return _lookup(ADVANTAGE_ESTIMATORS, name, "advantage estimator")
