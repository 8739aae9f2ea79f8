"""Nothing lost, nothing changed: many greedy requests through the served application, compared
with the target's own greedy decoding, and seeded sampled requests, compared with the target's own
sampling for the same seed and sent twice.

Contract checked (``dspark reliability lossless``):

* every greedy request is answered, and its text, its token count (``usage.completion_tokens``)
  and its finish reason equal what the *plain* engine (``VerifierEngine`` without a drafter,
  tested equal to transformers' ``generate`` elsewhere) decodes for the same prompt ids, cut by
  the stop rule below;
* a sampled request with a seed gives the text the plain engine samples with that seed (seeded
  requests use position-keyed noise, ``platform/sampling.py``: their tokens do not depend on
  drafting, verify lengths or batch neighbours), and therefore the same text twice.

The stop rule is the engine's (``VerifierEngine._emit``): tokens are appended one at a time and
the first of these ends the request, *including* the token that triggered it — the server
returns the stop string, it does not cut the text before it:

1. the token is an end-of-text token and the request does not ignore end-of-text -> ``stop``;
2. the decoded generated text (special tokens skipped) contains one of the stop strings -> ``stop``;
3. the ``max_tokens``-th token -> ``length``.

The reference applies rule 2 to the *whole* generated text, where the engine looks at a tail of
``len(stop) + 4`` tokens, so a disagreement between the two would show up here too. Greedy
decoding is prefix-stable, so one plain run per prompt, as long as its longest request, serves
every request on that prompt. The served text is compared with the reference token ids decoded
the way the ingress decodes them (``skip_special_tokens``): the OpenAI API returns text, not ids,
so ids are checked through their text, their count and the finish reason together.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from dspark.platform.bench.load import LoadRequest, RequestRecord

__all__ = ["Case", "Mismatch", "LosslessResult", "build_cases", "sampled_requests", "prompt_ids",
           "greedy_reference", "sampled_reference", "expected_output", "compare", "compare_sampled",
           "compare_to_reference", "passed", "render_markdown"]

MAX_TOKENS = (1, 4, 16, 32, 64, 128)
# stop-string sets for Python-like text: frequent ("\n"), rarer ("\n\n", "return"), multi-string
STOPS: tuple[tuple[str, ...], ...] = ((), (), ("\n",), ("\n\n",), ("return", ":"), (")",), ("def ", "class "), ("=",))


@dataclass(frozen=True)
class Case:
    """One greedy request and the prompt ids the ingress will make of it."""

    index: int
    request: LoadRequest
    prompt_ids: tuple[int, ...]
    kind: str  # "text" | "ids" | "chat"


@dataclass(frozen=True)
class Mismatch:
    index: int
    what: str  # e.g. "text, tokens" or the request's error
    want_text: str
    got_text: str
    want_tokens: int
    got_tokens: int
    want_finish: str
    got_finish: str | None


@dataclass
class LosslessResult:
    greedy: int
    errors: int  # greedy requests that got no complete answer
    mismatches: list[Mismatch]
    finish_counts: dict[str, int]  # expected finish reasons: length / stop (string) / stop (end-of-text)
    kinds: dict[str, int]
    tokens: int
    seconds: float
    tokens_per_step: float | None
    sampled: int
    sampled_identical: int
    sampled_errors: int
    reference_seconds: float
    sampled_as_plain: int = 0  # first-run samples equal to the plain engine's for the same seed
    notes: list[str] = field(default_factory=list)


def prompt_ids(tokenizer: Any, req: LoadRequest) -> tuple[int, ...]:
    """The prompt token ids the ingress makes of ``req`` (``Ingress._prompt_ids``)."""
    if req.chat:
        from dspark.platform.serving.app import chat_ids

        return tuple(chat_ids(tokenizer, [{"role": "user", "content": req.prompt}]))
    if isinstance(req.prompt, list):
        return tuple(req.prompt)
    return tuple(tokenizer(req.prompt, add_special_tokens=False)["input_ids"])


def _prompts(n: int, seed: int) -> list[str]:
    """``n`` prompts of mixed lengths from the demo corpus's test split: short, medium and long."""
    from dspark.platform.bench.load import text_prompts

    k = (n + 2) // 3
    out = (text_prompts(k, min_chars=12, max_chars=48, seed=seed)
           + text_prompts(k, min_chars=80, max_chars=320, seed=seed + 1)
           + text_prompts(k, min_chars=500, max_chars=1100, seed=seed + 2))
    random.Random(seed).shuffle(out)
    return out[:n]


def build_cases(tokenizer: Any, n: int, *, max_model_len: int, seed: int = 0, repeats: int = 2) -> list[Case]:
    """``n`` greedy requests on ``ceil(n / repeats)`` prompts of mixed lengths, with mixed
    ``max_tokens``, stop strings and end-of-text handling; one in ten is a chat request and one
    in ten sends its prompt as token ids. A prompt longer than 3/4 of ``max_model_len`` is cut,
    and ``max_tokens`` is lowered where prompt + max_tokens would pass ``max_model_len`` (the
    server would refuse the request)."""
    rng = random.Random(seed)
    prompts = _prompts(-(-n // repeats), seed)
    cases = []
    for i in range(n):
        text = prompts[i % len(prompts)]
        roll = rng.random()
        kind = "chat" if roll < 0.1 else "ids" if roll < 0.2 else "text"
        ids = prompt_ids(tokenizer, LoadRequest(text, 1, chat=kind == "chat"))
        while len(ids) > max_model_len * 3 // 4 and len(text) > 1:  # a long prompt, with room left to answer
            text = text[: len(text) * 3 // 4]
            ids = prompt_ids(tokenizer, LoadRequest(text, 1, chat=kind == "chat"))
        max_tokens = min(rng.choice(MAX_TOKENS), max_model_len - len(ids))
        req = LoadRequest(list(ids) if kind == "ids" else text, max_tokens, temperature=0.0,
                          stop=rng.choice(STOPS), ignore_eos=rng.random() < 0.5, chat=kind == "chat")
        cases.append(Case(i, req, ids, kind))
    return cases


def sampled_requests(cases: Sequence[Case], n: int, *, temperature: float = 0.8, seed: int = 0) -> list[LoadRequest]:
    """``n`` sampled requests (one seed each) on the greedy cases' prompts."""
    rng = random.Random(seed + 7)
    out = []
    for i in range(n):
        c = cases[(i * 7) % len(cases)].request
        out.append(LoadRequest(c.prompt, min(c.max_tokens, 48) if c.max_tokens > 1 else 16, temperature=temperature,
                               seed=1000 + i, stop=rng.choice(STOPS), ignore_eos=rng.random() < 0.5, chat=c.chat))
    return out


def greedy_reference(target: Any, prompts: dict[tuple[int, ...], int], *, max_model_len: int, max_batch_size: int = 32,
                     progress: Callable[[int], None] | None = None
                     ) -> tuple[dict[tuple[int, ...], list[int]], frozenset[int]]:
    """(prompt ids -> the plain engine's greedy continuation of that many tokens, end-of-text
    ignored; the engine's end-of-text token ids)."""
    from dspark.platform.contracts import GenerationRequest, SamplingParams
    from dspark.verifier_service.engine import VerifierEngine

    engine = VerifierEngine(target, None, max_batch_size=max_batch_size, max_model_len=max_model_len)
    keys = list(prompts)
    for i, ids in enumerate(keys):
        engine.add_request(GenerationRequest(str(i), ids, SamplingParams(max_tokens=prompts[ids], ignore_eos=True)))
    out: dict[tuple[int, ...], list[int]] = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                out[keys[int(o.request_id)]] = list(o.token_ids)
                if progress is not None:
                    progress(1)
    return out, engine.eos_token_ids


def expected_output(ref: Sequence[int], req: LoadRequest, eos_ids: frozenset[int],
                    tokenizer: Any) -> tuple[list[int], str]:
    """(token ids, finish reason) the server must return for ``req``, from the greedy ``ref``
    (at least ``req.max_tokens`` long), by the stop rule of the module docstring."""
    for k in range(1, req.max_tokens + 1):
        t = ref[k - 1]
        if not req.ignore_eos and t in eos_ids:
            return list(ref[:k]), "stop"
        if req.stop and any(s in tokenizer.decode(list(ref[:k]), skip_special_tokens=True) for s in req.stop):
            return list(ref[:k]), "stop"
    return list(ref[: req.max_tokens]), "length"


def _finish_kind(ids: list[int], finish: str, req: LoadRequest, eos_ids: frozenset[int]) -> str:
    if finish == "length":
        return "length"
    return "stop (end-of-text)" if not req.ignore_eos and ids[-1] in eos_ids else "stop (string)"


def compare(cases: Sequence[Case], records: Sequence[RequestRecord], refs: dict, eos_ids: frozenset[int],
            tokenizer: Any) -> tuple[list[Mismatch], int, dict[str, int]]:
    """(mismatches, errors, expected finish counts); a request that failed is a mismatch too."""
    bad, errors, finishes = [], 0, {}
    for case, rec in zip(cases, records):
        ids, finish = expected_output(refs[case.prompt_ids], case.request, eos_ids, tokenizer)
        kind = _finish_kind(ids, finish, case.request, eos_ids)
        finishes[kind] = finishes.get(kind, 0) + 1
        want = tokenizer.decode(ids, skip_special_tokens=True)
        if rec.error is not None:
            errors += 1
            bad.append(Mismatch(case.index, f"error: {rec.error}", want, rec.text, len(ids), rec.tokens, finish,
                                rec.finish_reason))
            continue
        what = [name for name, ok in (("text", rec.text == want), ("tokens", rec.tokens == len(ids)),
                                      ("finish_reason", rec.finish_reason == finish)) if not ok]
        if what:
            bad.append(Mismatch(case.index, ", ".join(what), want, rec.text, len(ids), rec.tokens, finish,
                                rec.finish_reason))
    return bad, errors, finishes


def sampled_reference(target: Any, reqs: Sequence[LoadRequest], *, max_model_len: int, max_batch_size: int = 32
                      ) -> list[tuple[str, int, str]]:
    """(text, token count, finish reason) the plain engine gives each seeded sampled request, with
    the request's own parameters (the engine's stop rule)."""
    from dspark.platform.contracts import GenerationRequest, SamplingParams
    from dspark.verifier_service.engine import VerifierEngine

    tok = target.tokenizer
    engine = VerifierEngine(target, None, max_batch_size=max_batch_size, max_model_len=max_model_len)
    outs = engine.generate([
        GenerationRequest(str(i), prompt_ids(tok, r), SamplingParams(
            max_tokens=r.max_tokens, temperature=r.temperature, seed=r.seed, stop=tuple(r.stop), ignore_eos=r.ignore_eos))
        for i, r in enumerate(reqs)])
    return [(tok.decode(list(o.token_ids), skip_special_tokens=True), len(o.token_ids), o.finish_reason)
            for o in (outs[str(i)] for i in range(len(reqs)))]


def compare_to_reference(records: Sequence[RequestRecord], ref: Sequence[tuple[str, int, str]]) -> int:
    """Records equal (text, token count, finish reason) to their reference entries."""
    return sum(r.error is None and (r.text, r.tokens, r.finish_reason) == tuple(w) for r, w in zip(records, ref))


def compare_sampled(first: Sequence[RequestRecord], second: Sequence[RequestRecord]) -> tuple[int, int]:
    """(pairs identical in text, token count and finish reason, pairs with an error)."""
    same = errors = 0
    for a, b in zip(first, second):
        if a.error is not None or b.error is not None:
            errors += 1
        elif (a.text, a.tokens, a.finish_reason) == (b.text, b.tokens, b.finish_reason):
            same += 1
    return same, errors


def _short(s: str, n: int = 60) -> str:
    s = s if len(s) <= n else s[:n] + "…"
    return s.replace("\n", "\\n").replace("|", "\\|").replace("`", "'")


def render_markdown(r: LosslessResult, *, concurrency: int, what: str) -> str:
    from dspark.platform.bench.report import markdown_table

    tps = "–" if r.tokens_per_step is None else f"{r.tokens_per_step:.2f}"
    rows = [
        ["greedy requests", r.greedy],
        ["failed (no complete answer)", r.errors],
        ["**mismatches** vs the target's greedy output (text, token count or finish reason; failed included)",
         f"**{len(r.mismatches)}**"],
        ["expected finish: " + ", ".join(f"{k} {v}" for k, v in sorted(r.finish_counts.items())), ""],
        ["prompts sent as: " + ", ".join(f"{k} {v}" for k, v in sorted(r.kinds.items())), ""],
        ["completion tokens compared", r.tokens],
        ["wall time of the greedy + first sampled run (s)", f"{r.seconds:.0f}"],
        ["mean tokens per verify step (usage.dspark)", tps],
        ["reference (plain engine, local) time (s)", f"{r.reference_seconds:.0f}"],
        ["sampled requests (temperature 0.8, one seed each), sent twice", r.sampled],
        ["**equal to the plain engine's samples for the same seed** (text, token count, finish reason)",
         f"**{r.sampled_as_plain}**"],
        ["**identical across the two runs**", f"**{r.sampled_identical}**"],
        ["sampled pairs with an error", r.sampled_errors],
    ]
    out = [f"{what}. {r.greedy} greedy requests at concurrency {concurrency} (streaming, `openai` client): "
           f"prompts of mixed lengths from the demo corpus's test split, max_tokens from {list(MAX_TOKENS)}, "
           "stop strings from " + ", ".join(f"`{_short(repr(list(s)))}`" for s in STOPS if s)
           + " or none, end-of-text ignored or not (half each). Each is compared with the plain engine's greedy "
           "decoding of the same prompt ids cut by the server's stop rule (the stop string is returned; "
           "`platform/reliability/lossless.py`). The sampled requests ride along with the greedy run, then run "
           "again alone in reverse order at concurrency 8, so their batch neighbours differ; both runs are compared "
           "with the plain engine's own sampling of the same seeded requests.", "",
           markdown_table(["", "count"], rows), ""]
    if r.mismatches:
        out += ["First mismatches:", "",
                markdown_table(["#", "what", "want (tokens, finish)", "got (tokens, finish)", "want text", "got text"],
                               [[m.index, _short(m.what, 80), f"{m.want_tokens}, {m.want_finish}",
                                 f"{m.got_tokens}, {m.got_finish}", f"`{_short(m.want_text)}`",
                                 f"`{_short(m.got_text)}`"]
                                for m in r.mismatches[:10]]), ""]
    out += [f"- {n}" for n in r.notes]
    return "\n".join(out)


def run_lossless(serve: Callable[[], Any], target: Any, *, requests: int, concurrency: int, sampled: int,
                 max_model_len: int, seed: int = 0, log: Callable[[str], None] = print) -> LosslessResult:
    """The whole check: cases, the reference (plain engine on ``target``, in this process, before
    anything is served so the two do not compete for the CPU), then ``serve()``, a context manager
    yielding the ``dspark.platform.bench.serve.Endpoint`` under test, the load runs and the
    comparison."""
    import time

    import torch
    from tqdm.auto import tqdm

    from dspark.platform.bench.load import run_load_sync, summarize

    tok = target.tokenizer
    cases = build_cases(tok, requests, max_model_len=max_model_len, seed=seed)
    extra = sampled_requests(cases, sampled, seed=seed)
    need: dict[tuple[int, ...], int] = {}
    for c in cases:
        need[c.prompt_ids] = max(need.get(c.prompt_ids, 0), c.request.max_tokens)
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a small model on a shared CPU: one thread is much faster than contended ones
    try:
        with tqdm(total=len(need), desc="reference (plain engine)", unit="prompt") as bar:
            refs, eos = greedy_reference(target, need, max_model_len=max_model_len, progress=bar.update)
        sampled_ref = sampled_reference(target, extra, max_model_len=max_model_len)
    finally:
        torch.set_num_threads(threads)
    ref_s = time.perf_counter() - t0

    # run 1: greedy and sampled interleaved (the sampled ones spread evenly)
    order: list[tuple[str, int]] = []
    every, j = max(1, len(cases) // (len(extra) + 1)), 0
    for i in range(len(cases)):
        order.append(("g", i))
        if (i + 1) % every == 0 and j < len(extra):
            order.append(("s", j))
            j += 1
    order += [("s", k) for k in range(j, len(extra))]
    reqs = [cases[i].request if k == "g" else extra[i] for k, i in order]
    with serve() as endpoint:
        log(f"{len(cases)} greedy + {len(extra)} sampled requests to {endpoint.url} at concurrency {concurrency} ...")
        with tqdm(total=len(reqs), desc="run 1 (greedy + sampled)", unit="req") as bar:
            recs, seconds = run_load_sync(endpoint.url, endpoint.model, reqs, concurrency=concurrency,
                                          api_key=endpoint.api_key, progress=lambda _r: bar.update(1))
        # run 2: the sampled ones alone, reversed, fewer at a time: other batch neighbours
        with tqdm(total=len(extra), desc="run 2 (sampled again)", unit="req") as bar:
            again, _ = run_load_sync(endpoint.url, endpoint.model, extra[::-1], concurrency=min(8, concurrency),
                                     api_key=endpoint.api_key, progress=lambda _r: bar.update(1))
    greedy_recs: list[RequestRecord] = [None] * len(cases)  # type: ignore[list-item]
    first: list[RequestRecord] = [None] * len(extra)  # type: ignore[list-item]
    for (k, i), rec in zip(order, recs):
        (greedy_recs if k == "g" else first)[i] = rec
    second = again[::-1]
    bad, errors, finishes = compare(cases, greedy_recs, refs, eos, tok)
    same, s_err = compare_sampled(first, second)
    as_plain = compare_to_reference(first, sampled_ref)
    s = summarize(greedy_recs, seconds)
    kinds: dict[str, int] = {}
    for c in cases:
        kinds[c.kind] = kinds.get(c.kind, 0) + 1
    notes = []
    if bad:
        notes.append(_recheck(target, cases, greedy_recs, bad, max_model_len))
    return LosslessResult(len(cases), errors, bad, finishes, kinds, s.tokens, seconds, s.tokens_per_step,
                          len(extra), same, s_err, ref_s, sampled_as_plain=as_plain, notes=notes)


def passed(r: LosslessResult) -> bool:
    """No greedy mismatch, and every seeded sample equal to the plain engine's and to its repeat."""
    return not r.mismatches and r.sampled_as_plain == r.sampled_identical == r.sampled


def _recheck(target: Any, cases: Sequence[Case], records: Sequence[RequestRecord], bad: Sequence[Mismatch],
             max_model_len: int) -> str:
    """Mismatches that are not errors, decoded again one at a time by the plain engine with the
    request's own parameters (the engine's stop rule): tells a batch-composition rounding
    difference (the server equals batch-1 decoding) from a real deviation."""
    from dspark.platform.contracts import GenerationRequest, SamplingParams
    from dspark.verifier_service.engine import VerifierEngine

    tok = target.tokenizer
    eng = VerifierEngine(target, None, max_batch_size=1, max_model_len=max_model_len)
    agree = 0
    checked = [m for m in bad if not m.what.startswith("error")]
    for m in checked:
        c, rec = cases[m.index], records[m.index]
        p = SamplingParams(max_tokens=c.request.max_tokens, stop=tuple(c.request.stop), ignore_eos=c.request.ignore_eos)
        out = eng.generate([GenerationRequest("r", c.prompt_ids, p)])["r"]
        if tok.decode(list(out.token_ids), skip_special_tokens=True) == rec.text and len(out.token_ids) == rec.tokens:
            agree += 1
    return (f"of the {len(checked)} differing outputs, {agree} equal the plain engine run at batch 1 with the "
            "request's own stop parameters")
