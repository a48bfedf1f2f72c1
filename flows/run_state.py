"""Run folder, manifest and the live objects a flow run's tasks share.

Prefect tasks pass run ids and paths; the live actor handles stay here, looked up by run id,
so Prefect never tries to hash or serialise them.
"""
from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from flows import timeline
from rlhf_core.config import AlignflowConfig
from rlhf_core.io import atomic_write_text

# Every stage is a Prefect task with these options. Live actor handles are never task inputs
# (Prefect would hash them): tasks take the run id and look the run up in RUNS.
STAGE = dict(cache_policy=NO_CACHE, log_prints=True)


def stage(fn=None, **options):
    """Decorate a stage `fn(run_id, k, ...)`: a Prefect task (STAGE options, plus `options`) whose
    wall time and actor compute go to the run's timeline (flows/timeline.py)."""
    if fn is None:
        return lambda f: stage(f, **options)

    @functools.wraps(fn)
    def timed(run_id: str, *args, **kwargs):
        t0 = time.time()
        k = kwargs.get("k", args[0] if args and isinstance(args[0], int) else None)
        try:
            out = fn(run_id, *args, **kwargs)
        finally:
            if run_id in RUNS:
                RUNS[run_id].time_stage(fn.__name__, k, t0, time.time())
        if run_id in RUNS:
            RUNS[run_id].last_completed = fn.__name__ if k is None else f"{fn.__name__} (iteration {k})"
        return out

    def run_name(parameters: dict) -> str:
        # the Prefect UI's name of the task run: the stage and its iteration, not "evaluate-1cb"
        k = parameters.get("k")
        return fn.__name__ if k is None else f"{fn.__name__}[iter={k}]"

    return task(**STAGE, task_run_name=run_name, **options)(timed)


@dataclass
class RunState:
    run_id: str
    run_dir: Path
    cfg: AlignflowConfig
    manifest: dict = field(default_factory=dict)
    workers: object = None          # workers.controller.RLHFWorkers
    progress: object = None         # flows.progress.ProgressUI
    log: object = None              # flows.training_log.TrainingLog (TensorBoard)
    prompts: list = field(default_factory=list)   # rows of schemas.PROMPTS
    last_completed: str | None = None   # this process's last finished stage, for an interruption's record

    def __post_init__(self):
        if self.log is None:            # opens no file until a stage writes to it
            from flows.training_log import TrainingLog
            self.log = TrainingLog(self.run_dir)

    def iter_dir(self, k: int) -> Path:
        d = self.run_dir / f"iter_{k}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def save_manifest(self) -> Path:
        self.manifest["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        path = self.run_dir / "manifest.json"
        atomic_write_text(path, json.dumps(self.manifest, indent=2, sort_keys=False, default=str))
        return path

    def done(self, k: int, key: str):
        """What stage `key` of iteration k recorded, if it completed before: a resumed run keeps it
        (a stage records only after its outputs are written, so a record means a finished stage)."""
        value = self.manifest.get("iterations", {}).get(str(k), {}).get(key)
        if value is not None:
            print(f"iteration {k}: {key.replace('_', ' ')} completed before the interruption; kept")
        return value

    def timeline(self) -> dict:
        """This process's timeline (the last one: a resumed run has one per process)."""
        timelines = self.manifest.setdefault("timelines", [])
        if not timelines:
            timelines.append(timeline.new_timeline())
        return timelines[-1]

    def time_stage(self, name: str, k: int | None, t0: float, t1: float) -> None:
        busy = {}
        if self.workers is not None:
            try:
                busy = self.workers.busy_intervals()
            except Exception as e:  # noqa: BLE001 — timing must never hide the stage's own error
                print(f"timeline: actor busy clocks unavailable after {name} ({type(e).__name__}: {e})")
        self.timeline()["stages"].append(timeline.stage_entry(name, k, t0, t1, busy))
        self.save_manifest()

    def record(self, k: int, key: str, value) -> None:
        it = self.manifest.setdefault("iterations", {}).setdefault(str(k), {})
        it[key] = value
        self.save_manifest()


RUNS: dict[str, RunState] = {}


def new_run_id(name: str) -> str:
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
