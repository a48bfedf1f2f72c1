"""rlhf_core is pure: importing every module of it loads neither Ray nor Prefect (rule 1)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _loaded_after(imports: str) -> set[str]:
    code = f"import sys; {imports}; print(' '.join(sorted(m.split('.')[0] for m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_rlhf_core_loads_neither_ray_nor_prefect():
    # every module, subpackages included (rlhf_core.algorithms, rlhf_core.evaluation, …)
    modules = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts) for p in (ROOT / "rlhf_core").rglob("*.py"))
    loaded = _loaded_after("; ".join(f"import {m.removesuffix('.__init__')}" for m in modules))
    assert "rlhf_core" in loaded
    assert "ray" not in loaded and "prefect" not in loaded


def test_workers_do_not_import_prefect():
    loaded = _loaded_after("import workers.controller, workers.actors")
    assert "ray" in loaded and "prefect" not in loaded
