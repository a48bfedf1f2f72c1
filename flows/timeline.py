"""Where a run's wall-clock time went: stages, actor compute, and the orchestration around them.

Every stage task records its wall time and, from the actors' busy clocks, how much of it some actor
was computing (the union of their call intervals, so parallel workers are not counted twice). What
is left is what the flow adds: Prefect task runs, Ray calls and transfers, and the driver's own
Python (reading and writing Parquet, building pairs). The manifest keeps one timeline per process
that worked on the run (a resumed run has two).
"""
from __future__ import annotations

import time

import psutil


def union_seconds(intervals, lo: float, hi: float) -> float:
    """Length of the union of (start, end) intervals, clipped to [lo, hi]."""
    total, cur_start, cur_end = 0.0, None, None
    for a, b in sorted((max(a, lo), min(b, hi)) for a, b in intervals):
        if b <= a:
            continue
        if cur_end is None or a > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = a, b
        else:
            cur_end = max(cur_end, b)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def new_timeline() -> dict:
    """The timeline of this process: it started at `process_start` (imports included)."""
    return {"process_start": psutil.Process().create_time(), "prepared": time.time(), "stages": []}


def stage_entry(name: str, k: int | None, t0: float, t1: float, busy: dict[str, list]) -> dict:
    all_busy = [iv for ivs in busy.values() for iv in ivs]
    return {"stage": name, "iteration": k, "start": t0, "seconds": round(t1 - t0, 3),
            "actor_seconds": round(union_seconds(all_busy, t0, t1), 3),
            "by_role": {role: round(union_seconds(ivs, t0, t1), 3) for role, ivs in busy.items() if ivs}}


def summarize(timeline: dict, end: float | None = None) -> dict:
    """Totals of one timeline: cold start, stage time, actor compute, and what is outside both.

    - cold start: process start → first stage running (imports, config and prompt checks, the
      Prefect server and flow run);
    - prefect: the gaps between stages (task-run bookkeeping and the flow's own lines);
    - outside actors: stage time when no actor computed (Ray calls, the driver's Python and I/O).
    """
    stages = timeline["stages"]
    if not stages:
        return {}
    first = stages[0]["start"]
    last_end = max(s["start"] + s["seconds"] for s in stages)
    end = end or timeline.get("flow_finished") or last_end
    stage_s = sum(s["seconds"] for s in stages)
    actor_s = sum(s["actor_seconds"] for s in stages)
    return {"cold_start_s": first - timeline["process_start"],
            "flow_start_s": first - timeline["prepared"],
            "wall_s": end - first, "stage_s": stage_s, "actor_s": actor_s,
            "outside_actors_s": stage_s - actor_s, "prefect_gaps_s": max(0.0, (end - first) - stage_s)}


def duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def markdown(timeline: dict) -> str:
    """A stage-time table for the run report."""
    rows = ["| stage | iteration | time | actor compute |", "|---|---|---|---|"]
    for s in timeline["stages"]:
        share = s["actor_seconds"] / s["seconds"] if s["seconds"] > 0 else 0.0
        rows.append(f"| {s['stage'].replace('_', ' ')} | {'' if s['iteration'] is None else s['iteration']} "
                    f"| {duration(s['seconds'])} | {100 * share:.0f} % |")
    t = summarize(timeline)
    if t:
        rows += ["", f"Cold start (process start → first stage) {t['cold_start_s']:.1f} s. Of {t['wall_s'] / 60:.1f} "
                     f"min from the first stage: actors computed {t['actor_s'] / 60:.1f} min; outside the actors "
                     f"(Ray calls, the driver's Python and I/O) {t['outside_actors_s'] / 60:.2f} min; between "
                     f"stages (Prefect) {t['prefect_gaps_s']:.1f} s."]
    return "\n".join(rows)
