"""`alignflow` command line: run the RLHF pipeline, evaluate a model, inspect the config."""
from __future__ import annotations

import argparse
import os
import sys

EPILOG = """\
examples:
  alignflow run                                  # the embedded default: SmolLM2-135M, 2 iterations
  alignflow run --config my.yaml --set ppo.steps=4 --set run.iterations=3
  alignflow eval                                 # evaluate the base model on the held-out sets
  alignflow eval --adapter runs/<run_id>/iter_2/policy_adapter
  alignflow config --fields                      # every key you can --set, with its default and meaning

environment:
  RAY_ADDRESS        use that Ray cluster instead of starting a local Ray
  PREFECT_API_URL    report flow runs, tasks and artifacts to that Prefect server (else an ephemeral API)
  ALIGNFLOW_CACHE    where the converted default model is cached (default ~/.cache/alignflow)
"""


def _prepare_env() -> None:
    # Offline machines: never reach a model hub. Prefect's ephemeral API needs 8–15 s to start on
    # 2 cores against a 20 s default timeout (STACK.md): give it room.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML config; unspecified keys keep their defaults")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides",
                   help="override one key, e.g. --set ppo.steps=4 (repeatable; see `alignflow config --fields`)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (also off when not a terminal)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alignflow", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="alignflow: RLHF that makes a language model less harmful without making it refuse "
                    "safe requests. Stages run as Ray actors under a Prefect flow.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the RLHF pipeline (default: the embedded default run)",
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         description="Per iteration: generate samples → simulated feedback (constitution judge) → "
                                     "train reward model → PPO policy update → evaluate. Writes runs/<run_id>/.")
    _add_config_args(run)

    ev = sub.add_parser("eval", help="evaluate a model (and optional LoRA adapter) on the held-out sets",
                        description="Greedy answers on held-out harmful, benign and borderline prompts: "
                                    "unsafe-compliance and over-refusal rates, judge score.")
    ev.add_argument("--model", help="HF causal LM folder or cached hub id (default: policy.model)")
    ev.add_argument("--adapter", help="a policy_adapter folder written by `alignflow run`")
    _add_config_args(ev)

    cf = sub.add_parser("config", help="print the resolved config, or every field with its help")
    cf.add_argument("--fields", action="store_true", help="list every key, its default and what it means")
    cf.add_argument("--config", metavar="FILE")
    cf.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides")
    return parser


def _print_result(console, title: str, results: dict, run_dir: str) -> None:
    from rich.table import Table

    from flows.report import ROWS, _fmt
    keys = sorted(results)
    table = Table(title=title)
    table.add_column("metric")
    for k in keys:
        table.add_column("base" if k == 0 else f"iter {k}", justify="right")
    for key, label in ROWS:
        table.add_row(label, *[_fmt(results[k].get(key)) for k in keys])
    console.print(table)
    console.print(f"Run folder: [bold]{run_dir}[/]  (manifest.json, report.md, iter_*/…parquet, policy adapters)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _prepare_env()
    from rich.console import Console

    from rlhf_core.config import ConfigError, describe_fields, load_config
    from rlhf_core.prompts import PromptFileError
    console = Console()
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        console.print(f"[red]error:[/] {e}")
        return 2

    if args.command == "config":
        import yaml
        if args.fields:
            for key, default, help_ in describe_fields():
                console.print(f"[bold]{key}[/] = {default}\n    {help_}", highlight=False)
        else:
            console.print(yaml.safe_dump(cfg.model_dump(), sort_keys=False), highlight=False)
        return 0

    import torch
    torch.set_num_threads(1)  # the driver only coordinates; actors own the cores (STACK.md)
    from flows.pipeline import eval_flow, prepare_run, rlhf_pipeline
    show = False if args.no_progress else None
    if args.command == "eval":
        if args.model:
            cfg.policy.model = args.model
        if args.adapter and not os.path.isfile(os.path.join(args.adapter, "adapter_model.safetensors")):
            console.print(f"[red]error:[/] --adapter {args.adapter}: no adapter_model.safetensors in that folder")
            return 2
        cfg.run.name = "eval"
    try:
        # Every prompt file is read and validated here, before Prefect, Ray or any model starts;
        # a bad file leaves nothing behind (the run folder is created only after validation).
        state = prepare_run(cfg)
    except PromptFileError as e:
        console.print(f"[red]error:[/] {e}")
        return 2
    try:
        if args.command == "run":
            out = rlhf_pipeline(cfg, run_id=state.run_id, show_progress=show)
            _print_result(console, f"alignflow run {out['run_id']}: base vs final policy", out["results"],
                          out["run_dir"])
        else:
            out = eval_flow(cfg, adapter=args.adapter, run_id=state.run_id, show_progress=show)
            _print_result(console, f"alignflow eval: {cfg.policy.model}", {0: out["metrics"]}, out["run_dir"])
    except Exception:
        console.print(f"[red]run failed[/]; partial outputs and manifest.json (status: failed) are in {state.run_dir}")
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
