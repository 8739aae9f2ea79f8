"""The verifier engine: a batched, continuously batching decoder over a frozen target that owns
its KV state and verifies drafted blocks losslessly.

One request's life (notation of the drafter interface: the *anchor* x_p is the newest token,
emitted but not yet run through the target; p is its position = the slot's committed KV length):

1. ``add_request`` queues it (length limits checked, bad input refused with the reason).
2. Admission (start of a step, while slots are free): chunked prefill of the prompt into a free
   slot; the target's distribution at the last prompt position gives the first token, which
   becomes the anchor. The prompt's target features go to the drafter's context.
3. Each step, for all running requests at once: the drafter proposes γ tokens; the verify-length
   policy picks ℓ_r ≤ γ per request (0 allowed: plain decoding is the same path); one target
   forward over every row's ``[anchor, d_1..d_ℓ]`` (ragged, right-padded); chain rejection sampling
   (greedy = longest matching prefix + the target's token) emits ``a_r + 1`` tokens; the slot's KV
   length becomes ``p + a_r + 1`` (rollback of rejected drafts is a length change) and the
   committed tokens' features go to the drafter.
4. Stop tokens, stop strings and ``max_tokens`` end it; its slot is freed and the running batch
   compacted (the last slot moves into the hole), so every forward sees slots ``0..R-1``.

The drafter is any object with the methods of ``dspark.drafter_service.base.Drafter`` (this
package does not import the drafter service: in serving it may be a remote draft worker). If the
drafter raises, the step falls back to plain decoding for every request (ℓ = 0) and counts it;
output stays exact because plain decoding is the target's own sampling.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from dspark.platform.contracts import GenerationRequest, RequestOutput, RequestStats, SamplingParams
from dspark.platform.sampling import (
    SamplingBatch,
    draw_exponentials,
    greedy_verify,
    keyed_exponentials,
    logits_to_probs,
    rejection_sample,
    sample_from_probs,
)
from dspark.platform.target.loading import FrozenTarget
from dspark.scheduler.policies import (
    BatchView,
    FixedPolicy,
    LegacyPolicy,
    OffPolicy,
    VerifyPolicy,
    clip_lengths,
    decide_lengths,
    should_draft,
)
from dspark.verifier_service.draft_context import DraftContext
from dspark.verifier_service.kv_cache import SlotKVCache

__all__ = ["EngineTimings", "RequestRejected", "StepRecord", "VerifierEngine", "run_to_completion"]

log = logging.getLogger(__name__)


class RequestRejected(ValueError):
    """The request cannot be served as asked (too long, unknown id, ...). Message is for users."""


@dataclass
class _Running:
    request: GenerationRequest
    generator: torch.Generator
    key: int | None = None  # noise key of a seeded request (E(key, n) per output index n); None = generator
    anchor: int = -1  # newest emitted token, not yet in the target's KV
    position: int = 0  # the anchor's position = committed KV length
    generated: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    fallback_steps: int = 0
    drafting: bool = True  # False once the drafter lost this request's context: plain decoding from then on
    proposed_at: list[int] = field(default_factory=list)
    accepted_at: list[int] = field(default_factory=list)

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    def stats(self) -> RequestStats:
        return RequestStats(self.steps, self.drafted, self.accepted, tuple(self.proposed_at), tuple(self.accepted_at), self.fallback_steps)


@dataclass
class EngineTimings:
    """Wall time the engine spent per phase (seconds; the device is synchronised at phase ends,
    so on GPU these are real durations, not launch times) and how many of each it ran."""

    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0  # target forward + acceptance + commit
    prefills: int = 0  # batched prefill calls
    steps: int = 0  # verify steps
    tokens: int = 0  # tokens emitted

    def per_step_ms(self) -> tuple[float, float]:
        """(draft ms, verify ms) per verify step."""
        n = max(self.steps, 1)
        return 1e3 * self.draft_s / n, 1e3 * self.verify_s / n


@dataclass(frozen=True)
class StepRecord:
    """What one verify step decided, for evaluation and calibration (``observer`` hook).
    Row r: request ``request_ids[r]`` verified ``lengths[r]`` drafts and accepted ``accepted[r]``."""

    request_ids: tuple[str, ...]
    lengths: tuple[int, ...]  # ℓ_r after policy and max_tokens clipping
    accepted: tuple[int, ...]  # a_r <= ℓ_r
    confidences: Any  # [R, γ] float numpy array of the drafter's confidences, or None
    fallback: bool  # the drafter failed this step (ℓ = 0 for all)
    draft_s: float | None = None  # wall seconds of the step's draft phase (policy included), as in EngineTimings
    verify_s: float | None = None  # wall seconds of its verify phase (forward, acceptance, commit)


def _scatter_block(block, rows: list[int], R: int):
    """A DraftBlock of ``len(rows)`` requests placed at ``rows`` of an R-row block (other rows zero)."""
    def scatter(x):
        if x is None:
            return None
        full = x.new_zeros((R, *x.shape[1:]))
        full[rows] = x
        return full

    return type(block)(scatter(block.tokens), scatter(block.logits), scatter(block.confidences))


def run_to_completion(engine: Any, requests: Iterable[GenerationRequest]) -> dict[str, RequestOutput]:
    """Add ``requests`` to anything with the engine's add_request/step/has_unfinished (an engine,
    a tensor-parallel group) and step until all finish; the final output of each."""
    for req in requests:
        engine.add_request(req)
    final: dict[str, RequestOutput] = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    return final


class VerifierEngine:
    """Plain class (no Ray). ``drafter=None`` or an ``OffPolicy`` gives plain decoding."""

    def __init__(
        self,
        target: FrozenTarget,
        drafter: Any = None,
        policy: VerifyPolicy | LegacyPolicy | None = None,
        *,
        max_batch_size: int = 16,
        max_model_len: int | None = None,
        prefill_chunk: int = 256,
        seed: int = 0,
        observer: Callable[[StepRecord], None] | None = None,
        max_deferred_context: int = 64,
        reproducible_seeds: bool = True,
    ):
        if max_batch_size < 1 or prefill_chunk < 1:
            raise ValueError("max_batch_size and prefill_chunk must be >= 1")
        self.target = target
        self.drafter = drafter
        self.policy = policy if policy is not None else (FixedPolicy() if drafter is not None else OffPolicy())
        # cap on the draft tokens verified per step (Σ_r ℓ_r), set by the cluster scheduler's client;
        # None = no cap, 0 = plain decoding (the drafter is then not called at all)
        self.verify_budget: int | None = None
        self.gamma = int(getattr(drafter, "block_size", 0)) if drafter is not None else 0
        limit = int(getattr(target.config, "max_position_embeddings", 0) or 0) or 4096
        self.max_model_len = min(max_model_len or limit, limit)
        self.max_batch_size = max_batch_size
        self.prefill_chunk = prefill_chunk
        self.vocab_size = target.vocab_size
        self.device = target.device
        self.cache = SlotKVCache(
            target.num_layers, max_batch_size, self.max_model_len + self.gamma + 1, self.device, target.dtype
        )
        # the drafter's context; a step that does not draft defers its hand-over (draft_context.py)
        self.context = DraftContext(drafter, max_deferred_context) if drafter is not None else None
        if drafter is not None:
            drafter.allocate(max_batch_size, self.max_model_len + self.gamma + 1)
        self._float_mask = getattr(target.config, "_attn_implementation", "sdpa") == "eager"
        gen_cfg = getattr(target.model, "generation_config", None)
        eos = getattr(gen_cfg, "eos_token_id", None)
        if eos is None:
            eos = getattr(target.config, "eos_token_id", None)
        self.eos_token_ids: frozenset[int] = frozenset([eos] if isinstance(eos, int) else (eos or []))
        self.tokenizer = target.tokenizer
        self.seed = seed
        # seeded sampled requests use position-keyed noise (True) or their generator (chain rejection)
        self.reproducible_seeds = reproducible_seeds
        self._seeded = 0
        self.waiting: collections.deque[_Running] = collections.deque()
        self.running: list[_Running] = []  # index in this list == slot
        self.total_fallback_steps = 0
        self._drafter_failing = False
        self.skipped_draft_steps = 0  # steps the policy decided not to draft (the pass would not pay)
        self.draft_steps = 0  # steps that ran a draft pass (propose called)
        self.context_failures = 0  # append_context failures (those requests stopped drafting)
        self.timings = EngineTimings()
        # step observers (evaluation, traces, the scheduler client); one failing never fails a step
        self.observers: list[Callable[[StepRecord], None]] = [observer] if observer is not None else []

    def add_observer(self, fn: Callable[[StepRecord], None]) -> None:
        """Call ``fn`` with the :class:`StepRecord` of every verify step (after the commit)."""
        self.observers.append(fn)

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    # ------------------------------------------------------------------ public API
    def add_request(self, request: GenerationRequest) -> None:
        n, p = len(request.prompt_token_ids), request.params
        if n + p.max_tokens > self.max_model_len:
            raise RequestRejected(
                f"request {request.request_id!r}: prompt ({n} tokens) + max_tokens ({p.max_tokens}) "
                f"exceeds the context length ({self.max_model_len})"
            )
        if max(request.prompt_token_ids) >= self.vocab_size:
            raise RequestRejected(f"request {request.request_id!r}: token id {max(request.prompt_token_ids)} outside the vocabulary ({self.vocab_size})")
        if p.stop and self.tokenizer is None:
            raise RequestRejected("stop strings need a target loaded with its tokenizer")
        if any(r.request.request_id == request.request_id for r in (*self.waiting, *self.running)):
            raise RequestRejected(f"request id {request.request_id!r} is already in use")
        seed = p.seed if p.seed is not None else (self.seed * 1_000_003 + self._seeded)
        self._seeded += 1
        # a seeded request samples with position-keyed noise (reproducible whatever the verify
        # lengths) unless reproducible_seeds is off; the others with their generator and chain
        # rejection sampling (platform.sampling)
        self.waiting.append(_Running(request, torch.Generator(device="cpu").manual_seed(seed),
                                     key=p.seed if self.reproducible_seeds else None))

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its slot; returns its last state (None if unknown)."""
        for i, r in enumerate(self.waiting):
            if r.request.request_id == request_id:
                del self.waiting[i]
                return self._finish_output(r, "abort", ())
        for slot, r in enumerate(self.running):
            if r.request.request_id == request_id:
                out = self._finish_output(r, "abort", ())
                self._free_slots([slot])
                return out
        return None

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def step(self) -> list[RequestOutput]:
        """Admit what fits (one batched prefill), then one verify step for every running request."""
        outputs: list[RequestOutput] = []
        admitted: list[_Running] = []
        while self.waiting and len(self.running) + len(admitted) < self.max_batch_size:
            admitted.append(self.waiting.popleft())
        if admitted:
            # longest prompt first: the rows still prefilling in any chunk are then a contiguous
            # run of slots starting at the first new one
            admitted.sort(key=lambda r: -len(r.request.prompt_token_ids))
            start = len(self.running)
            self.running.extend(admitted)
            t0 = self._now()
            firsts = self._prefill(start, admitted)
            self.timings.prefill_s += self._now() - t0
            self.timings.prefills += 1
            done = []
            for i, r in enumerate(admitted):
                outputs.append(self._emit(r, [firsts[i]]))
                if r.finished:
                    done.append(start + i)
            self._free_slots(done)
        if self.running:
            outputs.extend(self._verify_step())
        return outputs

    def generate(self, requests: Iterable[GenerationRequest]) -> dict[str, RequestOutput]:
        """Run requests to completion; returns the final output of each."""
        return run_to_completion(self, requests)

    # ------------------------------------------------------------------ internals
    def _forward(self, start: int, ids: torch.Tensor, *, logits_positions, with_features: bool):
        """One target forward of ``ids`` [R, q] for slots start..start+R-1 through the slot cache."""
        R, q = ids.shape
        self.cache.begin(start, R, q)
        try:
            return self.target(
                ids.to(self.device),
                position_ids=self.cache.positions(),
                attention_mask=self.cache.attention_mask(as_float=self._float_mask),
                past_key_values=self.cache,
                use_cache=True,
                logits_positions=logits_positions,
                with_features=with_features,
            )
        finally:
            self.cache.end()

    def _prefill(self, start: int, rs: list[_Running]) -> list[int]:
        """Chunked prefill of ``rs`` (longest prompt first) into slots ``start..start+len-1`` in
        one forward per chunk; returns each request's first token, sampled from the target."""
        lens = [len(r.request.prompt_token_ids) for r in rs]
        with_features = self.drafter is not None
        for i in range(len(rs)):
            self.cache.set_length(start + i, 0)
            if self.context is not None:
                self.context.reset(start + i)
        last_hidden: list[torch.Tensor | None] = [None] * len(rs)
        for c0 in range(0, lens[0], self.prefill_chunk):
            rows = sum(n > c0 for n in lens)  # a prefix of rs, as lens is descending
            q = min(self.prefill_chunk, lens[0] - c0)
            ids = torch.zeros((rows, q), dtype=torch.long)  # [rows, q] right-padded with token 0
            take = torch.tensor([min(q, lens[i] - c0) for i in range(rows)])  # [rows]
            for i in range(rows):
                ids[i, : take[i]] = torch.tensor(rs[i].request.prompt_token_ids[c0 : c0 + int(take[i])])
            out = self._forward(start, ids, logits_positions=None, with_features=with_features)
            for i in range(rows):
                self.cache.set_length(start + i, c0 + int(take[i]))
                if lens[i] <= c0 + q:
                    last_hidden[i] = out.last_hidden[i, int(take[i]) - 1]
            if self.drafter is not None:
                self._append_context(list(range(start, start + rows)), ids, out, take)
        logits = self.target.lm_head(torch.stack(last_hidden)).float()  # [n, V]
        batch = self._sampling_batch(rs)  # output index 0 of every request
        probs = logits_to_probs(logits, batch.temperature, batch.top_k, batch.top_p)
        tokens = sample_from_probs(probs, batch.exponentials(self.vocab_size, probs.device)).tolist()
        for r, n, t in zip(rs, lens, tokens):
            r.position, r.anchor = n, int(t)
        return [int(t) for t in tokens]

    def _append_context(self, slots: list[int], tokens: torch.Tensor, out, lengths: torch.Tensor, *,
                        defer: bool = False) -> None:
        """Give the drafter the committed ``tokens`` [n, k] of ``slots`` with their target features
        (``defer``: later, batched; see ``DraftContext``)."""
        self._context_failed(self.context.append(slots, tokens, out.features, out.last_hidden, lengths, defer=defer))

    def _context_failed(self, slots: list[int]) -> None:
        """Requests whose drafter context could not be updated stop drafting (it would be out of
        step) and decode plainly from here on; output is unaffected."""
        if not slots:
            return
        self.context_failures += 1
        for slot in slots:
            self.running[slot].drafting = False
            try:
                self.context.reset(slot)
            except Exception:
                log.exception("drafter.reset_slot failed")

    def _sampling_batch(self, rs: list[_Running] | None = None) -> SamplingBatch:
        """Sampling rows of ``rs`` (default: the running batch); each row's offset is the output
        index of the next token it samples."""
        rs = self.running if rs is None else rs
        return SamplingBatch.from_params([(r.params.temperature, r.params.top_k, r.params.top_p) for r in rs],
                                         [r.generator for r in rs], [r.key for r in rs], [len(r.generated) for r in rs])

    def _verify_step(self) -> list[RequestOutput]:
        R = len(self.running)
        sampling = self._sampling_batch()
        anchors = torch.tensor([r.anchor for r in self.running], dtype=torch.long)
        positions = torch.tensor([r.position for r in self.running], dtype=torch.long)
        block, lengths, fallback, conf = None, [0] * R, False, None
        t0 = self._now()
        rows = [i for i, r in enumerate(self.running) if r.drafting]  # requests whose drafter context is intact
        drafted = False
        if self.drafter is not None and not isinstance(self.policy, OffPolicy) and rows and self.verify_budget != 0:
            try:
                # per-request caps known before drafting: max_tokens left, and 0 for rows not drafting
                limits = tuple(r.params.max_tokens - len(r.generated) - 1 if r.drafting else 0 for r in self.running)
                req_ids = tuple(r.request.request_id for r in self.running)
                if not should_draft(self.policy, BatchView(None, self.gamma, req_ids, self.verify_budget, limits)):
                    self.skipped_draft_steps += 1
                else:
                    self._context_failed(self.context.flush(rows))  # deferred context first
                    rows = [i for i in rows if self.running[i].drafting]
                    drafted = bool(rows)
                if drafted:
                    self.draft_steps += 1
                    block = self.drafter.propose(torch.tensor(rows), anchors[rows], positions[rows], sampling.select(rows))
                    if len(rows) < R:  # scatter to all R rows; the others verify nothing
                        block = _scatter_block(block, rows, R)
                    conf = block.confidences.float().cpu().numpy() if block.confidences is not None else None
                    limits = tuple(m if self.running[i].drafting else 0 for i, m in enumerate(limits))
                    view = BatchView(conf, self.gamma, req_ids, self.verify_budget, limits)
                    lengths = decide_lengths(self.policy, view)  # limits and budget enforced there too
                    self._drafter_failing = False
            except Exception:
                # the first failure of a run with its traceback, the rest quietly (a worker that is
                # away fails every step) until a draft succeeds again
                (log.debug if self._drafter_failing else log.exception)("drafter failed; this step decodes without "
                                                                        "drafts", exc_info=True)
                self._drafter_failing = True
                block, lengths, fallback, conf = None, [0] * R, True, None
                self.total_fallback_steps += 1
        # never verify past max_tokens: the step emits ℓ_accepted + 1 tokens
        lengths = clip_lengths(lengths, [r.params.max_tokens - len(r.generated) - 1 for r in self.running])
        t1 = self._now()
        q = 1 + max(lengths)
        ids = anchors[:, None].repeat(1, q)  # [R, q]; padding repeats the anchor (any valid id)
        for i, l in enumerate(lengths):
            if l:
                ids[i, 1 : 1 + l] = block.tokens[i, :l].cpu()
        want_features = self.drafter is not None
        out = self._forward(0, ids, logits_positions=slice(None), with_features=want_features)
        num_acc, emitted = self._accept(out.logits, block, lengths, sampling)

        # commit: KV keeps [anchor, d_1..d_a]; the drafter gets their features
        for i, r in enumerate(self.running):
            self.cache.set_length(i, r.position + int(num_acc[i]) + 1)
        rows = [i for i in rows if self.running[i].drafting]
        if self.drafter is not None and rows:
            k = int(num_acc[rows].max()) + 1
            feats = out if len(rows) == R else type(out)(out.features[rows], out.last_hidden[rows], None, None)
            # a step that did not draft defers the hand-over: the next one likely will not either
            self._append_context(rows, ids[rows, :k], feats, num_acc[rows] + 1, defer=not drafted)
        t2 = self._now()
        self.timings.draft_s += t1 - t0
        self.timings.verify_s += t2 - t1
        self.timings.steps += 1
        if self.observers:
            record = StepRecord(tuple(r.request.request_id for r in self.running), tuple(lengths),
                                tuple(int(a) for a in num_acc), conf, fallback, t1 - t0, t2 - t1)
            for obs in self.observers:
                try:
                    obs(record)
                except Exception:
                    log.exception("step observer failed")

        outputs, done = [], []
        for i, r in enumerate(self.running):
            a, l = int(num_acc[i]), lengths[i]
            r.steps += 1
            r.drafted += l
            r.accepted += a
            r.fallback_steps += int(fallback)
            if len(r.proposed_at) < self.gamma:
                r.proposed_at.extend([0] * (self.gamma - len(r.proposed_at)))
                r.accepted_at.extend([0] * (self.gamma - len(r.accepted_at)))
            for k in range(l):
                r.proposed_at[k] += 1
                r.accepted_at[k] += int(k < a)
            new = emitted[i, : a + 1].tolist()
            r.position += a + 1
            r.anchor = new[-1]
            outputs.append(self._emit(r, new))
            if r.finished:
                done.append(i)
        self._free_slots(done)
        return outputs

    def _accept(self, logits: torch.Tensor, block, lengths: list[int], sampling: SamplingBatch):
        """Verification over the ragged batch -> (num_accepted [R], emitted [R, max_ℓ+1]), both on CPU.

        Greedy and keyed rows (seeded sampled requests) are verified by matching: the target's
        token at each row is its argmax, or ``argmax(p_t / E(key, n))`` for keyed rows (see
        ``platform.sampling``), and a draft is accepted iff it equals that token. Unkeyed sampled
        rows use chain rejection sampling; in a mixed batch the matched rows enter it as one-hot
        p_t and p_d, which makes it a match for them.

        Verification runs on the logits' device, so on a GPU ``greedy_verify`` / ``rejection_sample``
        take the Triton kernel of ``dspark.kernels.rejection`` when the kernel dispatcher picks it
        (the reference otherwise; on CPU always). Crossing devices: the draft tokens and logits when
        the drafter left them elsewhere; the uniforms [D] and Exp(1) noise [R, V] of unkeyed rows,
        always drawn from the requests' CPU generators (so a seeded request's stream is the same on
        every device and path) and moved to the logits; the two small results, moved back. Keyed
        noise is computed on the logits' device. ``cu`` stays on the CPU: both implementations read
        the ragged layout on the host anyway.
        """
        dev = logits.device
        R = len(lengths)
        counts = torch.tensor(lengths, dtype=torch.long)  # [R]
        cu = torch.zeros(R + 1, dtype=torch.long)  # [R+1]
        cu[1:] = torch.cumsum(counts, 0)
        # target rows in the logits' dtype: argmax and logits_to_probs' float32 upcast see the same values
        rows = self._ragged_rows(logits, [l + 1 for l in lengths])  # [D+R, V]
        if block is not None and cu[-1] > 0:
            draft_tokens = self._ragged_rows(block.tokens, lengths).to(dev)  # [D]
        else:
            draft_tokens = torch.zeros(0, dtype=torch.long, device=dev)  # [0]
        if bool(sampling.greedy.all()):
            return self._to_host(greedy_verify(draft_tokens, rows.argmax(-1), cu))
        per_row = sampling.repeat_interleave(counts + 1)  # row j of request r samples output index n_r + j
        target_probs = logits_to_probs(rows, per_row.temperature, per_row.top_k, per_row.top_p)  # [D+R, V] f32
        keyed = per_row.keyed  # [D+R]
        if any(keyed):
            idx = [i for i, k in enumerate(keyed) if k]
            noise = keyed_exponentials([per_row.keys[i] for i in idx], [per_row.offsets[i] for i in idx],
                                       rows.shape[-1], dev)  # [K, V] E(key, n)
            choice = sample_from_probs(target_probs[idx], noise)  # [K] the target's own tokens
            target_probs[idx] = torch.zeros_like(target_probs[idx]).scatter_(-1, choice[:, None], 1.0)
        if all(keyed[i] or t == 0 for i, t in enumerate(per_row.temperature.tolist())):
            return self._to_host(greedy_verify(draft_tokens, target_probs.argmax(-1), cu))  # all matched
        draft_probs = target_probs.new_zeros((int(cu[-1]), target_probs.shape[-1]))  # [D, V] f32
        if cu[-1] > 0:
            per_draft = sampling.repeat_interleave(counts)
            matched = [k or t == 0 for k, t in zip(per_draft.keyed, per_draft.temperature.tolist())]
            idx = [i for i, m in enumerate(matched) if not m]
            if idx:  # unkeyed sampled drafts: p_d from their logits
                sub = per_draft.select(idx)
                draft_rows = self._ragged_rows(block.logits, lengths)[idx].to(dev)  # [D_s, V]
                draft_probs[idx] = logits_to_probs(draft_rows, sub.temperature, sub.top_k, sub.top_p)
            idx = [i for i, m in enumerate(matched) if m]
            if idx:  # greedy and keyed drafts: one-hot p_d (a remote worker sends no logits for them)
                draft_probs[idx] = torch.zeros_like(draft_probs[idx]).scatter_(-1, draft_tokens[idx][:, None], 1.0)
        uniforms = sampling.uniforms(lengths).to(dev)  # [D], drawn on the CPU generators (zeros for keyed rows)
        noise = draw_exponentials(sampling.generators, rows.shape[-1], skip=sampling.keyed).to(dev)  # [R, V], after the uniforms
        return self._to_host(rejection_sample(draft_tokens, draft_probs, target_probs, cu, uniforms, noise))

    @staticmethod
    def _ragged_rows(x: torch.Tensor, counts: list[int]) -> torch.Tensor:  # [R, q, ...] -> [Σ counts, ...]
        """The first ``counts[r]`` rows of each request, concatenated; a view (no copy) when every
        request uses all q rows and ``x`` is contiguous, one copy otherwise."""
        if counts and all(c == x.shape[1] for c in counts):
            return x.reshape(-1, *x.shape[2:])
        return torch.cat([x[i, :c] for i, c in enumerate(counts)])

    @staticmethod
    def _to_host(result: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(num_accepted [R], emitted [R, max_ℓ+1]) on the CPU, where the commit loop reads them."""
        return result[0].cpu(), result[1].cpu()

    def _emit(self, r: _Running, new: list[int]) -> RequestOutput:
        """Append ``new`` tokens one at a time, exactly as plain decoding would see them: the
        first stop token, stop string or the ``max_tokens``-th token ends the request and the
        rest of the block is dropped, so speculation never emits more than plain decoding."""
        p = r.params
        stops = set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_token_ids)
        window = max((len(s) for s in p.stop), default=0) + 4  # tokens of text tail to search
        kept: list[int] = []
        for t in new:
            kept.append(t)
            r.generated.append(t)
            if t in stops:
                r.finished, r.finish_reason = True, "stop"
            elif p.stop and any(s in self.tokenizer.decode(r.generated[-window:], skip_special_tokens=True) for s in p.stop):
                r.finished, r.finish_reason = True, "stop"
            elif len(r.generated) >= p.max_tokens:
                r.finished, r.finish_reason = True, "length"
            if r.finished:
                break
        self.timings.tokens += len(kept)
        return RequestOutput(r.request.request_id, tuple(kept), tuple(r.generated), r.finished, r.finish_reason, r.stats())

    def _finish_output(self, r: _Running, reason: str, new: tuple[int, ...]) -> RequestOutput:
        r.finished, r.finish_reason = True, reason
        return RequestOutput(r.request.request_id, new, tuple(r.generated), True, reason, r.stats())

    def _free_slots(self, slots: list[int]) -> None:
        """Remove finished requests and keep the running ones compacted in slots 0..R-1."""
        for slot in sorted(slots, reverse=True):
            last = len(self.running) - 1
            if slot != last:
                self.cache.move_slot(last, slot)
                if self.context is not None:
                    self.context.move(last, slot)
                self.running[slot] = self.running[last]
            self.running.pop()
            self.cache.set_length(last, 0)
            if self.context is not None:
                self.context.reset(last)
