"""Run by tests/test_cluster.py in a fresh process (a test session already has its own local Ray).

    python tests/cluster_job.py multinode OUT_DIR   # a 2-node cluster simulated on this machine

It starts alignflow's two data-parallel reward-model ranks the way RLHFWorkers does (placement
group, STRICT_SPREAD: one per node; one gloo group), trains the reward model, and prints one JSON
line with where the ranks ran and what they trained.
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
    if mode != "multinode":
        raise SystemExit(f"unknown mode {mode!r}")
    from ray.cluster_utils import Cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    init_ray(cluster.address)
    strategy = "STRICT_SPREAD"
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
        print(json.dumps({"nodes": nodes, "cluster_nodes": len(ray.nodes()), "metrics": metrics, "scores": scores,
                          "placement": placement is not None}))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
