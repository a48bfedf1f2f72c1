"""RLHF math as pure functions of tensors: log-probs, KL, advantages, policy/value/preference losses.

Every function here takes and returns tensors (metrics come back as Python floats) and touches no
model, optimizer or global state, so each one can be unit-tested by hand. Shapes follow one
convention throughout:

    B  batch (number of sequences)
    T  full sequence length (prompt + response), only for the logits helpers
    V  vocabulary size
    A  response tokens (the "action" dimension of RLHF)

Per-token tensors are (B, A) and come with a float or bool `mask` of the same shape in which 1 marks
a real response token and 0 padding. Masked positions never contribute to a sum, a mean or a return.

Variants (KL estimators, advantage estimators, policy losses, loss aggregations, preference losses)
live once, in plain dicts keyed by name; an unknown name raises ValueError listing the valid keys.
docs/algorithms.md maps each paper to its equation, function and config field.

Modules: stats (log-probs, masked statistics, KL estimators), advantages (per-token rewards, GAE,
GRPO, RLOO, REINFORCE++), losses (PPO, value, Bradley–Terry, unlikelihood, DPO/IPO, cost model),
controllers (adaptive KL β, Lagrange multiplier λ).

References
    Schulman et al. 2017, "Proximal Policy Optimization Algorithms"         (PPO, arXiv:1707.06347)
    Schulman et al. 2016, "High-Dimensional Continuous Control Using GAE"   (GAE, arXiv:1506.02438)
    Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences" (arXiv:1909.08593)
    Ouyang et al. 2022, "Training language models to follow instructions"   (InstructGPT, arXiv:2203.02155)
    Touvron et al. 2023, "Llama 2: Open Foundation and Fine-Tuned Chat Models" (margin loss, arXiv:2307.09288)
    Shao et al. 2024, "DeepSeekMath"                                         (GRPO, arXiv:2402.03300)
    Liu et al. 2025, "Understanding R1-Zero-Like Training"                   (Dr. GRPO, arXiv:2503.20783)
    Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE…"            (RLOO, arXiv:2402.14740)
    Hu 2025, "REINFORCE++"                                                   (arXiv:2501.03262)
    Rafailov et al. 2023, "Direct Preference Optimization"                   (DPO, arXiv:2305.18290)
    Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences" (IPO)
    Dai et al. 2023, "Safe RLHF: Safe Reinforcement Learning from Human Feedback" (arXiv:2310.12773)
    Schulman 2020, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html
    Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO" (arXiv:2403.17031)
"""
from rlhf_core.algorithms.advantages import (
                                             ADVANTAGE_ESTIMATORS,
                                             AdvantageEstimator,
                                             compute_gae,
                                             compute_gae_loop,
                                             discounted_returns,
                                             get_advantage_estimator,
                                             grpo_advantages,
                                             reinforce_pp_advantages,
                                             rloo_advantages,
                                             token_level_rewards,
)
from rlhf_core.algorithms.controllers import (
                                             AdaptiveKLController,
                                             FixedKLController,
                                             LagrangeMultiplier,
                                             lagrangian_advantages,
)
from rlhf_core.algorithms.losses import (
                                             LOSS_AGGREGATIONS,
                                             POLICY_LOSSES,
                                             PREFERENCE_LOSSES,
                                             aggregate_loss,
                                             bradley_terry_loss,
                                             cost_model_loss,
                                             dpo_loss,
                                             get_policy_loss,
                                             get_preference_loss,
                                             ipo_loss,
                                             ppo_policy_loss,
                                             ppo_value_loss,
                                             sequence_unlikelihood_loss,
)
from rlhf_core.algorithms.stats import (
                                             KL_ESTIMATORS,
                                             entropy_from_logits,
                                             kl_estimate,
                                             logprobs_from_logits,
                                             masked_mean,
                                             masked_var,
                                             masked_whiten,
)

__all__ = [
    "logprobs_from_logits", "entropy_from_logits", "masked_mean", "masked_var", "masked_whiten",
    "KL_ESTIMATORS", "kl_estimate",
    "token_level_rewards", "compute_gae", "compute_gae_loop", "grpo_advantages", "rloo_advantages",
    "discounted_returns", "reinforce_pp_advantages", "AdvantageEstimator", "ADVANTAGE_ESTIMATORS",
    "get_advantage_estimator",
    "aggregate_loss", "LOSS_AGGREGATIONS", "ppo_policy_loss", "POLICY_LOSSES", "get_policy_loss", "ppo_value_loss",
    "bradley_terry_loss", "sequence_unlikelihood_loss", "dpo_loss", "ipo_loss", "PREFERENCE_LOSSES",
    "get_preference_loss", "cost_model_loss",
    "AdaptiveKLController", "FixedKLController", "LagrangeMultiplier", "lagrangian_advantages",
]
