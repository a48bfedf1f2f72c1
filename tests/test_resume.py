"""Kill the flow process mid-run (SIGKILL, no clean-up), resume it: the same result as a run that was
never interrupted, nothing lost, nothing done twice."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "configs" / "tiny.yaml"
# the smallest run with every stage (the suite's time budget): one iteration, 4 prompts × 2 answers,
# two PPO steps with a checkpoint after the first
SETTINGS = ["run.iterations=1", "ppo.steps=2", "ppo.checkpoint_every=1", "data.train_prompts_per_iter=4", "warmup.prompts=4",
            "feedback.responses_per_prompt=2", "ppo.rollout_batch_size=4", "data.eval_harmful=2", "data.eval_benign=1",
            "data.eval_borderline=1"]


def _wait_for(run_root: Path, proc: subprocess.Popen, log: Path, stage: tuple[str, str], timeout: float) -> Path:
    """The run folder, once its manifest records `stage` = (iteration, key)."""
    end = time.time() + timeout
    while time.time() < end:
        for m in run_root.glob("*/manifest.json"):
            try:
                it = json.loads(m.read_text()).get("iterations", {})
            except json.JSONDecodeError:     # cannot happen (atomic writes), but never flake on it
                continue
            if stage[1] in it.get(stage[0], {}):
                return m.parent
        if proc.poll() is not None:
            pytest.fail(f"the run exited ({proc.returncode}) before {stage}:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    pytest.fail(f"no {stage} within {timeout}s:\n{log.read_text()[-3000:]}")


def _assert_close(got, want, where: str) -> None:
    """Equal metrics: numbers to rel 1e-6, the rest (set names, nested rates and intervals) exactly."""
    if isinstance(want, dict):
        assert set(got) == set(want), where
        for key in want:
            _assert_close(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_close(g, w, f"{where}[{i}]")
    elif isinstance(want, (int, float)) and not isinstance(want, bool):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-9, nan_ok=True), where
    else:
        assert got == want, where


def _descendant(pid: int, title: str, timeout: float):
    """A process under `pid` (its Ray cluster's workers) whose title starts with `title`."""
    import psutil
    end = time.time() + timeout
    while time.time() < end:
        for child in psutil.Process(pid).children(recursive=True):
            try:
                if " ".join(child.cmdline()).startswith(title):
                    return child
            except psutil.Error:
                continue
        time.sleep(0.2)
    pytest.fail(f"no {title} process under {pid} within {timeout}s")


def _start(root: Path, log: Path, env: dict | None = None, command: list[str] | None = None) -> subprocess.Popen:
    """`alignflow run` on the smallest settings (or `command`), in its own session: a kill of its
    group takes the flow process and the local Ray it started, at once."""
    args = command or (["run", "--config", str(TINY), "--no-progress", "--set", f"run.output_dir={root}"]
                       + [x for s in SETTINGS for x in ("--set", s)])
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, HF_HUB_OFFLINE="1", **(env or {})))


def _finish(proc: subprocess.Popen, timeout: float) -> int:
    """The exit code within `timeout`; the whole group killed if it is still there."""
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def stopped_twice(tmp_path_factory):
    """One run through the CLI, stopped the two ways a run stops without its code's consent (the
    suite's time budget: one run instead of three):
    - Ctrl-C (SIGINT to the whole foreground process group, Prefect's embedded server included)
      after iteration 0's evaluation;
    - `alignflow resume`, whose policy trainer is then SIGKILLed (by PID) after iteration 1's
      samples are judged; the run restarts its actors and completes on its own.
    What each step left is kept for the tests below; the completed run is the reference of the
    mid-PPO kill test (it never resumed inside PPO)."""
    tmp = tmp_path_factory.mktemp("stopped")
    root, home = tmp / "runs", tmp / "prefect_home"
    env = {"PREFECT_HOME": str(home)}
    proc = _start(root, tmp / "run.log", env)
    try:
        run_dir = _wait_for(root, proc, tmp / "run.log", ("0", "eval"), timeout=300)
        os.killpg(proc.pid, signal.SIGINT)            # what a terminal does on Ctrl-C
    finally:
        code = _finish(proc, timeout=90)
    out = {"run_dir": run_dir, "ctrl_c_code": code, "ctrl_c_log": (tmp / "run.log").read_text(),
           "interrupted": json.loads((run_dir / "manifest.json").read_text()),
           "registry_at_stop": (root / "registry.json").exists()}
    if code != 130:                                   # its own test reports it; nothing to resume
        return out
    import sqlite3
    with sqlite3.connect(home / "prefect.db") as db:   # before the resume adds its own flow run
        out["flow_run_states"] = db.execute("select state_type from flow_run").fetchall()

    proc = _start(root, tmp / "resume.log", env, ["resume", str(run_dir), "--no-progress"])
    try:
        _wait_for(root, proc, tmp / "resume.log", ("1", "preferences"), timeout=300)
        _descendant(proc.pid, "ray::PolicyTrainerActor", timeout=30).kill()
    finally:
        out["resume_code"] = _finish(proc, timeout=600)
    out["resume_log"] = (tmp / "resume.log").read_text()
    out["completed"] = json.loads((run_dir / "manifest.json").read_text())
    return out


def test_ctrl_c_stops_the_run_cleanly_and_it_resumes(stopped_twice):
    """Ctrl-C during a run: it stops, the manifest says interrupted after the last completed stage,
    nothing is registered, the Prefect flow run ends Crashed, one line says how to resume; and the
    resume completes. Before the fix the server died, the run went on, and it ended "failed" after
    minutes of retries."""
    run, text = stopped_twice, stopped_twice["ctrl_c_log"]
    run_dir, manifest = run["run_dir"], run["interrupted"]
    assert run["ctrl_c_code"] == 130, text[-3000:]
    assert manifest["status"] == "interrupted", text[-3000:]
    assert manifest["interrupted"]["signal"] == "SIGINT"
    # the signal may land between the evaluation's record and its stage's end (its TensorBoard and
    # Prefect artifacts): the stage before it is then the last one completed
    assert manifest["interrupted"]["last_completed_stage"].startswith(
        ("restore_checkpoints", "evaluate (iteration 0)", "generate_samples"))
    assert "registry" not in manifest and not run["registry_at_stop"]
    lines = [ln for ln in text.splitlines() if "interrupted" in ln]
    assert len(lines) == 1 and f"alignflow resume {run_dir}" in lines[0], text[-3000:]
    assert "Traceback" not in text and "ERROR" not in text, text[-3000:]
    # a log file reads as text: no colour codes, no notices about Ray's or Prefect's defaults
    assert "\x1b[" not in text and "Token authentication" not in text and "telemetry" not in text, text[:3000]
    assert run["flow_run_states"] == [("CRASHED",)]

    assert run["resume_code"] == 0, run["resume_log"][-4000:]
    after = run["completed"]
    assert after["status"] == "completed" and after["resumed"][0]["status_before"] == "interrupted"
    assert after["iterations"]["0"]["eval"] == manifest["iterations"]["0"]["eval"]   # kept, not redone


def test_a_killed_trainer_is_restarted_and_the_run_completes(stopped_twice):
    """The policy trainer SIGKILLed during the resume: the run restarts every actor, continues from
    the stages it recorded, and completes on its own."""
    text, manifest = stopped_twice.get("resume_log", ""), stopped_twice.get("completed", {})
    assert stopped_twice.get("resume_code") == 0, text[-4000:]
    assert manifest["status"] == "completed"
    assert [r["status_before"] for r in manifest["resumed"]] == ["interrupted", "failed"]
    assert "lost actor" in manifest["resumed"][1]["automatic"]
    assert "ALERT: an actor was lost" in text
    assert "samples" in manifest["iterations"]["1"] and "policy" in manifest["iterations"]["1"]


def test_killed_run_resumes_to_the_same_result(ray_local, tiny_config, tmp_path, stopped_twice):
    """SIGKILL of the whole run in the middle of PPO, after its first step's checkpoint: the stages
    before are kept, PPO continues from the checkpoint, and the run ends where one that never
    stopped inside PPO does (the run above, same settings: its stops fall outside PPO)."""
    from flows.pipeline import rlhf_pipeline
    from flows.resume import load_run
    killed_root, log = tmp_path / "killed", tmp_path / "killed.log"
    proc = _start(killed_root, log)
    try:
        run_dir = _wait_for(killed_root, proc, log, ("1", "ppo_progress"), timeout=300)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = json.loads((run_dir / "manifest.json").read_text())
    assert before.get("status") is None and "policy" not in before["iterations"]["1"]
    assert before["iterations"]["1"]["ppo_progress"]["step"] == 1

    state = load_run(run_dir.name, str(killed_root))
    resumed = rlhf_pipeline(state.cfg, run_id=state.run_id, show_progress=False)
    ref_run = stopped_twice["run_dir"]
    reference = stopped_twice.get("completed", {})
    assert reference.get("status") == "completed", "the reference run did not complete (see the tests above)"

    after = json.loads((run_dir / "manifest.json").read_text())
    assert after["status"] == "completed" and len(after["resumed"]) == 1
    # the stages recorded before the kill were kept, not redone
    for key in ("samples", "preferences", "warmup", "reward_model"):
        assert after["iterations"]["1"][key] == before["iterations"]["1"][key]
    ppo = after["iterations"]["1"]["policy"]
    assert ppo["resumed_after_step"] == 1 and ppo["ppo"][0] == before["iterations"]["1"]["ppo_progress"]["history"][0]
    assert not list(run_dir.rglob("ppo_step_*"))        # step checkpoints go once the stage has its own
    assert set(resumed["results"]) == {0, 1}
    for k in ("0", "1"):
        _assert_close(after["iterations"][k]["eval"]["metrics"], reference["iterations"][k]["eval"]["metrics"],
                      f"iteration {k} eval")
    ref_ppo = reference["iterations"]["1"]["policy"]["ppo"]
    for got, want in zip(ppo["ppo"], ref_ppo, strict=True):     # the step after the checkpoint too
        for metric, value in want.items():
            assert got[metric] == pytest.approx(value, rel=1e-6, abs=1e-9), metric
    for name in ("samples.parquet", "eval.parquet", "experience.parquet"):
        assert (pq.read_table(run_dir / "iter_1" / name).column("response").to_pylist()
                == pq.read_table(ref_run / "iter_1" / name).column("response").to_pylist()), name
    assert not list(run_dir.rglob("*.tmp*"))


def test_resume_refuses_what_it_cannot_continue(tmp_path):
    from flows.resume import ResumeError, load_run
    with pytest.raises(ResumeError, match="no run there"):
        load_run("nope", str(tmp_path))
    done = tmp_path / "r1"
    done.mkdir()
    (done / "manifest.json").write_text(json.dumps({"run_id": "r1", "status": "completed", "config": {}}))
    with pytest.raises(ResumeError, match="already finished"):
        load_run(str(done))
    r = subprocess.run([sys.executable, "-m", "flows.cli", "resume", "nope", "--runs-dir", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no run there" in r.stdout


def test_resume_refuses_a_run_id_that_escapes_the_runs_dir(tmp_path, capsys):
    from flows.cli import main
    from flows.resume import ResumeError, load_run
    outside = tmp_path / "escaped"
    outside.mkdir()
    (outside / "manifest.json").write_text(json.dumps({"run_id": "escaped", "status": "failed", "config": {}}))
    (tmp_path / "runs").mkdir()
    for run_id in ("../escaped", "a/../../escaped"):    # a folder that exists from here is taken as a folder
        with pytest.raises(ResumeError, match="not a run id"):
            load_run(run_id, str(tmp_path / "runs"))
    assert main(["resume", "../escaped", "--runs-dir", str(tmp_path / "runs")]) == 2
    out = capsys.readouterr().out
    assert out.startswith("error: ../escaped: not a run id") and out.count("\n") == 1, out
