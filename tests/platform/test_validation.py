"""Everything read from disk is validated with a clear error: target checkpoints (damaged
safetensors, missing weights, unreadable config or tokenizer, pickle weights that must never be
unpickled), drafter checkpoints (damaged files, a checkpoint of another target) and YAML configs
(unknown keys named with the file, duplicate keys, secrets never echoed). The CLI turns these into
one message and a non-zero exit status, without a traceback."""

from __future__ import annotations

import json
import pickle
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch

from dspark.drafter_service.checkpoint import CONFIG_NAME, WEIGHTS_NAME, DrafterLoadError, load_drafter, save_drafter
from dspark.platform.config import ConfigError, DemoConfig, TargetConfig, load_config, validate_config, yaml_load
from dspark.platform.target.loading import TargetLoadError, load_target

CODE = Path(__file__).resolve().parents[2]
CODE_DIRS = ("platform", "drafter_service", "verifier_service", "scheduler", "kernels")


# ------------------------------------------------------------------------------ damaged files
def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[:-64])


def _garbage_header(f: Path) -> None:
    f.write_bytes(struct.pack("<Q", 32) + b"this is not the JSON header!!!!!" + b"\0" * 64)


def _huge_header(f: Path) -> None:  # a header length far beyond the file (and any sane limit)
    f.write_bytes(struct.pack("<Q", 2**62) + b"{}")


def _empty(f: Path) -> None:
    f.write_bytes(b"")


DAMAGE = {"truncated": _truncate, "garbage header": _garbage_header, "huge header": _huge_header, "empty": _empty}


@pytest.fixture
def target_copy(tiny_checkpoints, tmp_path):
    dst = tmp_path / "target"
    shutil.copytree(tiny_checkpoints["qwen3"], dst)
    return dst


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_target_safetensors(target_copy, damage):
    DAMAGE[damage](next(target_copy.glob("*.safetensors")))
    with pytest.raises(TargetLoadError, match=re.escape(str(target_copy)) + ".*damaged or incomplete"):
        load_target(TargetConfig(path=str(target_copy)), with_tokenizer=False)


def test_target_missing_a_weight_is_refused_not_randomly_filled(target_copy):
    from safetensors.torch import load_file, save_file

    f = next(target_copy.glob("*.safetensors"))
    tensors = load_file(str(f))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(TargetLoadError, match=r"lacks 1 weight.*model\.layers\.1\.mlp\.up_proj\.weight.*random"):
        load_target(TargetConfig(path=str(target_copy)), with_tokenizer=False)


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00\x01", b"[1, 2]", "layers"])
def test_unreadable_target_config(target_copy, content):
    cfg = target_copy / "config.json"
    if content == "layers":  # valid JSON whose fields contradict each other
        data = json.loads(cfg.read_text())
        cfg.write_text(json.dumps({**data, "num_hidden_layers": data["num_hidden_layers"] + 2}))
    else:
        cfg.write_bytes(content)
    with pytest.raises(TargetLoadError, match=f"cannot read the model config.*{re.escape(str(target_copy))}"):
        load_target(TargetConfig(path=str(target_copy)), with_tokenizer=False)


@pytest.mark.parametrize("content", ["{nope", '{"version": "1.0", "model": {"type": "BPE"}}', "[1, 2]"])
def test_damaged_tokenizer(tiny_demo_target, tmp_path, content):
    dst = tmp_path / "demo"
    shutil.copytree(tiny_demo_target.path, dst)
    (dst / "tokenizer.json").write_text(content)
    with pytest.raises(TargetLoadError, match=f"cannot load the tokenizer from {re.escape(str(dst))}"):
        load_target(TargetConfig(path=str(dst)))


# ------------------------------------------------------------------------------ no pickle, ever
class _Bomb:
    """Unpickling this creates ``marker``: proof that a pickle was executed."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickle_bomb(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"model.norm.weight": _Bomb(marker)}))


def test_pickle_only_target_is_refused_and_never_unpickled(target_copy, tmp_path):
    marker = tmp_path / "executed"
    next(target_copy.glob("*.safetensors")).unlink()
    _pickle_bomb(target_copy / "pytorch_model.bin", marker)
    with pytest.raises(TargetLoadError, match="pickle weights are never loaded"):
        load_target(TargetConfig(path=str(target_copy)), with_tokenizer=False)
    assert not marker.exists()


def test_pickle_beside_safetensors_is_ignored(target_copy, tiny_checkpoints, tmp_path):
    marker = tmp_path / "executed"
    _pickle_bomb(target_copy / "pytorch_model.bin", marker)
    t = load_target(TargetConfig(path=str(target_copy)), with_tokenizer=False)
    ref = load_target(TargetConfig(path=str(tiny_checkpoints["qwen3"])), with_tokenizer=False)
    assert torch.equal(t.lm_head.weight, ref.lm_head.weight)
    assert not marker.exists()


def test_shard_index_naming_a_pickle_is_refused_and_never_unpickled(target_copy, tmp_path):
    """A safetensors shard index that points at a pickle file: the file is read as safetensors
    (and fails), never unpickled."""
    from safetensors.torch import load_file

    marker = tmp_path / "executed"
    weights = next(target_copy.glob("*.safetensors"))
    names = sorted(load_file(str(weights)))
    weights.rename(target_copy / "model-00001-of-00002.safetensors")
    _pickle_bomb(target_copy / "model-00002-of-00002.bin", marker)
    index = {n: "model-00001-of-00002.safetensors" for n in names}
    index["model.norm.weight"] = "model-00002-of-00002.bin"
    (target_copy / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    with pytest.raises(TargetLoadError):
        load_target(TargetConfig(path=str(target_copy)), with_tokenizer=False)
    assert not marker.exists()


def test_no_code_unpickles_weights():
    """torch.load / pickle.load / numpy's allow_pickle appear nowhere in the code: weights are
    safetensors, traces .npz without pickle. (DeepSpeed's own resume path is documented in
    training/trainer.py: trusted local state.)"""
    pattern = re.compile(r"torch\.load\(|pickle\.loads?\(|allow_pickle\s*=\s*True|weights_only\s*=\s*False")
    hits = [f"{p.relative_to(CODE)}:{i}" for d in CODE_DIRS for p in (CODE / d).rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1)
            if pattern.search(line) and not line.lstrip().startswith("#")]
    assert not hits, hits


# ------------------------------------------------------------------------------ drafter checkpoints
@pytest.fixture(scope="module")
def qwen3_target(tiny_checkpoints):
    return load_target(TargetConfig(path=str(tiny_checkpoints["qwen3"])), with_tokenizer=False)


@pytest.fixture
def drafter_dir(qwen3_target, tmp_path):
    from dspark.drafter_service.registry import build_drafter
    from dspark.platform.config import DrafterConfig

    torch.manual_seed(0)
    d = build_drafter(DrafterConfig(kind="dspark", block_size=4, num_layers=1), qwen3_target, mask_token_id=5)
    return save_drafter(d, tmp_path / "drafter")


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_drafter_safetensors(drafter_dir, qwen3_target, damage):
    DAMAGE[damage](drafter_dir / WEIGHTS_NAME)
    with pytest.raises(DrafterLoadError, match=re.escape(str(drafter_dir / WEIGHTS_NAME)) + ".*damaged or incomplete"):
        load_drafter(drafter_dir, qwen3_target)


def _edit_meta(d: Path, fn) -> None:
    meta = json.loads((d / CONFIG_NAME).read_text())
    fn(meta)
    (d / CONFIG_NAME).write_text(json.dumps(meta))


@pytest.mark.parametrize("damage,needle", [
    (lambda d: (d / CONFIG_NAME).write_bytes(b"\xff\xfe garbage"), "not valid JSON"),
    (lambda d: (d / CONFIG_NAME).write_text("{truncated"), "not valid JSON"),
    (lambda d: (d / CONFIG_NAME).write_text("[1, 2]"), "expected a JSON object"),
    (lambda d: _edit_meta(d, lambda m: m.pop("target")), "'target' must be a JSON object"),
    (lambda d: _edit_meta(d, lambda m: m.__setitem__("dims", "x")), "'dims' must be a JSON object"),
    (lambda d: _edit_meta(d, lambda m: m["target"].__setitem__("mask_token_id", "five")), "target.mask_token_id"),
    (lambda d: _edit_meta(d, lambda m: m["target"].__setitem__("layer_ids", None)), "target.layer_ids"),
    (lambda d: _edit_meta(d, lambda m: m["drafter"].__setitem__("block_sise", 4)), "block_sise: unknown field"),
], ids=["binary", "truncated", "list", "no target", "dims", "mask id", "layer ids", "unknown key"])
def test_damaged_drafter_config(drafter_dir, qwen3_target, damage, needle):
    damage(drafter_dir)
    with pytest.raises(DrafterLoadError, match=re.escape(str(drafter_dir / CONFIG_NAME)) + r"[\s\S]*" + re.escape(needle)):
        load_drafter(drafter_dir, qwen3_target)


@pytest.mark.parametrize("what", ["nan", "int"])
def test_drafter_weights_must_be_finite_floats(drafter_dir, qwen3_target, what):
    from safetensors.torch import load_file, save_file

    f = drafter_dir / WEIGHTS_NAME
    t = load_file(str(f))
    k = sorted(t)[0]
    t[k] = torch.full_like(t[k], float("nan")) if what == "nan" else t[k].to(torch.int64)
    save_file(t, str(f))
    with pytest.raises(DrafterLoadError, match=re.escape(k) + (".*NaN or infinite" if what == "nan" else ".*int64")):
        load_drafter(drafter_dir, qwen3_target)


@pytest.mark.parametrize("change,field", [
    (dict(hidden_size=96), "hidden_size"),
    (dict(vocab_size=384), "vocab_size"),
    (dict(num_hidden_layers=6), "num_hidden_layers"),
])
def test_drafter_of_another_target_is_refused(drafter_dir, change, field):
    """The checkpoint records the identity of its target (drafter_config.json ``target``)."""
    from transformers import AutoModelForCausalLM

    from _helpers import tiny_hf_config
    from dspark.platform.target.loading import FrozenTarget

    cfg = tiny_hf_config("qwen3", vocab_size=change.get("vocab_size", 320), num_layers=change.get("num_hidden_layers", 4))
    if "hidden_size" in change:
        cfg.hidden_size = change["hidden_size"]
    other = FrozenTarget(AutoModelForCausalLM.from_config(cfg))
    saved = json.loads((drafter_dir / CONFIG_NAME).read_text())["target"][field]
    with pytest.raises(DrafterLoadError, match=rf"built for a target with {field}={saved}, .* has {field}={change[field]}"):
        load_drafter(drafter_dir, other)


# ------------------------------------------------------------------------------ configs
def _schemas():
    from dspark.platform.cli import SCHEMAS, _schema

    return {name: _schema(name) for name in SCHEMAS}


def test_every_model_forbids_unknown_keys():
    """Every pydantic model of the code derives from the strict bases (``extra="forbid"``), and
    nothing loosens that again."""
    bases = {"StrictModel", "_Strict"}
    loose = re.compile(r"extra\s*=\s*[\"'](allow|ignore)")
    found = []
    for d in CODE_DIRS:
        for p in (CODE / d).rglob("*.py"):
            text = p.read_text()
            for m in re.finditer(r"^class (\w+)\(([^)]*)\):", text, re.M):
                if "BaseModel" in m.group(2) and m.group(1) not in bases:
                    found.append(f"{p.relative_to(CODE)}: {m.group(1)} derives from BaseModel directly")
            if loose.search(text):
                found.append(f"{p.relative_to(CODE)} sets extra to allow/ignore")
    assert not found, found
    from dspark.platform.serving.config import ServeConfig
    from dspark.platform.serving.openai_api import ChatBody, CompletionBody

    for schema in [*_schemas().values(), ServeConfig, CompletionBody, ChatBody]:
        assert schema.model_config.get("extra") == "forbid", schema


@pytest.mark.parametrize("name", ["demo", "train", "data", "eval", "target", "drafter", "demo-target", "generate"])
def test_unknown_key_in_any_config_file_names_the_key_and_the_file(name, tmp_path):
    from pydantic import BaseModel

    schema = _schemas()[name]
    data: dict = {"no_such_key": 1}
    for field, info in schema.model_fields.items():  # and one level down, in the first section
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            data[field] = {"nested_typo": 2}
            break
    f = tmp_path / f"{name}.yaml"
    f.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as err:
        load_config(schema, f)
    msg = str(err.value)
    assert str(f) in msg and "no_such_key: unknown field" in msg, msg
    if len(data) > 1:
        assert re.search(r"\w+\.nested_typo: unknown field", msg), msg


def test_duplicate_yaml_key_is_an_error(tmp_path):
    f = tmp_path / "dup.yaml"
    f.write_text("generate:\n  max_new_tokens: 8\n  temperature: 0.5\n  max_new_tokens: 16\n")
    with pytest.raises(ConfigError, match=f"{re.escape(str(f))}.*line 4.*'max_new_tokens' is given twice"):
        load_config(DemoConfig, f)
    # keys merged in from an anchor may still be overridden
    assert yaml_load("a: &x {p: 1, q: 2}\nb:\n  <<: *x\n  p: 3\n") == {"a": {"p": 1, "q": 2}, "b": {"p": 3, "q": 2}}


def test_cluster_configs_have_no_duplicate_keys():
    for f in sorted((CODE / "clusters").glob("*.yaml")):
        text = f.read_text()
        if "\n---" not in text:
            yaml_load(text)


def test_config_errors_never_echo_secrets(tmp_path):
    from dspark.platform.serving.cli import load_serve_file
    from dspark.platform.serving.config import ServeConfig

    secret = "sk-live-0123456789abcdef"
    app = {"name": "x", "import_path": "dspark.platform.serving.app:app_builder",
           "args": {"ingress": {"api_key": secret, "api_key_env": secret}, "topologyy": "colocated"}}
    f = tmp_path / "serve.yaml"
    f.write_text(json.dumps({"applications": [app]}))
    with pytest.raises(ConfigError) as err:
        load_serve_file(str(f))
    msg = str(err.value)
    assert str(f) in msg and "topologyy: unknown field" in msg and "ingress.api_key: unknown field" in msg
    assert "ingress.api_key_env" in msg and "NAME of an environment variable" in msg
    assert secret not in msg
    with pytest.raises(ConfigError, match="not both"):
        validate_config(ServeConfig, {"ingress": {"api_key_env": "K", "api_key_file": "/k"}})


def test_serve_config_holds_no_secret():
    """The config names where the key lives (a file, a variable), so dumping or logging a
    ServeConfig never reveals it."""
    from pydantic import BaseModel

    from dspark.platform.serving.config import ServeConfig

    def fields(model, prefix=""):
        for name, info in model.model_fields.items():
            yield prefix + name
            if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
                yield from fields(info.annotation, prefix + name + ".")

    named = re.compile(r"(^|_)(api_?key|key|secret|password|credentials?|(auth|access|bearer)_?token)(_|$)")
    secretish = [f for f in fields(ServeConfig) if named.search(f.rsplit(".", 1)[-1])
                 and not f.endswith(("api_key_env", "api_key_file"))]
    assert not secretish, secretish


# ------------------------------------------------------------------------------ the CLI
@pytest.mark.parametrize("command,content", [
    ("serve", {"applications": [{"name": "dspark", "route_prefix": "/",
                                 "import_path": "dspark.platform.serving.app:app_builder",
                                 "args": {"model_name": "m", "ingress": {"max_body_byte": 4096}}}]}),
    ("train", {"name": "typo", "data": {}, "optimm": {"lr": 0.001}}),
    ("data generate", {"output_dir": "x", "answer_samplng": {}}),
])
def test_cli_refuses_unknown_keys_with_one_message(tmp_path, command, content):
    """``dspark serve`` / ``train`` / ``data generate`` exit with status 2 and a message naming
    the key and the file, before starting anything (no Ray, no target)."""
    import os
    import subprocess
    import sys

    f = tmp_path / "config.yaml"
    f.write_text(json.dumps(content))
    dspark = shutil.which("dspark", path=str(Path(sys.executable).parent)) or "dspark"
    r = subprocess.run([dspark, *command.split(), str(f)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "RAY_ADDRESS": ""}, cwd=tmp_path)
    key = {"serve": "ingress.max_body_byte", "train": "optimm", "data generate": "answer_samplng"}[command]
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and str(f) in r.stderr and f"{key}: unknown field" in r.stderr, r.stderr
