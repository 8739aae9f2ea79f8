"""The serving configs in clusters/, checked with Ray's own validators and dspark's ServeConfig.

* Serve configs (serve-local.yaml, serve-gpu.yaml, and the serveConfigV2 of the KubeRay
  RayService) validate with ``ray.serve.schema.ServeDeploySchema``; Ray ignores unknown keys
  there, so a typo is caught by walking the keys against Ray's models. The one application
  imports dspark's app builder and its ``args`` validate with ``ServeConfig``; the options
  ``app_builder`` derives from them are valid Serve deployment options.
* Cluster-launcher YAMLs (aws-serve.yaml, gcp-serve.yaml) validate with Ray's autoscaler schema
  after Ray fills in the provider defaults, as ``ray up`` does before it contacts the cloud.
* The RayService's cluster goes through the Ray autoscaler's own KubeRay translation (which
  parses ``rayStartParams``) and the same autoscaler validation.
* serve-gpu.yaml's deployments can be scheduled on each of the three clusters: some node type
  offers every resource a replica asks for (custom resources included), and the node types'
  min/max workers hold the deployments' min/max replicas.
* Negative controls: unknown keys (in args, in a Serve config, in a cluster YAML) and a missing
  custom resource make the checks fail.
* Every key of these YAML files carries a comment (on its line or the line above).

The app builder itself is not imported: these tests check the files, not the application.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import typing
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from pydantic import BaseModel, ValidationError
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
from ray.autoscaler._private.util import validate_config as validate_autoscaler_config
from ray.autoscaler.sdk import fillout_defaults
from ray.serve.schema import DeploymentSchema, ServeDeploySchema

from dspark.platform.config import load_config
from dspark.platform.serving.config import DEPLOYMENT_NAMES, DeploymentSettings, ServeConfig
from dspark.platform.training.train_config import TrainConfig

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CLUSTERS = ROOT / "clusters"
APP_IMPORT_PATH = "dspark.platform.serving.app:app_builder"
SERVE_FILES = ("serve-local.yaml", "serve-gpu.yaml")
LAUNCHER_FILES = {"aws-serve.yaml": "aws", "gcp-serve.yaml": "gcp"}
RAYSERVICE_FILE = "kuberay-rayservice.yaml"
SERVE_IN_RAYSERVICE = f"{RAYSERVICE_FILE}:serveConfigV2"
SERVE_CONFIGS = (*SERVE_FILES, SERVE_IN_RAYSERVICE)
CLUSTER_FILES = (*LAUNCHER_FILES, RAYSERVICE_FILE)
NEW_FILES = (*SERVE_FILES, *CLUSTER_FILES)
# Deployment options the ServeConfig args own; a `deployments:` override must not set them too.
OWNED_BY_ARGS = {"num_replicas", "autoscaling_config", "ray_actor_options", "max_ongoing_requests"}


# ------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------


def _load(name: str) -> dict[str, Any]:
    return yaml.safe_load((CLUSTERS / name).read_text(encoding="utf-8"))


def _serve_config(label: str) -> dict[str, Any]:
    if label == SERVE_IN_RAYSERVICE:
        return yaml.safe_load(_load(RAYSERVICE_FILE)["spec"]["serveConfigV2"])
    return _load(label)


def _the_app(serve: dict[str, Any]) -> dict[str, Any]:
    apps = serve["applications"]
    assert len(apps) == 1, "one application: dspark"
    return apps[0]


def _args(label: str) -> ServeConfig:
    return ServeConfig.model_validate(_the_app(_serve_config(label))["args"])


def _ray_cluster_cr(rayservice: dict[str, Any]) -> dict[str, Any]:
    """The RayCluster KubeRay creates for the RayService (what the autoscaler reads)."""
    meta = rayservice["metadata"]
    return {
        "apiVersion": "ray.io/v1", "kind": "RayCluster",
        "metadata": {"name": meta["name"], "namespace": meta.get("namespace", "default")},
        "spec": rayservice["spec"]["rayClusterConfig"],
    }


def _autoscaler_config(name: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
    """The validated autoscaler config of a cluster file (raises what Ray raises)."""
    data = copy.deepcopy(_load(name) if data is None else data)
    if name == RAYSERVICE_FILE:
        return _derive_autoscaling_config_from_ray_cr(_ray_cluster_cr(data))  # validates too
    config = fillout_defaults(data)  # ray.autoscaler.sdk: the provider's defaults.yaml under ours
    validate_autoscaler_config(config)  # ray/autoscaler/ray-schema.json + Ray's consistency rules
    return config


# ------------------------------------------------------------------------------------------
# Checks shared by the tests and their negative controls
# ------------------------------------------------------------------------------------------


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation such as Optional[List[Model]] (None if none)."""
    stack = [annotation]
    while stack:
        t = stack.pop()
        if isinstance(t, type) and issubclass(t, BaseModel):
            return t
        stack.extend(typing.get_args(t))
    return None


def _keys_ray_ignores(model: type[BaseModel], data: Any, where: str = "") -> list[str]:
    """Keys of ``data`` that are no field of Ray's ``model`` (recursively). Ray's Serve schemas
    accept and drop unknown keys (forward compatibility), so a typo would pass silently."""
    if not isinstance(data, dict):
        return []
    fields = {(f.alias or n): f for n, f in model.model_fields.items()} | model.model_fields
    out = []
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            out.append(path)
            continue
        sub = _model_of(fields[key].annotation)
        if sub is None:
            continue  # free-form (args, runtime_env, ...) or a scalar
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            out += _keys_ray_ignores(sub, item, f"{path}[{i}]" if isinstance(value, list) else path)
    return out


def _deployments(cfg: ServeConfig) -> dict[str, DeploymentSettings]:
    """Serve deployment name -> its settings in ServeConfig."""
    out = {DEPLOYMENT_NAMES["ingress"]: cfg.ingress_deployment, DEPLOYMENT_NAMES["verifier"]: cfg.verifier}
    if cfg.topology == "disaggregated":
        out[DEPLOYMENT_NAMES["draft_worker"]] = cfg.draft_worker
    return out


def _demand(cfg: ServeConfig, name: str) -> dict[str, float]:
    """Resources one replica needs on one node: a verifier's ranks are per-rank amounts x TP (its
    ranks share a node); ``resources`` is read per rank as well, the conservative reading."""
    settings = _deployments(cfg)[name]
    ranks = cfg.tensor_parallel_size if name == DEPLOYMENT_NAMES["verifier"] else 1
    need = {"CPU": settings.num_cpus, "GPU": settings.num_gpus, **settings.resources}
    return {k: v * ranks for k, v in need.items() if v > 0}


def _per_node(resources: dict[str, float], demand: dict[str, float]) -> int:
    """Replicas of ``demand`` one node of ``resources`` holds."""
    return min(math.floor(resources.get(k, 0) / v + 1e-9) for k, v in demand.items())


def _scheduling_problems(cfg: ServeConfig, autoscaler: dict[str, Any]) -> list[str]:
    """Why serve-gpu.yaml's deployments could not reach their replica bounds on this cluster."""
    head = autoscaler["head_node_type"]
    problems = []
    for name, settings in _deployments(cfg).items():
        demand = _demand(cfg, name)
        lo, hi = (settings.autoscaling.min_replicas, settings.autoscaling.max_replicas) if settings.autoscaling \
            else (settings.num_replicas, settings.num_replicas)
        fits = {t: _per_node(nt["resources"], demand) for t, nt in autoscaler["available_node_types"].items()}
        fits = {t: n for t, n in fits.items() if n > 0}
        if not fits:
            problems.append(f"{name}: no node type offers {demand}")
            continue
        types = autoscaler["available_node_types"]
        at_most = sum(n * (1 if t == head else types[t]["max_workers"]) for t, n in fits.items())
        at_least = sum(n * (1 if t == head else types[t].get("min_workers", 0)) for t, n in fits.items())
        if at_most < hi:
            problems.append(f"{name}: max_replicas {hi} > {at_most} that fit on {sorted(fits)} at max_workers")
        if at_least < lo:
            problems.append(f"{name}: min_replicas {lo} > {at_least} that fit on {sorted(fits)} at min_workers")
    return problems


def _uncommented_keys(text: str) -> list[str]:
    """Mapping keys (found by PyYAML's scanner) with no comment on their line or the line above."""
    lines = text.splitlines()
    tokens = list(yaml.scan(text))
    missing = []
    for tok, nxt in zip(tokens, tokens[1:]):
        if not (isinstance(tok, yaml.KeyToken) and isinstance(nxt, yaml.ScalarToken)):
            continue
        n = nxt.start_mark.line
        after_key = lines[n][nxt.end_mark.column:]
        inline = any(after_key[i] == "#" and after_key[i - 1].isspace() for i in range(1, len(after_key)))
        above = n > 0 and lines[n - 1].lstrip().startswith("#")
        if not (inline or above):
            missing.append(f"line {n + 1}: {nxt.value}")
    return missing


# ------------------------------------------------------------------------------------------
# Serve configs
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("label", SERVE_CONFIGS)
def test_serve_config_validates_with_ray_serve_schema(label):
    ServeDeploySchema.model_validate(_serve_config(label))


@pytest.mark.parametrize("label", SERVE_CONFIGS)
def test_serve_config_has_no_keys_ray_would_ignore(label):
    assert _keys_ray_ignores(ServeDeploySchema, _serve_config(label)) == []


@pytest.mark.parametrize("label", SERVE_CONFIGS)
def test_serve_config_runs_the_dspark_app_with_valid_args(label):
    app = _the_app(_serve_config(label))
    assert app["import_path"] == APP_IMPORT_PATH
    cfg = ServeConfig.model_validate(app["args"])
    # what app_builder hands @serve.deployment is a valid Serve deployment config
    for name, settings in _deployments(cfg).items():
        DeploymentSchema.model_validate({"name": name, **settings.to_serve()})


@pytest.mark.parametrize("label", SERVE_CONFIGS)
def test_deployment_overrides_name_dspark_deployments_only(label):
    app = _the_app(_serve_config(label))
    known = set(_deployments(ServeConfig.model_validate(app["args"])))
    for override in app.get("deployments", []):
        assert override["name"] in known, f"{override['name']} is no deployment of this app ({sorted(known)})"
        both = OWNED_BY_ARGS & set(override)
        assert not both, f"{override['name']}: {sorted(both)} are set by args; one source only"


def test_local_config_fits_this_machine():
    cfg, serve = _args("serve-local.yaml"), _serve_config("serve-local.yaml")
    train = load_config(TrainConfig, CLUSTERS / "train-demo.yaml")
    assert cfg.target.path == "demo" and cfg.topology == "disaggregated"
    assert cfg.drafter_path == f"{train.output_dir}/{train.name}/drafter", "the drafter train-demo.yaml writes"
    deployments = _deployments(cfg)
    assert all(d.autoscaling is None and d.num_replicas == 1 and d.num_gpus == 0 for d in deployments.values())
    cpus = sum(_demand(cfg, name).get("CPU", 0) for name in deployments)
    assert cpus <= 1.0, f"{cpus} CPUs reserved: leave a core of 2 to the scheduler actor and Ray"
    assert serve["http_options"] == {"host": "127.0.0.1", "port": 8000}
    assert cfg.ingress.api_key_env is None and cfg.ingress.api_key_file is None  # hence loopback only


def test_gpu_config_shape():
    cfg = _args("serve-gpu.yaml")
    assert cfg.tensor_parallel_size == 2 and cfg.verifier.num_gpus == 1
    assert 0 < cfg.draft_worker.num_gpus < 1
    assert cfg.verifier.autoscaling and cfg.draft_worker.autoscaling
    assert cfg.ingress.api_key_env, "a cluster endpoint needs an API key"
    assert Path(cfg.target.path).is_absolute() and cfg.target.device.startswith("cuda")
    assert cfg.verifier.resources and cfg.draft_worker.resources
    assert not set(cfg.verifier.resources) & set(cfg.draft_worker.resources), "each pins to its own node type"


def test_rayservice_embeds_serve_gpu_yaml():
    assert _serve_config(SERVE_IN_RAYSERVICE) == _load("serve-gpu.yaml")


# ------------------------------------------------------------------------------------------
# Cluster files
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(LAUNCHER_FILES))
def test_cluster_launcher_yaml_validates_with_ray_autoscaler_schema(name):
    config = _autoscaler_config(name)
    assert config["provider"]["type"] == LAUNCHER_FILES[name]


def test_rayservice_cluster_validates_with_ray_kuberay_translation():
    rayservice = _load(RAYSERVICE_FILE)
    assert (rayservice["apiVersion"], rayservice["kind"]) == ("ray.io/v1", "RayService")
    assert rayservice["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    node_types = _autoscaler_config(RAYSERVICE_FILE)["available_node_types"]
    groups = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert set(node_types) == {"headgroup", *(g["groupName"] for g in groups)}


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_gpu_deployments_can_be_scheduled(name):
    assert _scheduling_problems(_args("serve-gpu.yaml"), _autoscaler_config(name)) == []


def test_cluster_files_use_one_ray_version():
    versions = {n: _load(n)["docker"]["image"].split(":")[1].split("-")[0] for n in LAUNCHER_FILES}
    ray_cluster = _load(RAYSERVICE_FILE)["spec"]["rayClusterConfig"]
    versions[RAYSERVICE_FILE] = ray_cluster["rayVersion"]
    assert len(set(versions.values())) == 1, versions
    images = {c["image"] for g in [ray_cluster["headGroupSpec"], *ray_cluster["workerGroupSpecs"]]
              for c in g["template"]["spec"]["containers"]}
    assert all(f"ray{ray_cluster['rayVersion']}" in image for image in images), images


# ------------------------------------------------------------------------------------------
# Negative controls: the checks above can fail
# ------------------------------------------------------------------------------------------


def test_unknown_args_keys_are_rejected():
    args = _the_app(_serve_config("serve-gpu.yaml"))["args"]
    with pytest.raises(ValidationError, match="verfier"):
        ServeConfig.model_validate({**args, "verfier": args["verifier"]})
    nested = copy.deepcopy(args)
    nested["verifier"]["num_gpu"] = 1
    with pytest.raises(ValidationError, match="num_gpu"):
        ServeConfig.model_validate(nested)


def test_unknown_serve_keys_pass_ray_but_not_this_check():
    serve = copy.deepcopy(_serve_config("serve-gpu.yaml"))
    serve["proxy_locaton"] = "HeadOnly"
    serve["applications"][0]["deployments"][0]["graceful_shutdown_timeout"] = 1
    ServeDeploySchema.model_validate(serve)  # Ray accepts and drops both
    assert sorted(_keys_ray_ignores(ServeDeploySchema, serve)) == [
        "applications[0].deployments[0].graceful_shutdown_timeout", "proxy_locaton"]


@pytest.mark.parametrize("name", sorted(LAUNCHER_FILES))
def test_unknown_cluster_keys_are_rejected(name):
    top = _load(name)
    top["max_worker"] = 6
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        _autoscaler_config(name, top)
    in_node_type = _load(name)
    next(iter(in_node_type["available_node_types"].values()))["min_worker"] = 1
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        _autoscaler_config(name, in_node_type)


def test_fractional_custom_resource_in_rayservice_is_rejected():
    rayservice = _load(RAYSERVICE_FILE)
    rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["rayStartParams"]["resources"] = \
        '"{\\"verifier_node\\": 0.5}"'
    with pytest.raises(AssertionError):  # Ray's parser: custom resource amounts are integers
        _autoscaler_config(RAYSERVICE_FILE, rayservice)


def test_a_missing_custom_resource_is_caught():
    aws = _load("aws-serve.yaml")
    verifier_type = next(t for t in aws["available_node_types"].values() if "verifier_node" in t["resources"])
    verifier_type["resources"]["gpu_node"] = verifier_type["resources"].pop("verifier_node")
    problems = _scheduling_problems(_args("serve-gpu.yaml"), _autoscaler_config("aws-serve.yaml", aws))
    assert problems and all(p.startswith(DEPLOYMENT_NAMES["verifier"]) for p in problems), problems


def test_too_few_workers_for_max_replicas_is_caught():
    gcp = _load("gcp-serve.yaml")
    next(t for t in gcp["available_node_types"].values() if "draft_node" in t["resources"])["max_workers"] = 1
    problems = _scheduling_problems(_args("serve-gpu.yaml"), _autoscaler_config("gcp-serve.yaml", gcp))
    assert problems and "max_replicas" in problems[0], problems


# ------------------------------------------------------------------------------------------
# Comments and registration
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NEW_FILES)
def test_every_key_is_commented(name):
    text = (CLUSTERS / name).read_text(encoding="utf-8")
    assert _uncommented_keys(text) == []
    if name == RAYSERVICE_FILE:  # the embedded Serve config is a string: check its own keys
        assert _uncommented_keys(yaml.safe_load(text)["spec"]["serveConfigV2"]) == []


def test_comment_check_finds_uncommented_keys():
    assert _uncommented_keys("# a\na: 1\nb: 2  # b\nc: {d: 3}\n") == ["line 4: c", "line 4: d"]
    assert _uncommented_keys("x: '#no'\n# y\ny: 1 # y\n") == ["line 1: x"]


def test_new_files_are_registered():
    spec = importlib.util.spec_from_file_location("_cluster_config_registry", HERE / "test_cluster_configs.py")
    registry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(registry)
    for name in SERVE_FILES:
        assert registry.SCHEMAS.get(name) is ServeDeploySchema, name
    for name in CLUSTER_FILES:
        assert registry.VALIDATED_ELSEWHERE.get(name) == Path(__file__).name, name
