"""Small recorders that turn what a component already knows into the metrics of ``metrics.py``.
Plain Python: each takes a metric factory (``metrics.default_factory()`` unless given; tests pass
a fake) and fixed tags, and none of them imports Ray, torch or the component it observes.

Contract shared by all: recording never raises into the caller's hot path (the step loop, a
request, a training step): a failure is logged once per recorder and that record is dropped.

* :class:`StepMetrics` — an engine step observer (``engine.add_observer``): one call per verify
  step with the engine's ``StepRecord``.
* :class:`LoopMetrics` — the replica step loop: tokens emitted, queue depth, running requests,
  load (busy fraction over ``window_s``).
* :class:`IngressMetrics` / :class:`RequestTimer` — the HTTP ingress: requests, errors by kind,
  time to first token, inter-token latency, request latency.
* :class:`SchedulerMetrics` — the scheduler actor: budget and expected goodput per replica.
* :class:`TrainingMetrics` — the trainer: loss terms, tokens, step time.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Any, Callable, Iterable

from dspark.platform.observability import metrics as M

__all__ = ["StepMetrics", "LoopMetrics", "IngressMetrics", "RequestTimer", "SchedulerMetrics", "TrainingMetrics",
           "error_kind", "serve_tags"]

log = logging.getLogger(__name__)

LOSS_KEYS = ("loss", "ce", "tv", "soft_ce", "conf")  # values of the `term` tag of dspark_train_loss


def serve_tags() -> dict[str, str]:
    """The serving tags (application, deployment, replica) of the calling Serve replica; empty
    strings outside one."""
    try:
        from ray import serve

        ctx = serve.get_replica_context()
        return {"application": str(ctx.app_name), "deployment": str(ctx.deployment), "replica": str(ctx.replica_tag)}
    except Exception:
        return dict.fromkeys(M.SERVING_TAGS, "")


class _Recorder:
    def __init__(self, tags: dict[str, str] | None = None, factory: M.MetricFactory | None = None):
        self.tags = {k: str(v) for k, v in (tags or {}).items()}
        self.factory = factory if factory is not None else M.default_factory()
        self._made: dict[str, Any] = {}
        self._failed = False

    def _m(self, spec: M.MetricSpec) -> Any:
        m = self._made.get(spec.name)
        if m is None:
            m = self._made[spec.name] = self.factory.make(spec)
        return m

    def _tags(self, spec: M.MetricSpec, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The recorder's tags restricted to the metric's keys, plus ``extra``; keys the metric
        declares but nobody set are recorded as "" (Ray requires every declared key)."""
        t = {k: self.tags.get(k, "") for k in spec.tag_keys}
        if extra:
            t.update(extra)
        return t

    def inc(self, spec: M.MetricSpec, value: float = 1, **extra: str) -> None:
        if value > 0:  # Ray refuses increments <= 0
            self._m(spec).inc(float(value), tags=self._tags(spec, extra))

    def set(self, spec: M.MetricSpec, value: float, **extra: str) -> None:
        self._m(spec).set(float(value), tags=self._tags(spec, extra))

    def observe(self, spec: M.MetricSpec, value: float, **extra: str) -> None:
        self._m(spec).observe(float(value), tags=self._tags(spec, extra))

    def _guard(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:
            if not self._failed:
                self._failed = True
                log.exception("%s: recording failed (further failures are not logged)", type(self).__name__)


# ----------------------------------------------------------------------------- engine
class StepMetrics(_Recorder):
    """Engine step observer. Per verify step: each row's verify length ℓ_r, its accepted length
    a_r (rows with ℓ_r > 0 only), drafted/accepted counts per block position, the step's draft
    and verify times (``StepRecord.draft_s`` / ``verify_s`` when the record carries them) and
    fallbacks (also counted as a ``draft_failure`` error)."""

    def __call__(self, record: Any) -> None:
        self._guard(lambda: self._record(record))

    def _record(self, rec: Any) -> None:
        drafted: collections.Counter[int] = collections.Counter()
        accepted: collections.Counter[int] = collections.Counter()
        for l, a in zip(rec.lengths, rec.accepted):
            l, a = int(l), int(a)
            self.observe(M.VERIFY_LENGTH, l)
            if l > 0:
                self.observe(M.ACCEPTED_LENGTH, a)
                for k in range(1, l + 1):
                    drafted[k] += 1
                    accepted[k] += k <= a
        for k, n in drafted.items():  # one increment per position per step, not per row
            self.inc(M.DRAFTED_TOKENS, n, position=str(k))
            self.inc(M.ACCEPTED_TOKENS, accepted[k], position=str(k))
        for spec, attr in ((M.DRAFT_STEP_SECONDS, "draft_s"), (M.VERIFY_STEP_SECONDS, "verify_s")):
            v = getattr(rec, attr, None)
            if v is not None:
                self.observe(spec, max(float(v), 0.0))
        if rec.fallback:
            self.inc(M.FALLBACK_STEPS)
            self.inc(M.REQUEST_ERRORS, kind="draft_failure")


# ----------------------------------------------------------------------------- replica step loop
class LoopMetrics(_Recorder):
    """The replica step loop's view. ``on_step`` after every engine step (its outputs and the
    loop's cumulative busy seconds); ``on_idle`` while the loop waits for work, at least every
    ``idle_interval_s`` (so the load decays to 0 and the gauges read 0 when nothing runs).
    Load = Δbusy / Δwall between the oldest sample within ``window_s`` and now."""

    def __init__(self, tags: dict[str, str] | None = None, factory: M.MetricFactory | None = None, *,
                 window_s: float = 10.0, idle_interval_s: float = 2.0, clock: Callable[[], float] = time.monotonic):
        super().__init__(tags, factory)
        self.window_s, self.idle_interval_s, self.clock = window_s, idle_interval_s, clock
        self._busy: collections.deque[tuple[float, float]] = collections.deque()

    def on_step(self, engine: Any, outputs: Iterable[Any], busy_s: float) -> None:
        self._guard(lambda: self._step(engine, outputs, busy_s))

    def on_idle(self, engine: Any, busy_s: float) -> None:
        self._guard(lambda: self._publish(engine, busy_s))

    def _step(self, engine: Any, outputs: Iterable[Any], busy_s: float) -> None:
        self.inc(M.GENERATED_TOKENS, sum(len(o.new_token_ids) for o in outputs))
        self._publish(engine, busy_s)

    def _publish(self, engine: Any, busy_s: float) -> None:
        self.set(M.QUEUE_DEPTH, len(getattr(engine, "waiting", ())))
        self.set(M.RUNNING_REQUESTS, int(getattr(engine, "num_running", 0)))
        self.set(M.REPLICA_LOAD, self.load(busy_s))

    def load(self, busy_s: float) -> float:
        now = self.clock()
        if self._busy and busy_s < self._busy[-1][1]:  # the counter restarted
            self._busy.clear()
        self._busy.append((now, busy_s))
        while len(self._busy) > 2 and self._busy[1][0] <= now - self.window_s:  # keep one baseline
            self._busy.popleft()
        t0, b0 = self._busy[0]
        return min(1.0, max(0.0, (busy_s - b0) / (now - t0))) if now > t0 else 0.0


# ----------------------------------------------------------------------------- ingress
def error_kind(exc: Any) -> str:
    """The ``kind`` tag of an error answered to a client (an ``openai_api.APIError`` or anything
    with ``status`` / ``kind`` / ``code``)."""
    status, kind, code = getattr(exc, "status", 500), getattr(exc, "kind", ""), getattr(exc, "code", None)
    if code == "model_not_found":
        return "model_not_found"
    if code == "context_length_exceeded":
        return "context_length"
    if kind == "authentication_error" or status in (401, 403):
        return "authentication"
    if status >= 500:
        return "server_error"
    return "invalid_request"


class IngressMetrics(_Recorder):
    """The ingress's recorder: ``request(route)`` starts a :class:`RequestTimer` (and counts the
    request); ``error(exc)`` counts an error that belongs to no request (e.g. /v1/models)."""

    def __init__(self, tags: dict[str, str] | None = None, factory: M.MetricFactory | None = None, *,
                 clock: Callable[[], float] = time.perf_counter):
        super().__init__(tags, factory)
        self.clock = clock

    def request(self, route: str) -> "RequestTimer":
        self._guard(lambda: self.inc(M.REQUESTS, route=route))
        return RequestTimer(self, route)

    def error(self, exc_or_kind: Any) -> None:
        kind = exc_or_kind if isinstance(exc_or_kind, str) else error_kind(exc_or_kind)
        self._guard(lambda: self.inc(M.REQUEST_ERRORS, kind=kind))


class RequestTimer:
    """One request's clock, started at its arrival. ``output(n)`` for every output carrying n
    tokens (the first gives TTFT, each later one an inter-token latency of gap / n);
    ``done()`` at the last token (request latency); ``error(exc)`` when it fails. Each of
    ``done`` / ``error`` records at most once per request."""

    def __init__(self, metrics: IngressMetrics, route: str):
        self.m, self.route = metrics, route
        self.t0 = self.last = metrics.clock()
        self.outputs = 0
        self.closed = False

    def output(self, tokens: int) -> None:
        now = self.m.clock()
        if self.outputs == 0:
            self.m._guard(lambda: self.m.observe(M.TIME_TO_FIRST_TOKEN, now - self.t0, route=self.route))
        elif tokens > 0:
            gap = now - self.last
            self.m._guard(lambda: self.m.observe(M.INTER_TOKEN_LATENCY, gap / tokens, route=self.route))
        self.outputs += 1
        if tokens > 0:
            self.last = now

    def done(self) -> None:
        if not self.closed:
            self.closed = True
            if self.outputs:
                now = self.m.clock()
                self.m._guard(lambda: self.m.observe(M.REQUEST_LATENCY, now - self.t0, route=self.route))

    def error(self, exc_or_kind: Any) -> None:
        if not self.closed:
            self.closed = True
            self.m.error(exc_or_kind)


# ----------------------------------------------------------------------------- scheduler actor
class SchedulerMetrics(_Recorder):
    """The scheduler actor's view, from its ``ClusterView``: budget and expected goodput per live
    replica, 0 for replicas that left the view since the last publish (Ray cannot remove a
    series), and the number of live replicas. At most one publish per ``min_interval_s``."""

    def __init__(self, factory: M.MetricFactory | None = None, *, min_interval_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__({}, factory)
        self.min_interval_s, self.clock = min_interval_s, clock
        self._last = -float("inf")
        self._known: set[str] = set()

    def maybe_publish(self, view_fn: Callable[[], Any]) -> None:
        """``view_fn()`` (the ``ClusterView``) is only called when a publish is due."""
        now = self.clock()
        if now - self._last >= self.min_interval_s:
            self._last = now
            self._guard(lambda: self.publish(view_fn()))

    def publish(self, view: Any) -> None:
        live = set()
        for r in view.replicas:
            live.add(r.replica_id)
            if r.budget_tokens is not None:  # no plan yet: nothing to report
                self.set(M.SCHEDULER_BUDGET, r.budget_tokens, replica=r.replica_id)
                self.set(M.SCHEDULER_GOODPUT, r.goodput, replica=r.replica_id)
        for rid in self._known - live:
            self.set(M.SCHEDULER_BUDGET, 0, replica=rid)
            self.set(M.SCHEDULER_GOODPUT, 0, replica=rid)
        self._known = live
        self.set(M.SCHEDULER_REPLICAS, len(live))


# ----------------------------------------------------------------------------- training
class TrainingMetrics(_Recorder):
    """One optimizer step's global values (the dict ``DrafterTrainer.train_step`` returns, with
    ``seconds``): loss terms, tokens, step time, step, τ and learning rate. Record on one rank
    only (the values are already reduced over all ranks)."""

    def __init__(self, run: str, factory: M.MetricFactory | None = None):
        super().__init__({"run": run}, factory)

    def step(self, values: dict) -> None:
        self._guard(lambda: self._step(values))

    def _step(self, v: dict) -> None:
        for term in LOSS_KEYS:
            if isinstance(v.get(term), (int, float)):
                self.set(M.TRAIN_LOSS, v[term], term=term)
        self.inc(M.TRAIN_TOKENS, v.get("tokens", 0))
        if "seconds" in v:
            self.observe(M.TRAIN_STEP_SECONDS, v["seconds"])
        for spec, key in ((M.TRAIN_STEP, "step"), (M.TRAIN_TAU, "tau_probabilistic"), (M.TRAIN_LEARNING_RATE, "lr")):
            if isinstance(v.get(key), (int, float)):
                self.set(spec, v[key])
