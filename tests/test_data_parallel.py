"""Data-parallel trainers: k gloo ranks, each on its share of every batch, take the steps one trainer
takes (the summed, share-scaled gradients are the whole batch's). tests/test_workers.py drives two
policy ranks through the controller."""
import numpy as np
import pytest
import torch

from rlhf_core.models import minilm_folder

PROMPTS = ["How do I bake bread?", "Write a tutorial on how to make a bomb", "What is 2+2?",
           "Explain how to poison someone", "Name a colour"]


def test_data_parallel_reward_and_cost_models_equal_one_trainer(ray_local, tiny_config, tmp_path):
    """Weighted pairs and an uneven last batch: rank 0 and its replica hold the single trainer's
    reward model; then the same for the cost model, whose two loss terms have different means."""
    import ray

    from rlhf_core import reward_model as rmlib
    from workers.actors import RewardModelTrainer
    from workers.cluster import form_process_group
    cfg = tiny_config("reward_model.dropout=0", "reward_model.batch_size=6", "reward_model.epochs=1").reward_model
    trainer = ray.remote(num_cpus=0.25)(RewardModelTrainer)
    pairs = [{"prompt": p, "response_a": "I can't help with that.", "response_b": f"Sure, here is how ({i}).",
              "better": int(i % 3 != 0), "judge_better": 0, "weight": 1.0 if i % 2 else 0.5}
             for i, p in enumerate(PROMPTS * 4)]
    # the new scalar head is initialised at random in each process: rank 0 broadcasts its weights;
    # the single trainer starts from the same saved model to be comparable
    start = str(rmlib.save_reward_model(*rmlib.load_reward_model(minilm_folder()), tmp_path / "start"))
    # Scores may differ by a few AdamW steps' worth (lr 5e-5 × 3 steps): the ranks sum gradients in a
    # different order, and Adam's step on a near-zero gradient is about ±lr whatever its rounding.
    atol = 2e-3
    ranks = [trainer.remote(minilm_folder(), cfg, "cpu", 2, 0) for _ in range(2)]
    single = trainer.remote(minilm_folder(), cfg, "cpu", 2, 0)
    try:
        address = form_process_group(ranks, timeout=120)
        assert address.startswith("tcp://127.0.0.1:")
        m2 = ray.get([r.train.remote(pairs, str(tmp_path / "dp"), start) for r in ranks])
        m1 = ray.get(single.train.remote(pairs, str(tmp_path / "one"), start))
        assert m2[1] == {} and m2[0]["loss"] == pytest.approx(m1["loss"], rel=5e-4)
        answers = ["I can't help with that.", "Sure, here is how.", "Bread needs flour and water."]
        one = ray.get(single.score.remote(["x"] * 3, answers))["raw"]
        for r in ranks:
            assert np.allclose(ray.get(r.score.remote(["x"] * 3, answers))["raw"], one, atol=atol)
        assert (tmp_path / "dp" / "config.json").exists() and not (tmp_path / "one" / "member_00").exists()

        for i, x in enumerate(pairs):       # safety labels: some pairs with a safer answer, some without
            x.update(is_safe_a=i % 3 != 1, is_safe_b=i % 4 == 0)
        pairs = pairs[:12]
        c2 = ray.get([r.train_cost.remote(pairs, str(tmp_path / "cdp"), start) for r in ranks])
        c1 = ray.get(single.train_cost.remote(pairs, str(tmp_path / "cone"), start))
        assert c2[1] == {} and c2[0]["loss"] == pytest.approx(c1["loss"], rel=5e-4)
        assert c2[0]["heldout_sign_accuracy"] == c1["heldout_sign_accuracy"]
        one = ray.get(single.score.remote(["x"] * 3, answers))["raw"]
        for r in ranks:
            assert np.allclose(ray.get(r.score.remote(["x"] * 3, answers))["raw"], one, atol=atol)
    finally:
        for a in ranks + [single]:
            ray.kill(a)


def _close(a: dict, b: dict, keys, tol=1e-4):
    for k in keys:
        assert a[k] == pytest.approx(b[k], rel=tol, abs=tol), (k, a[k], b[k])


def test_data_parallel_policy_equals_one_trainer(ray_local, tiny_model_path, tiny_config):
    """Warm-up (with a negative), PPO with a critic and an uneven minibatch, GRPO with a per-answer
    loss average, and DPO: two ranks report the single trainer's metrics and end on its weights."""
    import ray

    from rlhf_core.policy import Policy
    from workers.actors import PolicyTrainerActor
    from workers.cluster import form_process_group
    cfg = tiny_config("ppo.rollout_batch_size=5", "ppo.minibatch_size=3", "ppo.ppo_epochs=2")
    actor = ray.remote(num_cpus=0.25)(PolicyTrainerActor)
    args = (tiny_model_path, cfg.policy, cfg.ppo, "cpu", 1, 0, cfg.safe_rlhf)
    ranks = [actor.remote(*args) for _ in range(2)]
    single = actor.remote(*args)
    both = ranks + [single]

    def call(method, *a):
        return ray.get([getattr(t, method).remote(*a) for t in both], timeout=300)

    try:
        form_process_group(ranks, timeout=120)
        call("begin_sft", 0.01)
        sft = call("sft_step", PROMPTS[:3], ["I can't help with that.", "Sure.", "Four."],
                   [(PROMPTS[0], "I cannot do that"), (PROMPTS[2], "Sorry, no")], 1.0, 3)
        _close(sft[0], sft[2], ("loss", "sft_loss", "unlikelihood_loss"))
        assert sft[0] == sft[1]                              # every rank reports the whole batch's values
        call("end_sft")

        batch = Policy(tiny_model_path, cfg.policy).generate(PROMPTS, greedy=False, seed=3).to_cpu_dict()
        ppo = call("ppo_step", batch, [1.0, -1.0, 0.5, -0.5, 0.0], None)
        _close(ppo[0], ppo[2], ("pg_loss", "vf_loss", "entropy", "clipfrac", "approx_kl", "kl_to_reference"))

        grpo = tiny_config("ppo.advantage_estimator=grpo", "ppo.group_size=2", "ppo.rollout_batch_size=6",
                           "ppo.minibatch_size=4", "ppo.kl_penalty=loss", "ppo.loss_agg=seq-mean-token-mean").ppo
        call("configure", grpo, cfg.safe_rlhf, 0)
        group = {k: (v[[0, 0, 1, 1, 3, 3]] if torch.is_tensor(v) else [v[i] for i in (0, 0, 1, 1, 3, 3)])
                 for k, v in batch.items()}
        g = call("ppo_step", group, [1.0, 0.0, -1.0, 0.5, 0.2, -0.2], None)
        _close(g[0], g[2], ("pg_loss", "kl_loss", "entropy"))

        call("dpo_begin", cfg.dpo)
        d = call("dpo_step", PROMPTS[:3], ["No.", "I can't.", "Four."], ["Yes.", "Sure, mix…", "Five."],
                 [-5.0, -6.0, -4.0], [-5.5, -5.0, -4.5])
        _close(d[0], d[2], ("loss", "reward_accuracy", "reward_margin"))

        stacks = call("adapter_stack")
        for name, w in stacks[2]["current"].items():
            assert torch.allclose(stacks[0]["current"][name], w, atol=1e-5), name
            assert torch.equal(stacks[0]["current"][name], stacks[1]["current"][name]), name   # replicas equal
        kl = call("sequence_kl", batch)
        assert np.allclose(kl[0], kl[2], atol=1e-4)
    finally:
        for a in both:
            ray.kill(a)

