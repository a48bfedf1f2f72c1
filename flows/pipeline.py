"""The `rlhf_pipeline` Prefect flow: iterated RLHF, one task per stage.

    prompts, judge ← prepare(config)                         # validated before any model loads
    evaluate(base)                                           # iteration 0
    for k in 1..K:
        samples     ← generate_samples(policy_k-1)           # rollout pool
        preferences ← collect_feedback(samples)              # constitution judge + label noise
        preferences ← collect_human_feedback(preferences)    # optional: people label some pairs on the page
        policy      ← warm_up_policy(judge's best answers)   # supervised (rejection sampling) + unlikelihood
                                                             #   of safe-prompt refusals, merged into
                                                             #   the base: PPO's reference
        reward_model← train_reward_model(preferences)        # Bradley–Terry
        cost_model  ← train_cost_model(preferences)          # optional (Safe-RLHF): unsafe > 0 > safe
        policy_k    ← update_policy(reward_model)            # PPO inner loop under one controller
        evaluate(policy_k)                                   # unsafe compliance, over-refusal, KL
        check_reward_hacking(k)                              # alerts → warn, stop, or roll back
"""
from __future__ import annotations

import os
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
from prefect import flow
from prefect.exceptions import TerminationSignal

from flows import artifacts, interrupt, report, timeline, training_log
from flows.artifacts import artifact_key
from flows.guard import check_reward_hacking, roll_back
from flows.human_feedback import check_ready as check_human_feedback_ready
from flows.human_feedback import collect_human_feedback
from flows.resume import drop_ppo_checkpoints, ppo_checkpoint, ppo_resume_point, restore_checkpoints
from flows.run_state import RUNS, RunState, atomic_write_text, new_run_id, stage
from rlhf_core import evaluation, schemas
from rlhf_core.agreement import aggregate_preferences, agreement_report
from rlhf_core.annotators import default_panel, panel_preferences
from rlhf_core.config import AlignflowConfig, ConfigError
from rlhf_core.evaluation import eval_rows, summarize
from rlhf_core.feedback import (
    annotator_id,
    make_preferences,
    preference_stats,
    refusal_negatives,
    rejection_sampling_targets,
)
from rlhf_core.preflight import check_run
from rlhf_core.prompts import build_prompt_table, sample_prompts


def prepare_run(cfg: AlignflowConfig, run_id: str | None = None) -> RunState:
    """Validate prompt files and build the split *before* any model or actor starts.

    Nothing is written unless every input is valid: the run folder is created only afterwards.
    """
    check_run(cfg)
    table = build_prompt_table(cfg.data)
    check_human_feedback_ready(cfg)
    imported = _imported_preferences(cfg, table) if cfg.data.preferences_file else None
    run_id = run_id or new_run_id(cfg.run.name)
    run_dir = Path(cfg.run.output_dir) / run_id
    run_dir.mkdir(parents=True, exist_ok=False)
    prompts_path = schemas.write_table(table, run_dir / "prompts.parquet", schemas.PROMPTS)
    state = RunState(run_id=run_id, run_dir=run_dir, cfg=cfg, prompts=table.to_pylist())
    data = {"prompts": {"path": str(prompts_path), "sha256": schemas.file_sha256(prompts_path)}}
    if imported is not None:
        path = schemas.write_table(imported[0], run_dir / "imported_preferences.parquet", schemas.PREFERENCES)
        data["imported_preferences"] = {"path": str(path), "sha256": schemas.file_sha256(path),
                                        "source_file": str(cfg.data.preferences_file), **imported[1]}
    counts = {f"{s}_{k}": sum(r["split"] == s and r["kind"] == k for r in state.prompts)
              for s in ("train", "eval", "generalisation") for k in schemas.PROMPT_KINDS}
    state.manifest = {"run_id": run_id, "created_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                      "config": cfg.model_dump(), "config_hash": cfg.hash(), "seed": cfg.run.seed,
                      "split_seed": cfg.data.split_seed, "prompt_counts": counts,
                      "data": data, "iterations": {}, "timelines": [timeline.new_timeline()]}
    state.save_manifest()
    RUNS[run_id] = state
    return state


def _imported_preferences(cfg: AlignflowConfig, prompts) -> tuple:
    """data.preferences_file, read and checked before anything starts: (its PREFERENCES table with
    every pair that asks an evaluation prompt dropped, what the manifest records)."""
    from rlhf_core.interop import PreferenceFormatError, read_preference_file
    try:
        table, fmt = read_preference_file(cfg.data.preferences_file, cfg.data.preferences_format)
    except PreferenceFormatError as e:
        raise ConfigError(f"data.preferences_file: {e}") from None
    # the same request, whatever its case and spacing: it would train on what the run measures
    norm = lambda t: " ".join(t.casefold().split())  # noqa: E731
    held = {norm(p) for p, s in zip(prompts.column("prompt").to_pylist(), prompts.column("split").to_pylist())
            if s != "train"}
    keep = [norm(p) not in held for p in table.column("prompt").to_pylist()]
    if not any(keep):
        raise ConfigError(f"data.preferences_file: {cfg.data.preferences_file}: every pair asks an evaluation prompt")
    return table.filter(pa.array(keep)), {"format": fmt, "pairs": sum(keep), "dropped_evaluation_prompts":
                                          len(keep) - sum(keep)}


def _eval_prompts(state: RunState, k: int) -> list[dict]:
    """Held-out prompts of iteration k: the in-distribution split (data.eval_*), and the
    generalisation set at the base and the last iteration (every iteration with
    data.generalisation_every_iteration). Each row carries its `eval_set`."""
    d = state.cfg.data
    rng = np.random.default_rng(d.split_seed)
    out = []
    held = [r for r in state.prompts if r["split"] == "eval"]
    for kind, n in (("harmful", d.eval_harmful), ("benign", d.eval_benign), ("borderline", d.eval_borderline)):
        pool = [r for r in held if r["kind"] == kind]
        idx = sorted(rng.permutation(len(pool))[: min(n, len(pool))])
        out += [dict(pool[i], eval_set="in_distribution") for i in idx]
    if k in (0, state.cfg.run.iterations) or d.generalisation_every_iteration:
        gen = [r for r in state.prompts if r["split"] == "generalisation"]
        for harmful, n in ((True, d.generalisation_harmful), (False, d.generalisation_safe)):
            pool = [r for r in gen if (r["kind"] == "harmful") == harmful]
            idx = sorted(rng.permutation(len(pool))[: min(n, len(pool))])
            out += [dict(pool[i], eval_set="generalisation") for i in idx]
    return out


def _covers(cfg, k: int) -> bool:
    """Whether iteration k's supervised round gets coverage prompts (warmup.coverage_every_iteration)."""
    return cfg.warmup.enabled and (k == 1 or (cfg.warmup.every_iteration and cfg.warmup.coverage_every_iteration))


def _train_prompts(state: RunState, k: int) -> tuple[list[dict], list[dict], list[dict]]:
    """Round k's training prompts (warmup.prompts in the first, data.train_prompts_per_iter later;
    data.harmful_share of them harmful), resampled each iteration, each source an equal share of
    its kind (data.balance_sources). In a supervised round with coverage also the coverage
    prompts, drawn from the rest and from prompts no earlier round covered: warmup.refusal_prompts
    harmful ones and warmup.helpful_prompts safe ones. Returns (sampled, refusal coverage, helpful
    coverage)."""
    cfg = state.cfg
    rng = np.random.default_rng(cfg.run.seed * 7919 + k)
    picked = _sampled(state, _prompts_per_iter(cfg, k), rng)
    if not _covers(cfg, k):
        return picked, [], []
    # earlier rounds' coverage is recomputed, not read back: the draw is seeded, and a resumed run
    # gets the same prompts (once per earlier round: each is drawn given the rounds before it)
    covered: set[str] = set()
    for j in range(1, k):
        covered |= {r["prompt_id"] for part in _coverage(state, j, covered) for r in part}
    return picked, *_coverage(state, k, covered, picked, rng)


def _coverage(state: RunState, k: int, covered: set[str], picked: list[dict] | None = None,
              rng=None) -> tuple[list[dict], list[dict]]:
    """Round k's coverage (refusal, helpful), drawn from the training prompts outside `covered` and
    outside that round's sampled prompts (`picked` with the `rng` after drawing them; recomputed
    when not given)."""
    cfg = state.cfg
    if not _covers(cfg, k):
        return [], []
    if picked is None:
        rng = np.random.default_rng(cfg.run.seed * 7919 + k)
        picked = _sampled(state, _prompts_per_iter(cfg, k), rng)
    rows = [r for r in state.prompts if r["split"] == "train"]
    harmful = [r for r in rows if r["kind"] == "harmful"]
    other = [r for r in rows if r["kind"] != "harmful"]
    by_source = cfg.data.balance_sources
    seen = covered | {r["prompt_id"] for r in picked}
    rest = lambda pool: [r for r in pool if r["prompt_id"] not in seen]  # noqa: E731
    # coverage needs each prompt once: a source smaller than its share gives what it has
    refusal = sample_prompts(rest(harmful), cfg.warmup.refusal_prompts, rng, by_source, repeat=False)
    helpful = sample_prompts(rest(other), cfg.warmup.helpful_prompts, rng, by_source, repeat=False)
    return refusal, helpful


def _sampled(state: RunState, n: int, rng) -> list[dict]:
    cfg = state.cfg
    rows = [r for r in state.prompts if r["split"] == "train"]
    h = max(1, round(n * cfg.data.harmful_share))
    by_source = cfg.data.balance_sources
    return (sample_prompts([r for r in rows if r["kind"] == "harmful"], h, rng, by_source)
            + sample_prompts([r for r in rows if r["kind"] != "harmful"], n - h, rng, by_source))


def _prompts_per_iter(cfg, k: int) -> int:
    return cfg.warmup.prompts if (k == 1 and cfg.warmup.enabled) else cfg.data.train_prompts_per_iter


@stage
def start_workers(run_id: str) -> dict:
    """Start Ray (local, or RAY_ADDRESS), the actors, and train the judge's harm classifier."""
    from rlhf_core.models import resolve_encoder_path, resolve_model_path
    from workers.cluster import init_ray
    from workers.controller import RLHFWorkers
    st = RUNS[run_id]
    cfg = st.cfg
    resources = init_ray(cfg.resources.ray_address)
    interrupt.reclaim_sigterm()
    policy_path = resolve_model_path(cfg.policy.model)
    encoder_path = resolve_encoder_path(cfg.feedback.encoder)
    rm_path = resolve_encoder_path(resolve_model_path(cfg.reward_model.model))
    st.workers = RLHFWorkers(cfg, policy_path, encoder_path, rm_path)
    if "judge" in st.manifest:               # a resumed run: the judge is the one it had
        st.workers.load_harm_classifier(st.manifest["judge"]["harm_classifier"])
        return {"policy": policy_path, "harm_classifier": st.manifest["judge"]["harm_classifier"]}
    train = [r for r in st.prompts if r["split"] == "train"]
    clf_path = str(st.run_dir / "judge" / "harm_classifier.npz")
    os.makedirs(os.path.dirname(clf_path), exist_ok=True)
    held = [r for r in st.prompts if r["split"] == "eval"]
    clf_metrics = st.workers.fit_harm_classifier(
        [r["prompt"] for r in train], [int(r["kind"] == "harmful") for r in train], clf_path,
        heldout=([r["prompt"] for r in held], [int(r["kind"] == "harmful") for r in held]))
    info = st.workers.constitution_info()
    st.manifest.update(models={"policy": policy_path, "encoder": encoder_path, "reward_model_backbone": rm_path},
                       judge={"constitution_version": info["version"], "harm_classifier": clf_path,
                              "harm_classifier_metrics": clf_metrics},
                       ray={"resources": {k: float(v) for k, v in resources.items() if k in ("CPU", "GPU", "memory")}})
    st.save_manifest()
    return {"policy": policy_path, "harm_classifier": clf_path}


@stage
def evaluate(run_id: str, k: int, use_adapter: bool | None = None, with_reward_model: bool | None = None) -> dict:
    """Greedy answers on the held-out sets; unsafe compliance, over-refusal, reward, KL.

    Iteration 0 is the base model (adapter disabled, no reward model yet).
    """
    st = RUNS[run_id]
    if (rec := st.done(k, "eval")) is not None:
        return rec["metrics"]
    use_adapter = k > 0 if use_adapter is None else use_adapter
    with_reward_model = k > 0 if with_reward_model is None else with_reward_model
    w, prompts = st.workers, _eval_prompts(st, k)
    texts = [p["prompt"] for p in prompts]
    with st.progress.task(f"iter {k}: evaluate (greedy)", len(texts)) as adv:
        roll = w.generate(texts, greedy=True, use_adapter=use_adapter, progress=adv)
    # KL to the reference on the in-distribution rows (every iteration has them; it is a drift
    # signal, and scoring the generalisation set too would double the stage)
    kl_rows = [i for i, p in enumerate(prompts) if p["eval_set"] == "in_distribution"] if use_adapter else None
    scores, verdicts, rm, kls = w.score_answers(texts, roll, with_reward_model=with_reward_model, kl_rows=kl_rows)
    kls = kls if kls is not None else [0.0] * len(texts)
    rows = eval_rows(prompts, roll["texts"], roll["num_tokens"], scores, verdicts, rm, kls)
    path = schemas.write_table(schemas.from_rows(rows, schemas.EVAL_RESULTS), st.iter_dir(k) / "eval.parquet",
                               schemas.EVAL_RESULTS)
    metrics = summarize(rows)
    st.record(k, "eval", {"path": str(path), "sha256": schemas.file_sha256(path), "metrics": metrics})
    st.log.evaluation(k, metrics)
    artifacts.table(artifact_key(run_id, f"iter-{k}-metrics"), report.metric_rows(metrics),
                    f"iteration {k}: rates per prompt set, evaluation judge, Wilson 95 % intervals")
    ci = lambda key: "[{:.0f}–{:.0f}]".format(*metrics[f"{key}_ci"])  # noqa: E731
    print(f"iteration {k} ({metrics['headline_set']} set, evaluation judge): unsafe compliance "
          f"{metrics['unsafe_compliance']:.1f}% {ci('unsafe_compliance')}  over-refusal "
          f"{metrics['over_refusal']:.1f}% {ci('over_refusal')}  KL {metrics['kl_to_reference']:.2f}")
    return metrics


@stage
def generate_samples(run_id: str, k: int) -> str:
    """Sample `responses_per_prompt` answers per training prompt from the current policy.

    A supervised round adds coverage prompts (the first, and by default every one): safe ones with
    one answer each, and harmful ones whose only candidate is the constitution's refusal that fits
    them (no generation)."""
    st = RUNS[run_id]
    if (rec := st.done(k, "samples")) is not None:
        return rec["path"]
    cfg = st.cfg
    rows, refusal, helpful = _train_prompts(st, k)
    reps = cfg.feedback.responses_per_prompt
    # helpful coverage: one answer each (the constitution's refusal is its other candidate)
    flat = [r for r in rows for _ in range(reps)] + helpful
    with st.progress.task(f"iter {k}: generate samples", len(flat)) as adv:
        roll = st.workers.generate([r["prompt"] for r in flat], greedy=False, seed=cfg.run.seed * 100 + k,
                                   progress=adv)
    out = []
    for j, (r, text, n_tok) in enumerate(zip(flat, roll["texts"], roll["num_tokens"])):
        out.append({"sample_id": f"{r['prompt_id']}-{k}-{j}", "prompt_id": r["prompt_id"], "prompt": r["prompt"],
                    "kind": r["kind"], "response": text, "origin": "policy", "policy_version": roll["policy_version"],
                    "num_tokens": int(n_tok)})
    # refusal coverage: no policy answer, the fitting refusal is the only candidate (judged later)
    for r, demo in zip(refusal, st.workers.match_demonstrations([r["prompt"] for r in refusal]) if refusal else []):
        out.append({"sample_id": f"{r['prompt_id']}-{k}-demo", "prompt_id": r["prompt_id"], "prompt": r["prompt"],
                    "kind": r["kind"], "response": demo, "origin": "demonstration",
                    "policy_version": "constitution", "num_tokens": 0})
    path = schemas.write_table(schemas.from_rows(out, schemas.SAMPLES), st.iter_dir(k) / "samples.parquet",
                               schemas.SAMPLES)
    st.record(k, "samples", {"path": str(path), "sha256": schemas.file_sha256(path), "count": len(out),
                             "refusal_coverage": len(refusal), "helpful_coverage": len(helpful)})
    return str(path)


@stage(retries=1)
def collect_feedback(run_id: str, k: int, samples_path: str) -> str:
    """Constitution judge scores every candidate; noisy pairwise preferences + supervised targets."""
    st = RUNS[run_id]
    if (rec := st.done(k, "preferences")) is not None:
        return rec["path"]
    cfg = st.cfg.feedback
    samples = schemas.read_table(samples_path, schemas.SAMPLES).to_pylist()
    if cfg.include_demonstration:
        # One more candidate per prompt: the constitution's refusal that best fits the prompt. The
        # judge decides whether it beats the policy's answers (it should only for harmful prompts).
        first, has_demo = {}, {s["prompt_id"] for s in samples if s["origin"] == "demonstration"}
        for s in samples:
            if s["prompt_id"] not in has_demo:
                first.setdefault(s["prompt_id"], s)
        demos = st.workers.match_demonstrations([s["prompt"] for s in first.values()]) if first else []
        for (pid, s), demo in zip(first.items(), demos):
            samples.append(dict(s, sample_id=f"{pid}-{k}-demo", response=demo, origin="demonstration",
                                policy_version="constitution", num_tokens=0))
    prompts, responses = [s["prompt"] for s in samples], [s["response"] for s in samples]
    with st.progress.task(f"iter {k}: feedback (judge)", len(samples)) as adv:
        scores = st.workers.judge(prompts, responses, progress=adv)
    d = st.iter_dir(k)
    pairs, annotator, label_stats = _simulated_labels(st, k, samples, scores)
    path = schemas.write_table(schemas.from_rows(pairs, schemas.PREFERENCES), d / "preferences.parquet",
                               schemas.PREFERENCES)
    w = st.cfg.warmup
    origins = None if (k == 1 or w.demonstrations_after_first) else {"policy"}
    targets = rejection_sampling_targets(samples, scores, w.keep_margin, origins=origins, by_kind=w.targets_by_kind)
    tpath = schemas.write_table(schemas.from_rows(targets, schemas.SAMPLES), d / "warmup_targets.parquet",
                                schemas.SAMPLES)
    negatives = refusal_negatives(samples, scores, by_kind=w.targets_by_kind)
    npath = schemas.write_table(schemas.from_rows(negatives, schemas.SAMPLES), d / "warmup_negatives.parquet",
                                schemas.SAMPLES)
    stats = preference_stats(pairs)
    stats["warmup_targets_count"] = len(targets)
    stats["warmup_targets_refusal_demonstrations"] = float(np.mean([t["origin"] == "demonstration" for t in targets]))
    stats["warmup_negatives_count"] = len(negatives)
    stats["warmup_negatives_from_policy"] = sum(n["origin"] == "policy" for n in negatives)
    st.record(k, "preferences", {"path": str(path), "sha256": schemas.file_sha256(path), "annotator": annotator,
                                 "warmup_targets": str(tpath), "warmup_negatives": str(npath), **label_stats, **stats})
    return str(path)


def _simulated_labels(st: RunState, k: int, samples: list[dict], scores) -> tuple[list[dict], str, dict]:
    """Preference pairs from the judge's scores: one noisy judge, or a biased panel + aggregation.

    With a panel, every annotator's raw label is kept in labels.parquet (lineage: whose judgement
    the reward model learned), and preferences.parquet holds one aggregated soft label per pair.
    Returns (pairs, annotator, stats for the manifest).
    """
    cfg, seed = st.cfg.feedback, st.cfg.run.seed * 17 + k
    if cfg.annotators == "judge":
        annotator = annotator_id(st.manifest["judge"]["constitution_version"], cfg.flip_prob, st.cfg.run.seed)
        return make_preferences(samples, scores, flip_prob=cfg.flip_prob, tie_margin=cfg.tie_margin, seed=seed,
                                annotator=annotator, iteration=k), annotator, {}
    panel = default_panel(cfg.panel_size, seed=st.cfg.run.seed)
    raw = panel_preferences(samples, scores, panel, labels_per_pair=cfg.labels_per_pair, seed=seed, iteration=k)
    lpath = schemas.write_table(schemas.from_rows(raw, schemas.PREFERENCES), st.iter_dir(k) / "labels.parquet",
                                schemas.PREFERENCES)
    report = agreement_report(raw)
    pairs = aggregate_preferences(raw, method=cfg.aggregation)
    agree = np.mean([p["better"] == p["judge_better"] for p in pairs if p["judge_better"] in (0, 1)] or [np.nan])
    stats = {"labels_path": str(lpath), "labels": len(raw), "panel": [p.id for p in panel], "agreement": report,
             "aggregated_agrees_with_judge": float(agree)}
    return pairs, f"{cfg.aggregation}/panel{cfg.panel_size}/seed{st.cfg.run.seed}", stats


@stage
def warm_up_policy(run_id: str, k: int) -> dict:
    """Supervised stage on the judge's best answers (rejection sampling), then merged into the base.

    InstructGPT and Safe-RLHF start RL from a supervised policy; Llama 2 alternates rejection-sampling
    fine-tuning and PPO. In later iterations the candidates are the current policy's own answers, so a
    benign prompt it now refuses is trained towards its answer that did not refuse. Refusals of prompts
    the judge deems safe are negatives: an unlikelihood term pushes their opening down, so refusing
    harmful requests is learned as a distinction, not as a habit.
    """
    st = RUNS[run_id]
    if (rec := st.done(k, "warmup")) is not None:
        return rec
    targets = schemas.read_table(st.iter_dir(k) / "warmup_targets.parquet", schemas.SAMPLES).to_pylist()
    negatives: dict[str, list[str]] = {}
    for n in schemas.read_table(st.iter_dir(k) / "warmup_negatives.parquet", schemas.SAMPLES).to_pylist():
        negatives.setdefault(n["prompt"], []).append(n["response"])
    w = st.cfg.warmup
    epochs = w.epochs if k == 1 else w.later_epochs
    steps = epochs * -(-len(targets) // w.batch_size)
    with st.progress.task(f"iter {k}: supervised (rejection sampling)", steps) as adv:
        metrics = st.workers.warmup([t["prompt"] for t in targets], [t["response"] for t in targets],
                                    epochs=epochs, version=f"iter{k}-sft", negatives=negatives, progress=adv)
    # the merged policy is PPO's new reference: checkpoint it, a resumed run starts PPO from here
    metrics["checkpoint"] = st.workers.save_policy(str(st.iter_dir(k) / "warmup_policy"))
    st.record(k, "warmup", metrics)
    st.log.per_iteration("supervised", k, metrics)
    return metrics


def _fit_scorer(st, k: int, preferences_path: str, name: str, train, metric: str, label: str,
                extra=None) -> str:
    """Train a reward-model-shaped scorer (reward or cost model) on the preferences, warm-started from
    the previous iteration's, into iter_<k>/<name>/; record its metrics (and `extra(pairs)`'s)."""
    if (rec := st.done(k, name)) is not None:
        return rec["path"]
    pairs = schemas.read_table(preferences_path, schemas.PREFERENCES).to_pylist()
    prev = st.run_dir / f"iter_{k - 1}" / name
    dest = st.iter_dir(k) / name
    with st.progress.task(f"iter {k}: train {name.replace('_', ' ')}", 1) as adv:
        metrics = train(pairs, str(dest), init_from=str(prev) if prev.exists() else None, round_seed=k)
        adv(1)
    if extra is not None:
        metrics.update(extra(pairs))
    st.record(k, name, {"path": str(dest), **metrics})
    st.log.per_iteration(name, k, metrics)
    print(f"iteration {k}: {name.replace('_', ' ')} {label} {metrics.get(metric, float('nan')):.3f}")
    return str(dest)


@stage(retries=1)
def train_reward_model(run_id: str, k: int, preferences_path: str) -> str:
    """Bradley–Terry reward model on this iteration's preferences, warm-started from the last one."""
    st = RUNS[run_id]
    if "imported_preferences" in st.manifest["data"] and st.done(k, "reward_model") is None:
        preferences_path = _with_imported(st, k, preferences_path)
    return _fit_scorer(st, k, preferences_path, "reward_model", st.workers.train_reward_model, "heldout_accuracy",
                       "held-out pair accuracy", extra=lambda pairs: _reward_model_vs_eval_judge(st, pairs))


def _with_imported(st: RunState, k: int, preferences_path: str) -> str:
    """This iteration's preferences plus data.preferences_file's pairs, weighted by
    feedback.source_weights.imported: iter_<k>/reward_model_preferences.parquet."""
    import pyarrow.compute as pc
    ours = schemas.read_table(preferences_path, schemas.PREFERENCES)
    # from the run folder, wherever it is now (a resumed run may have moved)
    imported = schemas.read_table(st.run_dir / "imported_preferences.parquet", schemas.PREFERENCES)
    w = float(st.cfg.feedback.source_weights.get("imported", 1.0))
    imported = imported.set_column(imported.schema.get_field_index("weight"), "weight",
                                   pc.multiply(imported.column("weight"), pa.scalar(w, pa.float32())))
    path = schemas.write_table(pa.concat_tables([ours, imported.cast(ours.schema)]), st.iter_dir(k) / "reward_model_preferences.parquet",
                               schemas.PREFERENCES)
    print(f"iteration {k}: reward model trains on {ours.num_rows} pairs of this iteration and "
          f"{imported.num_rows} imported (weight {w:g})")
    return str(path)


def _reward_model_vs_eval_judge(st: RunState, pairs: list[dict]) -> dict:
    """The reward model's held-out pairs (the same prompts it was not trained on) scored against the
    evaluation judge: does it rank the answer the judge finds right (a refusal of a harmful request,
    real help for a safe one) above the other? Pairs of two answers of one standing are left out."""
    from rlhf_core.reward_model import holdout_split
    hold, _ = holdout_split(pairs, st.cfg.reward_model.holdout_fraction)
    if not hold:
        return {}
    kind = {p["prompt_id"]: p["kind"] for p in st.prompts}
    prompts = [x["prompt"] for x in hold]
    answers = [x["response_a"] for x in hold] + [x["response_b"] for x in hold]
    complied = st.workers.evaluate_answers(prompts * 2, answers).complied
    raw = st.workers.reward(prompts * 2, answers)["raw"]
    n = len(hold)
    preferred = [evaluation.judge_preference(kind[x["prompt_id"]], bool(complied[i]), bool(complied[n + i]))
                 if x["prompt_id"] in kind else -1 for i, x in enumerate(hold)]   # imported prompts: no kind
    acc, decided = evaluation.preference_accuracy(preferred, raw[:n], raw[n:])
    return {"heldout_accuracy_vs_eval_judge": acc, "heldout_pairs_decided_by_eval_judge": decided,
            "heldout_prompts": len({x["prompt"] for x in hold})}


@stage(retries=1)
def train_cost_model(run_id: str, k: int, preferences_path: str) -> str:
    """Safe-RLHF cost model on the per-answer safety labels (unsafe > 0 > safe), warm-started."""
    st = RUNS[run_id]
    return _fit_scorer(st, k, preferences_path, "cost_model", st.workers.train_cost_model, "heldout_sign_accuracy",
                       "held-out sign accuracy")


@stage
def update_policy(run_id: str, k: int) -> str:
    """PPO against the reward model: the whole inner loop runs under one controller in this task."""
    st = RUNS[run_id]
    if (rec := st.done(k, "policy")) is not None:
        return rec["adapter"]
    train = [r for r in st.prompts if r["split"] == "train"]
    d, steps = st.iter_dir(k), st.cfg.ppo.steps
    start = ppo_resume_point(st, k)
    with st.progress.task(f"iter {k}: PPO", steps) as adv:
        if start:
            adv(start["step"])
        history, experience = st.workers.ppo(train, k, progress=adv, start=start,
                                             on_step=lambda state: _after_ppo_step(st, k, state))
    exp_path = schemas.write_table(schemas.from_rows(experience, schemas.EXPERIENCE), d / "experience.parquet",
                                   schemas.EXPERIENCE)
    adapter = st.workers.save_policy(str(d / "policy_adapter"))
    # one manifest write: the stage's record replaces the step checkpoint's, whose files go next
    st.manifest.get("iterations", {}).get(str(k), {}).pop("ppo_progress", None)
    st.record(k, "policy", {"adapter": adapter, "experience": str(exp_path), "ppo": history,
                            "resumed_after_step": start["step"] if start else None})
    drop_ppo_checkpoints(st, k, keep=None)
    return adapter


def _after_ppo_step(st: RunState, k: int, state: dict) -> None:
    """A step checkpoint to resume from, and the step's statistics to TensorBoard."""
    ppo_checkpoint(st, k, state)
    st.log.ppo_step(k, st.cfg.ppo.steps, state["step"], state["history"][-1])


@flow(name="rlhf_pipeline", log_prints=True)
def rlhf_pipeline(cfg: AlignflowConfig, run_id: str | None = None, show_progress: bool | None = None) -> dict:
    """Iterated RLHF: generate → feedback → reward model → policy update → evaluate, K times."""
    # The CLI prepares (validates) the run before Prefect starts; a direct call prepares it here.
    with managed_run(cfg, run_id, show_progress, "rlhf_pipeline") as st:
        start_workers(st.run_id)
        restore_checkpoints(st.run_id)       # a resumed run: actors back where the interruption left them
        results = {0: evaluate(st.run_id, 0)}
        last_good, stopped_at = 0, None      # the iteration whose policy is the run's result
        for k in range(1, cfg.run.iterations + 1):
            samples = generate_samples(st.run_id, k)
            preferences = collect_feedback(st.run_id, k, samples)
            if cfg.feedback.human.enabled:
                preferences = collect_human_feedback(st.run_id, k, preferences)
            if cfg.warmup.enabled and (k == 1 or cfg.warmup.every_iteration):
                warm_up_policy(st.run_id, k)
            train_reward_model(st.run_id, k, preferences)
            if cfg.safe_rlhf.enabled:
                train_cost_model(st.run_id, k, preferences)
            update_policy(st.run_id, k)
            results[k] = evaluate(st.run_id, k)
            alerts = check_reward_hacking(st.run_id, k) if cfg.guards.enabled else []
            artifacts.markdown(artifact_key(st.run_id, f"iter-{k}"), report.iteration_markdown(st, k),
                               f"alignflow iteration {k}")
            if not alerts or cfg.guards.action == "warn":
                last_good = k
            elif cfg.guards.action == "rollback" and last_good > 0:
                roll_back(st.run_id, k, last_good)
            else:                            # "stop", or a rollback with no earlier checkpoint
                stopped_at = k
                break
        plots = training_log.make_plots(st, results, last_good)
        write_report(st, report.final_markdown(st, results, last_good, stopped_at, plots), "alignflow run report")
        adapter = st.manifest["iterations"][str(last_good)]["policy"]["adapter"] if last_good else None
        st.manifest["final"] = {"metrics": results[last_good], "base": results[0], "iteration": last_good,
                                "adapter": adapter}
        st.manifest["status"] = "completed" if stopped_at is None else f"stopped at iteration {stopped_at}"
        st.save_manifest()
        if cfg.registry.enabled and last_good:
            register_policy(st.run_id, last_good)
        return {"run_id": st.run_id, "run_dir": str(st.run_dir), "results": results}


@stage
def register_policy(run_id: str, k: int) -> dict:
    """Register iteration k's policy with its lineage, run the promotion gate, promote if it passes."""
    from rlhf_core.registry import Registry, lineage_from_manifest
    st = RUNS[run_id]
    r = st.cfg.registry
    reg = Registry(st.cfg.registry_path())
    version = f"{run_id}/iter_{k}"
    if "registry" in st.manifest:           # registered before an interruption
        return st.manifest["registry"]
    reg.register(version, lineage_from_manifest(st.manifest, k), st.manifest["iterations"][str(k)]["eval"]["metrics"])
    gate = reg.evaluate_gate(version, r.max_unsafe_compliance, r.max_over_refusal, r.tolerance, promote=r.auto_promote)
    entry = reg.get(version)
    st.manifest["registry"] = {"path": str(reg.path), "version": version, "stage": entry["stage"],
                               "gate": entry["gate"]}
    st.save_manifest()
    print(f"registry: {version} is {entry['stage']}" + ("" if gate.passed else f" ({'; '.join(gate.reasons)})"))
    return st.manifest["registry"]


@contextmanager
def managed_run(cfg: AlignflowConfig, run_id: str | None, show_progress: bool | None, flow_name: str):
    """A flow's run state (prepared by the CLI, or here for a direct call), with its progress display
    open; marked failed in the manifest if anything raises; actors always shut down."""
    from flows.progress import ProgressUI
    st = RUNS[run_id] if run_id in RUNS else prepare_run(cfg, run_id)
    st.manifest["flow"] = flow_name
    artifacts.name_flow_run(st.run_id)
    st.progress = ProgressUI(show_progress, run_id=st.run_id)
    st.timeline()["flow_started"] = time.time()
    try:
        with st.progress:
            yield st
    except (KeyboardInterrupt, TerminationSignal) as e:
        # Ctrl-C / SIGTERM (flows/interrupt.py): resumable from the last completed stage
        # the signal handler's record: what reaches here may be a KeyboardInterrupt re-raised on the way
        signum = interrupt.received() or getattr(e, "signal", signal.SIGINT)
        interrupt.note(signum)
        st.manifest["status"] = "interrupted"
        st.manifest["interrupted"] = {"signal": signal.Signals(signum).name, "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                      "last_completed_stage": st.last_completed}
        raise
    except BaseException:
        st.manifest["status"] = "failed"
        raise
    finally:
        st.timeline()["flow_finished"] = time.time()
        st.save_manifest()
        st.log.close()
        if st.workers is not None:
            st.workers.shutdown()
        RUNS.pop(st.run_id, None)
        interrupt.mark_cleaned()


def write_report(st: RunState, md: str, description: str) -> None:
    """report.md in the run folder (atomically) and the same Markdown as the run's report artifact."""
    atomic_write_text(st.run_dir / "report.md", md)
    artifacts.markdown(artifact_key(st.run_id, "report"), md, description)


@flow(name="alignflow_eval", log_prints=True)
def eval_flow(cfg: AlignflowConfig, adapter: str | None = None, run_id: str | None = None,
              show_progress: bool | None = None) -> dict:
    """Evaluate `policy.model` (optionally with a saved LoRA adapter) on the held-out sets."""
    # The CLI prepares (validates) the run before Prefect starts; a direct call prepares it here.
    with managed_run(cfg, run_id, show_progress, "alignflow_eval") as st:
        start_workers(st.run_id)
        if adapter:
            st.workers.load_policy(adapter)
        metrics = evaluate(st.run_id, 0, use_adapter=bool(adapter), with_reward_model=False)
        st.manifest.update(status="completed", evaluated={"model": cfg.policy.model, "adapter": adapter})
        st.save_manifest()
        return {"run_id": st.run_id, "run_dir": str(st.run_dir), "metrics": metrics}
