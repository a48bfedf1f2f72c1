"""Benchmark (not a test): does RL earn its place? Supervised-only against supervised + RL.

Runs the default `alignflow run` once per arm and seed, as child processes, each in its own output
folder, and compares the kept policies on the generalisation set (written for evaluation only) with
the evaluation judge (trained on human labels, never used in training), with Wilson 95 % intervals:

- `sft+rl`: the default run (supervised stage, then PPO against the reward model, each iteration);
- `sft-only`: the same run with no RL steps (`ppo.steps=0`) and more supervised epochs instead, so
  that both arms spend about the same wall clock (both are reported: the match is approximate).

    python bench/rl_ablation.py [--seeds 0 1] [--arms sft+rl sft-only] [--set key=value ...]
                                [--out docs/rl_ablation.json]

`--set` applies to both arms. Writes the JSON and prints a Markdown table (docs/algorithms.md holds
the latest). Each run takes the default run's time: run it on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ARMS = {
    "sft+rl": [],
    # RL's wall clock (4 PPO steps of 24 rollouts per iteration) spent on supervised epochs instead
    "sft-only": ["ppo.steps=0", "warmup.epochs=3", "warmup.later_epochs=2"],
}


def run_arm(arm: str, seed: int, overrides: list[str], out_root: Path) -> dict:
    out = out_root / f"{arm}-seed{seed}"
    sets = [*overrides, *ARMS[arm], f"run.seed={seed}", f"run.output_dir={out}", f"run.name={arm.replace('+', '-')}",
            "registry.enabled=false"]
    cmd = [sys.executable, "-m", "flows.cli", "run", *[a for s in sets for a in ("--set", s)]]
    print(f"[{arm} seed {seed}] {' '.join(cmd[2:])}", flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT)
    wall = time.time() - t0
    manifests = sorted(out.glob("*/manifest.json"))
    if proc.returncode != 0 or not manifests:
        raise SystemExit(f"[{arm} seed {seed}] alignflow run failed (rc {proc.returncode}); see its output above")
    man = json.loads(manifests[-1].read_text())
    iters = man["iterations"]
    last = max(int(k) for k in iters)
    evals = {k: iters[str(k)]["eval"]["metrics"] for k in (0, last)}
    return {"arm": arm, "seed": seed, "wall_s": wall, "run_dir": str(manifests[-1].parent),
            "base": _headline(evals[0]), "final": _headline(evals[last]),
            "train_s": _train_seconds(man)}


def _headline(m: dict) -> dict:
    g = m["sets"]["generalisation"]
    return {k: {"rate": g[k]["rate"], "ci": g[k]["ci"], "n": g[k]["n"]}
            for k in ("unsafe_compliance", "over_refusal", "degeneration_safe") if k in g}


def _train_seconds(manifest: dict) -> float:
    """Seconds of the stages that train the policy (supervised and RL), from the run's timelines."""
    return sum(e["seconds"] for t in manifest.get("timelines", []) for e in t["stages"]
               if e["stage"] in ("warm_up_policy", "update_policy"))


def _cell(r: dict) -> str:
    return f"{r['rate']:.1f} [{r['ci'][0]:.0f}–{r['ci'][1]:.0f}]"


def markdown(results: list[dict]) -> str:
    lines = ["| arm | seed | unsafe compliance | over-refusal | degenerate safe answers | policy training (min) "
             "| wall (min) |", "|---|---|---|---|---|---|---|"]
    for r in results:
        f = r["final"]
        lines.append(f"| {r['arm']} | {r['seed']} | {_cell(f['unsafe_compliance'])} | {_cell(f['over_refusal'])} | "
                     f"{_cell(f['degeneration_safe'])} | {r['train_s'] / 60:.1f} | {r['wall_s'] / 60:.1f} |")
    b = results[0]["base"]
    lines.append(f"| base | – | {_cell(b['unsafe_compliance'])} | {_cell(b['over_refusal'])} | "
                 f"{_cell(b['degeneration_safe'])} | – | – |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="Run seeds (each arm runs once per seed).")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS), help="Arms to run.")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="Config override for every arm (repeatable).")
    ap.add_argument("--out", default="docs/rl_ablation.json", help="Where the JSON goes.")
    ap.add_argument("--work", default=None, help="Folder for the runs (default: a temporary one).")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="alignflow-ablation-"))
    results = []
    try:
        for seed in args.seeds:
            for arm in args.arms:
                results.append(run_arm(arm, seed, args.overrides, work))
                Path(args.out).write_text(json.dumps(results, indent=2) + "\n")   # partial results survive
    except KeyboardInterrupt:
        print("interrupted: the finished runs are in", args.out, file=sys.stderr)
        return 130
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
