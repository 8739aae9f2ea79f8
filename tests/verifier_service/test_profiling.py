"""Measuring SPS(B) with real verify forwards on a tiny checkpoint."""

from __future__ import annotations

import pytest

import dspark.verifier_service.profiling as profiling
from _mocks import MockDrafter
from dspark.platform.config import TargetConfig
from dspark.platform.contracts import GenerationRequest, SamplingParams
from dspark.platform.target.loading import load_target
from dspark.scheduler.sps import SPSProfile
from dspark.verifier_service.engine import VerifierEngine
from dspark.verifier_service.profiling import default_token_counts, engine_identity, measure_sps, profile_for_engine


@pytest.fixture(scope="module")
def target(tiny_checkpoints):
    return load_target(TargetConfig(path=str(tiny_checkpoints["qwen3"])), with_tokenizer=False)


def test_default_counts_are_whole_blocks():
    assert default_token_counts(4, 3) == [4, 8, 12]
    counts = default_token_counts(8, 1000, max_points=50)
    assert len(counts) == 50 and counts[0] == 8 and counts[-1] == 8000


def test_measure_on_a_bare_target(target):
    prof = measure_sps(target, repeats=2, width=4, max_batch=4, context=16)
    assert prof.tokens == (4, 8, 12, 16)
    assert all(s > 0 for s in prof.steps_per_s)
    assert prof.source == "measured" and prof.device == "cpu" and prof.dtype == "float32" and prof.max_batch == 4
    assert len(prof.config_hash) == 12


def test_shapes_and_the_points_recorded(target):
    # 1 -> 1×1; 5 -> 2 rows of 4 = 8; 9 and 12 -> 3×4 = 12 (merged); 40 needs more than 4 rows of 4:
    # the rows widen to 10 tokens, 4×10 = 40
    prof = measure_sps(target, [1, 5, 9, 12, 40], repeats=1, warmup=0, width=4, max_batch=4, context=8)
    assert prof.tokens == (1, 8, 12, 40)
    with pytest.raises(ValueError):
        measure_sps(target, [0], repeats=1, max_batch=2)


def test_large_batches_are_slower(target):
    prof = measure_sps(target, [1, 2048], repeats=3, width=128, max_batch=16, context=32)
    assert prof(1) > prof(2048)


def test_measure_on_an_engine_leaves_it_usable(target):
    def run(eng):
        req = GenerationRequest("a", (5, 6, 7, 8), SamplingParams(max_tokens=12, temperature=0.0))
        return eng.generate([req])["a"].token_ids

    fresh = VerifierEngine(target, MockDrafter(target.vocab_size, 3, oracle=target), max_batch_size=4)
    measured = VerifierEngine(target, MockDrafter(target.vocab_size, 3, oracle=target), max_batch_size=4)
    prof = measure_sps(measured, repeats=1, context=8)
    assert prof.tokens == (4, 8, 12, 16)  # width 1 + γ, one to four rows
    assert prof.matches(**engine_identity(measured))
    assert run(measured) == run(fresh)
    measured.add_request(GenerationRequest("b", (1, 2), SamplingParams(max_tokens=4)))
    with pytest.raises(RuntimeError, match="idle"):
        measure_sps(measured)


def test_profile_for_engine_reuses_a_matching_file(target, tmp_path, monkeypatch):
    eng = VerifierEngine(target, None, max_batch_size=2)
    path = tmp_path / "sps.json"
    first = profile_for_engine(eng, path, repeats=1, context=4, width=2)
    assert path.exists() and first.max_batch == 2

    def no_measuring(*a, **k):
        raise AssertionError("measured again")

    monkeypatch.setattr(profiling, "measure_sps", no_measuring)
    again = profile_for_engine(eng, path)
    assert again.tokens == first.tokens and again.steps_per_s == first.steps_per_s
    # a profile of another engine (here: another batch limit) is measured again
    other = VerifierEngine(target, None, max_batch_size=3)
    with pytest.raises(AssertionError, match="measured again"):
        profile_for_engine(other, path)
    SPSProfile.from_points([(1, 1.0)], **{**engine_identity(eng), "config_hash": "other"}).save(path)
    with pytest.raises(AssertionError, match="measured again"):
        profile_for_engine(eng, path)


def test_draft_cost_is_measured_with_a_real_drafter(target):
    import torch

    from _helpers import MASK_ID, drafter_config
    from dspark.drafter_service.registry import build_drafter

    torch.manual_seed(0)
    drafter = build_drafter(drafter_config("dspark-gated"), target, mask_token_id=MASK_ID)
    eng = VerifierEngine(target, drafter, max_batch_size=6)
    prof = measure_sps(eng, [4, 8], repeats=2, context=12, draft_rows=[1, 3, 6])
    assert [r for r, _ in prof.draft_points] == [1, 3, 6] and all(t > 0 for _, t in prof.draft_points)
    assert prof.draft_time_s(2) > 0 and SPSProfile.from_dict(prof.to_dict()).draft_points == prof.draft_points
    assert all(drafter.context_length(s) == 0 for s in range(6))  # every slot reset
    with pytest.raises(ValueError, match="draft rows"):
        profiling.measure_draft(eng, [7])
    plain = measure_sps(VerifierEngine(target, None, max_batch_size=2), [2], repeats=1, context=4)
    assert plain.draft_points == ()  # no drafter: no draft cost
