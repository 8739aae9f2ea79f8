"""Every metric dspark exports: names, types, descriptions, tags and histogram boundaries, in
one place. Recorders (``recorders.py``), dashboards (``dashboards.py``) and the docs read these
definitions; nothing else names a metric.

Metrics go through Ray's metrics API (``ray.util.metrics``): each process records into its
node's metrics agent, which Prometheus scrapes (``clusters/prometheus.yml``). Ray exports a
metric ``dspark_x`` as ``ray_dspark_x``; a counter gets the suffix ``_total`` and a histogram
the series ``_bucket`` / ``_sum`` / ``_count`` (:meth:`MetricSpec.series`), and every series
also carries Ray's own labels (``SessionName``, ``NodeAddress``, ``WorkerId``, ...).

Contract of a factory (:class:`MetricFactory`): ``make(spec)`` returns an object with
``inc(value, tags)`` (counter), ``set(value, tags)`` (gauge) or ``observe(value, tags)``
(histogram), where ``tags`` names every one of ``spec.tag_keys`` with a string value. Ray refuses
a counter increment <= 0 and histogram boundaries <= 0, so recorders never increment by 0 and
integer histograms put their boundaries at half-integers (the bucket ``le=0.5`` holds the zeros).
Without an initialised Ray, :func:`default_factory` is :class:`NullFactory` and recording costs
a method call.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from typing import Any, Literal, Protocol

__all__ = [
    "EXPORT_PREFIX", "ERROR_KINDS", "SERVING_TAGS", "MetricSpec", "METRICS", "BY_NAME", "MetricFactory",
    "NullFactory", "RayFactory", "default_factory", "exported_series", "markdown_table",
    # the metrics, by role
    "ACCEPTED_LENGTH", "VERIFY_LENGTH", "DRAFTED_TOKENS", "ACCEPTED_TOKENS", "DRAFT_STEP_SECONDS",
    "VERIFY_STEP_SECONDS", "FALLBACK_STEPS", "GENERATED_TOKENS", "QUEUE_DEPTH", "RUNNING_REQUESTS",
    "REPLICA_LOAD", "REQUESTS", "REQUEST_ERRORS", "TIME_TO_FIRST_TOKEN", "INTER_TOKEN_LATENCY",
    "REQUEST_LATENCY", "SCHEDULER_BUDGET", "SCHEDULER_GOODPUT", "SCHEDULER_REPLICAS", "TRAIN_LOSS",
    "TRAIN_TOKENS", "TRAIN_STEP_SECONDS", "TRAIN_STEP", "TRAIN_TAU", "TRAIN_LEARNING_RATE",
]

EXPORT_PREFIX = "ray_"  # Ray's namespace for application metrics in Prometheus

Kind = Literal["counter", "gauge", "histogram"]

# Tags of every serving metric: which Serve application, deployment and replica recorded it.
SERVING_TAGS = ("application", "deployment", "replica")

# Values of the ``kind`` tag of dspark_request_errors.
ERROR_KINDS = ("invalid_request", "authentication", "model_not_found", "context_length", "server_error",
               "draft_failure")


@dataclass(frozen=True)
class MetricSpec:
    name: str  # as passed to Ray (no prefix, no suffix)
    kind: Kind
    description: str
    tag_keys: tuple[str, ...]
    where: str  # where it is recorded (docs)
    boundaries: tuple[float, ...] = ()  # histograms only; each > 0, increasing

    def __post_init__(self) -> None:
        if not self.name.startswith("dspark_"):
            raise ValueError(f"metric names start with dspark_: {self.name}")
        if (self.kind == "histogram") != bool(self.boundaries):
            raise ValueError(f"{self.name}: histograms, and only they, have boundaries")
        if any(b <= 0 for b in self.boundaries) or list(self.boundaries) != sorted(set(self.boundaries)):
            raise ValueError(f"{self.name}: boundaries must be positive and increasing")

    @property
    def exported(self) -> str:
        """The Prometheus name (counters: with ``_total``; histograms: the family's base name)."""
        base = EXPORT_PREFIX + self.name
        return base + "_total" if self.kind == "counter" else base

    def series(self) -> tuple[str, ...]:
        """Every series name Prometheus stores for this metric."""
        if self.kind == "histogram":
            base = EXPORT_PREFIX + self.name
            return (f"{base}_bucket", f"{base}_sum", f"{base}_count")
        return (self.exported,)

    @property
    def bucket(self) -> str:
        return self._part("bucket")

    @property
    def sum(self) -> str:
        return self._part("sum")

    @property
    def count(self) -> str:
        return self._part("count")

    def _part(self, part: str) -> str:
        if self.kind != "histogram":
            raise AttributeError(f"{self.name} is a {self.kind}, not a histogram")
        return f"{EXPORT_PREFIX}{self.name}_{part}"


def _halves(n: int) -> tuple[float, ...]:
    """0.5, 1.5, ..., n + 0.5: one bucket per integer 0..n."""
    return tuple(i + 0.5 for i in range(n + 1))


# seconds: 0.5 ms .. 60 s, roughly ×2 per bucket
_SECONDS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0)
_MAX_GAMMA = 16  # block sizes above this land in the +Inf bucket
_S = SERVING_TAGS

# ----------------------------------------------------------------------------- speculation (engine)
_ENGINE = "verifier replica, engine step observer (StepMetrics)"
ACCEPTED_LENGTH = MetricSpec(
    "dspark_accepted_length", "histogram",
    "Drafts accepted per request per verify step, over rows that verified at least one draft "
    "(tokens emitted by such a row = this + 1).", _S, _ENGINE, _halves(_MAX_GAMMA))
VERIFY_LENGTH = MetricSpec(
    "dspark_verify_length", "histogram",
    "Drafts the verify-length policy chose to verify per request per verify step (0 = plain decoding).",
    _S, _ENGINE, _halves(_MAX_GAMMA))
DRAFTED_TOKENS = MetricSpec(
    "dspark_drafted_tokens", "counter",
    "Drafts sent to verification at block position `position` (1-based); acceptance at a position "
    "= accepted / drafted.", (*_S, "position"), _ENGINE)
ACCEPTED_TOKENS = MetricSpec(
    "dspark_accepted_tokens", "counter",
    "Drafts accepted at block position `position` (1-based).", (*_S, "position"), _ENGINE)
DRAFT_STEP_SECONDS = MetricSpec(
    "dspark_draft_step_seconds", "histogram",
    "Wall time of the draft phase of one verify step (the policy's decision included; ~0 when the "
    "step did not draft).", _S, _ENGINE, _SECONDS)
VERIFY_STEP_SECONDS = MetricSpec(
    "dspark_verify_step_seconds", "histogram",
    "Wall time of the verify phase of one verify step (target forward, acceptance, KV commit); its "
    "_count is the number of verify steps.", _S, _ENGINE, _SECONDS)
FALLBACK_STEPS = MetricSpec(
    "dspark_fallback_steps", "counter",
    "Verify steps decoded without drafts because the drafter failed (plain decoding; output unchanged).",
    _S, _ENGINE)

# ----------------------------------------------------------------------------- replica step loop
_LOOP = "verifier replica, step loop (LoopMetrics)"
GENERATED_TOKENS = MetricSpec(
    "dspark_generated_tokens", "counter", "Tokens emitted to requests (rate() = tokens/s).", _S, _LOOP)
QUEUE_DEPTH = MetricSpec(
    "dspark_queue_depth", "gauge", "Requests submitted to the replica and not yet running (no free slot).",
    _S, _LOOP)
RUNNING_REQUESTS = MetricSpec("dspark_running_requests", "gauge", "Requests holding a slot in the batch.", _S, _LOOP)
REPLICA_LOAD = MetricSpec(
    "dspark_replica_load", "gauge",
    "Busy fraction of the step loop over the last window (time inside engine.step / wall time), 0..1.",
    _S, _LOOP)

# ----------------------------------------------------------------------------- ingress
_INGRESS = "ingress (IngressMetrics)"
REQUESTS = MetricSpec(
    "dspark_requests", "counter", "Generation requests received (`route`: completions or chat).",
    (*_S, "route"), _INGRESS)
REQUEST_ERRORS = MetricSpec(
    "dspark_request_errors", "counter",
    "Errors by `kind`: " + ", ".join(ERROR_KINDS) + " (draft_failure: a verify step whose drafter "
    "failed, recorded by the verifier replica; the others by the ingress).", (*_S, "kind"),
    "ingress (IngressMetrics); draft_failure: verifier replica (StepMetrics)")
TIME_TO_FIRST_TOKEN = MetricSpec(
    "dspark_time_to_first_token_seconds", "histogram",
    "Seconds from the request's arrival at the ingress to its first generated token.",
    (*_S, "route"), _INGRESS, (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0))
INTER_TOKEN_LATENCY = MetricSpec(
    "dspark_inter_token_latency_seconds", "histogram",
    "Seconds between two outputs of one request divided by the tokens the later one carries "
    "(a verify step emits several tokens at once).", (*_S, "route"), _INGRESS,
    (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0))
REQUEST_LATENCY = MetricSpec(
    "dspark_request_latency_seconds", "histogram",
    "Seconds from the request's arrival at the ingress to its last token.", (*_S, "route"), _INGRESS,
    (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0, 120.0, 300.0))

# ----------------------------------------------------------------------------- scheduler actor
_SCHED = "scheduler actor (SchedulerMetrics)"
SCHEDULER_BUDGET = MetricSpec(
    "dspark_scheduler_budget_tokens", "gauge",
    "Verify budget (draft tokens per step) planned for `replica`; 0 once the replica left the view.",
    ("replica",), _SCHED)
SCHEDULER_GOODPUT = MetricSpec(
    "dspark_scheduler_goodput", "gauge",
    "Goodput (tokens/s) the scheduler's model expects of `replica` at its budget; 0 once it left the view.",
    ("replica",), _SCHED)
SCHEDULER_REPLICAS = MetricSpec("dspark_scheduler_replicas", "gauge", "Replicas in the scheduler's view.", (), _SCHED)

# ----------------------------------------------------------------------------- training
_TRAIN = "training worker of rank 0 (TrainingMetrics)"
TRAIN_LOSS = MetricSpec(
    "dspark_train_loss", "gauge",
    "Global mean of a loss term at the last optimizer step (`term`: loss = the weighted total, ce, tv, "
    "soft_ce, conf).", ("run", "term"), _TRAIN)
TRAIN_TOKENS = MetricSpec("dspark_train_tokens", "counter", "Tokens trained on, all ranks (rate() = tokens/s).",
                          ("run",), _TRAIN)
TRAIN_STEP_SECONDS = MetricSpec("dspark_train_step_seconds", "histogram", "Wall time of one optimizer step.",
                                ("run",), _TRAIN, (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0,
                                                   60.0, 120.0))
TRAIN_STEP = MetricSpec("dspark_train_step", "gauge", "Optimizer steps done.", ("run",), _TRAIN)
TRAIN_TAU = MetricSpec("dspark_train_tau", "gauge",
                       "Expected accepted length per block (tau_probabilistic) at the last step.", ("run",), _TRAIN)
TRAIN_LEARNING_RATE = MetricSpec("dspark_train_learning_rate", "gauge", "Learning rate at the last step.",
                                 ("run",), _TRAIN)

METRICS: tuple[MetricSpec, ...] = (
    ACCEPTED_LENGTH, VERIFY_LENGTH, DRAFTED_TOKENS, ACCEPTED_TOKENS, DRAFT_STEP_SECONDS, VERIFY_STEP_SECONDS,
    FALLBACK_STEPS, GENERATED_TOKENS, QUEUE_DEPTH, RUNNING_REQUESTS, REPLICA_LOAD, REQUESTS, REQUEST_ERRORS,
    TIME_TO_FIRST_TOKEN, INTER_TOKEN_LATENCY, REQUEST_LATENCY, SCHEDULER_BUDGET, SCHEDULER_GOODPUT,
    SCHEDULER_REPLICAS, TRAIN_LOSS, TRAIN_TOKENS, TRAIN_STEP_SECONDS, TRAIN_STEP, TRAIN_TAU, TRAIN_LEARNING_RATE,
)
BY_NAME = {m.name: m for m in METRICS}
assert len(BY_NAME) == len(METRICS), "duplicate metric name"


def exported_series() -> frozenset[str]:
    """Every Prometheus series name of every metric (what a PromQL expression may reference)."""
    return frozenset(s for m in METRICS for s in m.series())


# ----------------------------------------------------------------------------- factories
class MetricFactory(Protocol):
    def make(self, spec: MetricSpec) -> Any: ...


class _Null:
    def inc(self, value: float = 1.0, tags: dict | None = None) -> None:
        pass

    set = observe = inc


class NullFactory:
    """Metrics that record nothing (Ray absent or not initialised)."""

    _NULL = _Null()

    def make(self, spec: MetricSpec) -> Any:
        return self._NULL


class RayFactory:
    """``ray.util.metrics`` objects, one per metric name per process (recorders share them)."""

    _lock = threading.Lock()
    _made: dict[str, Any] = {}

    def make(self, spec: MetricSpec) -> Any:
        with self._lock:
            m = self._made.get(spec.name)
            if m is None:
                from ray.util import metrics as rm

                if spec.kind == "counter":
                    m = rm.Counter(spec.name, spec.description, tag_keys=spec.tag_keys)
                elif spec.kind == "gauge":
                    m = rm.Gauge(spec.name, spec.description, tag_keys=spec.tag_keys)
                else:
                    m = rm.Histogram(spec.name, spec.description, list(spec.boundaries), tag_keys=spec.tag_keys)
                self._made[spec.name] = m
            return m


def default_factory() -> MetricFactory:
    """Ray's metrics where this process is connected to Ray (a Serve replica, an actor, a driver
    after ``ray.init``), else :class:`NullFactory`. Never imports Ray itself."""
    ray = sys.modules.get("ray")
    try:
        if ray is not None and ray.is_initialized():
            return RayFactory()
    except Exception:
        pass
    return NullFactory()


def markdown_table() -> str:
    """The metric table of ``platform/observability/DESIGN.md`` (a test keeps the two equal)."""
    rows = ["| metric (Prometheus name) | type | tags | recorded by | meaning |", "|---|---|---|---|---|"]
    for m in METRICS:
        serving = set(SERVING_TAGS) <= set(m.tag_keys)
        tags = ", ".join(["serving"] * serving + [t for t in m.tag_keys if not (serving and t in SERVING_TAGS)])
        rows.append(f"| `{m.exported}` | {m.kind} | {tags or '—'} | {m.where} | {m.description} |")
    return "\n".join(rows) + "\n"
