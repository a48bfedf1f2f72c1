"""`alignflow export RUN|VERSION --out DIR`: a run's policy as a plain Hugging Face model folder."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from flows.models_cli import DEFAULT_REGISTRY, version_problem
from rlhf_core.io import path_component_problem


def add_export_command(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser(
        "export", help="write a run's policy as a plain Hugging Face model folder",
        description="The policy of a finished run (its final iteration) or of a registry version, with every "
                    "adapter folded into the base weights: a folder that AutoModelForCausalLM.from_pretrained "
                    "loads with nothing else installed (float32 safetensors, tokenizer and chat template, "
                    "generation config, a model card with the lineage and evaluation). Its greedy answers are "
                    "the policy's.")
    e.add_argument("source", metavar="RUN|VERSION",
                   help="a run folder, a run id under --runs-dir, or a registry version (<run_id>/iter_<k>)")
    e.add_argument("--out", required=True, metavar="DIR", help="the folder to write (must not exist, or --force)")
    e.add_argument("--force", action="store_true", help="replace --out if it exists")
    e.add_argument("--runs-dir", default="runs", help="where run folders are (default: runs)")
    e.add_argument("--registry", default=DEFAULT_REGISTRY, metavar="FILE",
                   help="registry file, for a version (default %(default)s)")


class _Source:
    def __init__(self, manifest: dict, adapter: str, lineage: dict, metrics: dict, version: str | None):
        self.manifest, self.adapter, self.lineage, self.metrics, self.version = (manifest, adapter, lineage,
                                                                                  metrics, version)


def _read_manifest(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable alignflow manifest ({e})") from e


def resolve_source(source: str, runs_dir: str, registry: str) -> _Source:
    """What to export, checked before any model loads."""
    from rlhf_core.export import check_adapter_folder
    from rlhf_core.registry import Registry, folder_sha256, lineage_from_manifest
    run_dir = Path(source) if (Path(source) / "manifest.json").is_file() else None
    if run_dir is None and not path_component_problem(source) and (Path(runs_dir) / source / "manifest.json").is_file():
        run_dir = Path(runs_dir) / source
    if run_dir is not None:
        manifest = _read_manifest(run_dir / "manifest.json")
        final = manifest.get("final") or {}
        if not final.get("adapter"):
            raise ValueError(f"run {manifest.get('run_id', run_dir)} has no final policy to export "
                             f"(status: {manifest.get('status', 'unknown')}); a finished run records one")
        k = final["iteration"]
        adapter = str(run_dir / f"iter_{k}" / "policy_adapter")    # the run folder may have moved
        return _Source(manifest, str(check_adapter_folder(adapter)), lineage_from_manifest(manifest, k),
                       final.get("metrics") or {}, None)
    if "/" not in source:
        raise ValueError(f"{source}: no run folder there, no run {source!r} under {runs_dir}, and not a "
                         "registry version (<run_id>/iter_<k>)")
    if problem := version_problem(source):
        raise ValueError(f"version {source[:120]!r}: not a version id ({problem})")
    reg = Registry(registry)
    if not reg.path.exists():
        raise ValueError(f"--registry {reg.path}: no registry there, so no version {source!r}")
    entry = reg.get(source)
    lineage = entry["lineage"]
    adapter = check_adapter_folder(lineage["adapter"])
    if lineage.get("adapter_sha256") and folder_sha256(adapter) != lineage["adapter_sha256"]:
        raise ValueError(f"{adapter}: changed since version {source} was registered (sha256 differs)")
    manifest = _read_manifest(adapter.parent.parent / "manifest.json")
    return _Source(manifest, str(adapter), lineage, entry.get("metrics") or {}, source)


def export_main(args: argparse.Namespace) -> int:
    from rich.markup import escape

    from flows.console import make_console
    from rlhf_core.config import AlignflowConfig
    from rlhf_core.registry import RegistryError
    console = make_console()
    out = Path(args.out)
    try:
        if out.exists() and not args.force:
            raise ValueError(f"--out {out}: already exists (give --force to replace it)")
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out}: a file, not a folder")
        src = resolve_source(args.source, args.runs_dir, args.registry)
        cfg = AlignflowConfig.model_validate(src.manifest["config"])
        base = src.manifest.get("models", {}).get("policy")
        if not base or not Path(base).exists():        # a cache folder since removed: resolve anew
            from rlhf_core.models import resolve_model_path
            base = resolve_model_path(cfg.policy.model)
    except (ValueError, KeyError, RegistryError) as e:
        console.print(f"[red]error:[/] {escape(str(e))}", highlight=False)
        return 2
    from rlhf_core.export import export_policy, model_card
    console.print(f"exporting {escape(src.adapter)} on {escape(base)} …", highlight=False)
    export_policy(base, src.adapter, cfg.policy, out, model_card(src.lineage, src.metrics, src.version))
    console.print(f"wrote {escape(str(out))}: load it with AutoModelForCausalLM.from_pretrained({str(out)!r})",
                  highlight=False)
    return 0
