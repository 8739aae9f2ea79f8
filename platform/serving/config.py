"""The serving config: one strict schema for the ``args`` of the Serve application.

``dspark serve serve.yaml`` and ``serve deploy serve.yaml`` read the same file, a Ray Serve config
whose application imports ``dspark.platform.serving.app:app_builder`` and passes these fields as
``args`` (YAML as data only; unknown keys are errors)::

    applications:
      - name: dspark
        route_prefix: /
        import_path: dspark.platform.serving.app:app_builder
        args:
          model_name: dspark-demo
          drafter_path: artifacts/runs/dspark-demo/drafter
          topology: disaggregated
          verifier: {num_replicas: 1, num_cpus: 1}
          draft_worker: {autoscaling: {min_replicas: 1, max_replicas: 4}}
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from dspark.platform.config import DemoTargetConfig, EngineConfig, StrictModel, TargetConfig

__all__ = ["AutoscalingSettings", "DeploymentSettings", "IngressSettings", "ServeConfig", "DEPLOYMENT_NAMES"]

# Deployment names inside the app (a Serve config's ``deployments:`` list overrides them by name).
DEPLOYMENT_NAMES = {"ingress": "Ingress", "verifier": "VerifierReplica", "draft_worker": "DraftWorker"}


class AutoscalingSettings(StrictModel):
    """The subset of Ray Serve's ``autoscaling_config`` we set (Serve validates it again)."""

    min_replicas: int = Field(1, ge=0, description="Fewest replicas (0 = scale to zero when idle).")
    max_replicas: int = Field(1, ge=1, description="Most replicas.")
    initial_replicas: int | None = Field(None, ge=0, description="Replicas at start (default: min_replicas).")
    target_ongoing_requests: float = Field(
        2.0, gt=0, description="Ongoing requests per replica Serve scales to keep (queued + running).")
    upscale_delay_s: float = Field(10.0, ge=0, description="Seconds a higher demand must last before scaling up.")
    downscale_delay_s: float = Field(300.0, ge=0, description="Seconds a lower demand must last before scaling down.")

    @model_validator(mode="after")
    def _bounds(self) -> "AutoscalingSettings":
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) < min_replicas ({self.min_replicas})")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError("initial_replicas must lie in [min_replicas, max_replicas]")
        return self

    def to_serve(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class DeploymentSettings(StrictModel):
    """Replicas and resources of one deployment."""

    num_replicas: int = Field(1, ge=1, description="Fixed replica count (ignored when autoscaling is set).")
    autoscaling: AutoscalingSettings | None = Field(None, description="Serve autoscaling; None = fixed num_replicas.")
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per replica (per rank for a TP verifier).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per replica (per rank for a TP verifier).")
    max_ongoing_requests: int = Field(256, ge=1, description="Requests Serve sends one replica at once.")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources per replica, e.g. {'verifier_node': 1} to pin "
        "verifiers to a node type of the cluster YAML.")

    def to_serve(self) -> dict[str, Any]:
        """``@serve.deployment`` options."""
        actor: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.resources:
            actor["resources"] = dict(self.resources)
        out: dict[str, Any] = {"ray_actor_options": actor, "max_ongoing_requests": self.max_ongoing_requests}
        if self.autoscaling is not None:
            out["autoscaling_config"] = self.autoscaling.to_serve()
        else:
            out["num_replicas"] = self.num_replicas
        return out


class IngressSettings(StrictModel):
    """The OpenAI-compatible HTTP front."""

    api_key_env: str | None = Field(
        None, min_length=1, description="Environment variable holding the API key clients must send as "
        "'Authorization: Bearer <key>'; None (and no api_key_file) = no key.")
    api_key_file: str | None = Field(None, min_length=1, description="File holding the API key (first line).")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Largest request body accepted (413 above).")
    max_tokens_default: int = Field(256, ge=1, description="max_tokens when a request gives none.")
    request_timeout_s: float = Field(600.0, gt=0, description="A request still running after this is aborted.")

    # The config names where the key is, never the key itself: configs are printed, logged and
    # passed to every replica as deployment args.
    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v):
            raise ValueError("must be the NAME of an environment variable holding the key (letters, digits "
                             "and '_'), not the key itself")
        return v

    @model_validator(mode="after")
    def _one_key_source(self) -> "IngressSettings":
        if self.api_key_env and self.api_key_file:
            raise ValueError("set api_key_env or api_key_file, not both")
        return self


class ServeConfig(StrictModel):
    """Everything ``app_builder`` needs: the model, the drafter, the topology and each deployment."""

    model_name: str = Field("dspark-demo", min_length=1, description="The model id clients send ('model').")
    target: TargetConfig = Field(default_factory=TargetConfig, description="The target model (path 'demo' = the embedded demo target).")
    demo_target: DemoTargetConfig = Field(default_factory=DemoTargetConfig, description="Demo-target recipe (used when target.path is 'demo').")
    drafter_path: str | None = Field(None, min_length=1, description="Trained drafter directory; None = plain decoding.")
    topology: Literal["disaggregated", "colocated"] = Field(
        "disaggregated", description="Draft workers as their own deployment, or the drafter inside each verifier replica.")
    tensor_parallel_size: int = Field(1, ge=1, le=64, description="Ranks (devices) per verifier replica.")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="The verifier engine of every replica.")
    policy: dict[str, Any] = Field(
        default_factory=lambda: {"name": "async"}, description="Verify-length policy (dspark.scheduler.registry), e.g. "
        "{name: async, lag: 2}; prefix/async plan with the SPS profile each replica measures at start-up.")
    use_scheduler: bool = Field(True, description="Join the central scheduler actor (cluster verify budgets).")
    draft_timeout_s: float = Field(
        2.0, gt=0, description="A draft call slower than this fails; its step decodes plainly (disaggregated only).")
    ingress: IngressSettings = Field(default_factory=IngressSettings, description="HTTP front.")
    verifier: DeploymentSettings = Field(default_factory=DeploymentSettings, description="Verifier replicas.")
    draft_worker: DeploymentSettings = Field(default_factory=DeploymentSettings, description="Draft workers (disaggregated).")
    ingress_deployment: DeploymentSettings = Field(
        default_factory=lambda: DeploymentSettings(num_cpus=0.1), description="Replicas and resources of the ingress.")

    @model_validator(mode="after")
    def _policy_is_valid(self) -> "ServeConfig":
        from dspark.scheduler.registry import parse_policy_config

        parse_policy_config(self.policy)  # raises a pydantic error naming the bad field
        return self
