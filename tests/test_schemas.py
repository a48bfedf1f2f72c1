import math
import os

import pyarrow as pa
import pytest

from rlhf_core import schemas

EXAMPLES = {
    "prompts": {"prompt_id": "x-1", "prompt": "hi", "kind": "benign", "source": "s", "category": "c",
                "split": "train"},
    "samples": {"sample_id": "x-1-1-0", "prompt_id": "x-1", "prompt": "hi", "kind": "benign", "response": "hello",
                "origin": "policy", "policy_version": "base", "num_tokens": 2},
    "preferences": {"pair_id": "p", "prompt_id": "x-1", "prompt": "hi", "response_a": "a", "response_b": "b",
                    "better": 1, "judge_better": 0, "flipped": True, "score_a": 0.5, "score_b": 0.1,
                    "is_safe_a": True, "is_safe_b": False, "safer": 0, "harm_category_a": None, "harm_category_b": "violence",
                    "annotator": "judge", "source": "simulated", "display_order": "ba",
                    "labeled_at": None, "soft_label": 0.8, "margin": 0.5, "weight": 1.0},
    "experience": {"step": 0, "prompt_id": "x-1", "kind": "harmful", "response": "no", "reward_model_score": 1.5,
                   "reward": 0.3, "kl": 0.01, "num_tokens": 3, "cost": -0.5},
    "eval_results": {"prompt_id": "x-1", "prompt": "hi", "kind": "harmful", "eval_set": "generalisation",
                     "source": "generalisation/short_question", "category": "violence", "response": "no",
                     "verdict": "refusal", "p_complies": 0.1, "refused": True, "unsafe_compliance": False,
                     "over_refusal": False, "detector_refused": True, "degenerate": False,
                     "reward_model_score": math.nan, "judge_total": 0.2, "kl": 0.0, "num_tokens": 1},
}


@pytest.mark.parametrize("name", sorted(schemas.SCHEMAS))
def test_round_trip(tmp_path, name):
    schema = schemas.SCHEMAS[name]
    assert set(EXAMPLES[name]) == set(schema.names), "example must cover the schema"
    table = schemas.from_rows([EXAMPLES[name]] * 3, schema)
    path = schemas.write_table(table, tmp_path / f"{name}.parquet", schema)
    back = schemas.read_table(path, schema)
    assert back.schema.equals(schema, check_metadata=False)
    assert back.to_pylist()[0].keys() == EXAMPLES[name].keys()
    assert back.num_rows == 3
    assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")] == []


def test_every_field_is_documented():
    for schema in schemas.SCHEMAS.values():
        for f in schema:
            assert f.metadata and f.metadata[b"doc"], f.name


def test_missing_column_named():
    t = pa.table({"prompt": ["x"]})
    with pytest.raises(schemas.SchemaError, match="prompt_id"):
        schemas.validate(t, schemas.PROMPTS, "somewhere")


def test_failed_write_leaves_nothing(tmp_path):
    bad = pa.table({"prompt_id": ["a"]})
    with pytest.raises(schemas.SchemaError):
        schemas.write_table(bad, tmp_path / "p.parquet", schemas.PROMPTS)
    assert os.listdir(tmp_path) == []


def test_missing_optional_columns_become_null():
    row = {k: v for k, v in EXAMPLES["preferences"].items()
           if k not in ("judge_better", "flipped", "score_a", "score_b", "display_order", "soft_label")}
    back = schemas.from_rows([row], schemas.PREFERENCES).to_pylist()[0]
    assert back["judge_better"] is None and back["soft_label"] is None and back["better"] == 1


def test_timeline_union_counts_parallel_actors_once():
    from flows.timeline import summarize, union_seconds
    # two workers overlapping on [2, 3], a third call outside the window, one interval clipped
    assert union_seconds([(0, 3), (2, 5), (9, 12)], 1, 10) == (5 - 1) + (10 - 9)
    assert union_seconds([], 0, 10) == 0 and union_seconds([(4, 3)], 0, 10) == 0
    tl = {"process_start": 0.0, "prepared": 2.0, "flow_finished": 30.0,
          "stages": [{"start": 5.0, "seconds": 10.0, "actor_seconds": 8.0},
                     {"start": 16.0, "seconds": 12.0, "actor_seconds": 12.0}]}
    t = summarize(tl)
    assert t["cold_start_s"] == 5 and t["flow_start_s"] == 3 and t["wall_s"] == 25
    assert t["outside_actors_s"] == 2 and t["prefect_gaps_s"] == 3


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_writes_honour_the_umask(tmp_path, umask):
    """mkstemp/mkdtemp make 0600/0700; a file alignflow writes must get what open()/mkdir give,
    or a teammate or serving container sharing the run folder cannot read it."""
    import numpy as np

    from rlhf_core import interop
    from rlhf_core.io import atomic_write_text
    from rlhf_core.judge import HarmClassifier
    from rlhf_core.models import _atomic_folder
    from rlhf_core.registry import Registry
    old = os.umask(umask)
    try:
        prefs = schemas.write_table(schemas.from_rows([EXAMPLES["preferences"]], schemas.PREFERENCES),
                                    tmp_path / "prefs.parquet", schemas.PREFERENCES)
        clf = HarmClassifier(encoder=None)
        clf.w = np.zeros(2)
        clf.save(tmp_path / "clf.npz")
        Registry(tmp_path / "registry.json").register("run-a/iter_1", {}, {})
        interop.export_preferences(prefs, tmp_path / "trl.jsonl", "trl")
        files = [prefs, atomic_write_text(tmp_path / "m.json", "{}"), tmp_path / "clf.npz",
                 tmp_path / "registry.json", tmp_path / "trl.jsonl"]
        folder = _atomic_folder(tmp_path / "model", lambda tmp: (tmp / "config.json").write_text("{}"))
    finally:
        os.umask(old)
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {f.name: oct(0o666 & ~umask) for f in files}
    assert oct(folder.stat().st_mode & 0o777) == oct(0o777 & ~umask)


def test_every_atomic_write_goes_through_rlhf_core_io():
    # A new mkstemp/mkdtemp elsewhere would bring the 0600 files back.
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    sources = [p for d in ("rlhf_core", "flows", "workers", "labeling") for p in (root / d).rglob("*.py")]
    direct = [str(p.relative_to(root)) for p in sources
              if p != root / "rlhf_core" / "io.py" and ("mkstemp(" in p.read_text() or "mkdtemp(" in p.read_text()
                                                       or "NamedTemporaryFile(" in p.read_text())]
    assert direct == []
