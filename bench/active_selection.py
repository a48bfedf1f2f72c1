"""Benchmark (not a test): reward-model accuracy per label spent, active selection vs random.

Simulated annotators stand in for people. The pool is a finished run's judged pairs
(`runs/<id>/iter_*/preferences.parquet`); a fifth is held out and scored against the judge's
noise-free choice. Each strategy starts from the same random seed set, then in every round trains
a fresh reward model (MiniLM + scalar head, as in the pipeline) on the labels bought so far,
scores the unlabelled pool, and buys `--per-round` more labels from a simulated annotator
(AlpacaFarm flip rate 0.25). "disagreement" trains an ensemble of `--ensemble` models per round.

    python bench/active_selection.py --run runs/<run_id> [--rounds 4] [--repeats 2] [--out docs/active_selection.json]

Writes a JSON with the curve (labels spent -> held-out accuracy) per strategy and a PNG plot.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from rlhf_core import reward_model as rmlib
from rlhf_core import schemas
from rlhf_core.active import select_pairs
from rlhf_core.annotators import AnnotatorProfile, choose
from rlhf_core.models import minilm_folder


def _label(rows: list[dict], profile: AnnotatorProfile, rng: np.random.Generator) -> list[dict]:
    """The simulated annotator's labels of judged pairs (score and safety from the judge's pass)."""
    out = []
    for r in rows:
        better, _ = choose(profile, rng, int(rng.integers(2)), (r["score_a"], r["score_b"]),
                           (len(r["response_a"]), len(r["response_b"])), (r["is_safe_a"], r["is_safe_b"]))
        out.append(dict(r, better=better))
    return out


def _train_and_score(train: list[dict], pool: list[dict], hold: list[dict], seed: int, epochs: int,
                     max_length: int) -> tuple[np.ndarray, np.ndarray, float]:
    torch.manual_seed(seed)
    model, tok = rmlib.load_reward_model(minilm_folder())
    p, c, r, t = rmlib.preference_arrays(train)
    rmlib.train_reward_model(model, tok, p, c, r, targets=t, epochs=epochs, lr=5e-5, batch_size=16,
                             max_length=max_length, seed=seed)
    sa = rmlib.score(model, tok, [x["prompt"] for x in pool], [x["response_a"] for x in pool], max_length=max_length)
    sb = rmlib.score(model, tok, [x["prompt"] for x in pool], [x["response_b"] for x in pool], max_length=max_length)
    hc = [x["response_a"] if x["judge_better"] == 0 else x["response_b"] for x in hold]
    hr = [x["response_b"] if x["judge_better"] == 0 else x["response_a"] for x in hold]
    acc = rmlib.pair_accuracy(model, tok, [x["prompt"] for x in hold], hc, hr, max_length=max_length)
    return sa, sb, acc


def run_once(rows: list[dict], profile: AnnotatorProfile, args, seed: int, curves: dict, on_done) -> dict:
    """One repeat: a held-out fifth, then every strategy from the same seed labels (into `curves`)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(rows))
    n_hold = len(rows) // 5
    hold, pool_all = [rows[i] for i in order[:n_hold]], [rows[i] for i in order[n_hold:]]
    for strategy in args.strategies.split(","):
        t0 = time.time()
        label_rng = np.random.default_rng(seed + 1)
        first = np.random.default_rng(seed + 2).permutation(len(pool_all))[: args.seed_labels]
        labelled = _label([pool_all[i] for i in first], profile, label_rng)
        bought = set(first.tolist())
        pool = [x for i, x in enumerate(pool_all) if i not in bought]
        curve = []
        for rnd in range(args.rounds + 1):
            members = args.ensemble if strategy == "disagreement" else 1
            outs = [_train_and_score(labelled, pool, hold, seed + 10 * rnd + m, args.epochs, args.max_length)
                    for m in range(members)]
            acc = float(np.mean([o[2] for o in outs]))
            curve.append({"labels": len(labelled), "heldout_accuracy": acc})
            print(f"seed {seed:5d} {strategy:12s} labels {len(labelled):4d}  held-out accuracy {acc:.3f}  "
                  f"({time.time() - t0:.0f}s)", flush=True)
            if rnd == args.rounds or not pool:
                break
            sa, sb = np.stack([o[0] for o in outs]), np.stack([o[1] for o in outs])
            pick = select_pairs(sa, sb, min(args.per_round, len(pool)), strategy, seed=seed + rnd)
            labelled += _label([pool[i] for i in pick], profile, label_rng)
            chosen = set(pick.tolist())
            pool = [x for i, x in enumerate(pool) if i not in chosen]
        curves[strategy] = curve
        on_done()
    return curves


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a finished alignflow run folder")
    ap.add_argument("--strategies", default="random,uncertainty,disagreement")
    ap.add_argument("--seed-labels", type=int, default=48)
    ap.add_argument("--per-round", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--ensemble", type=int, default=2, help="models per round for 'disagreement'")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2, help="repeats with other splits/seeds; the curve is their mean")
    ap.add_argument("--out", default="docs/active_selection.json")
    ap.add_argument("--from-log", metavar="LOG", help="rebuild JSON and plot from a stopped benchmark's output")
    args = ap.parse_args()
    torch.set_num_threads(2)

    if args.from_log:
        results = _from_log(Path(args.from_log), args)
    else:
        rows = []
        for it in sorted(Path(args.run).glob("iter_*/preferences.parquet")):
            rows += schemas.read_table(it, schemas.PREFERENCES).to_pylist()
        rows = [r for r in rows if r["judge_better"] in (0, 1) and r["score_a"] is not None]
        profile = AnnotatorProfile("crowd", flip_prob=0.25)
        results = {"run": str(args.run), "pairs": len(rows), "annotator": profile.id, "args": vars(args),
                   "repeats": [], "curves": {}}
        for rep in range(args.repeats):
            seed = args.seed + 1000 * rep       # another held-out split, seed set and label noise
            curves = {}
            results["repeats"].append({"seed": seed, "curves": curves})
            # written after every strategy: an interrupted benchmark keeps what it measured
            run_once(rows, profile, args, seed, curves, on_done=lambda: write(results, Path(args.out)))
    write(results, Path(args.out))
    print("\nmean held-out accuracy over", len(results["repeats"]), "repeat(s):")
    print("labels  " + "  ".join(f"{s:>12s}" for s in results["curves"]))
    longest = max(results["curves"].values(), key=len)
    for i, c in enumerate(longest):
        print(f"{c['labels']:6d}  " + "  ".join(
            f"{curve[i]['heldout_accuracy']:12.3f}" if i < len(curve) else f"{'-':>12s}"
            for curve in results["curves"].values()))
    print(f"wrote {args.out}")


def _from_log(log: Path, args) -> dict:
    """The results of a benchmark that was stopped, rebuilt from the lines it printed (its curves are
    exactly those it measured: every point is printed as soon as it is measured)."""
    import re
    pat = re.compile(r"seed\s+(\d+) (\w+)\s+labels\s+(\d+)\s+held-out accuracy ([0-9.]+)")
    repeats: dict[int, dict] = {}
    for line in log.read_text().splitlines():
        if m := pat.search(line):
            seed, strategy, labels, acc = int(m[1]), m[2], int(m[3]), float(m[4])
            repeats.setdefault(seed, {}).setdefault(strategy, []).append({"labels": labels, "heldout_accuracy": acc})
    return {"run": str(args.run), "annotator": "crowd", "args": vars(args), "rebuilt_from_log": str(log),
            "repeats": [{"seed": s, "curves": c} for s, c in repeats.items()], "curves": {}}


def write(results: dict, out: Path) -> None:
    """Mean curve per strategy over the repeats that finished it; JSON and a PNG plot."""
    strategies = list(dict.fromkeys(s for r in results["repeats"] for s in r["curves"]))
    for strategy in strategies:
        per = [r["curves"][strategy] for r in results["repeats"] if strategy in r["curves"]]
        n = min(len(c) for c in per)
        results["curves"][strategy] = [
            {"labels": per[0][i]["labels"], "heldout_accuracy": float(np.mean([c[i]["heldout_accuracy"] for c in per])),
             "min": float(np.min([c[i]["heldout_accuracy"] for c in per])),
             "max": float(np.max([c[i]["heldout_accuracy"] for c in per])), "repeats": len(per)} for i in range(n)]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, curve in results["curves"].items():
        x = [c["labels"] for c in curve]
        ax.plot(x, [c["heldout_accuracy"] for c in curve], marker="o", label=f"{name} ({curve[0]['repeats']}×)")
        if curve[0]["repeats"] > 1:
            ax.fill_between(x, [c["min"] for c in curve], [c["max"] for c in curve], alpha=0.15)
    ax.set_xlabel("labels spent")
    ax.set_ylabel("held-out pair accuracy (vs judge)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    plt.close(fig)

if __name__ == "__main__":
    main()
