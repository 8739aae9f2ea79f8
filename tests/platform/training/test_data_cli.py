"""``dspark data`` (the click group, through CliRunner): generate, resume, info, cache-features;
user errors are one line and exit status 2; the example config validates."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from _data_helpers import tiny_data_dict
from dspark.platform.config import load_config
from dspark.platform.training.data_cli import data
from dspark.platform.training.data_config import AnswerSampling, DataConfig

ROOT = Path(__file__).resolve().parents[3]


def invoke(*args: str):
    return CliRunner().invoke(data, [str(a) for a in args])


def assert_user_error(result, *needles: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    # stderr may carry progress lines before the message (config errors add a line per field)
    lines = result.stderr.strip().splitlines()
    starts = [i for i, ln in enumerate(lines) if ln.startswith("error: ")]
    assert "Traceback" not in result.output and len(starts) == 1, result.stderr
    message = "\n".join(lines[starts[0]:])
    for n in needles:
        assert n in message, (n, result.stderr)


@pytest.fixture(scope="module")
def generated(tiny_demo_target, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    cfg = root / "data.yaml"
    cfg.write_text(yaml.safe_dump(tiny_data_dict(tiny_demo_target.path, root / "out")))
    r = invoke("generate", cfg, "--no-progress", "--set", "sampling.temperature=0.5")
    assert r.exit_code == 0, (r.output, r.exception)
    return cfg, root / "out", r


def test_generate_then_resume_then_info(generated):
    cfg, out, first = generated
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] and m["generation"]["sampling"]["temperature"] == 0.5  # --set reached the config
    assert f"{m['counts']['records']} records in {len(m['shards'])} shard(s)" in first.stdout
    again = invoke("generate", cfg, "--no-progress", "--set", "sampling.temperature=0.5")
    assert again.exit_code == 0 and "nothing to do" in again.stderr
    info = invoke("info", out, "--verify")
    assert info.exit_code == 0 and f"{m['counts']['records']} records" in info.stdout
    assert "T=0.5" in info.stdout and f"verified {len(m['shards'])} shard(s)" in info.stdout


def test_user_errors_are_one_line_with_exit_status_2(generated, tmp_path):
    cfg, out, _ = generated
    assert_user_error(invoke("generate", cfg, "--no-progress"), "different settings", "sampling.temperature", "--force")
    assert_user_error(invoke("generate", tmp_path / "none.yaml"), "config file not found")
    assert_user_error(invoke("generate", cfg, "--set", "sampling.top_p=2"), "sampling.top_p")
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "x"}\n{"prompt": 3}\n')
    assert_user_error(invoke("generate", cfg, "--set", f"sources=[{{kind: jsonl, path: {bad}}}]",
                             "--set", f"output_dir={tmp_path / 'o'}"), f"{bad}:2:", "non-empty string")
    assert_user_error(invoke("info", tmp_path), "neither a data set nor a feature cache")
    (out / "shard-00000.parquet").rename(out / "moved.parquet")
    try:
        assert_user_error(invoke("info", out, "--verify"), "missing or altered: shard-00000.parquet")
    finally:
        (out / "moved.parquet").rename(out / "shard-00000.parquet")


def test_cache_features_prints_the_estimate_then_writes(generated, tmp_path):
    from dspark.platform.training.dataset import TrainData
    from dspark.platform.training.feature_cache import estimate_feature_cache_bytes

    _, out, _ = generated
    dry = invoke("cache-features", out, tmp_path / "fc", "--dry-run", "--shard-mb", "0.01")
    assert dry.exit_code == 0, (dry.output, dry.exception)
    d = TrainData(out)
    est = estimate_feature_cache_bytes(d.lengths, 3 * 64, 64, "bfloat16", int(0.01 * 2**20))
    assert f"({est} bytes)" in dry.stdout and not (tmp_path / "fc").exists()
    r = invoke("cache-features", out, tmp_path / "fc", "--shard-mb", "0.01", "--no-progress")
    assert r.exit_code == 0, (r.output, r.exception)
    assert "feature cache: 7 records" in r.stderr or "feature cache:" in r.stderr
    m = json.loads((tmp_path / "fc" / "manifest.json").read_text())
    assert m["complete"] and m["estimate_bytes"] == est
    info = invoke("info", tmp_path / "fc", "--verify")
    assert info.exit_code == 0 and "feature cache" in info.stdout and "bfloat16" in info.stdout
    assert_user_error(invoke("cache-features", out, tmp_path / "fc", "--dtype", "float32"), "different settings")


def test_example_config_validates_and_targets_the_demo():
    cfg = load_config(DataConfig, ROOT / "clusters" / "data-demo.yaml")
    assert cfg.target.path == "demo" and cfg.output_dir.startswith("artifacts/")
    assert cfg.sampling == AnswerSampling(max_new_tokens=128)  # DeepSpec's Qwen3 settings otherwise
    # every key of the file carries a comment on the line(s) above it, or opens a list item
    lines = (ROOT / "clusters" / "data-demo.yaml").read_text().splitlines()
    for i, ln in enumerate(lines):
        if ln.strip() and not ln.lstrip().startswith(("#", "- ")):
            assert lines[i - 1].lstrip().startswith(("#", "- ")), f"uncommented key: {ln!r}"


def test_cli_module_imports_stay_light():
    code = ("import sys, dspark.platform.training.data_cli; "
            "heavy = [m for m in ('torch', 'pyarrow', 'transformers') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
