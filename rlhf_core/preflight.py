"""What a config points at — the models, an adapter, the output folder — checked before Prefect,
Ray or any model starts: a mistyped path fails in a second with its key named, instead of a minute
into a run with the same traceback from every actor."""
from __future__ import annotations

import os
from pathlib import Path

from rlhf_core.config import AlignflowConfig, ConfigError
from rlhf_core.models import DEFAULT_ENCODER, DEFAULT_POLICY, TINY_POLICIES, builtin_problem

# The built-in names each key resolves (flows/pipeline.py start_workers: the reward model's backbone
# goes through both resolvers, so it takes every one).
POLICY_MODELS = (DEFAULT_POLICY, *TINY_POLICIES)
ENCODERS = (DEFAULT_ENCODER,)
BACKBONES = (DEFAULT_POLICY, *TINY_POLICIES, DEFAULT_ENCODER)


def _in_hub_cache(name: str) -> bool:
    """Whether `name` is a Hugging Face model id already in the local cache (runs are offline)."""
    try:
        from huggingface_hub import try_to_load_from_cache
        found = try_to_load_from_cache(name, "config.json", cache_dir=os.environ.get("HF_HUB_CACHE"))
        return isinstance(found, str)
    except Exception:  # noqa: BLE001 - not a valid repo id (a path, '..', ...): not in the cache
        return False


def model_problem(name: str, builtins: tuple[str, ...]) -> str | None:
    """Why `name` is not a model alignflow can load here, or None: a built-in name, a Hugging Face
    folder (config.json) or a cached hub id."""
    if name in builtins:
        return builtin_problem(name)
    if name.startswith(("package:", "tiny:")):
        return f"{name!r} is not a built-in model for this key (built in: {', '.join(builtins)})"
    path = Path(name)
    if path.is_dir() and not (path / "config.json").is_file():
        return f"{name}: no config.json there (not a Hugging Face model folder)"
    if path.is_dir():
        return None
    if path.exists():
        return f"{name} is a file; expected a model folder (config.json and weights)"
    if _in_hub_cache(name):
        return None
    return f"{name!r}: no such folder, nor a model in the local Hugging Face cache (runs are offline)"


def check_model(key: str, name: str, builtins: tuple[str, ...] = POLICY_MODELS) -> None:
    if problem := model_problem(name, builtins):
        raise ConfigError(f"{key}: {problem}")


def check_adapter(key: str, folder: str) -> None:
    """A policy_adapter (or warmup_policy) folder written by `alignflow run`."""
    if not os.path.isdir(folder):
        raise ConfigError(f"{key} {folder}: no such folder")
    if not os.path.isfile(os.path.join(folder, "adapter_model.safetensors")):
        raise ConfigError(f"{key} {folder}: no adapter_model.safetensors in that folder")


def check_output_dir(path: str, key: str = "run.output_dir") -> None:
    """The folder runs are written to: a folder, or creatable, and writable."""
    p = Path(path)
    found = next((a for a in (p, *p.parents) if a.exists()), Path("."))
    if not found.is_dir():
        where = f"{path} is" if found == p else f"{path}: {found} is"
        raise ConfigError(f"{key}: {where} a file, not a folder")
    if not os.access(found, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: {found} is not writable")


def check_run(cfg: AlignflowConfig) -> None:
    """Everything a run reads or writes by name, each error naming its key."""
    check_output_dir(cfg.run.output_dir)
    check_model("policy.model", cfg.policy.model, POLICY_MODELS)
    check_model("reward_model.model", cfg.reward_model.model, BACKBONES)
    check_model("feedback.encoder", cfg.feedback.encoder, ENCODERS)
