"""Strict configuration schemas (pydantic v2) and the YAML loader.

Every config that crosses a process boundary is one of these models. The rules:

* ``extra="forbid"`` everywhere: an unknown key is an error, never silently ignored.
* Every field carries a description and, where it has one, a range.
* YAML files are data only. ``--set a.b=c`` overrides are applied to the raw mapping and the
  result is validated through the same schema as the file, so both paths share one set of rules.
* :func:`load_config` raises :class:`ConfigError` whose message names the file, the dotted
  field and the reason; the CLI prints it without a traceback. A key written twice in one YAML
  mapping is an error too (plain YAML would keep the last silently), and the values of unknown
  fields and of fields named like secrets (``api_key_*``) are never echoed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "ConfigError",
    "StrictModel",
    "TargetConfig",
    "DrafterConfig",
    "DemoTargetConfig",
    "GenerateConfig",
    "EngineConfig",
    "DemoTrainSettings",
    "DemoServeSettings",
    "DemoSweepSettings",
    "DemoConfig",
    "load_config",
    "validate_config",
    "apply_overrides",
    "parse_override",
    "config_hash",
    "yaml_load",
]

DType = Literal["float32", "bfloat16", "float16"]


class ConfigError(ValueError):
    """A configuration could not be read or validated. The message is meant for users."""


class StrictModel(BaseModel):
    """Base of every schema: unknown keys are errors, defaults are validated too."""

    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=True)


# ---------------------------------------------------------------------------------------------
# Target and drafter
# ---------------------------------------------------------------------------------------------


class TargetConfig(StrictModel):
    """The frozen target model, loaded from a local Hugging Face checkpoint directory."""

    path: str = Field(
        "demo",
        description="Checkpoint directory (config.json + *.safetensors + tokenizer), or 'demo' "
        "for the embedded demo target (built on first use).",
        min_length=1,
    )
    dtype: DType = Field("float32", description="Parameter and activation dtype.")
    device: str = Field("cpu", description="torch device string, e.g. 'cpu' or 'cuda:0'.")
    trust_remote_code: bool = Field(
        False, description="Allow the checkpoint's own Python code to run. Off unless you trust it."
    )
    layer_ids: tuple[int, ...] | None = Field(
        None,
        description="Decoder layers whose raw outputs feed the drafter (-1 = embedding output). "
        "The final layer is refused. None = evenly spread layers chosen from the model depth.",
    )

    @field_validator("layer_ids")
    @classmethod
    def _check_layer_ids(cls, v: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if v is None:
            return v
        if len(v) == 0:
            raise ValueError("must name at least one layer (or be null for the default)")
        if any(i < -1 for i in v):
            raise ValueError("layer ids must be >= -1 (-1 = embedding output)")
        if len(set(v)) != len(v):
            raise ValueError("layer ids must be distinct")
        return tuple(sorted(v))


class DrafterConfig(StrictModel):
    """Shape of a drafter; the fields follow DeepSpec's DSpark configs."""

    kind: Literal["dspark", "dflash", "eagle3", "mtp1"] = Field(
        "dspark", description="Drafter family (dflash = dspark with the Markov head off)."
    )
    block_size: int = Field(7, ge=1, le=64, description="γ: tokens drafted per block.")
    num_layers: int = Field(2, ge=1, le=64, description="Decoder layers in the draft backbone.")
    markov_rank: int = Field(
        64, ge=0, le=4096, description="Rank r of the Markov transition bias; 0 turns it off."
    )
    markov_head_type: Literal["vanilla", "gated", "rnn"] = Field(
        "vanilla", description="Sequential head variant."
    )
    confidence_head: bool = Field(True, description="Predict per-token survival probabilities.")
    confidence_with_markov: bool = Field(
        True, description="Feed the Markov embedding of the previous token to the confidence head "
        "(ignored when markov_rank is 0: there is no embedding to share)."
    )
    mask_token: str = Field("<|mask|>", min_length=1, description="Token filling block slots 2..γ.")

    @model_validator(mode="after")
    def _check_family(self) -> "DrafterConfig":
        if self.kind == "dflash" and self.markov_rank != 0:
            raise ValueError("kind 'dflash' is DSpark with the Markov head off: set markov_rank: 0")
        return self


# ---------------------------------------------------------------------------------------------
# The demo target (embedded default)
# ---------------------------------------------------------------------------------------------


class DemoTargetConfig(StrictModel):
    """The project's own small target: a byte-level BPE tokenizer and a Qwen3 (or Qwen3-MoE)
    causal LM trained on the standard library's Python sources. Everything here enters the
    cache key, so a change of any field builds a new target."""

    seed: int = Field(0, ge=0, description="Seed for the split-independent randomness (init, batches).")
    vocab_size: int = Field(8192, ge=300, le=262144, description="BPE vocabulary size.")
    hidden_size: int = Field(256, ge=16, le=8192, description="Model width d.")
    num_layers: int = Field(6, ge=2, le=128, description="Decoder layers.")
    num_heads: int = Field(4, ge=1, le=128, description="Query heads.")
    num_kv_heads: int = Field(2, ge=1, le=128, description="Key/value heads (GQA).")
    head_dim: int = Field(64, ge=8, le=512, description="Per-head width.")
    intermediate_size: int = Field(768, ge=16, description="SwiGLU width (dense layers).")
    max_position: int = Field(2048, ge=64, description="Longest context the model is configured for.")
    moe: bool = Field(False, description="Build the Qwen3-MoE variant instead of dense Qwen3.")
    num_experts: int = Field(8, ge=2, le=512, description="Routed experts (MoE only).")
    experts_per_token: int = Field(2, ge=1, le=64, description="Top-k routing (MoE only).")
    moe_intermediate_size: int = Field(256, ge=8, description="Per-expert SwiGLU width (MoE only).")
    seq_len: int = Field(256, ge=16, le=8192, description="Training sequence length.")
    batch_size: int = Field(8, ge=1, le=1024, description="Sequences per optimiser step.")
    steps: int = Field(480, ge=1, description="Optimiser steps.")
    lr: float = Field(2e-3, gt=0, lt=1, description="Peak AdamW learning rate.")
    warmup_steps: int = Field(30, ge=0, description="Linear warm-up steps before cosine decay.")
    weight_decay: float = Field(0.01, ge=0, lt=1, description="AdamW weight decay.")
    val_batches: int = Field(24, ge=1, description="Validation batches for the reported loss.")
    max_corpus_mb: float = Field(
        64.0, gt=0, description="Cap on corpus bytes read (files in sorted order)."
    )
    split_fractions: tuple[float, float, float] = Field(
        (0.90, 0.05, 0.05), description="train/validation/test shares, by a hash of each file's path."
    )
    threads: int = Field(
        0, ge=0, le=512, description="torch threads while training (0 = all cores). Results are "
        "deterministic for a given seed and thread count."
    )

    @field_validator("split_fractions")
    @classmethod
    def _check_split(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(x <= 0 for x in v) or abs(sum(v) - 1.0) > 1e-6:
            raise ValueError("three positive shares that sum to 1")
        return v

    @model_validator(mode="after")
    def _check_heads(self) -> "DemoTargetConfig":
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        if self.moe and self.experts_per_token > self.num_experts:
            raise ValueError("experts_per_token must not exceed num_experts")
        if self.warmup_steps >= self.steps:
            raise ValueError("warmup_steps must be smaller than steps")
        return self


class GenerateConfig(StrictModel):
    """One completion from the target (plain decoding)."""

    prompt: str = Field(
        "def fibonacci(n):\n", description="Prompt text.", min_length=1
    )
    max_new_tokens: int = Field(128, ge=1, le=65536, description="Tokens to generate.")
    temperature: float = Field(0.0, ge=0.0, le=10.0, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    top_k: int = Field(0, ge=0, description="Top-k sampling (0 = off).")
    seed: int = Field(0, ge=0, description="Sampling seed.")


class EngineConfig(StrictModel):
    """The verifier engine's batching and memory limits."""

    max_batch_size: int = Field(16, ge=1, le=4096, description="Requests decoded together (KV slots).")
    max_model_len: int | None = Field(
        None, ge=2, description="Prompt + generated tokens per request; None = the target's position limit."
    )
    prefill_chunk: int = Field(256, ge=1, le=65536, description="Prompt tokens per prefill forward.")
    seed: int = Field(0, ge=0, description="Seeds requests that bring no seed of their own.")
    reproducible_seeds: bool = Field(
        True, description="Sampled requests with a seed get the target's own samples for that seed (position-keyed "
        "noise, verified by matching): reproducible under any load, equal to plain decoding with the seed, at a "
        "somewhat lower acceptance (`dspark bench sampling`). False: chain rejection sampling for every sampled "
        "request (most acceptance; a seeded request then repeats only while its verify lengths repeat).",
    )


class DemoTrainSettings(StrictModel):
    """Where `dspark demo` gets its drafter: trained by a recipe (cached under a key of the recipe
    and the target), or a given directory."""

    recipe: str = Field(
        "clusters/train-demo.yaml", min_length=1,
        description="A `dspark train` YAML (schema `train`); its data.generate_config says how the data is "
        "made. The demo trains it against this config's target (its own target section is replaced).",
    )
    drafter_path: str | None = Field(
        None, min_length=1, description="A trained drafter directory to serve instead (no data, no training)."
    )


class DemoServeSettings(StrictModel):
    """The Serve app `dspark demo` starts on a local Ray instance."""

    config: str = Field(
        "clusters/serve-local.yaml", min_length=1,
        description="A Serve YAML whose application runs dspark's app_builder: its deployments, policy and "
        "scheduler settings are used; target, demo_target, engine and drafter come from this config.",
    )
    topologies: tuple[Literal["disaggregated", "colocated"], ...] = Field(
        ("disaggregated",), min_length=1,
        description="Speculative variants started beside the plain (no drafter) baseline, each under its own "
        "route prefix (/disaggregated/v1, /colocated/v1, /plain/v1).",
    )
    port: int = Field(8000, ge=1, le=65535, description="HTTP port on 127.0.0.1.")

    @field_validator("topologies")
    @classmethod
    def _distinct(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(v)) != len(v):
            raise ValueError("topologies must be distinct")
        return v


class DemoSweepSettings(StrictModel):
    """The concurrency sweep through the openai client (greedy, end-of-text ignored)."""

    concurrency: tuple[int, ...] = Field((1, 4, 16), min_length=1, description="Concurrent streams, one run each.")
    max_tokens: int = Field(32, ge=1, le=4096, description="New tokens per request.")
    min_requests: int = Field(
        4, ge=1, le=100_000, description="Requests per endpoint and concurrency C: max(2·C, this)."
    )

    @field_validator("concurrency")
    @classmethod
    def _positive(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(c < 1 for c in v) or len(set(v)) != len(v):
            raise ValueError("distinct positive integers")
        return tuple(sorted(v))


class DemoConfig(StrictModel):
    """What `dspark demo` runs on the embedded default (also read by `generate`, `target
    build-demo`, `bench engine` and `bench policies`)."""

    target: TargetConfig = Field(default_factory=TargetConfig, description="The target model.")
    demo_target: DemoTargetConfig = Field(
        default_factory=DemoTargetConfig, description="How the demo target is built when target.path is 'demo'."
    )
    generate: GenerateConfig = Field(
        default_factory=GenerateConfig, description="The completion `generate` prints; the demo sends it to the "
        "served endpoints."
    )
    engine: EngineConfig = Field(default_factory=EngineConfig, description="The verifier engine (the demo serves with it).")
    drafter: DrafterConfig = Field(
        default_factory=DrafterConfig, description="Shape of the untrained drafters of `bench engine` / `bench "
        "policies` (the demo's drafter is shaped by its training recipe)."
    )
    train: DemoTrainSettings = Field(default_factory=DemoTrainSettings, description="The demo's drafter.")
    serve: DemoServeSettings = Field(default_factory=DemoServeSettings, description="The demo's Serve app.")
    sweep: DemoSweepSettings = Field(default_factory=DemoSweepSettings, description="The demo's benchmark.")
    output_dir: str = Field(
        "artifacts/demo", min_length=1, description="Where the demo writes its plots and summary (created)."
    )


# ---------------------------------------------------------------------------------------------
# Loading, overrides, errors
# ---------------------------------------------------------------------------------------------

M = TypeVar("M", bound=BaseModel)


#: fields whose value may be a secret written in the wrong place: their values are never echoed
_SECRET_FIELD = re.compile(r"(^|_)(api_?key|secret|password|credentials?|(auth|access|bearer)_?token)(_|$)", re.I)


def _format_errors(err: ValidationError, source: str) -> str:
    """One line per error: the dotted field, the reason and the value given. The values of
    unknown fields and of fields named like secrets are never shown (a key pasted into the
    wrong place must not reach a terminal or a log)."""
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see the schema with `dspark config schema`)"
        got = e.get("input")
        secret = any(isinstance(p, str) and _SECRET_FIELD.search(p) for p in e["loc"])
        got_s = "" if e["type"] in ("extra_forbidden", "missing") or secret else f" (got {got!r})"
        if len(got_s) > 80:
            got_s = got_s[:77] + "...)"
        lines.append(f"  {loc}: {msg}{got_s}")
    return "\n".join(lines)


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key written twice in one mapping (plain YAML keeps the
    last one silently, so a half-edited file would drop a setting without a word). Keys merged
    in with ``<<:`` may still be overridden."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    if key in first:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"key {key!r} is given twice (first at line {first[key] + 1})",
                            key_node.start_mark)
                except TypeError:  # an unhashable key: the base loader reports it
                    continue
                first[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _UniqueKeyLoader.construct_mapping)


def yaml_load(text: str) -> Any:
    """YAML as data only (safe loading), with duplicate keys refused; errors are ``yaml.YAMLError``."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"a.b=3"`` -> (["a", "b"], 3). The value is parsed as YAML, so ``true``, ``1e-3``,
    ``[1, 2]`` and ``null`` get their natural types; quote it to force a string."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.path=value")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".")]
    if not key.strip() or any(not p for p in path):
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({exc.problem})") from None
    return path, value


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with dotted overrides applied (intermediate maps created)."""
    out: dict[str, Any] = copy.deepcopy(dict(data))
    for item in overrides:
        path, value = parse_override(item)
        node: Any = out
        for i, part in enumerate(path[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            elif not isinstance(nxt, dict):
                raise ConfigError(
                    f"override {item!r}: {'.'.join(path[: i + 1])} is a value, not a section"
                )
            node = nxt
        node[path[-1]] = value
    return out


def validate_config(schema: type[M], data: Any, source: str = "<config>") -> M:
    """Validate a mapping through ``schema``; raise :class:`ConfigError` with readable reasons."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"invalid configuration in {source}: expected a mapping at the top, got {type(data).__name__}")
    try:
        return schema.model_validate(dict(data))
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_config(schema: type[M], path: str | Path | None = None, overrides: Sequence[str] = ()) -> M:
    """Read YAML at ``path`` (or start from defaults), apply ``--set`` overrides, validate."""
    data: Any = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {p}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config file {p}: {exc}") from None
        try:
            data = yaml_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"{p}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"invalid configuration in {p}: expected a mapping at the top, got {type(data).__name__}")
    if overrides:
        data = apply_overrides(data, overrides)
        source += " + --set overrides"
    return validate_config(schema, data, source)


def config_hash(model: BaseModel, *extra: str, length: int = 12) -> str:
    """Stable short hash of a config (plus extra strings), used as a cache key."""
    payload = json.dumps(model.model_dump(mode="json"), sort_keys=True) + "|" + "|".join(extra)
    return hashlib.sha256(payload.encode()).hexdigest()[:length]
