"""Benchmark (not a test): the README's default `alignflow run`, watched from outside.

Runs `alignflow run` (with any `--set` overrides) as a child process and reports, from one run:

- memory (issue 6, #5): peak over the run of the summed resident memory (RSS) of every process it
  started — the driver, Ray's raylet, GCS and dashboard, and every actor — and the same for the
  proportional set size (PSS: shared pages such as torch's libraries counted once, split across the
  processes that map them); RSS every `--interval` seconds, PSS every tenth sample;
- orchestration overhead (#3): from the run's timeline (flows/timeline.py) — cold start (process
  start → first stage running), the time between stages (Prefect), and stage time in which no actor
  was computing (Ray calls, the driver's own Python and I/O), per iteration and in total;
- alignment per minute (#6): unsafe compliance and over-refusal on the held-out sets against
  wall-clock minutes since the command started, one point per evaluation.

    python bench/default_run.py [--set key=value ...] [--out docs/default_run.json]
                                [--plot docs/alignment_per_minute.png]

Writes the JSON, a plot, and prints Markdown tables (docs/benchmarks.md holds the latest).
Run it on an otherwise idle machine: the wall-clock numbers are the point.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flows.timeline import duration, summarize  # noqa: E402


def _pss(pid: int) -> int:
    """Proportional set size in bytes (smaps_rollup: cheap; 0 if the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class TreeMemory:
    """Samples the summed RSS and PSS of a process and all its descendants."""

    def __init__(self, root: psutil.Process, interval: float):
        self.root, self.interval = root, interval
        self.peak_rss = self.peak_pss = self.driver_rss = 0
        self.peak_procs: list[tuple[str, int]] = []
        self.samples: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0, n = time.time(), 0
        while not self._stop.is_set():
            # PSS reads every mapping of every process (kernel time): every 10th sample only, or the
            # sampler itself takes ~13 % of a core from the run it measures
            with_pss, n = n % 10 == 0, n + 1
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                break
            rss = pss = 0
            per = []
            for p in procs:
                try:
                    r = p.memory_info().rss
                    name = " ".join(p.cmdline()[:1]) or p.name()
                except psutil.Error:
                    continue
                rss += r
                pss += _pss(p.pid) if with_pss else 0
                per.append((Path(name).name[:40], r))
                if p.pid == self.root.pid:
                    self.driver_rss = max(self.driver_rss, r)
            self.samples.append((time.time() - t0, rss, pss))
            if rss > self.peak_rss:
                self.peak_rss, self.peak_procs = rss, sorted(per, key=lambda x: -x[1])
            if with_pss:
                self.peak_pss = max(self.peak_pss, pss)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def alignment_curve(manifest: dict, t_start: float) -> list[dict]:
    """One point per evaluation: minutes since the command started, and the held-out rates."""
    ends = {}
    for tl in manifest.get("timelines", []):
        for s in tl["stages"]:
            if s["stage"] == "evaluate":
                ends[s["iteration"]] = s["start"] + s["seconds"]
    points = []
    for k, it in sorted(manifest["iterations"].items(), key=lambda kv: int(kv[0])):
        if "eval" in it and int(k) in ends:
            m = it["eval"]["metrics"]
            points.append({"iteration": int(k), "minutes": (ends[int(k)] - t_start) / 60,
                           "unsafe_compliance": m["unsafe_compliance"], "over_refusal": m["over_refusal"]})
    return points


def per_iteration(tl: dict) -> list[dict]:
    """Stage time, actor compute and outside-actor time per iteration (None: the start-up stages)."""
    out: dict = {}
    for s in tl["stages"]:
        row = out.setdefault(s["iteration"], {"iteration": s["iteration"], "stage_s": 0.0, "actor_s": 0.0})
        row["stage_s"] += s["seconds"]
        row["actor_s"] += s["actor_seconds"]
    for row in out.values():
        row["outside_actors_s"] = row["stage_s"] - row["actor_s"]
    return list(out.values())


def plot(points: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.6))
    x = [p["minutes"] for p in points]
    ax.plot(x, [p["unsafe_compliance"] for p in points], "o-", label="unsafe compliance (harmful prompts)")
    ax.plot(x, [p["over_refusal"] for p in points], "s-", label="over-refusal (benign + borderline)")
    for p in points:
        ax.annotate(f"iter {p['iteration']}", (p["minutes"], p["unsafe_compliance"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    ax.set_xlabel("wall-clock minutes since `alignflow run` started")
    ax.set_ylabel("% of held-out prompts")
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Alignment per minute: the default run on 2 CPU cores", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML config (default: the embedded default run)")
    ap.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                    help="passed to `alignflow run --set` (e.g. run.iterations=1)")
    ap.add_argument("--output-dir", default=None, help="run.output_dir (default: a fresh temporary folder)")
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between memory samples")
    ap.add_argument("--out", default="docs/default_run.json")
    ap.add_argument("--plot", default="docs/alignment_per_minute.png")
    args = ap.parse_args()

    out_dir = Path(args.output_dir or tempfile.mkdtemp(prefix="alignflow-bench-"))
    cmd = [sys.executable, "-m", "flows.cli", "run", "--set", f"run.output_dir={out_dir}"]
    cmd += ["--config", str(Path(args.config).resolve())] if args.config else []
    for o in args.overrides:
        cmd += ["--set", o]
    log_path = out_dir / "run.log"
    out_dir.mkdir(parents=True, exist_ok=True)
    print("running:", " ".join(cmd), f"(log: {log_path})", flush=True)
    t_start = time.time()
    with open(log_path, "w") as log:
        child = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        with TreeMemory(psutil.Process(child.pid), args.interval) as mem:
            rc = child.wait()
    wall = time.time() - t_start
    if rc != 0:
        raise SystemExit(f"alignflow run exited with {rc}; see {log_path}")
    manifest = json.loads(next(out_dir.glob("*/manifest.json")).read_text())
    tl = manifest["timelines"][-1]
    totals = summarize(tl)
    totals["after_flow_s"] = t_start + wall - tl["flow_finished"]   # Prefect and Ray teardown, exit
    points = alignment_curve(manifest, t_start)
    gib = 1024 ** 3
    result = {
        "command": " ".join(["alignflow run", *([f"--config {args.config}"] if args.config else []),
                             *[f"--set {o}" for o in args.overrides]]),
        "wall_s": wall, "run_id": manifest["run_id"],
        "final": manifest["final"]["metrics"], "base": manifest["final"]["base"],
        "memory": {"peak_rss_gib": mem.peak_rss / gib, "peak_pss_gib": mem.peak_pss / gib,
                   "driver_peak_rss_gib": mem.driver_rss / gib,
                   "processes_at_peak": [(n, round(r / gib, 3)) for n, r in mem.peak_procs[:12]]},
        "orchestration": totals, "per_iteration": per_iteration(tl), "stages": tl["stages"],
        "alignment_per_minute": points,
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    if points:
        plot(points, Path(args.plot))

    o = totals
    print(f"\n## Default run: {duration(wall)} wall clock ({manifest['run_id']})\n")
    print("| memory | GiB |\n|---|---|")
    print(f"| peak summed RSS, all processes | {mem.peak_rss / gib:.2f} |")
    print(f"| peak summed PSS (shared pages once) | {mem.peak_pss / gib:.2f} |")
    print(f"| driver peak RSS | {mem.driver_rss / gib:.2f} |")
    print("\n| orchestration | seconds | share of wall |\n|---|---|---|")
    for key, label in (("cold_start_s", "cold start (process start → first stage)"),
                       ("flow_start_s", "…of which after the config and prompts were checked"),
                       ("prefect_gaps_s", "between stages (Prefect task runs)"),
                       ("outside_actors_s", "in stages, no actor computing (Ray, driver)"),
                       ("actor_s", "actors computing"), ("after_flow_s", "after the flow (teardown)")):
        print(f"| {label} | {o[key]:.1f} | {100 * o[key] / wall:.1f} % |")
    print("\n| iteration | stage time (s) | no actor computing (s) | share |\n|---|---|---|---|")
    for r in per_iteration(tl):
        print(f"| {'start' if r['iteration'] is None else r['iteration']} | {r['stage_s']:.1f} "
              f"| {r['outside_actors_s']:.1f} | {100 * r['outside_actors_s'] / max(r['stage_s'], 1e-9):.1f} % |")
    print("\n| minutes | iteration | unsafe compliance (%) | over-refusal (%) |\n|---|---|---|---|")
    for p in points:
        print(f"| {p['minutes']:.1f} | {p['iteration']} | {p['unsafe_compliance']:.1f} | {p['over_refusal']:.1f} |")


if __name__ == "__main__":
    main()
