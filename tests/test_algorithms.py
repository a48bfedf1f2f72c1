"""Hand-checked tests of the RLHF math in rlhf_core.algorithms (pure tensors, milliseconds)."""
import math

import pytest
import torch

from rlhf_core.algorithms import (
    ADVANTAGE_ESTIMATORS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    AdaptiveKLController,
    FixedKLController,
    bradley_terry_loss,
    compute_gae,
    compute_gae_loop,
    entropy_from_logits,
    get_advantage_estimator,
    get_policy_loss,
    kl_estimate,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    token_level_rewards,
)

torch.set_num_threads(1)
D = torch.float64


# ---------------------------------------------------------------- GAE


def test_gae_hand_computed_three_steps():
    # gamma=0.9, lam=0.8, gamma*lam=0.72, value after the last token = 0
    # t=2: delta = 2 + 0.9*0   - 0.3 = 1.7          A2 = 1.7
    # t=1: delta = 0 + 0.9*0.3 - 0.4 = -0.13        A1 = -0.13 + 0.72*1.7   = 1.094
    # t=0: delta = 1 + 0.9*0.4 - 0.5 = 0.86         A0 = 0.86  + 0.72*1.094 = 1.64768
    # returns = A + V = [2.14768, 1.494, 2.0]
    rewards = torch.tensor([[1.0, 0.0, 2.0]], dtype=D)
    values = torch.tensor([[0.5, 0.4, 0.3]], dtype=D)
    mask = torch.ones(1, 3, dtype=D)
    adv, ret = compute_gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert torch.allclose(adv, torch.tensor([[1.64768, 1.094, 1.7]], dtype=D))
    assert torch.allclose(ret, torch.tensor([[2.14768, 1.494, 2.0]], dtype=D))


def test_gae_padded_row():
    # row 1 has two real tokens then a pad whose (garbage) reward 5 and value 9 must not leak:
    # t=1: delta = 2 + 0.9*0   - 0.3 = 1.7     A1 = 1.7
    # t=0: delta = 1 + 0.9*0.3 - 0.5 = 0.77    A0 = 0.77 + 0.72*1.7 = 1.994
    rewards = torch.tensor([[1.0, 0.0, 2.0], [1.0, 2.0, 5.0]], dtype=D)
    values = torch.tensor([[0.5, 0.4, 0.3], [0.5, 0.3, 9.0]], dtype=D)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=D)
    adv, ret = compute_gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert torch.allclose(adv[0], torch.tensor([1.64768, 1.094, 1.7], dtype=D))
    assert torch.allclose(adv[1], torch.tensor([1.994, 1.7, 0.0], dtype=D))
    assert torch.allclose(ret[1], torch.tensor([2.494, 2.0, 0.0], dtype=D))


def test_gae_vectorised_matches_loop_ragged():
    g = torch.Generator().manual_seed(0)
    B, A = 5, 7
    rewards = torch.randn(B, A, generator=g, dtype=D)
    values = torch.randn(B, A, generator=g, dtype=D)
    lengths = [7, 1, 4, 0, 6]
    mask = torch.tensor([[1.0 if t < n else 0.0 for t in range(A)] for n in lengths], dtype=D)
    mask[4] = mask[4].flip(0)  # one left-padded row too
    adv, ret = compute_gae(rewards, values, mask, 0.95, 0.9)
    adv_ref, ret_ref = compute_gae_loop(rewards, values, mask, 0.95, 0.9)
    assert torch.allclose(adv, adv_ref)
    assert torch.allclose(ret, ret_ref)
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()


def test_gae_bool_mask_and_registry():
    rewards, values = torch.randn(2, 4, dtype=D), torch.randn(2, 4, dtype=D)
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    gae = get_advantage_estimator("gae")
    a1, _ = gae.fn(rewards, mask, values, 1, 1.0, 0.95)
    a2, _ = compute_gae_loop(rewards, values, mask, 1.0, 0.95)
    assert torch.allclose(a1, a2)
    assert ADVANTAGE_ESTIMATORS["gae"] is gae and gae.critic and gae.whiten and not gae.grouped


# ---------------------------------------------------------------- PPO policy loss


def _policy_grad(ratio: float, adv: float, eps: float):
    logp = torch.tensor([[math.log(ratio)]], dtype=D, requires_grad=True)
    old = torch.zeros(1, 1, dtype=D)
    loss, metrics = ppo_policy_loss(logp, old, torch.tensor([[adv]], dtype=D), torch.ones(1, 1, dtype=D), eps)
    loss.backward()
    return loss.item(), logp.grad.item(), metrics


def test_ppo_clip_positive_advantage():
    # eps chosen so that 1 + eps is *exactly* the float ratio exp(log 1.2): on the boundary
    ratio = torch.tensor(math.log(1.2), dtype=D).exp().item()
    eps = ratio - 1.0
    loss, grad, m = _policy_grad(ratio, 2.0, eps)
    assert loss == pytest.approx(-2.0 * ratio)
    assert grad == pytest.approx(-2.0 * ratio)  # still inside the trust region: gradient flows
    assert m["clipfrac"] == 0.0
    # beyond the boundary the clipped branch is flat: no incentive to push the ratio further
    loss, grad, m = _policy_grad(1.3, 2.0, eps)
    assert loss == pytest.approx(-2.0 * ratio)
    assert grad == 0.0
    assert m["clipfrac"] == 1.0
    # below 1 - eps with a positive advantage the unclipped term is the pessimistic one
    loss, grad, m = _policy_grad(0.7, 2.0, 0.2)
    assert grad == pytest.approx(-2.0 * 0.7) and m["clipfrac"] == 0.0


def test_ppo_clip_negative_advantage():
    # A < 0: clipping stops the ratio from shrinking below 1 - eps ...
    loss, grad, m = _policy_grad(0.7, -1.0, 0.2)
    assert loss == pytest.approx(0.8) and grad == 0.0 and m["clipfrac"] == 1.0
    # ... but a ratio above 1 + eps (a bad action made likelier) is still penalised in full
    loss, grad, m = _policy_grad(1.3, -1.0, 0.2)
    assert loss == pytest.approx(1.3) and grad == pytest.approx(1.3) and m["clipfrac"] == 0.0


def test_ppo_clipfrac_and_approx_kl_masked():
    logp = torch.log(torch.tensor([[1.3, 1.0, 0.7, 5.0]], dtype=D))
    old = torch.zeros(1, 4, dtype=D)
    adv = torch.ones(1, 4, dtype=D)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=D)  # the last (huge ratio) token is padding
    loss, m = ppo_policy_loss(logp, old, adv, mask, 0.2)
    assert m["clipfrac"] == pytest.approx(1 / 3)  # only 1.3 is clipped; 0.7 with A>0 is not
    expected_kl = sum((r - 1) - math.log(r) for r in (1.3, 1.0, 0.7)) / 3
    assert m["approx_kl"] == pytest.approx(expected_kl)
    assert loss.item() == pytest.approx(-(1.2 + 1.0 + 0.7) / 3)
    assert isinstance(m["clipfrac"], float) and isinstance(m["approx_kl"], float)
    assert get_policy_loss("ppo_clip") is ppo_policy_loss and POLICY_LOSSES["ppo_clip"] is ppo_policy_loss


# ---------------------------------------------------------------- value loss


def test_value_loss_clipping():
    ones = torch.ones(1, 1, dtype=D)
    # moved from 1.0 to 2.0 but clip 0.5: V_clipped = 1.5, (2-3)^2 = 1, (1.5-3)^2 = 2.25 -> clipped term wins
    v = torch.full((1, 1), 2.0, dtype=D, requires_grad=True)
    loss, clipfrac = ppo_value_loss(v, ones * 1.0, ones * 3.0, ones, clip_value=0.5)
    loss.backward()
    assert loss.item() == pytest.approx(0.5 * 2.25) and clipfrac == 1.0 and v.grad.item() == 0.0
    # target behind: (2-1)^2 = 1 > (1.5-1)^2 = 0.25 -> unclipped term, gradient (v - R) = 1
    v = torch.full((1, 1), 2.0, dtype=D, requires_grad=True)
    loss, clipfrac = ppo_value_loss(v, ones * 1.0, ones * 1.0, ones, clip_value=0.5)
    loss.backward()
    assert loss.item() == pytest.approx(0.5) and clipfrac == 0.0 and v.grad.item() == pytest.approx(1.0)
    # inside the clip range the two terms coincide: plain 0.5 (v - R)^2
    loss, clipfrac = ppo_value_loss(ones * 1.2, ones * 1.0, ones * 0.2, ones, clip_value=0.5)
    assert loss.item() == pytest.approx(0.5) and clipfrac == 0.0


def test_value_loss_ignores_padding():
    v = torch.tensor([[1.0, 100.0]], dtype=D)
    loss, _ = ppo_value_loss(v, v.clone(), torch.zeros(1, 2, dtype=D), torch.tensor([[1.0, 0.0]], dtype=D), 0.2)
    assert loss.item() == pytest.approx(0.5)


# ---------------------------------------------------------------- Bradley–Terry


def test_bradley_terry_values():
    r = torch.tensor([0.3, -1.0], dtype=D)
    assert bradley_terry_loss(r, r.clone()).item() == pytest.approx(math.log(2))
    # -log sigma(1) = log(1 + e^-1) = 0.3132616875
    d1 = bradley_terry_loss(torch.tensor([1.0], dtype=D), torch.tensor([0.0], dtype=D))
    assert d1.item() == pytest.approx(0.31326168751822286)
    # a margin of 1 (Llama 2) turns the same gap of 1 back into log 2
    m = bradley_terry_loss(torch.tensor([1.0], dtype=D), torch.tensor([0.0], dtype=D), margin=1.0)
    assert m.item() == pytest.approx(math.log(2))
    mt = bradley_terry_loss(torch.tensor([1.0, 1.0], dtype=D), torch.zeros(2, dtype=D), margin=torch.tensor([1.0, 0.0]))
    assert mt.item() == pytest.approx((math.log(2) + 0.31326168751822286) / 2)


def test_bradley_terry_weights_and_gradient():
    rc = torch.tensor([1.0, 0.0], dtype=D, requires_grad=True)
    rr = torch.tensor([0.0, 0.0], dtype=D, requires_grad=True)
    loss = bradley_terry_loss(rc, rr, weights=torch.tensor([3.0, 1.0], dtype=D))
    assert loss.item() == pytest.approx((3 * 0.31326168751822286 + math.log(2)) / 4)
    loss.backward()
    assert (rc.grad < 0).all() and (rr.grad > 0).all()  # gradient descent raises r_c, lowers r_r


# ---------------------------------------------------------------- KL estimators


def test_kl_estimators_hand_values():
    logp = torch.tensor([0.0, -1.0], dtype=D)
    ref = torch.tensor([-1.0, 0.0], dtype=D)
    assert torch.allclose(kl_estimate(logp, ref, "k1"), torch.tensor([1.0, -1.0], dtype=D))
    assert torch.allclose(kl_estimate(logp, ref, "k2"), torch.tensor([0.5, 0.5], dtype=D))
    # k3: r = exp(ref - logp); (r - 1) - log r -> e^-1 - 1 + 1 = e^-1 ; e - 1 - 1 = e - 2
    assert torch.allclose(kl_estimate(logp, ref, "k3"), torch.tensor([math.exp(-1), math.e - 2], dtype=D))
    assert kl_estimate(logp, ref).tolist() == kl_estimate(logp, ref, "k1").tolist()  # default k1


def test_kl_estimators_nonnegative_and_zero():
    g = torch.Generator().manual_seed(1)
    logp, ref = torch.randn(64, generator=g, dtype=D), torch.randn(64, generator=g, dtype=D)
    assert (kl_estimate(logp, ref, "k3") >= 0).all()
    for kind in KL_ESTIMATORS:
        assert (kl_estimate(logp, logp.clone(), kind) == 0).all()


def test_kl_unknown_kind():
    with pytest.raises(ValueError, match="k1.*k2.*k3"):
        kl_estimate(torch.zeros(1), torch.zeros(1), "k4")


# ---------------------------------------------------------------- token-level rewards


def test_token_level_rewards_score_on_last_real_token():
    logp = torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.0, 0.0, 0.0]], dtype=D)
    ref = torch.tensor([[-1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=D)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]], dtype=D)
    scores = torch.tensor([10.0, 20.0, 30.0], dtype=D)
    rewards, kl = token_level_rewards(scores, logp, ref, mask, kl_coef=0.1)
    assert torch.allclose(kl, torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0.0], [0, 0, 0]], dtype=D))
    expected = torch.tensor([[-0.1, 0.0, 10.0], [-0.05, -0.05 + 20.0, 0.0], [0.0, 0.0, 0.0]], dtype=D)
    assert torch.allclose(rewards, expected)  # empty row: no score anywhere


def test_token_level_rewards_left_padding_and_kind():
    mask = torch.tensor([[0, 1, 1, 0]], dtype=D)
    z = torch.zeros(1, 4, dtype=D)
    rewards, _ = token_level_rewards(torch.tensor([2.0], dtype=D), z, z, mask, 0.5, kl_kind="k3")
    assert rewards.tolist() == [[0.0, 0.0, 2.0, 0.0]]


# ---------------------------------------------------------------- masked statistics, logits helpers


def test_masked_stats():
    x = torch.tensor([[1.0, 2.0, 3.0, float("nan")]], dtype=D)
    mask = torch.tensor([[1, 1, 1, 0]], dtype=D)
    assert masked_mean(x, mask).item() == pytest.approx(2.0)
    assert masked_mean(x, mask, dim=1).tolist() == pytest.approx([2.0])
    assert masked_var(x, mask).item() == pytest.approx(1.0)  # unbiased: (1 + 0 + 1) / 2
    w = masked_whiten(x, mask)
    assert w[0, :3].tolist() == pytest.approx([-1.0, 0.0, 1.0]) and w[0, 3] == 0
    assert masked_whiten(x, mask, shift_mean=False)[0, :3].tolist() == pytest.approx([1.0, 2.0, 3.0])
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0


def test_logprobs_and_entropy_match_naive():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 5, 11, generator=g)
    labels = torch.randint(0, 11, (3, 5), generator=g)
    naive = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(logprobs_from_logits(logits, labels), naive, atol=1e-6)
    assert torch.allclose(logprobs_from_logits(logits.bfloat16(), labels).float(), naive, atol=5e-2)
    p = torch.softmax(logits, -1)
    assert torch.allclose(entropy_from_logits(logits), -(p * p.log()).sum(-1), atol=1e-5)


# ---------------------------------------------------------------- KL controllers, registries


def test_adaptive_kl_controller():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert ctl.update(12.0, 256) == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))  # error clipped to +0.2
    up = ctl.value
    ctl.update(0.0, 256)  # error clipped to -0.2
    assert ctl.value < up
    ctl2 = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl2.update(6.6, 100)  # 10 % over target
    assert ctl2.value == pytest.approx(0.1 * (1 + 0.1 * 100 / 10000))
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 256)
    assert fixed.value == 0.05


@pytest.mark.parametrize(
    "getter, valid", [(get_advantage_estimator, "gae"), (get_policy_loss, "ppo_clip")]
)
def test_unknown_names_list_valid_keys(getter, valid):
    with pytest.raises(ValueError, match=valid):
        getter("nope")


def test_sequence_unlikelihood_loss_hand_values():
    from rlhf_core.algorithms import sequence_unlikelihood_loss
    logp = torch.log(torch.tensor([[0.5, 0.5, 0.1], [0.9, 0.9, 0.9]]))
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # k = 2: P(opening) = 0.25 and 0.81 -> mean of -log(0.75), -log(0.19)
    expected = -(math.log(0.75) + math.log(0.19)) / 2
    assert sequence_unlikelihood_loss(logp, mask, 2).item() == pytest.approx(expected, rel=1e-5)
    # the mask cuts the second row at 2 tokens even when k = 3
    expected3 = -(math.log(1 - 0.025) + math.log(0.19)) / 2
    assert sequence_unlikelihood_loss(logp, mask, 3).item() == pytest.approx(expected3, rel=1e-5)
    # finite even when the opening is certain, and its gradient lowers the opening's log-prob
    x = torch.zeros(1, 2, requires_grad=True)
    loss = sequence_unlikelihood_loss(x, torch.ones(1, 2), 2)
    loss.backward()
    assert torch.isfinite(loss) and (x.grad > 0).all()


def test_bradley_terry_soft_targets():
    rc, rr = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0])
    # t = 1 is the hard loss; t = 0.5 on a gap of 2 is the cross-entropy of a coin flip
    assert bradley_terry_loss(rc, rr, targets=torch.ones(2)).item() == pytest.approx(bradley_terry_loss(rc, rr).item())
    s = 1 / (1 + math.exp(-2.0))
    expected = (-(0.5 * math.log(s) + 0.5 * math.log(1 - s)) + math.log(2)) / 2
    assert bradley_terry_loss(rc, rr, targets=torch.tensor([0.5, 0.5])).item() == pytest.approx(expected, rel=1e-5)
    # the soft loss is minimised where σ(Δ) equals the target
    d = torch.tensor([math.log(0.8 / 0.2)], requires_grad=True)
    bradley_terry_loss(d, torch.zeros(1), targets=torch.tensor([0.8])).backward()
    assert abs(d.grad.item()) < 1e-6
