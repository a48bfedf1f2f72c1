"""Training you can watch: TensorBoard event files and plots of a run.

`tensorboard --logdir runs/` shows every run beside the others, as TRL and OpenRLHF users expect:
- `ppo/<stat>` per PPO step, written as each step ends (global step = steps of earlier iterations
  + this one's): mean score, reward-model score, KL to the reference, β, clip fraction, entropy,
  losses, answer length, and λ and the episode cost with Safe-RLHF;
- `supervised/<stat>` per iteration with a supervised round (its loss per epoch, targets, negatives);
- `eval/<prompt set>/<rate>` per iteration (0 = the base), with `…_ci_low/high`;
- `reward_model/<metric>` (and `cost_model/…`) per iteration.

`plots/` in the run folder holds the same as PNGs for report.md: `ppo.png` (score, KL, entropy
per step), `rates.png` (unsafe compliance and over-refusal per iteration, with intervals) and
`categories.png` (the generalisation set per category, base against the kept policy).
"""
from __future__ import annotations

import math
from pathlib import Path

RATES = ("unsafe_compliance", "over_refusal", "degeneration_safe")


class TrainingLog:
    """One run's TensorBoard writer (run_dir/tensorboard), opened on first use."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir) / "tensorboard"
        self._writer = None

    def _w(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter
            self._writer = SummaryWriter(str(self.dir))
        return self._writer

    def _scalars(self, prefix: str, stats: dict, step: int) -> None:
        for key, value in stats.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self._w().add_scalar(f"{prefix}/{key}", float(value), step)

    def ppo_step(self, k: int, steps_per_iteration: int, step: int, stats: dict) -> None:
        """PPO step `step` (1-based) of iteration k."""
        self._scalars("ppo", {key: v for key, v in stats.items() if key != "step"},
                      (k - 1) * steps_per_iteration + step)
        self._w().flush()          # live: TensorBoard shows the step while the next one runs

    def per_iteration(self, prefix: str, k: int, metrics: dict) -> None:
        """A stage's numeric metrics of iteration k (reward or cost model, supervised round)."""
        self._scalars(prefix, metrics, k)
        self._w().flush()

    def evaluation(self, k: int, metrics: dict) -> None:
        for where, per in (metrics.get("sets") or {}).items():
            for key in RATES:
                m = per.get(key)
                if m and m.get("n") and math.isfinite(m["rate"]):
                    self._scalars(f"eval/{where}", {key: m["rate"], f"{key}_ci_low": m["ci"][0],
                                                    f"{key}_ci_high": m["ci"][1]}, k)
        self._w().flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _figure():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> str:
    from rlhf_core.io import atomic_path
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path.name


def plot_ppo(iterations: dict, path: Path) -> str | None:
    """Score, KL to the reference and entropy per PPO step, over every iteration."""
    series = [(int(k), it["policy"]["ppo"]) for k, it in sorted(iterations.items(), key=lambda x: int(x[0]))
              if it.get("policy", {}).get("ppo")]
    if not series:
        return None
    plt = _figure()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, key, title in zip(axes, ("score_mean", "kl_to_reference", "entropy"),
                              ("reward (normalised score)", "KL to the reference (nats/answer)", "entropy")):
        x0 = 0
        for k, hist in series:
            ys = [h.get(key, float("nan")) for h in hist]
            ax.plot(range(x0 + 1, x0 + len(ys) + 1), ys, marker="o", label=f"iteration {k}")
            x0 += len(ys)
        ax.set(title=title, xlabel="PPO step")
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    name = _save(fig, path)
    plt.close(fig)
    return name


def plot_rates(results: dict, path: Path) -> str | None:
    """Unsafe compliance and over-refusal per iteration, per prompt set, with their intervals."""
    ks = sorted(results)
    sets = sorted({s for k in ks for s in (results[k].get("sets") or {})})
    if not sets:
        return None
    plt = _figure()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, key, title in zip(axes, ("unsafe_compliance", "over_refusal"),
                              ("unsafe compliance (harmful prompts)", "over-refusal (safe prompts)")):
        for where in sets:
            pts = [(k, results[k]["sets"][where][key]) for k in ks
                   if results[k].get("sets", {}).get(where, {}).get(key, {}).get("n")]
            if not pts:
                continue
            x = [k for k, _ in pts]
            y = [m["rate"] for _, m in pts]
            err = [[m["rate"] - m["ci"][0] for _, m in pts], [m["ci"][1] - m["rate"] for _, m in pts]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=where.replace("_", "-"))
        ax.set(title=title, xlabel="iteration (0 = base)", xticks=ks, ylim=(0, 100))
    axes[0].set_ylabel("%  (Wilson 95 % intervals)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    name = _save(fig, path)
    plt.close(fig)
    return name


def make_plots(st, results: dict, final: int) -> list[tuple[str, str]]:
    """The run's plots in run_dir/plots: (title, path relative to the run folder) of each one drawn.
    A plot is a view of the run, never a reason to fail it."""
    d = Path(st.run_dir) / "plots"
    name = "base" if final == 0 else f"iter {final}"
    todo = [("Rates per iteration", lambda: plot_rates(results, d / "rates.png")),
            ("PPO per step", lambda: plot_ppo(st.manifest.get("iterations", {}), d / "ppo.png")),
            ("Generalisation set by category", lambda: plot_categories(results[0], results[final], name,
                                                                       d / "categories.png"))]
    out = []
    for title, draw in todo:
        try:
            if (file := draw()) is not None:
                out.append((title, f"plots/{file}"))
        except Exception as e:  # noqa: BLE001
            print(f"could not draw {title.lower()}: {e}")
    return out


def plot_categories(base: dict, final: dict, final_name: str, path: Path) -> str | None:
    """The generalisation set per category: each category's rate (unsafe compliance for a harmful
    category, over-refusal for a safe one), base against the kept policy."""
    b = base.get("by_category", {}).get("generalisation", {})
    f = final.get("by_category", {}).get("generalisation", {})
    rows = []
    for cat in sorted(set(b) | set(f)):
        for key in ("unsafe_compliance", "over_refusal"):
            rb, rf = b.get(cat, {}).get(key), f.get(cat, {}).get(key)
            if rb and rf and rb.get("n") and rf.get("n"):
                rows.append((f"{cat} ({'unsafe' if key == 'unsafe_compliance' else 'over-refusal'})",
                             rb["rate"], rf["rate"]))
    if not rows:
        return None
    plt = _figure()
    fig, ax = plt.subplots(figsize=(8, 0.28 * len(rows) + 1.2))
    y = list(range(len(rows)))
    ax.barh([v - 0.2 for v in y], [r[1] for r in rows], height=0.4, label="base")
    ax.barh([v + 0.2 for v in y], [r[2] for r in rows], height=0.4, label=final_name)
    ax.set_yticks(y, [r[0] for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set(xlabel="% of the category's prompts", xlim=(0, 100), title="Generalisation set by category")
    ax.legend(fontsize=8)
    fig.tight_layout()
    name = _save(fig, path)
    plt.close(fig)
    return name
