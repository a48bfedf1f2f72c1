"""GRPO, Dr. GRPO, RLOO, REINFORCE++, loss aggregation, DPO/IPO, the cost model and the Lagrange
multiplier against hand-computed values, closed forms and plain-loop references."""
import math

import pytest
import torch
import torch.nn.functional as F

from rlhf_core.algorithms import (ADVANTAGE_ESTIMATORS, PREFERENCE_LOSSES, LagrangeMultiplier, aggregate_loss,
                                  cost_model_loss, discounted_returns, dpo_loss, get_preference_loss,
                                  grpo_advantages, ipo_loss, lagrangian_advantages, reinforce_pp_advantages,
                                  rloo_advantages, token_level_rewards)
from rlhf_core.config import GROUPED_ESTIMATORS, PPOConfig

D = torch.float64


def _seq(scores, lengths, A=4):
    """Per-token rewards with each score on the last real token (no KL), and the mask."""
    mask = torch.tensor([[1.0 if t < n else 0.0 for t in range(A)] for n in lengths], dtype=D)
    z = torch.zeros(len(scores), A, dtype=D)
    rewards, _ = token_level_rewards(torch.tensor(scores, dtype=D), z, z, mask, 0.0)
    return rewards, mask


def test_grpo_hand_values_and_dr_grpo():
    rewards, mask = _seq([1.0, 2.0, 3.0, 0.0, 0.0, 4.0], [2, 3, 1, 4, 2, 1])
    adv, ret = grpo_advantages(rewards, mask, group_size=3)
    # group 1: returns 1, 2, 3 -> mean 2, unbiased std 1 -> -1, 0, 1 (on every real token)
    assert torch.allclose(adv[0, :2], torch.tensor([-1.0, -1.0], dtype=D), atol=1e-5)
    assert torch.allclose(adv[2, 0], torch.tensor(1.0, dtype=D), atol=1e-5) and adv[2, 1:].abs().sum() == 0
    # group 2: 0, 0, 4 -> mean 4/3, std = sqrt(((4/3)^2*2 + (8/3)^2)/2) = 4/sqrt(3)
    std = 4 / math.sqrt(3)
    assert adv[3, 0].item() == pytest.approx((0 - 4 / 3) / (std + 1e-6))
    assert ret[1, 2].item() == 2.0 and (adv[mask == 0] == 0).all()
    dr, _ = grpo_advantages(rewards, mask, group_size=3, scale=False)
    assert dr[5, 0].item() == pytest.approx(4 - 4 / 3) and dr[0, 0].item() == pytest.approx(-1.0)


def test_rloo_leave_one_out_matches_loop():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(12, generator=g, dtype=D).tolist()
    rewards, mask = _seq(scores, [1, 2, 3, 4] * 3)
    adv, _ = rloo_advantages(rewards, mask, group_size=4)
    for i in range(12):
        grp = range(4 * (i // 4), 4 * (i // 4) + 4)
        baseline = sum(scores[j] for j in grp if j != i) / 3
        assert adv[i, 0].item() == pytest.approx(scores[i] - baseline)
    with pytest.raises(ValueError, match="whole number of groups"):
        rloo_advantages(rewards[:10], mask[:10], group_size=4)


def test_reinforce_pp_returns_and_batch_normalisation():
    rewards = torch.tensor([[0.1, -0.2, 1.0, 0.0], [0.0, 0.5, 0.0, 0.0]], dtype=D)
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]], dtype=D)           # one left-padded row
    G = discounted_returns(rewards, mask, gamma=0.5)
    assert G[0].tolist() == pytest.approx([0.1 + 0.5 * (-0.2 + 0.5 * 1.0), -0.2 + 0.5, 1.0, 0.0])
    assert G[1].tolist() == pytest.approx([0.0, 0.5, 0.0, 0.0])
    adv, ret = reinforce_pp_advantages(rewards, mask, gamma=0.5)
    real = G[mask == 1]
    expected = (real - real.mean()) / torch.sqrt(real.var() + 1e-8)
    assert torch.allclose(adv[mask == 1], expected) and torch.equal(ret, G)
    # -baseline: the group's mean return is subtracted first
    adv_b, _ = reinforce_pp_advantages(rewards, mask, gamma=1.0, group_size=2)
    G1 = discounted_returns(rewards, mask, 1.0)
    seq = (rewards * mask).sum(1)
    centred = (G1 - seq.mean()) * mask
    real = centred[mask == 1]
    assert torch.allclose(adv_b[mask == 1], (real - real.mean()) / torch.sqrt(real.var() + 1e-8))


def test_registry_and_config_agree():
    assert set(ADVANTAGE_ESTIMATORS) == set(PPOConfig.model_fields["advantage_estimator"].annotation.__args__)
    assert {k for k, e in ADVANTAGE_ESTIMATORS.items() if e.grouped} == set(GROUPED_ESTIMATORS)
    assert [k for k, e in ADVANTAGE_ESTIMATORS.items() if e.critic] == ["gae"]


def test_loss_aggregations():
    loss = torch.tensor([[1.0, 3.0, 0.0], [2.0, 0.0, 0.0]], dtype=D)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=D)
    assert aggregate_loss(loss, mask, "token-mean").item() == pytest.approx(2.0)          # (1+3+2)/3
    assert aggregate_loss(loss, mask, "seq-mean-token-mean").item() == pytest.approx(2.0)  # (2 + 2)/2
    assert aggregate_loss(loss, mask, "seq-mean-token-sum-norm", 8).item() == pytest.approx((4 + 2) / 2 / 8)
    with pytest.raises(ValueError, match="token-mean"):
        aggregate_loss(loss, mask, "nope")


def test_dpo_matches_closed_form_and_label_smoothing():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(6, generator=g, dtype=D) for _ in range(4))
    beta = 0.1
    h = (pc - rc) - (pr - rr)
    loss, m = dpo_loss(pc, pr, rc, rr, beta)
    assert loss.item() == pytest.approx((-torch.log(torch.sigmoid(beta * h))).mean().item())
    assert m["reward_accuracy"] == pytest.approx((h > 0).double().mean().item())
    assert m["reward_margin"] == pytest.approx((beta * h).mean().item())
    eps = 0.2
    cdpo, _ = dpo_loss(pc, pr, rc, rr, beta, label_smoothing=eps)
    expected = (-(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)).mean()
    assert cdpo.item() == pytest.approx(expected.item())
    # gradient direction: DPO raises the chosen answer's log-prob and lowers the rejected one's
    pc_ = pc.clone().requires_grad_(True)
    pr_ = pr.clone().requires_grad_(True)
    dpo_loss(pc_, pr_, rc, rr, beta)[0].backward()
    assert (pc_.grad < 0).all() and (pr_.grad > 0).all()


def test_ipo_targets_a_finite_margin():
    beta = 0.5                      # target h = 1/(2β) = 1
    ref = torch.zeros(2, dtype=D)
    at_target = torch.tensor([1.0, 1.0], dtype=D)
    loss, _ = ipo_loss(at_target, torch.zeros(2, dtype=D), ref, ref, beta)
    assert loss.item() == pytest.approx(0.0)
    far, _ = ipo_loss(torch.tensor([3.0, 3.0], dtype=D), torch.zeros(2, dtype=D), ref, ref, beta)
    assert far.item() == pytest.approx(4.0)      # (3 − 1)²: past the target is penalised, unlike DPO
    assert get_preference_loss("ipo").length_normalised and not PREFERENCE_LOSSES["dpo"].length_normalised
    with pytest.raises(ValueError, match="dpo"):
        get_preference_loss("kto")


def test_cost_model_loss_hand_values():
    cost_a = torch.tensor([2.0, -1.0, 0.5], dtype=D)
    cost_b = torch.tensor([-1.0, 1.0, 0.5], dtype=D)
    safe_a = torch.tensor([False, True, True])
    safe_b = torch.tensor([True, False, True])
    safer = torch.tensor([1, 0, -1])           # pair 3: both safe, no ordering
    loss, m = cost_model_loss(cost_a, cost_b, safe_a, safe_b, safer)
    ls = lambda x: math.log(1 / (1 + math.exp(-x)))  # noqa: E731
    pairwise = -(ls(2.0 - (-1.0)) + ls(1.0 - (-1.0))) / 2
    sign = -(ls(2.0) + ls(1.0) + ls(1.0) + ls(1.0) + ls(-0.5) + ls(-0.5)) / 3
    assert m["pairwise"] == pytest.approx(pairwise) and m["sign"] == pytest.approx(sign)
    assert loss.item() == pytest.approx(pairwise + sign)
    assert m["sign_accuracy"] == pytest.approx(4 / 6)   # pair 3's safe answers have positive cost


def test_lagrange_multiplier_direction():
    lam = LagrangeMultiplier(init=1.0, threshold=0.0, lr=0.1, window=4)
    up = lam.update([1.0, 2.0])                  # mean cost 1.5 above threshold 0 -> λ grows
    assert up == pytest.approx(math.exp(0.1 * 1.0 * 1.5))
    down = LagrangeMultiplier(init=1.0, threshold=0.0, lr=0.1).update([-1.0])
    assert down < 1.0
    capped = LagrangeMultiplier(init=5.0, threshold=0.0, lr=10.0, max_value=8.0)
    assert capped.update([3.0]) == pytest.approx(8.0)
    for _ in range(3):
        lam.update([-5.0])
    assert len(lam.costs) == 4 and lam.mean_cost == pytest.approx((2.0 - 15.0) / 4)   # the last 4 episodes
    with pytest.raises(ValueError):
        LagrangeMultiplier(init=0.0, threshold=0.0, lr=0.1)
    a_r, a_c = torch.tensor([1.0]), torch.tensor([2.0])
    assert lagrangian_advantages(a_r, a_c, 1.0).item() == pytest.approx((1 - 2) / 2)
    assert lagrangian_advantages(a_r, a_c, 0.0).item() == pytest.approx(1.0)


def test_config_rejects_inconsistent_algorithm_settings():
    from rlhf_core.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="group_size must be >= 2"):
        load_config(None, ["ppo.advantage_estimator=grpo", "ppo.group_size=1"])
    with pytest.raises(ConfigError, match="multiple of ppo.group_size"):
        load_config(None, ["ppo.advantage_estimator=rloo", "ppo.group_size=5"])
    with pytest.raises(ConfigError, match="safe_rlhf.enabled needs ppo.advantage_estimator=gae"):
        load_config(None, ["safe_rlhf.enabled=true", "ppo.advantage_estimator=grpo"])
    with pytest.raises(ConfigError, match="ppo.advantage_estimator"):
        load_config(None, ["ppo.advantage_estimator=a2c"])
    with pytest.raises(ConfigError, match="disagreement needs reward_model.ensemble"):
        load_config(None, ["feedback.human.selection=disagreement"])
    assert load_config(None, ["ppo.advantage_estimator=grpo", "ppo.group_size=4"]).ppo.group_size == 4
