"""Choosing a verify-length policy by name: strict configs and a factory. No torch.

In YAML (one of, chosen by ``name``; unknown keys are errors)::

    policy: {name: prefix, sps_profile: /path/to/sps.json}   # or sps_profile: h100_like
    policy: {name: async, lag: 2}                           # SPS from the engine's measurement
    policy: {name: threshold, threshold: 0.4}
    policy: {name: fixed, length: 4}
    policy: {name: off}

``prefix`` and ``async`` need an SPS curve: the file (or built-in synthetic curve) named by
``sps_profile``, or else the profile the caller passes (normally measured at replica start-up by
``dspark.verifier_service.profiling.measure_sps``).
"""

from __future__ import annotations

from typing import Annotated, Callable, Literal, Union

from pydantic import Field, TypeAdapter

from dspark.platform.config import StrictModel
from dspark.scheduler.async_prefix import AsyncPrefixPolicy
from dspark.scheduler.policies import FixedPolicy, OffPolicy, Policy, ThresholdPolicy
from dspark.scheduler.prefix import PrefixPolicy
from dspark.scheduler.sps import SPSProfile, StepCurve, h100_like

__all__ = [
    "OffPolicyConfig",
    "FixedPolicyConfig",
    "ThresholdPolicyConfig",
    "PrefixPolicyConfig",
    "AsyncPolicyConfig",
    "PolicyConfig",
    "POLICY_NAMES",
    "parse_policy_config",
    "build_policy",
    "build_policy_from_config",
    "resolve_sps",
]

BUILTIN_CURVES: dict[str, Callable[[], SPSProfile]] = {"h100_like": h100_like}


class OffPolicyConfig(StrictModel):
    """Plain decoding: verify no drafts."""

    name: Literal["off"] = "off"


class FixedPolicyConfig(StrictModel):
    """Verify the first ``length`` drafts of every request."""

    name: Literal["fixed"] = "fixed"
    length: int | None = Field(None, ge=0, description="Drafts verified per request (None = the whole block).")


class ThresholdPolicyConfig(StrictModel):
    """Verify up to the first draft whose conditional confidence is below ``threshold``."""

    name: Literal["threshold"] = "threshold"
    threshold: float = Field(0.5, ge=0.0, le=1.0, description="Minimum conditional confidence c_k.")


class _SPSPolicyConfig(StrictModel):
    sps_profile: str | None = Field(
        None, min_length=1, description="SPS profile JSON path, or 'h100_like' (synthetic); None = "
        "the profile measured by the engine.")
    prior: float = Field(0.7, ge=0.0, le=1.0, description="Per-token acceptance assumed when the drafter "
                         "has no confidence head.")
    refresh: int = Field(64, ge=0, description="After this many steps in a row without drafting (drafting did not "
                         "pay), draft once to refresh the survival statistics (0 = never).")


class PrefixPolicyConfig(_SPSPolicyConfig):
    """Algorithm 1: greedy admission by prefix survival maximising τ·SPS(B), with the early break."""

    name: Literal["prefix"] = "prefix"


class AsyncPolicyConfig(_SPSPolicyConfig):
    """Production variant: capacity from confidences ``lag`` steps old, filled by current survival."""

    name: Literal["async"] = "async"
    lag: int = Field(2, ge=1, le=64, description="Age in steps of the confidences that size the step (>= 1).")


PolicyConfig = Annotated[
    Union[OffPolicyConfig, FixedPolicyConfig, ThresholdPolicyConfig, PrefixPolicyConfig, AsyncPolicyConfig],
    Field(discriminator="name"),
]
POLICY_NAMES = ("off", "fixed", "threshold", "prefix", "async")
_ADAPTER = TypeAdapter(PolicyConfig)


def parse_policy_config(data: dict) -> PolicyConfig:
    """Validate a mapping such as ``{"name": "async", "lag": 2}`` (pydantic errors on bad input)."""
    return _ADAPTER.validate_python(data)


def resolve_sps(name_or_path: str) -> SPSProfile:
    """'h100_like' -> the synthetic curve; anything else is read as an SPS profile JSON file."""
    if name_or_path in BUILTIN_CURVES:
        return BUILTIN_CURVES[name_or_path]()
    return SPSProfile.load(name_or_path)


def build_policy_from_config(cfg: PolicyConfig, *, sps: SPSProfile | StepCurve | None = None) -> Policy:
    """A policy object from a validated config; ``sps`` is used when the config names no profile."""
    if isinstance(cfg, OffPolicyConfig):
        return OffPolicy()
    if isinstance(cfg, FixedPolicyConfig):
        return FixedPolicy(cfg.length)
    if isinstance(cfg, ThresholdPolicyConfig):
        return ThresholdPolicy(cfg.threshold)
    curve = resolve_sps(cfg.sps_profile) if cfg.sps_profile is not None else sps
    if curve is None:
        raise ValueError(f"policy {cfg.name!r} needs an SPS profile: set sps_profile or pass a measured one")
    if isinstance(cfg, PrefixPolicyConfig):
        return PrefixPolicy(curve, prior=cfg.prior, refresh=cfg.refresh)
    return AsyncPrefixPolicy(curve, lag=cfg.lag, prior=cfg.prior, refresh=cfg.refresh)


def build_policy(name: str, *, sps: SPSProfile | StepCurve | None = None, **params) -> Policy:
    """``build_policy("async", sps=profile, lag=2)``: parameters validated by the strict config."""
    if name not in POLICY_NAMES:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")
    return build_policy_from_config(parse_policy_config({"name": name, **params}), sps=sps)
