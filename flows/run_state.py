"""Run folder, manifest and the live objects a flow run's tasks share.

Prefect tasks pass run ids and paths; the live actor handles stay here, looked up by run id,
so Prefect never tries to hash or serialise them (ARCHITECTURE.md).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from prefect.cache_policies import NO_CACHE

from rlhf_core.config import AlignflowConfig

# Every stage is a Prefect task with these options. Live actor handles are never task inputs
# (Prefect would hash them): tasks take the run id and look the run up in RUNS.
STAGE = dict(cache_policy=NO_CACHE, log_prints=True)


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@dataclass
class RunState:
    run_id: str
    run_dir: Path
    cfg: AlignflowConfig
    manifest: dict = field(default_factory=dict)
    workers: object = None          # workers.controller.RLHFWorkers
    progress: object = None         # flows.progress.ProgressUI
    prompts: list = field(default_factory=list)   # rows of schemas.PROMPTS

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

    def record(self, k: int, key: str, value) -> None:
        it = self.manifest.setdefault("iterations", {}).setdefault(str(k), {})
        it[key] = value
        self.save_manifest()


RUNS: dict[str, RunState] = {}


def new_run_id(name: str) -> str:
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
