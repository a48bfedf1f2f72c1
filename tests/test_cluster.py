"""alignflow's actors on clusters other than the local default: a multi-node cluster simulated on one
machine (ray.cluster_utils.Cluster), and a separately started `ray start --head` on loopback that a
run joins through RAY_ADDRESS. Each runs in its own process: the test session has its own Ray."""
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


def test_run_joins_a_separately_started_head(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The head and the driver share a token of this test's own: whether Ray 2.60 turns token auth on
    # depends on whether ~/.ray/auth_token exists on the machine, which a fresh CI machine lacks.
    env = dict(os.environ, HF_HUB_OFFLINE="1", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    # --block keeps the head in the foreground of its own session: killing that session stops it
    # (and only it: `ray stop` would also stop the test session's own Ray).
    # the `ray` script of this environment, whether or not its bin folder is on PATH
    ray_cli = str(Path(sys.executable).with_name("ray")) if Path(sys.executable).with_name("ray").exists() else "ray"
    head = subprocess.Popen([ray_cli, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
                             "--num-cpus=2", "--include-dashboard=false"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        time.sleep(3)
        proc = None
        for _ in range(20):                  # the head takes a few seconds to accept drivers
            proc = subprocess.run([sys.executable, str(JOB), "connect", str(tmp_path)], cwd=ROOT,
                                  capture_output=True, text=True, timeout=300,
                                  env=dict(env, RAY_ADDRESS=f"127.0.0.1:{port}"))
            if proc.returncode == 0 or "Could not" not in proc.stderr:
                break
            time.sleep(2)
        out = _result(proc)
        assert out["cluster_nodes"] == 1 and np.allclose(out["scores"][0], out["scores"][1], atol=1e-5)
    finally:                                 # SIGTERM takes > 30 s here; the session holds every head process
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=30)
