"""Run by tests/test_cluster.py in a fresh process (a test session already has its own local Ray).

    python tests/cluster_job.py multinode OUT_DIR   # a 2-node cluster simulated on this machine
    python tests/cluster_job.py connect OUT_DIR     # join the cluster at RAY_ADDRESS

Both start alignflow's two data-parallel reward-model ranks the way RLHFWorkers does (placement
group, STRICT_SPREAD: one per node when there are two nodes; one gloo group), train the reward
model, and print one JSON line with where the ranks ran and what they trained. On two nodes, two
policy ranks (the tiny model) also take a supervised step and a PPO update across the nodes.
"""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    import ray

    from rlhf_core.config import load_config
    from rlhf_core.models import minilm_folder
    from workers.cluster import init_ray, start_reward_trainers
    cluster = None
    strategy = "PACK"
    if mode == "multinode":
        from ray.cluster_utils import Cluster
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        init_ray(cluster.address)
        strategy = "STRICT_SPREAD"
    else:
        init_ray(None)                        # RAY_ADDRESS names the cluster
    cfg = load_config(ROOT / "tests" / "configs" / "tiny.yaml",
                      ["resources.reward_model_trainers=2", f"resources.placement_strategy={strategy}",
                       "reward_model.dropout=0"])
    trainers, placement = start_reward_trainers(cfg, str(minilm_folder()), timeout=120)
    try:
        nodes = [node for node, _ in ray.get([t.location.remote() for t in trainers])]
        pairs = [{"prompt": f"question {i}", "response_a": "I can't help with that.", "response_b": f"Sure ({i}).",
                  "better": i % 2, "judge_better": i % 2, "weight": 1.0} for i in range(20)]
        metrics = ray.get([t.train.remote(pairs, str(out / "rm"), None, 1) for t in trainers])[0]
        scores = [ray.get(t.score.remote(["q"] * 2, ["I can't help with that.", "Sure."]))["raw"] for t in trainers]
        result = {"nodes": nodes, "cluster_nodes": len(ray.nodes()), "metrics": metrics, "scores": scores,
                  "placement": placement is not None}
        if cluster is not None:
            result["policy"] = _policy_ranks(cfg)
        print(json.dumps(result))
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()


def _policy_ranks(cfg) -> dict:
    """Two policy ranks, one per node: a supervised step and a PPO update; where they ran and
    whether their adapters are still equal (the gradients crossed the nodes)."""
    import ray
    import torch

    from rlhf_core.models import tiny_folder
    from rlhf_core.policy import Policy
    from workers.actors import PolicyTrainerActor
    from workers.cluster import start_trainer_ranks
    r = cfg.resources
    ranks, placement = start_trainer_ranks(PolicyTrainerActor, 2, (str(tiny_folder()), cfg.policy, cfg.ppo, "cpu", 1, 0,
                                                                   cfg.safe_rlhf), r, 120, "policy")
    prompts = ["How do I bake bread?", "Write a tutorial on how to make a bomb", "What is 2+2?"]
    ray.get([t.begin_sft.remote(0.01) for t in ranks])
    ray.get([t.sft_step.remote(prompts, ["Flour, water.", "I can't help with that.", "Four."]) for t in ranks])
    batch = Policy(str(tiny_folder()), cfg.policy).generate(prompts, greedy=False, seed=1).to_cpu_dict()
    ppo = ray.get([t.ppo_step.remote(batch, [1.0, -1.0, 0.5], None) for t in ranks])
    stacks = ray.get([t.adapter_stack.remote() for t in ranks])
    nodes = [node for node, _ in ray.get([t.location.remote() for t in ranks])]
    ray.util.remove_placement_group(placement)      # its actors go with it
    return {"nodes": nodes, "pg_loss": [m["pg_loss"] for m in ppo],
            "equal": all(torch.equal(stacks[0]["current"][k], v) for k, v in stacks[1]["current"].items()),
            "changed": any(float(v.abs().sum()) > 0 for k, v in stacks[0]["current"].items() if "lora_B" in k)}


if __name__ == "__main__":
    main()
