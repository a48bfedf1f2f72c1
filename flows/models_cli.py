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


def models_main(args: argparse.Namespace) -> int:
    from flows.console import make_console
    from rich.markup import escape
    from rich.table import Table

    from rlhf_core.registry import Registry, RegistryError
    console = make_console()
    reg = Registry(args.registry)
    try:
        if getattr(args, "version", None) is not None and (problem := version_problem(args.version)):
            raise RegistryError(f"version {args.version[:120]!r}: not a version id ({problem})")
        if args.models_command != "list" and not reg.path.exists():
            raise RegistryError(f"--registry {reg.path}: no registry there yet (a finished `alignflow run` creates it)")
        if args.models_command == "list":
            table = Table(title=f"models in {reg.path}")
            for col in ("version", "stage", "unsafe %", "over-refusal %", "algorithm", "gate"):
                table.add_column(col)
            for v in reg.versions():
                m, gate = v["metrics"], v.get("gate") or {}
                table.add_row(escape(v["version"]), v["stage"], f"{m.get('unsafe_compliance', float('nan')):.1f}",
                              f"{m.get('over_refusal', float('nan')):.1f}", v["lineage"].get("algorithm", ""),
                              "–" if not gate else ("passed" if gate["passed"] else "; ".join(gate["reasons"])))
            console.print(table)
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
