"""`alignflow models list|show|promote|rollback`: the model registry from the command line."""
from __future__ import annotations

import argparse
import json

from rlhf_core.io import path_component_problem

DEFAULT_REGISTRY = "runs/registry.json"


def add_models_commands(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("models", help="the model registry: versions, lineage, promotion, rollback",
                       description="Every finished run registers its kept policy with its lineage (base model, "
                                   "adapter hash, reward/cost models, preference-data hashes, constitution version, "
                                   "annotators, config hash, evaluation). A version becomes production only if it "
                                   "passes the promotion gate (registry.* in the config).")
    actions = m.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    for name, help_ in (("list", "every version with its stage and held-out rates"),
                        ("show", "one version's lineage, evaluation and gate result"),
                        ("promote", "make a version production (by hand; the gate is not asked)"),
                        ("rollback", "production goes back to the previous production version")):
        a = actions.add_parser(name, help=help_, description=help_[0].upper() + help_[1:] + ".")
        if name in ("show", "promote"):
            a.add_argument("version", help="version id, e.g. default-20261128-214518/iter_2")
        a.add_argument("--registry", default=DEFAULT_REGISTRY, metavar="FILE",
                       help="registry file (default %(default)s: runs/ of the default run.output_dir)")


def version_problem(version: str) -> str | None:
    """Why `version` cannot be a version id (<run_id>/iter_<k>, each part one folder name as a run
    writes it), or None: one with '..', '.', an empty part or a backslash is refused, not looked up."""
    return next((f"part {p!r}: {why}" for p in version.split("/") if (why := path_component_problem(p))), None)


def versions_table(path, versions: list[dict]):
    """The `models list` table, then why each failed gate failed. A version id is never folded,
    whatever the width: a user copies it into `models show/promote`."""
    from rich import box
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table
    # the least needed column last, cut short on a narrow terminal (80 columns fit the rest)
    table = Table(title=f"models in {path}", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    table.add_column("version", no_wrap=True, min_width=max(len(v["version"]) for v in versions))
    table.add_column("stage", no_wrap=True, min_width=10)
    table.add_column("unsafe %", justify="right", min_width=6)
    table.add_column("over-refusal %", justify="right", min_width=12)
    table.add_column("gate", no_wrap=True, min_width=6)
    table.add_column("algorithm", no_wrap=True, overflow="ellipsis")
    reasons = []
    for v in versions:
        m, gate = v["metrics"], v.get("gate") or {}
        table.add_row(escape(v["version"]), v["stage"], f"{m.get('unsafe_compliance', float('nan')):.1f}",
                      f"{m.get('over_refusal', float('nan')):.1f}",
                      "–" if not gate else ("passed" if gate["passed"] else "failed"), v["lineage"].get("algorithm", ""))
        if gate and not gate["passed"]:
            reasons.append(f"{escape(v['version'])}: the gate failed: {escape('; '.join(gate['reasons']))}")
    return Group(table, *reasons)


def models_main(args: argparse.Namespace) -> int:
    from flows.console import make_console
    from rich.markup import escape

    from rlhf_core.registry import Registry, RegistryError
    console = make_console()
    reg = Registry(args.registry)
    try:
        if getattr(args, "version", None) is not None and (problem := version_problem(args.version)):
            raise RegistryError(f"version {args.version[:120]!r}: not a version id ({problem})")
        if args.models_command != "list" and not reg.path.exists():
            raise RegistryError(f"--registry {reg.path}: no registry there yet (a finished `alignflow run` creates it)")
        if args.models_command == "list":
            versions = reg.versions() if reg.path.exists() else []
            if not versions:
                console.print(f"no models registered in {reg.path} yet: a finished `alignflow run` registers "
                              "its policy there", highlight=False)
            else:
                console.print(versions_table(reg.path, versions))
        elif args.models_command == "show":
            print(json.dumps(reg.get(args.version), indent=2))
        elif args.models_command == "promote":
            reg.promote(args.version)
            console.print(f"{escape(args.version)} is now production", highlight=False)
        else:
            v = reg.rollback()
            console.print(f"rolled back: {escape(v['version'])} is production again", highlight=False)
    except RegistryError as e:
        console.print(f"[red]error:[/] {escape(str(e))}", highlight=False)
        return 2
    return 0
