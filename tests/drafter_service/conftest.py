"""Fixtures for the drafter tests: tiny random targets (vocab 320, d 64, 4 layers) and drafters
with their trainable weights re-drawn at a scale where context, Markov bias and sampling all
visibly matter (a freshly initialised drafter is nearly input-independent, which would make the
equivalence tests pass vacuously)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Callable

import pytest
import torch

from _helpers import BLOCK_KINDS, KIND_IDS, KINDS, MASK_ID, drafter_config, randomize  # noqa: F401


@pytest.fixture(scope="session")
def tiny_targets(tiny_checkpoints) -> Callable[[str], object]:
    """arch -> loaded FrozenTarget (cached for the session)."""
    from dspark.platform.config import TargetConfig
    from dspark.platform.target.loading import load_target

    cache: dict[str, object] = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = load_target(TargetConfig(path=str(tiny_checkpoints[arch])), with_tokenizer=False)
        return cache[arch]

    return get


@pytest.fixture()
def make_drafter(tiny_targets):
    """(kind_id, arch="qwen3", **config overrides) -> (drafter, target), randomized, cache allocated."""
    from dspark.drafter_service.registry import build_drafter

    def make(kind_id: str, arch: str = "qwen3", seed: int = 0, max_slots: int = 4, max_len: int = 48, **over):
        target = tiny_targets(arch)
        torch.manual_seed(seed)
        drafter = build_drafter(drafter_config(kind_id, **over), target, mask_token_id=MASK_ID)
        randomize(drafter, seed)
        drafter.allocate(max_slots, max_len)
        return drafter, target

    return make


def run_target(target, seq_len: int = 16, seed: int = 0, batch: int = 1):
    """Random token ids [batch, seq] and the target's features / last hidden for them."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, target.vocab_size, (batch, seq_len), generator=g)
    out = target(ids)
    return ids, out.features, out.last_hidden


def append(drafter, slot: int, ids, feats, hidden, start: int, stop: int) -> None:
    """Append rows start..stop-1 of a single sequence (batch row 0) to one slot."""
    n = stop - start
    drafter.append_context(
        torch.tensor([slot]), ids[:, start:stop], feats[:, start:stop], hidden[:, start:stop], torch.tensor([n])
    )


def greedy(r: int):
    from dspark.platform.sampling import SamplingBatch

    return SamplingBatch.from_params([(0.0, 0, 1.0)] * r, [None] * r)


def seeded(r: int, seed: int = 123, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    from dspark.platform.sampling import SamplingBatch

    gens = [torch.Generator().manual_seed(seed + i) for i in range(r)]
    return SamplingBatch.from_params([(temperature, top_k, top_p)] * r, gens)


def propose(drafter, slots: list[int], anchors: list[int], sampling=None):
    """Propose for ``slots`` at their current context lengths."""
    sampling = sampling if sampling is not None else greedy(len(slots))
    pos = torch.tensor([drafter.context_length(s) for s in slots])
    return drafter.propose(torch.tensor(slots), torch.tensor(anchors), pos, sampling)


def pytest_generate_tests(metafunc):
    """``kind_id`` runs a test for every drafter kind; ``block_kind`` for the DSpark/DFlash ones."""
    if "kind_id" in metafunc.fixturenames:
        metafunc.parametrize("kind_id", KIND_IDS)
    if "block_kind" in metafunc.fixturenames:
        metafunc.parametrize("block_kind", BLOCK_KINDS)


@pytest.fixture(scope="session")
def h():
    """The helper functions above (test modules cannot import a conftest)."""
    return SimpleNamespace(
        MASK_ID=MASK_ID, drafter_config=drafter_config, randomize=randomize, run_target=run_target,
        append=append, greedy=greedy, seeded=seeded, propose=propose,
    )
