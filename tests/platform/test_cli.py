"""The `dspark` console script, run as users run it (a subprocess of the installed entry point)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from _helpers import tiny_demo_config

DSPARK = shutil.which("dspark", path=str(Path(sys.executable).parent)) or "dspark"


def run(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([DSPARK, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_help_and_version():
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("demo", "generate", "target", "config", "version"):
        assert cmd in r.stdout
    v = run("version")
    assert v.returncode == 0 and v.stdout.startswith("dspark 0.1.0") and "torch" in v.stdout


def test_bad_config_is_one_message_not_a_traceback(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("generate:\n  max_new_tokens: -5\n  colour: blue\n")
    r = run("config", "check", str(p))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "generate.max_new_tokens" in r.stderr and "generate.colour" in r.stderr and "unknown field" in r.stderr


def test_missing_target_is_a_clear_error(tmp_path):
    r = run("generate", "--set", f"target.path={tmp_path / 'nowhere'}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "target checkpoint directory not found" in r.stderr


def test_config_schema_prints_json():
    import json

    r = run("config", "schema", "demo-target")
    schema = json.loads(r.stdout)
    assert schema["additionalProperties"] is False and "hidden_size" in schema["properties"]


def test_generate_builds_then_reuses_the_demo_target(tmp_path):
    cfg = {"demo_target": tiny_demo_config().model_dump(mode="json"),
           "generate": {"prompt": "def main():\n", "max_new_tokens": 8}}
    p = tmp_path / "demo.yaml"
    p.write_text(yaml.safe_dump(cfg))
    env = {"DSPARK_CACHE": str(tmp_path / "cache")}
    first = run("generate", "--config", str(p), env=env)
    assert first.returncode == 0, first.stderr
    assert "validation loss" in first.stderr and "tokens/s" in first.stdout
    assert first.stdout.startswith("def main():\n")
    second = run("generate", "--config", str(p), "--set", "generate.max_new_tokens=4", env=env)
    assert second.returncode == 0, second.stderr
    assert "validation loss" not in second.stderr  # reused from the cache
    n_tokens = int(second.stdout.rsplit(" tokens in ", 1)[0].split()[-1])
    assert 1 <= n_tokens <= 4  # fewer only if the model emitted end-of-text
    info = run("target", "build-demo", "--config", str(p), env=env)
    assert info.returncode == 0 and info.stdout.startswith("cached: ")
    built = Path(info.stdout.split()[1])
    desc = run("target", "info", str(built))
    assert desc.returncode == 0 and "Qwen3ForCausalLM" in desc.stdout and "default feature layers" in desc.stdout
