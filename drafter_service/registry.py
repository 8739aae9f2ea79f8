"""Drafter registry: ``kind`` (``DrafterConfig.kind``) → factory.

A factory is ``factory(cfg, target, mask_token_id) -> Drafter``. The built-in kinds are

* ``dspark``: :class:`~dspark.drafter_service.providers.dspark.DSparkDrafter`;
* ``dflash``: the same class with the Markov head off (the config validator enforces rank 0);
* ``eagle3``: :class:`~dspark.drafter_service.providers.eagle3.Eagle3Drafter`;
* ``mtp1``:   :class:`~dspark.drafter_service.providers.mtp.MTPDrafter` (block size forced to 1).

Provider modules are imported on first build, so listing the kinds costs nothing. A new algorithm
registers itself with ``@register("name")`` (the config schema must also accept the name).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from dspark.platform.config import DrafterConfig

if TYPE_CHECKING:
    from dspark.drafter_service.base import Drafter

__all__ = ["UnknownDrafterKind", "register", "kinds", "build_drafter"]

Factory = Callable[[DrafterConfig, Any, "int | None"], "Drafter"]
_FACTORIES: dict[str, Factory] = {}


class UnknownDrafterKind(ValueError):
    """No factory is registered under this kind."""


def register(kind: str) -> Callable[[Factory], Factory]:
    """Decorator: ``@register("dspark")`` makes ``build_drafter`` use the function for that kind."""

    def deco(factory: Factory) -> Factory:
        if kind in _FACTORIES:
            raise ValueError(f"drafter kind {kind!r} is already registered")
        _FACTORIES[kind] = factory
        return factory

    return deco


def kinds() -> tuple[str, ...]:
    return tuple(sorted(_FACTORIES))


def build_drafter(cfg: DrafterConfig, target: Any, mask_token_id: int | None = None) -> "Drafter":
    """A freshly initialised drafter of ``cfg.kind`` for ``target`` (a FrozenTarget), on the
    target's device and dtype. ``mask_token_id`` is needed only by block drafters whose target has
    no tokenizer (or whose tokenizer lacks ``cfg.mask_token``)."""
    factory = _FACTORIES.get(cfg.kind)
    if factory is None:
        raise UnknownDrafterKind(f"unknown drafter kind {cfg.kind!r}; registered kinds: {', '.join(kinds())}")
    return factory(cfg, target, mask_token_id)


@register("dspark")
@register("dflash")
def _block_drafter(cfg: DrafterConfig, target: Any, mask_token_id: int | None) -> "Drafter":
    from dspark.drafter_service.providers.dspark import DSparkDrafter, resolve_mask_token_id

    return DSparkDrafter(cfg, target, resolve_mask_token_id(target, cfg.mask_token, mask_token_id))


@register("eagle3")
def _eagle3(cfg: DrafterConfig, target: Any, mask_token_id: int | None) -> "Drafter":
    from dspark.drafter_service.providers.eagle3 import Eagle3Drafter

    return Eagle3Drafter(cfg, target)


@register("mtp1")
def _mtp1(cfg: DrafterConfig, target: Any, mask_token_id: int | None) -> "Drafter":
    from dspark.drafter_service.providers.mtp import MTPDrafter

    return MTPDrafter(cfg, target)
