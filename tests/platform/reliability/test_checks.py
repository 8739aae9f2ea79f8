"""The reliability tools without Ray: the lossless check's stop rule equals the engine's, its
comparison flags every kind of difference, the soak's memory sampler and report work, the
commands are registered, and a draft worker that keeps failing is not called at every step."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from click.testing import CliRunner

from dspark.platform.bench.load import LoadRequest, RequestRecord


@pytest.fixture(scope="module")
def demo(tiny_demo_target):
    from dspark.platform.config import TargetConfig
    from dspark.platform.target.loading import load_target

    return load_target(TargetConfig(path=str(tiny_demo_target.path)), str(tiny_demo_target.path))


def test_the_reference_stop_rule_is_the_engines(demo):
    from dspark.platform.contracts import GenerationRequest, SamplingParams
    from dspark.platform.reliability.lossless import build_cases, expected_output, greedy_reference
    from dspark.verifier_service.engine import VerifierEngine

    cases = build_cases(demo.tokenizer, 48, max_model_len=160, seed=3)
    need = {}
    for c in cases:
        need[c.prompt_ids] = max(need.get(c.prompt_ids, 0), c.request.max_tokens)
    refs, eos = greedy_reference(demo, need, max_model_len=160)
    # the tiny target rarely writes the corpus's stop strings: half the cases stop on a piece of their own text
    rng = random.Random(0)
    for j, c in enumerate(cases[::2]):
        text = demo.tokenizer.decode(refs[c.prompt_ids][: c.request.max_tokens], skip_special_tokens=True)
        if len(text) >= 4:
            k = rng.randrange(1, len(text) - 2)
            cases[2 * j] = dataclasses.replace(c, request=dataclasses.replace(c.request, stop=(text[k:k + 1 + j % 3],)))
    eng = VerifierEngine(demo, None, max_batch_size=8, max_model_len=160)
    reqs = [GenerationRequest(str(c.index), c.prompt_ids, SamplingParams(
        max_tokens=c.request.max_tokens, stop=c.request.stop, ignore_eos=c.request.ignore_eos)) for c in cases]
    got = eng.generate(reqs)
    finishes = set()
    for c in cases:
        ids, finish = expected_output(refs[c.prompt_ids], c.request, eos, demo.tokenizer)
        out = got[str(c.index)]
        assert (list(out.token_ids), out.finish_reason) == (ids, finish), c
        finishes.add(finish)
    assert finishes == {"stop", "length"}  # both rules were exercised
    assert {c.kind for c in cases} == {"text", "ids", "chat"}


def test_compare_flags_text_count_finish_and_errors(demo):
    from dspark.platform.reliability.lossless import Case, compare, compare_sampled

    tok = demo.tokenizer
    ref = [int(t) for t in tok("abc def ghi", add_special_tokens=False)["input_ids"]] * 3
    req = LoadRequest("p", 4)
    case = Case(0, req, (1, 2), "text")
    want = tok.decode(ref[:4], skip_special_tokens=True)

    def rec(**kw):
        base = dict(index=0, text=want, tokens=4, finish_reason="length", end=1.0)
        return RequestRecord(**{**base, **kw})

    refs = {(1, 2): ref}
    assert compare([case], [rec()], refs, frozenset(), tok)[0] == []
    for bad in (dict(text=want + "x"), dict(tokens=3), dict(finish_reason="stop"), dict(error="APIError: boom")):
        mism, errors, _ = compare([case], [rec(**bad)], refs, frozenset(), tok)
        assert len(mism) == 1 and errors == (1 if "error" in bad else 0), bad
    assert compare_sampled([rec(), rec(error="x")], [rec(), rec()]) == (1, 1)


def test_memory_sampler_report_and_plot(tmp_path):
    from dspark.platform.bench.load import summarize
    from dspark.platform.reliability.soak import MemorySampler, SoakResult, plot, render_markdown

    sampler = MemorySampler(0.05).start()
    junk = [bytearray(1 << 20) for _ in range(8)]  # the driver's RSS grows a little
    import time

    time.sleep(0.3)
    sampler.stop()
    del junk
    (driver,) = [s for s in sampler.series.values() if s.label.startswith("driver")]
    assert len(driver.points) >= 3 and all(rss > 0 for _, rss in driver.points)
    recs = [RequestRecord(i, start=0.0, ttft=0.1, end=0.5, tokens=4, text="x") for i in range(3)]
    res = SoakResult(0.4, 2, summarize(recs, 0.4), [], list(sampler.series.values()), 0.1)
    md = render_markdown(res, what="test", plot_rel="soak.png")
    assert "| **failed** | **0** |" in md and "driver" in md and "![soak memory](soak.png)" in md
    plot(res, tmp_path / "soak.png")
    assert (tmp_path / "soak.png").stat().st_size > 1000


def test_the_commands_are_registered():
    from dspark.platform.cli import cli

    out = CliRunner().invoke(cli, ["reliability", "--help"])
    assert out.exit_code == 0 and "lossless" in out.output and "soak" in out.output
    out = CliRunner().invoke(cli, ["reliability", "soak", "--help"])
    assert "--duration-s" in out.output and "--clients" in out.output


def test_a_failing_draft_worker_is_backed_off_and_drafting_resumes(tiny_checkpoints):
    """Each failed call waits out the transport's timeout; after one, the worker is left alone for
    a growing back-off (those steps decode plainly at once) and is called again once it passed."""
    from _helpers import MASK_ID, drafter_config, hf_greedy, prompts
    from dspark.drafter_service.registry import build_drafter
    from dspark.drafter_service.remote import RemoteDrafter
    from dspark.drafter_service.worker import DraftWorkerCore
    from dspark.platform.config import TargetConfig
    from dspark.platform.contracts import GenerationRequest, SamplingParams
    from dspark.platform.target.loading import load_target
    from dspark.scheduler.policies import FixedPolicy
    from dspark.verifier_service.engine import VerifierEngine

    target = load_target(TargetConfig(path=str(tiny_checkpoints["qwen3"])), with_tokenizer=False)
    torch.manual_seed(0)
    worker = DraftWorkerCore(lambda: build_drafter(drafter_config("dspark-gated"), target, mask_token_id=MASK_ID))
    box = {"now": 0.0, "down": True, "calls": 0}

    def transport(call):
        box["calls"] += 1
        if box["down"]:
            raise TimeoutError("no draft worker")
        return worker.call(call)

    remote = RemoteDrafter(transport, 4, target.vocab_size, retry_min_s=0.5, retry_max_s=2.0, clock=lambda: box["now"])
    eng = VerifierEngine(target, remote, FixedPolicy(), max_batch_size=2)
    ps = prompts(target.vocab_size, [5, 7], seed=1)
    for i, p in enumerate(ps):
        eng.add_request(GenerationRequest(str(i), tuple(p), SamplingParams(max_tokens=60, ignore_eos=True)))
    calls_at = []
    done = {}
    for step in range(200):
        box["now"] = step * 0.1  # 0.1 s per step
        box["down"] = step < 40
        before = box["calls"]
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o
        if box["calls"] > before:
            calls_at.append(step)
        if not eng.has_unfinished():
            break
    # down for 40 steps (4 s): called at step 0, then only after back-offs of 0.5, 1, 2, 2 s
    down = [s for s in calls_at if s < 40]
    assert down[0] == 0 and 3 <= len(down) <= 4, calls_at
    assert all(b - a >= 5 for a, b in zip(down, down[1:])), calls_at
    assert remote.backed_off >= 30
    up = [s for s in calls_at if s >= 40]  # back: called again within one back-off, then every step
    assert up and up[0] <= 61 and up == list(range(up[0], up[0] + len(up))), calls_at
    for i, p in enumerate(ps):
        assert list(done[str(i)].token_ids) == hf_greedy(target, p, 60)
