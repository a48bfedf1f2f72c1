"""alignflow's actors on clusters other than the local default: a multi-node cluster simulated on one
machine (ray.cluster_utils.Cluster), and a whole run submitted with `ray job submit` to a separately
started `ray start --head` on loopback, which it joins through RAY_ADDRESS. Each runs in its own
process: the test session has its own Ray."""
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "tests" / "cluster_job.py"


def _result(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


def test_data_parallel_ranks_spread_over_two_nodes(tmp_path):
    out = _result(subprocess.run([sys.executable, str(JOB), "multinode", str(tmp_path)], cwd=ROOT,
                                 capture_output=True, text=True, timeout=300,
                                 env=dict(os.environ, HF_HUB_OFFLINE="1")))
    assert out["placement"] and out["cluster_nodes"] == 2 and len(set(out["nodes"])) == 2   # one rank per node
    assert np.allclose(out["scores"][0], out["scores"][1], atol=1e-5)     # replicas stayed equal over gloo
    assert "heldout_accuracy" in out["metrics"] and (tmp_path / "rm" / "config.json").exists()


def test_a_whole_run_as_a_ray_job_on_a_separately_started_head(tmp_path):
    """docs/deploy.md's way onto a cluster: `ray start --head` on loopback (its own session), then
    `ray job submit --working-dir . -- alignflow run ...`. The driver runs on the head in a copy of
    the repository and joins that cluster through the RAY_ADDRESS Ray sets; the tiny pipeline runs
    end to end (every stage, two reward-model ranks in one gloo group) and writes its run folder."""
    ports = []
    for _ in range(6):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    port, dashboard, agent, agent_grpc, runtime_env, metrics = ports
    # The head and the clients share a token of this test's own: whether Ray 2.60 turns token auth
    # on depends on whether ~/.ray/auth_token exists on the machine, which a fresh CI machine lacks.
    env = dict(os.environ, HF_HUB_OFFLINE="1", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    env.pop("RAY_ADDRESS", None)
    # the `ray` script of this environment, whether or not its bin folder is on PATH
    ray_cli = str(Path(sys.executable).with_name("ray")) if Path(sys.executable).with_name("ray").exists() else "ray"
    # --block keeps the head in the foreground of its own session: killing that session stops it
    # (and only it: `ray stop` would also stop the test session's own Ray).
    head = subprocess.Popen([ray_cli, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
                             "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={dashboard}",
                             # every agent port of its own: the defaults (52365, ...) may be taken by the
                             # test session's own Ray, and the head's job agent then never comes up
                             f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
                             f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    out_dir = tmp_path / "runs"
    settings = ["run.iterations=1", "ppo.steps=1", "data.train_prompts_per_iter=4", "warmup.prompts=4",
                "feedback.responses_per_prompt=2", "ppo.rollout_batch_size=4", "data.eval_harmful=2",
                "data.eval_benign=1", "data.eval_borderline=1", "resources.reward_model_trainers=2",
                f"run.output_dir={out_dir}"]
    job = [ray_cli, "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--working-dir", str(ROOT), "--",
           sys.executable, "-m", "flows.cli", "run", "--config", "tests/configs/tiny.yaml", "--no-progress",
           *[x for s in settings for x in ("--set", s)]]
    try:
        proc = None
        for _ in range(30):                  # the job server takes a few seconds to come up
            proc = subprocess.run(job, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
            # before the head's job agent is up: a refused connection, then "No available agent"
            if proc.returncode == 0 or not any(m in proc.stdout + proc.stderr
                                               for m in ("Failed to connect", "No available agent")):
                break
            time.sleep(2)
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0 and "succeeded" in log, log[-4000:]
        assert "Connecting to existing Ray cluster" in log and "Started a local Ray instance" not in log, log[-4000:]
        (run_dir,) = [p for p in out_dir.iterdir() if p.is_dir()]     # beside it: registry.json
        manifest = json.loads((run_dir / "manifest.json").read_text())
        assert manifest["status"] == "completed" and "policy" in manifest["iterations"]["1"]
        assert (Path(manifest["iterations"]["1"]["reward_model"]["path"]) / "config.json").is_file()
        assert manifest["config"]["resources"]["reward_model_trainers"] == 2
    finally:                                 # SIGTERM takes > 30 s here; the session holds every head process
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=30)
