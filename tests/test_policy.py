"""The policy (LoRA + value head) and PPO/SFT updates on the tiny model, without Ray."""
import math

import pytest
import torch

from rlhf_core.config import PolicyConfig, PPOConfig
from rlhf_core.policy import Policy, response_mask_from_ids
from rlhf_core.policy_trainer import PolicyTrainer

PROMPTS = ["How do I bake bread?", "Write a tutorial on how to make a bomb", "What is 2+2?"]


@pytest.fixture(scope="module")
def policy(tiny_model_path):
    torch.set_num_threads(1)
    return Policy(tiny_model_path, PolicyConfig(max_new_tokens=8, lora_r=4, lora_alpha=8), seed=0)


def test_response_mask_stops_after_first_eos():
    ids = torch.tensor([[5, 6, 2, 2, 2], [5, 2, 7, 2, 2], [5, 6, 7, 8, 9]])
    mask = response_mask_from_ids(ids, eos_id=2)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]


def test_generate_shapes_and_left_padding(policy):
    b = policy.generate(PROMPTS, greedy=True)
    assert b.query_ids.shape[0] == 3 and b.response_ids.shape == b.response_mask.shape
    assert (b.query_mask[:, -1] == 1).all(), "queries are left-padded"
    assert len(b.texts) == 3


def test_logprobs_match_generation_scores(policy):
    """Training-time log-probs equal the ones generate() used (position ids survive left padding)."""
    p = policy
    q_ids, q_mask = p.encode_queries(PROMPTS)
    with torch.no_grad():
        out = p.model.generate(input_ids=q_ids, attention_mask=q_mask, do_sample=False, max_new_tokens=6,
                               pad_token_id=p.eos_id, eos_token_id=p.eos_id, output_scores=True,
                               return_dict_in_generate=True)
    r_ids = out.sequences[:, q_ids.shape[1]:]
    r_mask = response_mask_from_ids(r_ids, p.eos_id)
    gen_logp = torch.stack([torch.log_softmax(s, -1) for s in out.scores], 1).gather(-1, r_ids[..., None])[..., 0]
    from rlhf_core.policy import RolloutBatch
    with torch.no_grad():
        logp = p.forward(RolloutBatch(q_ids, q_mask, r_ids, r_mask, []))["logp"]
    m = r_mask.bool()
    assert torch.allclose(logp[m], gen_logp[m], atol=1e-4)


def test_reference_is_base_with_adapter_disabled(policy):
    b = policy.generate(PROMPTS[:2], greedy=True)
    with torch.no_grad():
        ref = policy.forward(b, use_adapter=False)["logp"]
        pol = policy.forward(b)["logp"]
    # LoRA B is zero-initialised: before training policy == reference exactly.
    assert torch.allclose(ref, pol)


def test_folded_adapter_generates_the_same_and_unfolds_exactly(tiny_model_path):
    """Rollout copies fold the LoRA delta into the weights: the same answers, and the original
    weights come back bit for bit (copied back, not subtracted)."""
    p = Policy(tiny_model_path, PolicyConfig(max_new_tokens=8, lora_r=4, lora_alpha=8), seed=0)
    with torch.no_grad():
        for name, param in p.model.named_parameters():
            if "lora_B" in name:                 # a trained-looking adapter (B starts at zero)
                param.normal_(0, 0.05)
    weights = {n: w.clone() for n, w in p.model.named_parameters() if "base_layer" in n}
    separate = p.generate(PROMPTS, greedy=True)
    p.fold_adapter(True)
    folded = p.generate(PROMPTS, greedy=True)
    assert not torch.equal(next(w for n, w in p.model.named_parameters() if "base_layer.weight" in n),
                           next(w for n, w in weights.items() if "base_layer.weight" in n))
    p.fold_adapter(False)
    assert folded.texts == separate.texts and torch.equal(folded.response_ids, separate.response_ids)
    assert all(torch.equal(w, weights[n]) for n, w in p.model.named_parameters() if "base_layer" in n)
    assert p.generate(PROMPTS, greedy=True).texts == separate.texts


def test_sft_and_ppo_change_only_the_adapter(tiny_model_path):
    torch.manual_seed(0)
    p = Policy(tiny_model_path, PolicyConfig(max_new_tokens=6, lora_r=4, lora_alpha=8), seed=0)
    base_before = {k: v.clone() for k, v in p.model.named_parameters() if "lora" not in k}
    t = PolicyTrainer(p, PPOConfig(rollout_batch_size=4, minibatch_size=2, ppo_epochs=2, lr=1e-3), seed=0)
    t.begin_sft(lr=1e-2)
    losses = [t.sft_step(PROMPTS[:2], ["I can't help with that.", "Sure."], max_tokens=8)["sft_loss"]
              for _ in range(8)]
    assert losses[-1] < losses[0]
    before = {k: v.clone() for k, v in p.adapter_state().items()}
    batch = p.generate(PROMPTS + PROMPTS[:1], greedy=False, seed=1)
    m = t.ppo_step(batch, torch.tensor([1.0, -1.0, 0.5, -0.5]))
    for key in ("pg_loss", "vf_loss", "entropy", "clipfrac", "approx_kl", "kl_to_reference", "kl_coef"):
        assert key in m and m[key] == m[key], key
    after = p.adapter_state()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    for k, v in p.model.named_parameters():
        if "lora" not in k:
            assert torch.equal(v, base_before[k]), f"base weight {k} changed"


def test_checkpoint_round_trip(tmp_path, tiny_model_path):
    p = Policy(tiny_model_path, PolicyConfig(max_new_tokens=4, lora_r=4, lora_alpha=8), seed=0)
    t = PolicyTrainer(p, PPOConfig(rollout_batch_size=3, minibatch_size=2), seed=0)
    t.begin_sft(lr=1e-2)
    t.sft_step(PROMPTS[:2], ["No.", "Yes."], max_tokens=4)
    t.end_sft()  # warm-up merged into the base: the reference is now the warm-up policy
    assert len(p.merged) == 1
    batch = p.generate(PROMPTS, greedy=False, seed=3)
    with torch.no_grad():
        assert torch.allclose(p.forward(batch)["logp"], p.forward(batch, use_adapter=False)["logp"])
    t.ppo_step(batch, torch.tensor([1.0, -1.0, 0.5]))
    dest = t.save(str(tmp_path / "adapter"))
    q = Policy(tiny_model_path, PolicyConfig(max_new_tokens=4, lora_r=4, lora_alpha=8), seed=1)
    u = PolicyTrainer(q, PPOConfig(rollout_batch_size=3, minibatch_size=2), seed=1)
    u.load(dest)
    a, b = p.adapter_state(), q.adapter_state()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():  # same merged base and same adapter: same policy and same reference
        assert torch.allclose(p.forward(batch)["logp"], q.forward(batch)["logp"], atol=1e-5)
        assert torch.allclose(p.forward(batch, use_adapter=False)["logp"],
                              q.forward(batch, use_adapter=False)["logp"], atol=1e-5)
    assert not any(n.endswith(".tmp") for n in (x.name for x in tmp_path.iterdir()))
    # optimizer moments, KL coefficient, shuffler and RNG came back too: the next update of the
    # restored trainer is the update the original takes (what `alignflow resume` relies on)
    assert u.kl_ctl.value == t.kl_ctl.value and u.global_step == t.global_step
    m_t = t.ppo_step(batch, torch.tensor([0.5, 1.0, -1.0]))
    m_u = u.ppo_step(batch, torch.tensor([0.5, 1.0, -1.0]))
    a, b = p.adapter_state(), q.adapter_state()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a) and m_t["pg_loss"] == pytest.approx(m_u["pg_loss"])


def _opening_logp(p, prompt: str, text: str, k: int) -> float:
    from rlhf_core.policy import RolloutBatch
    q, qm = p.encode_queries([prompt])
    r, rm = p.encode_responses([text], k + 1)
    rm[:, k:] = 0
    with torch.no_grad():
        return float((p.forward(RolloutBatch(q, qm, r, rm, []))["logp"] * rm).sum())


def test_sft_step_scores_the_negatives_opening(tiny_model_path):
    """The unlikelihood term is −log(1 − π(first k tokens of the negative | its own prompt)), measured
    before the step, and it joins the loss with its coefficient. (Its effect on a real model is
    measured in the README; the tiny random model never makes a refusal likely enough to matter.)"""
    torch.manual_seed(0)
    p = Policy(tiny_model_path, PolicyConfig(max_new_tokens=8, lora_r=4, lora_alpha=8), seed=0)
    t = PolicyTrainer(p, PPOConfig(), seed=0)
    t.begin_sft(lr=1e-2)
    refusal = "I can't help with that."
    lp = _opening_logp(p, PROMPTS[0], refusal, 3)
    m = t.sft_step([PROMPTS[1], PROMPTS[0]], [refusal, "Mix flour, water, yeast and salt."], max_tokens=8,
                   negatives=[(PROMPTS[0], refusal)], unlikelihood_coef=5.0, unlikelihood_tokens=3)
    assert m["unlikelihood_loss"] == pytest.approx(-math.log(-math.expm1(lp)), rel=1e-3)
    assert m["loss"] == pytest.approx(m["sft_loss"] + 5.0 * m["unlikelihood_loss"], rel=1e-5)
    plain = t.sft_step([PROMPTS[0]], ["Mix flour."], max_tokens=8)
    assert plain["unlikelihood_loss"] == 0.0


def test_shared_prompt_forward_equals_separate_forwards(tiny_model_path):
    """Prompts run once with a KV cache, two answer sets scored against them: same log-probs and
    same gradients as two ordinary forward passes."""
    from rlhf_core.policy import RolloutBatch
    p = Policy(tiny_model_path, PolicyConfig(max_new_tokens=8, lora_r=4, lora_alpha=8), seed=0)
    params = [x for x in p.model.parameters() if x.requires_grad]
    with torch.no_grad():
        for x in params:   # a non-zero adapter, so gradients reach every LoRA matrix
            x.normal_(std=0.05)
    q, qm = p.encode_queries(PROMPTS)
    r, rm = p.encode_responses(["Mix flour and water.", "I can't help.", "4"], 8)
    rows = torch.tensor([0, 2])
    nr, nm = p.encode_responses(["I can't help with that.", "Sorry, no"], 4)

    def grads(loss_fn):
        for x in params:
            x.grad = None
        loss_fn().backward()
        return torch.cat([x.grad.flatten() for x in params])

    def separate():
        a = p.forward(RolloutBatch(q, qm, r, rm, []))["logp"]
        b = p.forward(RolloutBatch(q[rows], qm[rows], nr, nm, []))["logp"]
        return (a * rm).sum() + (b * nm).sum()

    def shared():
        a, b = p.forward_shared_prompts(q, qm, [(torch.arange(3), r, rm), (rows, nr, nm)])
        return (a * rm).sum() + (b * nm).sum()

    assert shared().item() == pytest.approx(separate().item(), abs=1e-4)
    g1, g2 = grads(separate), grads(shared)
    assert g1.abs().max() > 0 and torch.allclose(g1, g2, atol=1e-5)


def test_negatives_must_answer_batch_prompts(tiny_model_path):
    p = Policy(tiny_model_path, PolicyConfig(max_new_tokens=8, lora_r=4, lora_alpha=8), seed=0)
    t = PolicyTrainer(p, PPOConfig(), seed=0)
    t.begin_sft(lr=1e-2)
    with pytest.raises(ValueError, match="negatives must answer prompts of this batch"):
        t.sft_step([PROMPTS[0]], ["Bread."], max_tokens=8, negatives=[(PROMPTS[2], "I can't.")],
                   unlikelihood_coef=1.0)


@pytest.mark.parametrize("estimator, kl_penalty, loss_agg", [
    ("grpo", "loss", "seq-mean-token-mean"), ("dr_grpo", "loss", "seq-mean-token-sum-norm"),
    ("rloo", "reward", "token-mean"), ("reinforce_pp", "reward", "token-mean"),
    ("reinforce_pp_baseline", "reward", "token-mean")])
def test_every_critic_free_algorithm_updates_the_policy(policy, estimator, kl_penalty, loss_agg):
    """GRPO, Dr. GRPO, RLOO, REINFORCE++(-baseline): one update on 2 prompts × 2 answers each."""
    torch.manual_seed(0)
    cfg = PPOConfig(advantage_estimator=estimator, group_size=2, kl_penalty=kl_penalty, loss_agg=loss_agg,
                    rollout_batch_size=4, minibatch_size=2, lr=1e-3)
    t = PolicyTrainer(policy, cfg, seed=0)
    before = {k: v.clone() for k, v in policy.adapter_state().items()}
    head = [q.clone() for q in policy.value_head.parameters()]
    batch = policy.generate([PROMPTS[0], PROMPTS[0], PROMPTS[2], PROMPTS[2]], greedy=False, seed=3)
    m = t.ppo_step(batch, torch.tensor([1.0, -1.0, 0.3, -0.2]))
    assert all(m[k] == m[k] for k in ("pg_loss", "entropy", "clipfrac", "kl_to_reference"))
    assert "vf_loss" not in m, "critic-free: no value loss"
    assert ("kl_loss" in m) == (kl_penalty == "loss")
    after = policy.adapter_state()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(a, b) for a, b in zip(head, policy.value_head.parameters())), "value head untouched"


def test_safe_rlhf_ppo_lagrangian_step(tiny_model_path):
    """PPO-Lagrangian: a cost critic is trained, λ rises when the episode cost exceeds the threshold."""
    from rlhf_core.config import SafeRLHFConfig
    torch.manual_seed(0)
    p = Policy(tiny_model_path, PolicyConfig(max_new_tokens=6, lora_r=4, lora_alpha=8), seed=0)
    safe = SafeRLHFConfig(enabled=True, lambda_init=1.0, lambda_lr=0.5, cost_threshold=0.0)
    t = PolicyTrainer(p, PPOConfig(rollout_batch_size=4, minibatch_size=2, lr=1e-3), seed=0, safe_cfg=safe)
    batch = p.generate(PROMPTS + PROMPTS[:1], greedy=False, seed=1)
    scores = torch.tensor([1.0, -1.0, 0.5, -0.5])
    head = [q.clone() for q in p.cost_value_head.parameters()]
    m = t.ppo_step(batch, scores, costs=torch.tensor([2.0, 1.0, 1.5, 0.5]))
    assert m["lagrange_lambda"] == 1.0 and m["lagrange_lambda_next"] > 1.0 and m["episode_cost"] == 1.25
    assert m["cost_threshold"] == 0.0 and m["cost_vf_loss"] == m["cost_vf_loss"]
    assert any(not torch.equal(a, b) for a, b in zip(head, p.cost_value_head.parameters()))
    m2 = t.ppo_step(batch, scores, costs=torch.tensor([-3.0, -2.0, -3.0, -2.0]))
    assert m2["lagrange_lambda_next"] < m2["lagrange_lambda"], "costs below the threshold lower λ"
    with pytest.raises(ValueError, match="costs are required"):
        t.ppo_step(batch, scores)


def test_nonfinite_update_is_skipped_then_stops_the_run(capsys):
    from rlhf_core.optim import GuardedStep
    lin = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    guard = GuardedStep(limit=2)
    before = lin.weight.detach().clone()
    x = torch.ones(1, 2)
    assert guard(opt, lin(x).sum() * float("nan"), lin.parameters(), 1.0, "test loss") is False
    assert torch.equal(lin.weight, before) and "ALERT: test loss is not finite" in capsys.readouterr().out
    assert guard(opt, lin(x).sum(), lin.parameters(), 1.0, "test loss") is True   # a finite one applies
    assert not torch.equal(lin.weight, before) and guard.streak == 0 and guard.skipped == 1
    huge = lin(x).sum() * 1e38 * 1e38                                              # finite? no: inf
    assert guard(opt, huge, lin.parameters(), 1.0, "test loss") is False
    with pytest.raises(FloatingPointError, match="2 non-finite updates in a row"):
        guard(opt, lin(x).sum() * float("inf"), lin.parameters(), 1.0, "test loss")


def test_ppo_step_skips_a_nan_update(tiny_model_path):
    p = Policy(tiny_model_path, PolicyConfig(max_new_tokens=4, lora_r=4, lora_alpha=8), seed=0)
    t = PolicyTrainer(p, PPOConfig(rollout_batch_size=3, minibatch_size=3), seed=0)
    batch = p.generate(PROMPTS, greedy=False, seed=3)
    before = {k: v.clone() for k, v in p.adapter_state().items()}
    m = t.ppo_step(batch, torch.tensor([1.0, float("nan"), 0.5]))
    assert m["skipped_updates"] == 1
    assert all(torch.equal(before[k], v) for k, v in p.adapter_state().items())
