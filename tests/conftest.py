import os

# Before anything imports transformers/prefect: offline, and room for Prefect's ephemeral API to
# start on two busy cores (8–15 s measured here, against a 20 s default).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

CONFIGS = Path(__file__).parent / "configs"


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    from rlhf_core.models import tiny_folder
    return str(tiny_folder())


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (starting it costs 3–5 s)."""
    import ray
    if not ray.is_initialized():
        # address="local": never join a stale cluster left by a killed test.
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_config():
    from rlhf_core.config import load_config
    return lambda *overrides: load_config(CONFIGS / "tiny.yaml", list(overrides))
