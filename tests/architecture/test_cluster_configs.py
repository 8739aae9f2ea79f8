"""Every YAML file under clusters/ is validated by the schema it is written for."""

from __future__ import annotations

from pathlib import Path

import pytest
from ray.serve.schema import ServeDeploySchema

from dspark.platform.config import DemoConfig, load_config
from dspark.platform.training.data_config import DataConfig
from dspark.platform.training.train_config import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
# file (relative to clusters/) -> schema; a new YAML must be registered here to be validated
SCHEMAS = {
    "demo.yaml": DemoConfig, "data-demo.yaml": DataConfig, "train-demo.yaml": TrainConfig,
    "train-gpu-cluster.yaml": TrainConfig,
    "serve-local.yaml": ServeDeploySchema, "serve-gpu.yaml": ServeDeploySchema,
}
# files whose schema is no pydantic model (Ray's autoscaler schema, KubeRay) -> the test module here
# that validates them
VALIDATED_ELSEWHERE = {
    "aws-serve.yaml": "test_serve_configs.py", "gcp-serve.yaml": "test_serve_configs.py",
    "kuberay-rayservice.yaml": "test_serve_configs.py",
    "prometheus.yml": "../platform/observability/test_prometheus.py",  # promtool + a real Prometheus
}


def test_every_cluster_yaml_is_registered():
    files = {p.relative_to(ROOT / "clusters").as_posix() for p in (ROOT / "clusters").rglob("*.y*ml")}
    registered = set(SCHEMAS) | set(VALIDATED_ELSEWHERE)
    assert files == registered, f"unregistered: {sorted(files - registered)}"


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_cluster_yaml_validates(name):
    cfg = load_config(SCHEMAS[name], ROOT / "clusters" / name)
    assert cfg == load_config(SCHEMAS[name], ROOT / "clusters" / name)


def test_demo_yaml_shows_the_defaults():
    # the sample documents the defaults; it must not drift from them
    assert load_config(DemoConfig, ROOT / "clusters" / "demo.yaml") == DemoConfig()
