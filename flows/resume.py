"""Resuming an interrupted `rlhf_pipeline` run: reading its run folder back, putting the actors
where the run left them, and PPO's per-step checkpoints (README, "Failures, resume and scheduled
retraining").

A stage records itself in the manifest only after its outputs are written atomically, so what the
manifest records is finished; everything else runs again.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from flows import timeline
from flows.run_state import RUNS, RunState, stage
from rlhf_core import schemas
from rlhf_core.config import AlignflowConfig
from rlhf_core.io import path_component_problem
from rlhf_core.preflight import check_run


class ResumeError(RuntimeError):
    pass


def lost_actor(e: BaseException | None) -> str | None:
    """What Ray said about the lost actor behind `e` (its cause chain), or None if no actor was lost."""
    import ray
    while e is not None:
        if isinstance(e, ray.exceptions.RayActorError):
            return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        e = e.__cause__ or e.__context__
    return None


def pipeline_restarting(state: RunState, show_progress: bool | None) -> dict:
    """`rlhf_pipeline` on a prepared run; when it fails because an actor was lost (a trainer rank:
    Ray restarts only the pools' actors), up to resources.trainer_restarts times: every actor anew,
    continuing from the last completed stage and PPO step checkpoint, as `alignflow resume` does."""
    from flows.pipeline import rlhf_pipeline
    restarts = state.cfg.resources.trainer_restarts
    for attempt in range(restarts + 1):
        try:
            return rlhf_pipeline(state.cfg, run_id=state.run_id, show_progress=show_progress)
        except Exception as e:
            why = lost_actor(e)
            if why is None or attempt == restarts:
                raise
            print(f"ALERT: an actor was lost ({why}). Restarting every actor and continuing from the last "
                  f"completed stage (restart {attempt + 1} of {restarts}, resources.trainer_restarts)", flush=True)
            state = load_run(str(state.run_dir), reason=f"lost actor: {why}")
    raise AssertionError("unreachable")


def load_run(run: str, output_dir: str = "runs", reason: str | None = None) -> RunState:
    """The state of an interrupted run (`run`: its folder, or its id under `output_dir`), to resume.

    The run continues with the config it started with; its prompts file must be the one recorded.
    """
    if Path(run).is_dir():
        run_dir = Path(run)
    elif problem := path_component_problem(run):
        # An id names a folder *in* output_dir; '../x' would reach a run (or write) outside it.
        raise ResumeError(f"{run}: not a run id ({problem}); to resume a run elsewhere, give its folder")
    else:
        run_dir = Path(output_dir) / run
    manifest_path = run_dir / "manifest.json"
    if not manifest_path.is_file():
        raise ResumeError(f"{run}: no run there (looked for {manifest_path})")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        cfg = AlignflowConfig.model_validate(manifest["config"])
    except (ValueError, KeyError) as e:
        raise ResumeError(f"{manifest_path}: not a readable alignflow manifest ({e})") from e
    if manifest.get("status") == "completed" or str(manifest.get("status", "")).startswith("stopped"):
        raise ResumeError(f"run {manifest['run_id']} already finished ({manifest['status']}); nothing to resume")
    if manifest.get("flow", "rlhf_pipeline") != "rlhf_pipeline":
        raise ResumeError(f"run {manifest['run_id']} is a {manifest['flow']} run; only `alignflow run` runs resume")
    prompts = run_dir / "prompts.parquet"
    if schemas.file_sha256(prompts) != manifest["data"]["prompts"]["sha256"]:
        raise ResumeError(f"{prompts} changed since the run started (sha256 differs from the manifest)")
    cfg.run.output_dir = str(run_dir.parent)     # wherever it is resumed from: the registry beside it
    check_run(cfg)     # a model folder moved since the run started: say so before any actor starts
    state = RunState(run_id=manifest["run_id"], run_dir=run_dir, cfg=cfg, manifest=manifest,
                     prompts=schemas.read_table(prompts, schemas.PROMPTS).to_pylist())
    manifest.setdefault("resumed", []).append({"at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                               "status_before": manifest.get("status", "running"),
                                               **({"automatic": reason} if reason else {})})
    manifest["status"] = "running"
    manifest.setdefault("timelines", []).append(timeline.new_timeline())
    state.save_manifest()
    RUNS[state.run_id] = state
    return state


@stage
def restore_checkpoints(run_id: str) -> dict:
    """Load the latest checkpoints a resumed run recorded (nothing for a new run).

    Within an iteration the stages end in this order: warm-up (checkpoint of the merged policy),
    reward model, cost model, PPO (a checkpoint every ppo.checkpoint_every steps, then the final
    adapter), evaluation, guard (maybe a rollback), so the last one recorded is the state the next
    unfinished stage (or PPO step) starts from.
    """
    st = RUNS[run_id]
    latest: dict = {"policy": None, "reward_model": None, "cost_model": None, "sft_rounds": 0}
    for k in sorted(int(x) for x in st.manifest.get("iterations", {})):
        it = st.manifest["iterations"][str(k)]
        if "warmup" in it:
            latest.update(policy=it["warmup"]["checkpoint"], sft_rounds=latest["sft_rounds"] + 1)
        for name in ("reward_model", "cost_model"):
            latest[name] = it.get(name, latest[name])
        if "ppo_progress" in it and "policy" not in it:      # killed mid-PPO: its last step checkpoint
            latest["policy"] = it["ppo_progress"]["checkpoint"]
        if "policy" in it:
            latest["policy"] = it["policy"]["adapter"]
        latest["policy"] = it.get("rolled_back_to", latest["policy"])
    if latest["policy"] or latest["reward_model"]:
        st.workers.restore(**latest)
        print(f"resumed: policy {latest['policy'] or 'base'}, reward model "
              f"{(latest['reward_model'] or {}).get('path', 'none yet')}")
    return {k: v if not isinstance(v, dict) else v["path"] for k, v in latest.items()}


def ppo_checkpoint(st: RunState, k: int, state: dict) -> None:
    """Every ppo.checkpoint_every steps (not after the last: the stage saves then): the policy and
    the experience so far, each in a folder/file named by its step, then the manifest points at them,
    then the older ones go. A kill at any moment leaves the manifest naming a whole checkpoint."""
    every, s = st.cfg.ppo.checkpoint_every, state["step"]
    if not every or s % every or s >= st.cfg.ppo.steps:
        return
    d = st.iter_dir(k)
    policy = st.workers.save_policy(str(d / f"ppo_step_{s}"))
    exp = schemas.write_table(schemas.from_rows(state["experience"], schemas.EXPERIENCE),
                              d / f"ppo_step_{s}_experience.parquet", schemas.EXPERIENCE)
    st.record(k, "ppo_progress", {"step": s, "checkpoint": policy, "experience": str(exp), "rng": state["rng"],
                                  "history": state["history"]})
    drop_ppo_checkpoints(st, k, keep=s)


def drop_ppo_checkpoints(st: RunState, k: int, keep: int | None) -> None:
    kept = {f"ppo_step_{keep}", f"ppo_step_{keep}_experience.parquet"} if keep is not None else set()
    for path in st.iter_dir(k).glob("ppo_step_*"):
        if path.name not in kept:
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def ppo_resume_point(st: RunState, k: int) -> dict | None:
    """The PPO loop's state at its last checkpoint in iteration k, if a killed run left one (the policy
    itself was restored by `restore_checkpoints`)."""
    prog = st.manifest.get("iterations", {}).get(str(k), {}).get("ppo_progress")
    if prog is None:
        return None
    print(f"iteration {k}: PPO continues after step {prog['step']} of {st.cfg.ppo.steps} (its checkpoint)")
    experience = schemas.read_table(prog["experience"], schemas.EXPERIENCE).to_pylist()
    return {"step": prog["step"], "rng": prog["rng"], "history": prog["history"], "experience": experience}
