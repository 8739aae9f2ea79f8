"""The engine with the Triton kernels forced on gives the same tokens as the references.

``dispatch.override("triton")`` makes ``VerifierEngine._accept`` verify through the Triton
rejection kernels (``greedy_verify`` for all-greedy batches, ``rejection_sample`` otherwise) and
the DSpark drafter sample its blocks through the Markov kernel where it covers the head; on CPU
they run under the Triton interpreter (``TRITON_INTERPRET=1`` comes from ``tests/conftest.py``).
The same requests through ``dispatch.override("reference")`` must give identical tokens: greedy,
and sampled with per-request seeds (the uniforms and the noise come from the requests' CPU
generators on both paths), with ragged verify lengths (0 included) on the trained tiny demo
target and an untrained drafter. Spies on the kernel modules prove the kernels actually ran.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from _helpers import drafter_config, randomize
from _mocks import CyclePolicy
from dspark.drafter_service.registry import build_drafter
from dspark.kernels import dispatch
from dspark.platform.config import TargetConfig
from dspark.platform.contracts import GenerationRequest, SamplingParams
from dspark.platform.target.loading import load_target
from dspark.verifier_service.engine import VerifierEngine

PROMPTS = ("def add(a, b):\n    return", "import os\n", "class Stack:\n    def push(self, x):\n")


@pytest.fixture(scope="module")
def kernel_modules():
    """The rejection and Markov kernel modules, interpreted (skip when the kernels cannot run here)."""
    if not dispatch.HAS_TRITON:
        pytest.skip("triton is not installed")
    if not dispatch.interpreting():
        pytest.skip("TRITON_INTERPRET is off: the kernels cannot run on CPU tensors")
    mods = {op: importlib.import_module(f"dspark.kernels.{op}.triton_kernel") for op in ("rejection", "markov")}
    if not all(m.INTERPRETED for m in mods.values()):
        pytest.skip("the kernel modules were imported before TRITON_INTERPRET was set")
    return mods


@pytest.fixture(autouse=True)
def _no_mode_from_env(monkeypatch):
    monkeypatch.delenv("DSPARK_KERNELS", raising=False)


@pytest.fixture(scope="module")
def demo(tiny_demo_target):
    return load_target(TargetConfig(path=str(tiny_demo_target.path)))


@pytest.fixture
def launches(kernel_modules, monkeypatch):
    """Counts of kernel launches by launcher name (the modules' Python launchers, wrapped)."""
    counts = {"greedy_verify": 0, "rejection_sample": 0, "markov_sample": 0}
    targets = {"greedy_verify": "rejection", "rejection_sample": "rejection", "markov_sample": "markov"}
    for name, op in targets.items():
        fn = getattr(kernel_modules[op], name)

        def counted(*args, _fn=fn, _name=name, **kwargs):
            counts[_name] += 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(kernel_modules[op], name, counted)
    return counts


def run(target, kind_id: str, params: list[SamplingParams], mode: str):
    """Generate PROMPTS (one per params) with a fresh, identically initialised drafter under ``mode``
    -> ({request id: tokens}, total accepted drafts)."""
    torch.manual_seed(0)
    drafter = build_drafter(drafter_config(kind_id), target)  # the demo tokenizer has the mask token
    randomize(drafter, 0)
    reqs = [GenerationRequest(str(i), tuple(target.tokenizer(PROMPTS[i % len(PROMPTS)]).input_ids), p)
            for i, p in enumerate(params)]
    with dispatch.override(mode):
        eng = VerifierEngine(target, drafter, CyclePolicy(), max_batch_size=len(params))
        outs = eng.generate(reqs)
    assert eng.total_fallback_steps == 0 and eng.context_failures == 0
    return {k: list(o.token_ids) for k, o in outs.items()}, sum(o.stats.accepted for o in outs.values())


def greedy(n):
    return SamplingParams(max_tokens=n, ignore_eos=True)


def sampled(n, temperature, seed, **kw):
    return SamplingParams(max_tokens=n, temperature=temperature, seed=seed, ignore_eos=True, **kw)


@pytest.mark.parametrize("kind_id", ["dspark-vanilla", "dspark-gated"])
def test_greedy_requests_match_the_reference(demo, launches, kind_id):
    params = [greedy(10), greedy(7), greedy(12)]
    want, _ = run(demo, kind_id, params, "reference")
    assert launches == {"greedy_verify": 0, "rejection_sample": 0, "markov_sample": 0}
    got, _ = run(demo, kind_id, params, "triton")
    assert got == want
    assert launches["greedy_verify"] > 0 and launches["rejection_sample"] == 0
    # the Markov kernel covers the vanilla head only; gated blocks come from the model's loop
    assert (launches["markov_sample"] > 0) == (kind_id == "dspark-vanilla")


@pytest.mark.parametrize("kind_id", ["dspark-vanilla", "dspark-gated"])
def test_seeded_sampled_requests_match_the_reference(demo, launches, kind_id):
    # seeded rows are verified by matching (position-keyed noise): the greedy kernel, never rejection
    params = [sampled(10, 1.0, 11), sampled(8, 0.7, 12), greedy(9), sampled(12, 1.5, 13)]
    want, accepted = run(demo, kind_id, params, "reference")
    got, accepted_triton = run(demo, kind_id, params, "triton")
    assert got == want and accepted_triton == accepted and accepted > 0
    assert launches["greedy_verify"] > 0 and launches["rejection_sample"] == 0


@pytest.mark.parametrize("kind_id", ["dspark-vanilla", "dspark-gated"])
def test_unseeded_and_mixed_sampled_requests_match_the_reference(demo, launches, kind_id):
    # unseeded rows take chain rejection sampling; the greedy and seeded rows of the batch enter it as one-hot rows
    params = [sampled(10, 1.0, None), sampled(8, 0.7, 12), greedy(9), sampled(12, 1.5, None)]
    want, accepted = run(demo, kind_id, params, "reference")
    got, accepted_triton = run(demo, kind_id, params, "triton")
    assert got == want and accepted_triton == accepted
    assert accepted > 0  # accepted prefixes and bonus tokens went through the kernel, not only rejections
    # (greedy_verify may run too: once the unseeded requests finish, the batch left is all matched)
    assert launches["rejection_sample"] > 0


def test_top_k_top_p_requests_match_the_reference(demo, launches):
    # p_t / p_d are filtered before the rejection kernel; the Markov kernel steps aside for any
    # batch with a filtered request (every request is filtered here, so it never runs)
    params = [sampled(9, 1.0, None, top_k=20), sampled(9, 1.2, 22, top_p=0.9), sampled(9, 0.8, None, top_k=50, top_p=0.95)]
    want, _ = run(demo, "dspark-vanilla", params, "reference")
    got, _ = run(demo, "dspark-vanilla", params, "triton")
    assert got == want
    assert launches["rejection_sample"] > 0 and launches["markov_sample"] == 0
