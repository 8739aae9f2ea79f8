"""Building one verifier replica's engine from a :class:`ServeConfig` (no Ray here): target,
drafter (local, remote or none), SPS profile and policy. The deployments call these; tests call
them directly."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

from dspark.platform.serving.config import ServeConfig

__all__ = ["resolve_target", "drafter_block_size", "build_engine", "build_draft_factory", "ServeDraftTransport"]

log = logging.getLogger(__name__)


def resolve_target(cfg: ServeConfig) -> Path:
    """The target checkpoint directory (the demo target is built on first use)."""
    from dspark.platform.demo.build import resolve_target_path

    return resolve_target_path(cfg.target.path, cfg.demo_target, progress=False, log=log.info)


def drafter_block_size(path: str | Path) -> int:
    """γ of a saved drafter, read from its config (no weights loaded)."""
    from dspark.drafter_service.checkpoint import CONFIG_NAME

    meta = json.loads((Path(path).expanduser() / CONFIG_NAME).read_text())
    return int(meta["drafter"]["block_size"])


def build_draft_factory(cfg: ServeConfig) -> Callable[[], Any]:
    """A function that builds the drafter (weights loaded) for a draft worker's sessions; what it
    needs of the target (config, embedding, LM head: never the decoder) is loaded once."""
    from dspark.drafter_service.checkpoint import load_drafter
    from dspark.platform.target.heads import load_target_heads

    if cfg.drafter_path is None:
        raise ValueError("a draft worker needs drafter_path")
    target = load_target_heads(cfg.target, resolve_target(cfg))
    return lambda: load_drafter(cfg.drafter_path, target)


class ServeDraftTransport:
    """A replica's draft calls through a Ray Serve handle of the DraftWorker deployment, routed by
    session (the multiplexed model id) and bounded by ``timeout_s``. Picklable, so a
    tensor-parallel rank actor can make the calls itself."""

    def __init__(self, handle: Any, session: str, timeout_s: float):
        self.handle, self.session, self.timeout_s = handle, session, timeout_s
        self._routed: Any = None

    def __getstate__(self) -> dict:
        return {"handle": self.handle, "session": self.session, "timeout_s": self.timeout_s, "_routed": None}

    def __call__(self, call: Any) -> Any:
        if self._routed is None:
            self._routed = self.handle.options(multiplexed_model_id=self.session)
        return self._routed.call.remote(call).result(timeout_s=self.timeout_s)


def _policy_needs_profile(cfg: ServeConfig) -> bool:
    from dspark.scheduler.registry import parse_policy_config

    pcfg = parse_policy_config(cfg.policy)
    return pcfg.name in ("prefix", "async") and getattr(pcfg, "sps_profile", None) is None


def build_tp_engine(cfg: ServeConfig, *, draft_transport: Callable | None = None, session: str | None = None,
                    measure: bool = True) -> Any:
    """A :class:`~dspark.verifier_service.tp.group.TPGroup` of ``cfg.tensor_parallel_size`` rank
    actors (each ``cfg.verifier.num_cpus``/``num_gpus``), standing in for the engine: the drafter
    colocated in every rank, or rank 0 calling the draft workers for all (``BroadcastDrafter``)."""
    import functools

    from dspark.drafter_service.checkpoint import load_drafter
    from dspark.drafter_service.remote import RemoteDrafterSpec
    from dspark.verifier_service.tp.group import ShardedEngineFactory, TPGroup

    target_cfg = cfg.target.model_copy(update={"path": str(resolve_target(cfg))})
    if cfg.verifier.num_gpus and not target_cfg.device.startswith("cuda"):
        target_cfg = target_cfg.model_copy(update={"device": "cuda"})
    e = cfg.engine
    kwargs = dict(max_batch_size=e.max_batch_size, max_model_len=e.max_model_len, prefill_chunk=e.prefill_chunk, seed=e.seed,
                  reproducible_seeds=e.reproducible_seeds)
    local = remote = None
    if cfg.drafter_path is not None:
        if cfg.topology == "colocated":
            local = functools.partial(load_drafter, cfg.drafter_path)
        else:
            if draft_transport is None:
                raise ValueError("the disaggregated topology needs a draft transport")
            vocab = json.loads((Path(target_cfg.path) / "config.json").read_text())["vocab_size"]
            remote = RemoteDrafterSpec(draft_transport, drafter_block_size(cfg.drafter_path), int(vocab), session)
    group = TPGroup(ShardedEngineFactory(target_cfg, kwargs, local, remote_drafter=remote), cfg.tensor_parallel_size,
                    num_cpus=cfg.verifier.num_cpus, num_gpus=cfg.verifier.num_gpus)
    try:
        sps = None
        if cfg.drafter_path is not None and measure and _policy_needs_profile(cfg):
            sps = group.measure_sps(repeats=3, context=min(64, group.max_model_len // 2))
        group.set_policy(cfg.policy if cfg.drafter_path is not None else {"name": "off"}, sps)
    except BaseException:
        group.shutdown()
        raise
    return group


def build_engine(cfg: ServeConfig, *, draft_transport: Callable | None = None, session: str | None = None,
                 measure: bool = True) -> Any:
    """The replica's ``VerifierEngine``: colocated drafter, a ``RemoteDrafter`` over
    ``draft_transport`` (disaggregated), or plain decoding without ``drafter_path``. Policies that
    need an SPS curve get one measured now on this engine (verify forwards and draft passes).
    With ``tensor_parallel_size > 1``, a tensor-parallel group (:func:`build_tp_engine`)."""
    if cfg.tensor_parallel_size > 1:
        return build_tp_engine(cfg, draft_transport=draft_transport, session=session, measure=measure)
    from dspark.drafter_service.checkpoint import load_drafter
    from dspark.drafter_service.remote import RemoteDrafter
    from dspark.platform.target.loading import load_target
    from dspark.scheduler.registry import build_policy_from_config, parse_policy_config
    from dspark.verifier_service.engine import VerifierEngine
    from dspark.verifier_service.profiling import measure_sps

    target = load_target(cfg.target, resolve_target(cfg))
    drafter = None
    if cfg.drafter_path is not None:
        if cfg.topology == "colocated":
            drafter = load_drafter(cfg.drafter_path, target)
        else:
            if draft_transport is None:
                raise ValueError("the disaggregated topology needs a draft transport")
            drafter = RemoteDrafter(draft_transport, drafter_block_size(cfg.drafter_path), target.vocab_size, session=session)
    pcfg = parse_policy_config(cfg.policy)
    e = cfg.engine
    engine = VerifierEngine(target, drafter, None, max_batch_size=e.max_batch_size, max_model_len=e.max_model_len,
                            prefill_chunk=e.prefill_chunk, seed=e.seed, reproducible_seeds=e.reproducible_seeds)
    sps = None
    if drafter is not None and pcfg.name in ("prefix", "async") and getattr(pcfg, "sps_profile", None) is None and measure:
        sps = measure_sps(engine, repeats=3, context=min(64, engine.max_model_len // 2))
        engine.sps_profile = sps
    engine.policy = build_policy_from_config(pcfg, sps=sps) if drafter is not None else build_policy_from_config(
        parse_policy_config({"name": "off"}))
    return engine
