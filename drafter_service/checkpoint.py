"""Drafter checkpoints: a directory with ``drafter_config.json`` and ``model.safetensors``.

* ``drafter_config.json``: ``{"format": "dspark-drafter", "version": 1, "drafter": <DrafterConfig
  fields>, "target": <identity of the target it was built for: model_type, vocab_size, hidden_size,
  num_hidden_layers, layer_ids, mask_token_id>, "dims": <the drafter's LayerSpec>}``.
* ``model.safetensors``: the trainable weights only, plus the ``confidence_temperature`` buffer
  ``[γ]`` (Sequential Temperature Scaling; :func:`save_confidence_temperature` rewrites just that
  entry). The frozen ``embed`` / ``lm_head`` copies are not saved; :func:`load_drafter` re-copies
  them from the target. A checkpoint written before calibration existed has no temperatures and
  loads with ones; any other missing or unexpected entry is refused.

Only safetensors is ever read. Loading against a target that differs in vocabulary size, width,
depth or feature layers raises :class:`DrafterLoadError` naming both values. So does every other
way a checkpoint can be broken: an unreadable or malformed ``drafter_config.json``, a truncated
or garbled ``model.safetensors``, tensors of the wrong shape or dtype, non-finite weights (the
drafter's proposals enter rejection sampling, which needs finite probabilities).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from dspark.drafter_service.base import Drafter
from dspark.drafter_service.layers import FROZEN_MODULES, target_identity
from dspark.drafter_service.providers import DrafterBuildError
from dspark.drafter_service.registry import build_drafter
from dspark.platform.config import ConfigError, DrafterConfig, validate_config

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "TEMPERATURE_KEY",
    "DrafterLoadError",
    "trainable_state_dict",
    "save_drafter",
    "load_drafter",
    "save_confidence_temperature",
]

CONFIG_NAME = "drafter_config.json"
WEIGHTS_NAME = "model.safetensors"
_FORMAT, _VERSION = "dspark-drafter", 1
#: the STS temperatures in model.safetensors (optional: absent = ones)
TEMPERATURE_KEY = "confidence_temperature"
#: target identity fields that must match for a checkpoint to load
_MUST_MATCH = ("vocab_size", "hidden_size", "num_hidden_layers", "layer_ids")


class DrafterLoadError(ValueError):
    """A drafter checkpoint cannot be used with this target (message is meant for users)."""


def trainable_state_dict(drafter: Drafter) -> dict[str, torch.Tensor]:
    """The drafter's state without the frozen target copies (``embed.*``, ``lm_head.*``)."""
    return {k: v for k, v in drafter.state_dict().items() if k.split(".", 1)[0] not in FROZEN_MODULES}


def save_drafter(drafter: Drafter, path: str | Path) -> Path:
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": _FORMAT,
        "version": _VERSION,
        "drafter": drafter.cfg.model_dump(mode="json"),
        "target": {**drafter.identity, "mask_token_id": drafter.mask_token_id},
        "dims": drafter.spec.to_dict(),
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in trainable_state_dict(drafter).items()}
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": _FORMAT})
    (out / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def _short(x: Any) -> str:
    r = repr(x)
    return r if len(r) <= 80 else r[:77] + "..."


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


#: the target identity a checkpoint must record: field -> (check, what it must be)
_IDENTITY_FIELDS = {
    "vocab_size": (lambda x: _is_int(x) and x > 0, "a positive integer"),
    "hidden_size": (lambda x: _is_int(x) and x > 0, "a positive integer"),
    "num_hidden_layers": (lambda x: _is_int(x) and x > 0, "a positive integer"),
    "layer_ids": (lambda x: isinstance(x, list) and bool(x) and all(_is_int(i) for i in x), "a list of layer ids"),
    "mask_token_id": (lambda x: x is None or (_is_int(x) and x >= 0), "null or a token id"),
}


def _read_meta(path: Path) -> dict:
    """``drafter_config.json`` of the checkpoint at ``path``, checked for shape (types of every
    field used to rebuild the drafter), or :class:`DrafterLoadError` naming the file and field."""
    cfg_file, weights = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not cfg_file.is_file() or not weights.is_file():
        pickled = sorted(p.name for p in path.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        hint = f" (found {', '.join(pickled)}: pickle weights are never loaded)" if pickled else ""
        raise DrafterLoadError(f"{path} is not a drafter checkpoint: it needs {CONFIG_NAME} and {WEIGHTS_NAME}{hint}")
    try:
        meta = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON or bad UTF-8
        raise DrafterLoadError(f"cannot read {cfg_file} (not valid JSON; the checkpoint is damaged): {exc}") from None
    if not isinstance(meta, dict):
        raise DrafterLoadError(f"{cfg_file}: expected a JSON object, got {type(meta).__name__} (the checkpoint is damaged)")
    if meta.get("format") != _FORMAT or meta.get("version") != _VERSION:
        raise DrafterLoadError(
            f"{cfg_file}: unsupported format {meta.get('format')!r} version {meta.get('version')!r} "
            f"(expected {_FORMAT!r} version {_VERSION})"
        )
    for key in ("drafter", "target", "dims"):
        if not isinstance(meta.get(key), dict):
            raise DrafterLoadError(f"{cfg_file}: {key!r} must be a JSON object (got {_short(meta.get(key))}); "
                                   "the checkpoint is damaged, save it again with save_drafter")
    for key, (ok, what) in _IDENTITY_FIELDS.items():
        if not ok(meta["target"].get(key)):
            raise DrafterLoadError(f"{cfg_file}: target.{key} must be {what} (got {_short(meta['target'].get(key))}); "
                                   "the checkpoint is damaged, save it again with save_drafter")
    return meta


def load_drafter(path: str | Path, target: Any, mask_token_id: int | None = None) -> Drafter:
    """Rebuild the drafter saved at ``path`` for ``target`` and load its trainable weights."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    ckpt = Path(path).expanduser()
    meta = _read_meta(ckpt)
    saved, have = meta["target"], target_identity(target)
    for key in _MUST_MATCH:
        if saved.get(key) != have[key]:
            raise DrafterLoadError(
                f"drafter checkpoint {ckpt} was built for a target with {key}={saved.get(key)}, "
                f"but this target ({have['model_type']}) has {key}={have[key]}"
            )
    try:
        cfg = validate_config(DrafterConfig, meta["drafter"], f"{ckpt / CONFIG_NAME} (drafter)")
    except ConfigError as exc:
        raise DrafterLoadError(str(exc)) from None
    stored_mask = saved.get("mask_token_id")
    try:
        drafter = build_drafter(cfg, target, mask_token_id if mask_token_id is not None else stored_mask)
    except DrafterBuildError as exc:
        raise DrafterLoadError(f"cannot rebuild the drafter saved at {ckpt}: {exc}") from None
    if stored_mask is not None and drafter.mask_token_id != stored_mask:
        raise DrafterLoadError(
            f"drafter checkpoint {ckpt} was trained with mask_token_id={stored_mask}, but {drafter.mask_token_id} was given"
        )
    if drafter.spec.to_dict() != meta["dims"]:
        raise DrafterLoadError(f"drafter checkpoint {ckpt} has layer dims {meta['dims']}, this target gives {drafter.spec.to_dict()}")
    weights = ckpt / WEIGHTS_NAME
    try:
        state = load_file(str(weights), device=str(drafter.device))
    except (SafetensorError, RuntimeError, OSError) as exc:  # truncated, garbled header, unreadable
        raise DrafterLoadError(f"cannot load the weights in {weights} (a damaged or incomplete safetensors "
                               f"file; copy or save the checkpoint again): {exc}") from None
    expected = drafter.state_dict()
    for k, t in state.items():  # before load_state_dict, which would cast ints into float weights
        want = expected.get(k)
        if want is not None and want.is_floating_point() and not t.is_floating_point():
            raise DrafterLoadError(f"{weights}: tensor {k!r} is {t.dtype}, the drafter needs floating point")
        if k != TEMPERATURE_KEY and t.is_floating_point() and not bool(torch.isfinite(t).all()):  # temps: below
            raise DrafterLoadError(f"{weights}: tensor {k!r} holds NaN or infinite values (a diverged or damaged checkpoint)")
    try:
        missing, unexpected = drafter.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise DrafterLoadError(f"cannot load the weights in {weights}: they do not fit the drafter of "
                               f"{CONFIG_NAME}: {exc}") from None
    missing = [k for k in missing if k.split(".", 1)[0] not in FROZEN_MODULES and k != TEMPERATURE_KEY]
    if missing or unexpected:
        raise DrafterLoadError(f"{weights} does not match the drafter: missing {missing}, unexpected {unexpected}")
    temps = getattr(drafter, TEMPERATURE_KEY, None)
    if temps is not None and not bool(torch.isfinite(temps).all() and (temps > 0).all()):
        raise DrafterLoadError(f"{ckpt / WEIGHTS_NAME}: confidence temperatures must be positive and finite, got {temps.tolist()}")
    return drafter


def save_confidence_temperature(path: str | Path, temperatures: Any) -> Path:
    """Write STS temperatures ``[γ]`` into the checkpoint at ``path``, leaving every other tensor
    byte-for-byte as it was (no dtype round trip through a loaded drafter). The file is replaced
    atomically."""
    import os

    from safetensors import safe_open
    from safetensors.torch import save_file

    ckpt = Path(path).expanduser()
    meta = _read_meta(ckpt)
    block = int(meta["drafter"].get("block_size", 0))
    t = torch.as_tensor(temperatures, dtype=torch.float32).reshape(-1).contiguous()
    if t.numel() != block or not bool(torch.isfinite(t).all() and (t > 0).all()):
        raise DrafterLoadError(f"need {block} positive finite confidence temperatures for {ckpt}, got {t.tolist()}")
    weights = ckpt / WEIGHTS_NAME
    with safe_open(str(weights), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        file_meta = fh.metadata()
    tensors[TEMPERATURE_KEY] = t
    tmp = weights.with_name(weights.name + ".tmp")
    save_file(tensors, str(tmp), metadata=file_meta)
    os.replace(tmp, weights)
    return weights
