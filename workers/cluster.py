"""Ray plumbing shared by the controller and the benchmarks: connecting to a cluster, checking
its resources, remote calls with timeouts, and data-parallel trainer groups (a placement group
plus a torch.distributed process group).
"""
from __future__ import annotations

import logging
import os

import ray

from workers.actors import RewardModelTrainer


class ActorCallError(RuntimeError):
    pass


def timed_get(refs, timeout: float, what: str):
    try:
        return ray.get(refs, timeout=timeout)
    except ray.exceptions.GetTimeoutError as e:
        raise ActorCallError(f"{what}: no answer within {timeout:.0f}s (resources.actor_timeout_s)") from e


def wait_ready(actor, timeout: float, what: str) -> None:
    """Block until a restarting actor answers again (calls fail fast while it restarts)."""
    import time
    end = time.monotonic() + timeout
    while True:
        try:
            return ray.get(actor.__ray_ready__.remote(), timeout=max(1.0, end - time.monotonic()))
        except ray.exceptions.ActorUnavailableError:
            if time.monotonic() > end:
                raise ActorCallError(f"{what}: the actor did not come back within {timeout:.0f}s") from None
            time.sleep(0.2)
        except ray.exceptions.GetTimeoutError as e:
            raise ActorCallError(f"{what}: no answer within {timeout:.0f}s (resources.actor_timeout_s)") from e


class _TokenAuthNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def init_ray(address: str | None, num_cpus: int | None = None) -> dict:
    """Connect to `address` / RAY_ADDRESS if given, else start a local Ray without the dashboard."""
    if ray.is_initialized():
        return ray.cluster_resources()
    address = address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}}
    if address:
        try:
            ray.init(address=address, runtime_env=env, log_to_driver=True)
        except ConnectionError as e:
            hint = ("" if os.environ.get("RAY_AUTH_MODE") else " If the cluster uses token authentication (Ray "
                    "turns it on where ~/.ray/auth_token exists), set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN.")
            raise ConnectionError(f"cannot reach the Ray cluster at {address} (RAY_ADDRESS / resources.ray_address): "
                                  f"{e}.{hint}") from e
    else:
        # Ray starts workers at nice 15, below the driver and Prefect's API server. Here the actors
        # ARE the computation, so they run at the driver's priority (bench/rollout_throughput.py:
        # 114 → 117 tokens/s against 119 for plain `generate`, docs/benchmarks.md).
        os.environ.setdefault("RAY_worker_niceness", "0")
        # Ray turns token auth on for a local instance where ~/.ray/auth_token exists, and says so
        # at WARNING on every run; its choice stands, the notice is dropped (an explicit
        # RAY_AUTH_MODE, or a token auth that is off, still gets Ray's own words).
        logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_TokenAuthNotice())
        # address="local": never join a stale cluster file left by a killed test.
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                 runtime_env=env, log_to_driver=True)
    return ray.cluster_resources()


def check_resources(cfg, n_trainers: int = 2) -> None:
    """Actors asking for more than the cluster has wait forever, silently: fail clearly instead."""
    r = cfg.resources
    need_cpu = (r.rollout_workers * r.cpus_per_rollout + r.feedback_workers * r.cpus_per_feedback
                + n_trainers * r.cpus_per_trainer)
    need_gpu = r.rollout_workers * r.gpus_per_rollout + n_trainers * r.gpus_per_trainer
    have = ray.cluster_resources()
    if need_cpu > have.get("CPU", 0) + 1e-9 or need_gpu > have.get("GPU", 0) + 1e-9:
        raise ActorCallError(
            f"the actors need {need_cpu:g} CPU / {need_gpu:g} GPU but the Ray cluster has "
            f"{have.get('CPU', 0):g} CPU / {have.get('GPU', 0):g} GPU: lower resources.* in the config")


def start_trainer_ranks(cls, k: int, args: tuple, r, timeout: float, what: str) -> tuple[list, object]:
    """k trainer actors of class `cls` built with `args`, data parallel when k > 1: one placement
    group reserves their resources at once and puts them where resources.placement_strategy says
    (PACK: few nodes; SPREAD: across nodes); then they form one torch.distributed group.
    Returns (actors, placement group or None); rank 0 comes first."""
    remote = ray.remote(num_cpus=r.cpus_per_trainer, num_gpus=r.gpus_per_trainer)(cls)
    placement, opts = None, [{}]
    if k > 1:
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        bundle = {"CPU": r.cpus_per_trainer, **({"GPU": r.gpus_per_trainer} if r.gpus_per_trainer else {})}
        placement = placement_group([bundle] * k, strategy=r.placement_strategy)
        timed_get(placement.ready(), timeout, f"reserving the {what} trainers' placement group")
        opts = [{"scheduling_strategy": PlacementGroupSchedulingStrategy(placement, i)} for i in range(k)]
    trainers = [remote.options(**o).remote(*args) for o in opts]
    if k > 1:
        form_process_group(trainers, timeout)
    return trainers, placement


def stop_trainer_ranks(trainers: list, placement) -> None:
    """Kill the ranks `start_trainer_ranks` started and release their placement group."""
    for t in trainers:
        ray.kill(t)
    if placement is not None:
        from ray.util.placement_group import remove_placement_group
        remove_placement_group(placement)


def start_reward_trainers(cfg, backbone_path: str, timeout: float, seed_offset: int = 0) -> tuple[list, object]:
    """The reward-model (or cost-model) trainer ranks: resources.reward_model_trainers of them."""
    r = cfg.resources
    return start_trainer_ranks(RewardModelTrainer, r.reward_model_trainers,
                               (backbone_path, cfg.reward_model, cfg.run.device, r.torch_threads,
                                cfg.run.seed + seed_offset), r, timeout, "reward-model")


def form_process_group(trainers: list, timeout: float) -> str:
    """Make the trainer actors ranks 0..k-1 of one torch.distributed group; returns its address.

    Rank 0 listens on a free port of its node; on one machine the group stays on loopback."""
    locations = timed_get([t.location.remote() for t in trainers], timeout, "locating the trainers")
    loopback = len({node for node, _ in locations}) == 1
    host = "127.0.0.1" if loopback else locations[0][1]
    address = f"tcp://{host}:{timed_get(trainers[0].free_port.remote(), timeout, 'choosing a port')}"
    timed_get([t.join_group.remote(i, len(trainers), address, loopback) for i, t in enumerate(trainers)], timeout,
              f"forming the trainers' process group at {address}")
    return address
