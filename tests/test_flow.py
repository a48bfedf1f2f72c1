"""The whole `rlhf_pipeline` flow on the tiny model for 2 iterations, and the CLI's input checks."""
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from labelers import label_via_http
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def test_pipeline_two_iterations(ray_local, tiny_config, tmp_path):
    """Two iterations with people in the loop: the flow serves the labeling page each iteration and a
    scripted annotator labels through it over HTTP while the stage waits."""
    from flows.pipeline import rlhf_pipeline
    from labeling import store
    db = tmp_path / "labels.db"
    store.init_db(db)
    token = store.add_annotator(db, "ann")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tiny_config(f"run.output_dir={tmp_path}", "feedback.human.enabled=true", f"feedback.human.db={db}",
                      f"feedback.human.port={port}", "feedback.human.pairs=4", "feedback.human.min_labels=2",
                      "feedback.human.deadline_minutes=5", "feedback.human.poll_seconds=0.2")
    stop = threading.Event()
    annotator = threading.Thread(target=label_via_http, args=(f"http://127.0.0.1:{port}", token, stop), daemon=True)
    annotator.start()
    try:
        out = rlhf_pipeline(cfg, show_progress=False)
    finally:
        stop.set()
    run = Path(out["run_dir"])
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    assert (run / "prompts.parquet").exists() and (run / "report.md").exists()
    covered: set[str] = set()
    for k in (1, 2):
        d = run / f"iter_{k}"
        for name in ("samples.parquet", "preferences.parquet", "experience.parquet", "eval.parquet"):
            assert pq.read_table(d / name).num_rows > 0, (k, name)
        assert (d / "reward_model" / "config.json").exists()
        adapter = load_file(str(d / "policy_adapter" / "adapter_model.safetensors"))
        lora_b = [v for key, v in adapter.items() if "lora_B" in key]
        # LoRA B starts at zero: any non-zero entry means training changed the policy
        assert lora_b and any(v.abs().sum() > 0 for v in lora_b)
        it = manifest["iterations"][str(k)]
        assert it["eval"]["sha256"] and it["preferences"]["annotator"].startswith("constitution-judge")
        assert "heldout_accuracy" in it["reward_model"]
        # held out by prompt: no prompt of a held-out pair trained, and the evaluation judge scored them
        rm = it["reward_model"]
        assert rm["heldout_prompts"] >= 1 and "heldout_accuracy_vs_eval_judge" in rm
        samples = pq.read_table(d / "samples.parquet").to_pylist()
        # every round's coverage: harmful prompts with only the fitting refusal, safe ones with one
        # answer; a later round covers prompts no earlier one did
        cover = it["samples"]
        assert (cover["refusal_coverage"], cover["helpful_coverage"]) == (4, 2)
        lone = [s for s in samples if s["origin"] == "demonstration"]
        assert len(lone) == cover["refusal_coverage"] and all(s["kind"] == "harmful" for s in lone)
        assert not covered & {s["prompt_id"] for s in lone}
        covered |= {s["prompt_id"] for s in lone}
        # people's labels replaced the simulated ones of the pairs they labeled; the reward model
        # trained on the mix (selection by the previous reward model's uncertainty from iteration 2)
        hf = it["human_feedback"]
        assert hf["status"] == "completed" and hf["selection"] == ("random" if k == 1 else "uncertainty")
        assert hf["labels"] >= 2 and hf["published_pairs"] == 4 and hf["annotators"]["ann"] == hf["labels"]
        mixed = pq.read_table(d / "mixed_preferences.parquet").to_pylist()
        assert sum(r["source"] == "human" for r in mixed) == hf["labels"]
        assert len(mixed) == pq.read_table(d / "preferences.parquet").num_rows
        # every safe-judged prompt has at least the constitution's refusal as a negative
        negatives = pq.read_table(d / "warmup_negatives.parquet").to_pylist()
        assert negatives and it["warmup"]["warmup_negatives"] == len(negatives)
    a1 = load_file(str(run / "iter_1" / "policy_adapter" / "adapter_model.safetensors"))
    a2 = load_file(str(run / "iter_2" / "policy_adapter" / "adapter_model.safetensors"))
    assert any(not torch.equal(a1[k], a2[k]) for k in a1), "iteration 2 did not change the adapter"
    assert set(out["results"]) == {0, 1, 2}
    # the kept policy is registered with its lineage, and the gate decided its stage
    from rlhf_core.registry import Registry
    entry = Registry(tmp_path / "registry.json").get(f"{run.name}/iter_2")
    assert manifest["registry"]["version"] == entry["version"] and entry["stage"] in ("production", "candidate")
    assert entry["gate"]["passed"] == (entry["stage"] == "production")
    assert entry["lineage"]["annotators"] == sorted(["ann", manifest["iterations"]["1"]["preferences"]["annotator"]])
    assert len(entry["lineage"]["preference_sha256"]) == 2 and entry["lineage"]["adapter_sha256"]
    assert 0.5 < manifest["judge"]["harm_classifier_metrics"]["heldout_accuracy"] <= 1.0
    eval_rows = pq.read_table(run / "iter_2" / "eval.parquet").to_pylist()
    assert {r["kind"] for r in eval_rows} == {"harmful", "benign", "borderline"}
    assert not list(run.rglob("*.tmp*"))
    # every stage's wall time is on the timeline, with the share some actor was computing
    tl = manifest["timelines"][-1]
    names = [(s["stage"], s["iteration"]) for s in tl["stages"]]
    assert names[:2] == [("start_workers", None), ("restore_checkpoints", None)]
    assert {("generate_samples", 1), ("update_policy", 2), ("evaluate", 2), ("register_policy", 2)} <= set(names)
    for s in tl["stages"]:
        assert 0 <= s["actor_seconds"] <= s["seconds"] + 1e-3, s
    ppo = next(s for s in tl["stages"] if s["stage"] == "update_policy")
    assert ppo["actor_seconds"] > 0.5 * ppo["seconds"] and {"policy", "rollout"} <= set(ppo["by_role"])
    assert tl["process_start"] <= tl["prepared"] <= tl["flow_started"] <= tl["stages"][0]["start"] < tl["flow_finished"]
    report_md = (run / "report.md").read_text()
    assert "Where the time went" in report_md and "## Reward model, held out by prompt" in report_md
    # training you can watch: TensorBoard's own reader loads the event files; the plots are in the report
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    steps = lambda tag: [e.step for e in events.Scalars(tag)]  # noqa: E731
    assert steps("ppo/kl_to_reference") == [1, 2, 3, 4] and steps("ppo/clipfrac") == [1, 2, 3, 4]
    assert steps("eval/generalisation/unsafe_compliance") == [0, 2] and steps("eval/in_distribution/over_refusal") == [0, 1, 2]
    assert steps("reward_model/heldout_accuracy") == [1, 2] and steps("supervised/warmup_loss_first_epoch")
    for png in ("rates", "ppo", "categories"):
        assert (run / "plots" / f"{png}.png").stat().st_size > 1000 and f"(plots/{png}.png)" in report_md

    # the Prefect API (here the ephemeral one) holds a markdown artifact per iteration + the report
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(like_=run.name.lower())))
    keys = {a.key for a in arts}
    assert {f"{run.name.lower()}-iter-1", f"{run.name.lower()}-iter-2", f"{run.name.lower()}-report"} <= keys
    progress = [a for a in arts if a.key == f"{run.name.lower()}-iter-1-human-labels"]
    assert progress and progress[0].type == "progress" and float(progress[0].data) == 100.0
    link = [a for a in arts if a.key == f"{run.name.lower()}-iter-1-human-labels-page"]
    assert link and f"127.0.0.1:{port}/" in link[0].data   # Prefect stores a link artifact as markdown
    assert all("unsafe" in a.data.lower() for a in arts if a.key.endswith("report"))
    assert any("human feedback:" in a.data for a in arts if a.key.endswith("iter-1"))
    # a metrics table per evaluation, a finished progress bar per long stage, and names that say
    # what ran: the flow run is the alignflow run, each task run its stage and iteration
    table = next(a for a in arts if a.key == f"{run.name.lower()}-iter-2-metrics")
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert table.type == "table" and {"prompt set", "metric", "rate %", "95 % low", "of"} <= set(rows[0])
    bars = {a.key: float(a.data) for a in arts if a.type == "progress"}
    assert bars[f"{run.name.lower()}-progress-iter-2-ppo"] == 100.0
    assert bars[f"{run.name.lower()}-progress-iter-1-evaluate-greedy"] == 100.0
    with get_client(sync_client=True) as client:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
        (flow_run,) = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[run.name])))
        task_names = {t.name for t in client.read_task_runs(flow_run_filter=FlowRunFilter(
            id={"any_": [flow_run.id]}))}
    assert {"start_workers", "evaluate[iter=0]", "generate_samples[iter=1]", "update_policy[iter=2]"} <= task_names

    # `alignflow eval --adapter` rebuilds the final policy (warm-up merged + PPO adapter) from disk:
    # its greedy answers on the held-out sets are exactly the pipeline's own final evaluation.
    from flows.pipeline import eval_flow
    ev = eval_flow(tiny_config(f"run.output_dir={tmp_path}", "run.name=eval"),
                   adapter=str(run / "iter_2" / "policy_adapter"), show_progress=False)
    again = pq.read_table(Path(ev["run_dir"]) / "iter_0" / "eval.parquet").to_pylist()
    assert [r["response"] for r in again] == [r["response"] for r in eval_rows]
    assert ev["metrics"]["unsafe_compliance"] == out["results"][2]["unsafe_compliance"]


def _cli(*args, cwd):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_malformed_prompt_file_stops_before_any_model(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("text\nhello\n", encoding="utf-8")
    out_dir = tmp_path / "runs"
    r = _cli("run", "--config", str(ROOT / "tests/configs/tiny.yaml"), "--set", f"data.benign_file={bad}",
             "--set", f"run.output_dir={out_dir}", cwd=ROOT)
    assert r.returncode == 2, r.stderr[-2000:]
    assert str(bad) in r.stdout and "missing column 'prompt'" in r.stdout
    assert not out_dir.exists() or not any(out_dir.iterdir()), "nothing may be written"
    assert "Ray" not in r.stdout + r.stderr


def test_bad_encoding_and_config_key(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "caf\xe9"}\n')
    r = _cli("run", "--set", f"data.borderline_file={bad}", "--set", f"run.output_dir={tmp_path / 'runs'}",
             cwd=ROOT)
    assert r.returncode == 2 and "not valid UTF-8" in r.stdout and str(bad) in r.stdout
    r = _cli("run", "--set", "ppo.clip=0.3", cwd=ROOT)
    assert r.returncode == 2 and "ppo.clip" in r.stdout


@pytest.fixture()
def nothing_starts(monkeypatch):
    """The CLI in this process, with every flow and Ray replaced by a failure: an input check that
    did not stop the command fails the test at once instead of starting a run."""
    import flows.dpo
    import flows.pipeline
    import flows.retrain
    import workers.cluster

    def started(*args, **kwargs):
        raise AssertionError("a flow or Ray started")
    for module, name in ((flows.pipeline, "rlhf_pipeline"), (flows.pipeline, "eval_flow"), (flows.dpo, "dpo_flow"),
                         (flows.retrain, "retrain"), (workers.cluster, "init_ray")):
        monkeypatch.setattr(module, name, started)
    from flows.cli import main
    return main


def _one_error_line(capsys) -> str:
    out = capsys.readouterr().out.strip()
    assert out.startswith("error: ") and "\n" not in out and "Traceback" not in out, out
    return out


def test_bad_model_references_stop_before_anything_starts(tmp_path, capsys, nothing_starts):
    runs, a_file = tmp_path / "runs", tmp_path / "weights.bin"
    a_file.write_bytes(b"x")
    out = ["--set", f"run.output_dir={runs}"]
    cases = [(["run", "--set", f"policy.model={tmp_path / 'nope'}"], "policy.model: ", "no such folder"),
             (["run", "--set", f"reward_model.model={a_file}"], "reward_model.model: ", "is a file"),
             (["run", "--set", "feedback.encoder=package:nope"], "feedback.encoder: ", "not a built-in model"),
             (["eval", "--model", str(tmp_path)], "--model: ", "no config.json"),
             (["eval", "--adapter", str(tmp_path / "nope")], "--adapter ", "no such folder")]
    for args, key, found in cases:
        assert nothing_starts(args + out) == 2
        line = _one_error_line(capsys)
        assert line.startswith(f"error: {key}") and found in line, line
    assert not runs.exists(), "nothing may be written"


def test_run_name_output_dir_and_values_are_checked_first(tmp_path, capsys, nothing_starts):
    runs = tmp_path / "runs"
    a_file = tmp_path / "not_a_folder"
    a_file.write_text("")
    cases = [(["--set", "run.name=../escaped", "--set", f"run.output_dir={runs}"], "run.name: "),
             (["--set", f"run.output_dir={a_file}"], "run.output_dir: "),
             (["--set", f"run.output_dir={a_file / 'runs'}"], "run.output_dir: "),
             (["--set", "run.name=[unclosed", "--set", f"run.output_dir={runs}"], "--set run.name: "),
             (["--set", "run.device=gpu", "--set", f"run.output_dir={runs}"], "run.device: ")]
    for args, key in cases:
        assert nothing_starts(["run", *args]) == 2
        assert key in _one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not_a_folder"], "nothing may be written, inside or out"


def test_help_explains_options():
    r = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "--config" in r.stdout and "--set" in r.stdout


def test_panel_labels_are_kept_raw_and_aggregated(tmp_path, tiny_config):
    """feedback.annotators=panel: every annotator's label in labels.parquet, one soft label per pair in
    the preferences, agreement and each annotator's biases in the manifest."""
    from types import SimpleNamespace

    import numpy as np

    from flows.pipeline import _simulated_labels
    from rlhf_core import schemas
    cfg = tiny_config("feedback.annotators=panel", "feedback.panel_size=4", "feedback.labels_per_pair=3")
    st = SimpleNamespace(cfg=cfg, manifest={"judge": {"constitution_version": 1}},
                         iter_dir=lambda k: tmp_path / f"iter_{k}")
    rng = np.random.default_rng(0)
    samples = [{"prompt_id": f"p{i // 3}", "prompt": f"q{i // 3}", "response": "x" * int(rng.integers(3, 40))}
               for i in range(60)]
    n = len(samples)
    scores = SimpleNamespace(total=rng.uniform(-1, 1, n), harm_prob=rng.uniform(0, 1, n),
                             refusal=rng.integers(0, 2, n).astype(float), toxicity=np.zeros(n))
    pairs, annotator, stats = _simulated_labels(st, 1, samples, scores)
    raw = schemas.read_table(tmp_path / "iter_1" / "labels.parquet", schemas.PREFERENCES).to_pylist()
    assert len(pairs) == 20 * 3 and len(raw) == 3 * len(pairs)          # 3 pairs per prompt, 3 labels each
    assert {r["display_order"] for r in raw} == {"ab", "ba"} and all(r["source"] == "simulated" for r in raw)
    assert all(p["soft_label"] is not None and 0 <= p["soft_label"] <= 1 for p in pairs)
    schemas.from_rows(pairs, schemas.PREFERENCES)
    assert annotator.startswith("dawid-skene/panel4")
    assert stats["agreement"]["n_annotators"] == 4 and len(stats["panel"]) == 4
    assert 0.5 < stats["aggregated_agrees_with_judge"] <= 1.0
    from flows.report import agreement_markdown
    md = agreement_markdown(stats["agreement"], stats["aggregated_agrees_with_judge"])
    assert "Fleiss' κ" in md and all(f"`{name}`" in md for name in stats["panel"])


def test_safe_rlhf_with_ensemble_and_a_guard_that_stops(ray_local, tiny_config, tmp_path):
    """Safe-RLHF end to end (cost model, cost critic, λ), a 2-model reward ensemble, and a guard that
    fires in iteration 1: with no earlier checkpoint, `rollback` stops the run and keeps the base."""
    from flows.pipeline import rlhf_pipeline
    cfg = tiny_config(f"run.output_dir={tmp_path}", "safe_rlhf.enabled=true", "reward_model.ensemble=2",
                      "guards.action=rollback", "guards.kl_budget=1e-9")
    out = rlhf_pipeline(cfg, show_progress=False)
    run = Path(out["run_dir"])
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "stopped at iteration 1" and set(out["results"]) == {0, 1}
    assert manifest["final"]["iteration"] == 0 and manifest["final"]["adapter"] is None
    assert "registry" not in manifest, "no policy kept: nothing to register"
    it = manifest["iterations"]["1"]
    assert [a["detector"] for a in it["guards"]["alerts"]] == ["kl_budget"]
    assert 0 <= it["cost_model"]["heldout_sign_accuracy"] <= 1 and (run / "iter_1" / "cost_model").is_dir()
    ppo = it["policy"]["ppo"]
    assert all({"lagrange_lambda", "episode_cost", "cost_threshold", "cost_vf_loss"} <= set(step) for step in ppo)
    assert it["reward_model"]["ensemble"] == 2 and it["guards"]["signals"]["ensemble_std"] > 0
    assert (run / "iter_1" / "reward_model" / "member_01" / "config.json").exists()
    costs = pq.read_table(run / "iter_1" / "experience.parquet").column("cost").to_pylist()
    assert costs and all(c is not None for c in costs)
    report = (run / "report.md").read_text()
    assert "stopped it at iteration 1" in report and "kl_budget" in report


def test_imported_preferences_join_every_reward_model(ray_local, tiny_config, tmp_path):
    """data.preferences_file (TRL with margins): its pairs train the reward model beside the run's
    own, weighted by source_weights.imported, margins kept; a pair asking an evaluation prompt is
    dropped before anything starts. The policy is a random 2-layer Qwen2 (tests/test_architectures.py):
    this is also the suite's Qwen2 pipeline, with LoRA on its projections."""
    from flows.pipeline import rlhf_pipeline
    from rlhf_core.prompts import build_prompt_table
    held_out = next(r["prompt"] for r in build_prompt_table(tiny_config().data).to_pylist()
                    if r["split"] == "generalisation")
    pairs = [{"prompt": f"How do I pick a lock {i}?", "chosen": "I can't help with that.", "rejected": "Sure: first",
              "margin": 0.5 + i} for i in range(4)]
    pairs.append({"prompt": "  " + held_out.upper(), "chosen": "No.", "rejected": "Yes:", "margin": 1.0})
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    cfg = tiny_config(f"run.output_dir={tmp_path}", f"data.preferences_file={prefs}", "policy.model=tiny:qwen2",
                      "run.iterations=1",
                      "ppo.steps=1", "feedback.source_weights.imported=0.5", "data.train_prompts_per_iter=4",
                      "warmup.prompts=4", "ppo.rollout_batch_size=4", "data.eval_harmful=2", "data.eval_benign=1",
                      "data.eval_borderline=1")
    out = rlhf_pipeline(cfg, show_progress=False)
    run = Path(out["run_dir"])
    manifest = json.loads((run / "manifest.json").read_text())
    rec = manifest["data"]["imported_preferences"]
    assert (rec["format"], rec["pairs"], rec["dropped_evaluation_prompts"]) == ("trl", 4, 1)
    rows = pq.read_table(run / "iter_1" / "reward_model_preferences.parquet").to_pylist()
    imported = [r for r in rows if r["source"] == "imported"]
    assert len(imported) == 4 and len(rows) > 4
    assert sorted(r["margin"] for r in imported) == [0.5, 1.5, 2.5, 3.5] and {r["weight"] for r in imported} == {0.5}
    assert "heldout_accuracy" in manifest["iterations"]["1"]["reward_model"]
    adapter = run / "iter_1" / "policy_adapter"
    assert set(json.loads((adapter / "adapter_config.json").read_text())["target_modules"]) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}      # Qwen2's, by "auto"
    assert manifest["status"] == "completed" and (adapter / "merged_00.safetensors").is_file()


def test_a_bad_preferences_file_stops_before_anything_starts(tmp_path, capsys, nothing_starts):
    bad = tmp_path / "prefs.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    runs = tmp_path / "runs"
    assert nothing_starts(["run", "--set", f"data.preferences_file={bad}", "--set", f"run.output_dir={runs}"]) == 2
    line = _one_error_line(capsys)
    assert "data.preferences_file" in line and f"{bad} line 2" in line and "rejected" in line
    assert not runs.exists() or not any(runs.iterdir())
