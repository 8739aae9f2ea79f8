"""Building one verifier replica's engine from a :class:`ServeConfig` (no Ray here): target,
drafter (local, remote or none), SPS profile and policy. The deployments call these; tests call
them directly."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

from dspark.platform.serving.config import ServeConfig

__all__ = ["resolve_target", "drafter_block_size", "build_engine", "build_draft_factory"]

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
    """A function that builds the drafter (weights loaded) for a draft worker's sessions; the
    target it is bound to (embedding and LM head) is loaded once."""
    from dspark.drafter_service.checkpoint import load_drafter
    from dspark.platform.target.loading import load_target

    if cfg.drafter_path is None:
        raise ValueError("a draft worker needs drafter_path")
    target = load_target(cfg.target, resolve_target(cfg), with_tokenizer=False)
    return lambda: load_drafter(cfg.drafter_path, target)


def build_engine(cfg: ServeConfig, *, draft_transport: Callable | None = None, session: str | None = None,
                 measure: bool = True) -> Any:
    """The replica's ``VerifierEngine``: colocated drafter, a ``RemoteDrafter`` over
    ``draft_transport`` (disaggregated), or plain decoding without ``drafter_path``. Policies that
    need an SPS curve get one measured now on this engine (verify forwards and draft passes)."""
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
                            prefill_chunk=e.prefill_chunk, seed=e.seed)
    sps = None
    if drafter is not None and pcfg.name in ("prefix", "async") and getattr(pcfg, "sps_profile", None) is None and measure:
        sps = measure_sps(engine, repeats=3, context=min(64, engine.max_model_len // 2))
        engine.sps_profile = sps
    engine.policy = build_policy_from_config(pcfg, sps=sps) if drafter is not None else build_policy_from_config(
        parse_policy_config({"name": "off"}))
    return engine
