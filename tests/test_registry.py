"""Model registry: lineage, the promotion gate, promote and roll back, atomic writes."""
import json

import pytest

from rlhf_core.registry import Registry, RegistryError, folder_sha256, lineage_from_manifest, promotion_gate

GOOD = {"unsafe_compliance": 30.0, "over_refusal": 2.0}


def test_gate_thresholds_and_regressions():
    assert promotion_gate(GOOD, None, 50, 5).passed
    r = promotion_gate({"unsafe_compliance": 60.0, "over_refusal": 2.0}, None, 50, 5)
    assert not r.passed and "unsafe_compliance 60.0 % is over the threshold 50 %" in r.reasons[0]
    worse = promotion_gate({"unsafe_compliance": 35.0, "over_refusal": 2.0}, GOOD, 50, 5, tolerance=2)
    assert not worse.passed and "regresses against production's 30.0 %" in worse.reasons[0]
    assert promotion_gate({"unsafe_compliance": 31.0, "over_refusal": 2.0}, GOOD, 50, 5, tolerance=2).passed
    assert not promotion_gate({"over_refusal": 1.0}, None, 50, 5).passed
    # rates read by another judge or on another set are not compared: the thresholds alone decide
    judged = dict(GOOD, measure="eval-judge-v1", headline_set="generalisation")
    assert not promotion_gate(dict(judged, unsafe_compliance=35.0), judged, 50, 5, tolerance=2).passed
    assert promotion_gate(dict(judged, unsafe_compliance=35.0), GOOD, 50, 5, tolerance=2).passed


def test_register_gate_promote_and_roll_back(tmp_path):
    reg = Registry(tmp_path / "registry.json")
    reg.register("run-a/iter_2", {"run_id": "run-a"}, GOOD)
    assert reg.evaluate_gate("run-a/iter_2", 50, 5).passed and reg.production()["version"] == "run-a/iter_2"
    reg.register("run-b/iter_2", {"run_id": "run-b"}, {"unsafe_compliance": 40.0, "over_refusal": 1.0})
    res = reg.evaluate_gate("run-b/iter_2", 50, 5)
    assert not res.passed and reg.get("run-b/iter_2")["stage"] == "candidate"
    assert reg.get("run-b/iter_2")["gate"]["against"] == "run-a/iter_2"
    reg.register("run-c/iter_2", {"run_id": "run-c"}, {"unsafe_compliance": 20.0, "over_refusal": 1.0})
    assert reg.evaluate_gate("run-c/iter_2", 50, 5).passed
    assert reg.production()["version"] == "run-c/iter_2" and reg.get("run-a/iter_2")["stage"] == "archived"
    back = reg.rollback()
    assert back["version"] == "run-a/iter_2" and reg.production()["version"] == "run-a/iter_2"
    assert reg.get("run-c/iter_2")["stage"] == "archived"
    assert [e["event"] for e in reg.events()] == ["register", "promote", "register", "register", "promote",
                                                  "promote"]
    reg.promote("run-b/iter_2", "override")
    assert reg.production()["version"] == "run-b/iter_2"
    with pytest.raises(RegistryError, match="already registered"):
        reg.register("run-a/iter_2", {}, GOOD)
    with pytest.raises(RegistryError, match="no version 'nope'"):
        reg.get("nope")
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob("*.lock"))


def test_rollback_needs_an_earlier_production_and_corrupt_files_are_named(tmp_path):
    reg = Registry(tmp_path / "r.json")
    reg.register("v1", {}, GOOD)
    reg.promote("v1")
    with pytest.raises(RegistryError, match="nothing to roll back"):
        reg.rollback()
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(RegistryError, match=f"{bad}: not a registry file"):
        Registry(bad).versions()


def test_lineage_from_a_run_manifest(tmp_path):
    adapter = tmp_path / "iter_2" / "policy_adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    manifest = {"run_id": "r1", "models": {"policy": "/m/smollm2"}, "config_hash": "abc", "seed": 0,
                "judge": {"constitution_version": 1},
                "config": {"ppo": {"advantage_estimator": "gae"}, "safe_rlhf": {"enabled": True}},
                "iterations": {"1": {"preferences": {"sha256": "p1", "annotator": "judge/flip0.25"}},
                               "2": {"preferences": {"sha256": "p2", "annotator": "judge/flip0.25"},
                                     "human_feedback": {"annotators": {"ann": 3}, "human_labels_sha256": "h2"},
                                     "reward_model": {"path": "/rm"}, "cost_model": {"path": "/cm"},
                                     "policy": {"adapter": str(adapter)}}}}
    lin = lineage_from_manifest(manifest, 2)
    assert lin["adapter_sha256"] == folder_sha256(adapter) and lin["preference_sha256"] == ["p1", "p2"]
    assert lin["annotators"] == ["ann", "judge/flip0.25"] and lin["human_labels_sha256"] == ["h2"]
    assert lin["algorithm"] == "gae+safe-rlhf" and lin["cost_model"] == "/cm" and lin["constitution_version"] == 1
    json.dumps(lin)


def test_models_cli(tmp_path, capsys):
    from flows.cli import main
    path = tmp_path / "registry.json"
    assert main(["models", "show", "x", "--registry", str(path)]) == 2
    assert "no registry there yet" in capsys.readouterr().out
    reg = Registry(path)
    reg.register("run-a/iter_2", {"algorithm": "gae"}, GOOD)
    reg.register("run-b/iter_2", {"algorithm": "grpo"}, GOOD)
    assert main(["models", "promote", "run-a/iter_2", "--registry", str(path)]) == 0
    assert main(["models", "promote", "run-b/iter_2", "--registry", str(path)]) == 0
    assert main(["models", "rollback", "--registry", str(path)]) == 0
    assert reg.production()["version"] == "run-a/iter_2"
    capsys.readouterr()
    assert main(["models", "list", "--registry", str(path)]) == 0
    out = capsys.readouterr().out
    assert "run-a/iter_2" in out and "production" in out and "archived" in out
    assert main(["models", "show", "run-b/iter_2", "--registry", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["lineage"]["algorithm"] == "grpo"


def test_models_list_says_when_empty_and_never_folds_a_version_id(tmp_path, capsys):
    from rich.console import Console

    from flows.cli import main
    from flows.models_cli import versions_table
    path = tmp_path / "registry.json"
    for registry in (path, tmp_path / "missing.json"):
        assert main(["models", "list", "--registry", str(registry)]) == 0
        assert "no models registered" in capsys.readouterr().out
    reg = Registry(path)
    ids = ["default-20261128-214518/iter_2", "a-much-longer-run-name-than-usual-20261203-061500/iter_12"]
    for version in ids:
        reg.register(version, {"algorithm": "reinforce_pp_baseline"}, GOOD)
    console = Console(width=80, record=True)
    console.print(versions_table(path, reg.versions()))
    text = console.export_text()
    assert all(version in text for version in ids), text


def test_cli_version_and_bare_help(capsys):
    from flows.cli import main
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("alignflow 0.")
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: alignflow") and "resume" in out and "examples:" in out


def test_models_cli_refuses_versions_that_are_not_ids(tmp_path, capsys):
    from flows.cli import main
    path = tmp_path / "registry.json"
    Registry(path).register("run-a/iter_2", {"algorithm": "gae"}, GOOD)
    for bad in ("../../etc/passwd", "../iter_2", "run-a/..", "run-a\\iter_2"):
        for action in ("show", "promote"):
            assert main(["models", action, bad, "--registry", str(path)]) == 2
            assert "not a version id" in capsys.readouterr().out
    assert Registry(path).production() is None
