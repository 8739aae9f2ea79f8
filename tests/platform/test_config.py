from __future__ import annotations

import pytest

from dspark.platform.config import (
    ConfigError,
    DemoConfig,
    DemoTargetConfig,
    DrafterConfig,
    TargetConfig,
    apply_overrides,
    config_hash,
    load_config,
    parse_override,
)


def test_defaults_validate():
    cfg = DemoConfig()
    assert cfg.target.path == "demo"
    assert cfg.demo_target.moe is False
    assert DrafterConfig().block_size == 7


def test_unknown_key_is_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("target:\n  pathh: /x\n")
    with pytest.raises(ConfigError) as e:
        load_config(DemoConfig, p)
    msg = str(e.value)
    assert str(p) in msg and "target.pathh" in msg and "unknown field" in msg


def test_range_error_names_field_and_value(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("generate:\n  temperature: -1\n  max_new_tokens: 0\n")
    with pytest.raises(ConfigError) as e:
        load_config(DemoConfig, p)
    msg = str(e.value)
    assert "generate.temperature" in msg and "greater than or equal to 0" in msg and "-1" in msg
    assert "generate.max_new_tokens" in msg


def test_wrong_type_and_enum(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("target:\n  dtype: float8\n  layer_ids: [1, 1]\n")
    with pytest.raises(ConfigError) as e:
        load_config(DemoConfig, p)
    msg = str(e.value)
    assert "target.dtype" in msg and "target.layer_ids" in msg and "distinct" in msg


def test_bad_yaml_and_missing_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("target: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(DemoConfig, p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(DemoConfig, tmp_path / "nope.yaml")
    p.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(DemoConfig, p)


def test_overrides_are_typed_and_revalidated(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("generate:\n  max_new_tokens: 10\n")
    cfg = load_config(DemoConfig, p, ["generate.max_new_tokens=32", "target.layer_ids=[2, 0]", "demo_target.moe=true"])
    assert cfg.generate.max_new_tokens == 32
    assert cfg.target.layer_ids == (0, 2)  # sorted
    assert cfg.demo_target.moe is True
    with pytest.raises(ConfigError, match="generate.max_new_tokens"):
        load_config(DemoConfig, p, ["generate.max_new_tokens=-3"])
    with pytest.raises(ConfigError, match="generate.nope"):
        load_config(DemoConfig, p, ["generate.nope=1"])


def test_override_parsing_errors():
    assert parse_override("a.b=hello world") == (["a", "b"], "hello world")
    assert parse_override("a=") == (["a"], "")
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_override("novalue")
    with pytest.raises(ConfigError, match="empty key"):
        parse_override("a..b=1")
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"a": 1}, ["a.b=2"])


def test_cross_field_rules():
    with pytest.raises(Exception, match="multiple of num_kv_heads"):
        DemoTargetConfig(num_heads=3, num_kv_heads=2)
    with pytest.raises(Exception, match="sum to 1"):
        DemoTargetConfig(split_fractions=(0.5, 0.2, 0.2))
    with pytest.raises(Exception, match="markov_rank: 0"):
        DrafterConfig(kind="dflash", markov_rank=8)
    assert DrafterConfig(kind="dflash", markov_rank=0).kind == "dflash"


def test_configs_are_frozen_and_hash_is_stable():
    a, b = DemoTargetConfig(), DemoTargetConfig()
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(DemoTargetConfig(seed=1))
    assert config_hash(a, "3.11") != config_hash(a, "3.12")
    with pytest.raises(Exception):
        a.seed = 3  # type: ignore[misc]


def test_every_field_is_documented():
    for schema in (DemoConfig, TargetConfig, DrafterConfig, DemoTargetConfig):
        for name, field in schema.model_fields.items():
            assert field.description, f"{schema.__name__}.{name} has no description"
