"""Controllers of penalty coefficients: the adaptive KL coefficient β and Safe-RLHF's multiplier λ."""
from __future__ import annotations

import math
from collections import deque

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


class LagrangeMultiplier:
    """λ of the PPO-Lagrangian (Safe-RLHF, Dai et al. 2023, eq. 10; Ray et al. 2019):

        max_θ min_λ≥0  J_R(θ) − λ (J_C(θ) − d)

    λ is kept as log λ (so it stays positive) and updated by gradient ascent on λ·(J_C − d), with
    J_C the mean episode cost over the last `window` episodes (a moving average, as safe-rlhf):

        log λ ← log λ + lr · λ · (J̄_C − d),      λ ≤ max_value

    Expected cost above the threshold d raises λ (more weight on being safe), below lowers it.
    """

    def __init__(self, init: float, threshold: float, lr: float, window: int = 64, max_value: float = 10.0):
        if init <= 0:
            raise ValueError(f"initial lambda must be > 0 (it is kept as log lambda), got {init}")
        self.log_value = math.log(init)
        self.threshold = float(threshold)
        self.lr = float(lr)
        self.max_value = float(max_value)
        self.costs: deque[float] = deque(maxlen=window)

    @property
    def value(self) -> float:
        return min(math.exp(self.log_value), self.max_value)

    @property
    def mean_cost(self) -> float:
        return sum(self.costs) / len(self.costs) if self.costs else float("nan")

    def update(self, episode_costs) -> float:
        """Add this step's episode costs, take one ascent step on log λ; returns the new λ."""
        self.costs.extend(float(c) for c in episode_costs)
        self.log_value += self.lr * self.value * (self.mean_cost - self.threshold)
        self.log_value = min(self.log_value, math.log(self.max_value))
        return self.value


def lagrangian_advantages(reward_adv, cost_adv, lam: float):
    """Safe-RLHF's combined advantage (A_r − λ·A_c) / (1 + λ): the 1/(1+λ) keeps its scale fixed
    as λ grows, so the PPO clip range means the same thing all along."""
    return (reward_adv - lam * cost_adv) / (1.0 + lam)
