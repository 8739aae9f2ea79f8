"""Records that cross component (and later process) boundaries.

Small frozen dataclasses, standard library only, validated on construction so that a bad value
is refused where it enters, with a reason. Tensors never travel in these records; the
drafter-to-verifier payload that must carry tensors is defined with the services that use it.
"""

from __future__ import annotations

import hashlib
import math
import operator
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "SCHEMA_VERSION", "SamplingParams", "GenerationRequest", "RequestStats", "RequestOutput", "assert_no_tensors",
    # verifier replica <-> central scheduler actor
    "ReplicaInfo", "Heartbeat", "BudgetReply", "ReplicaView", "ClusterView",
    # verifier replica <-> draft worker (disaggregated drafting)
    "DraftOp", "DraftProposal", "DraftCall", "DraftReply",
]

SCHEMA_VERSION = 2


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding parameters. ``temperature == 0`` is greedy decoding."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None  # None = draws from a generator seeded by the engine's own counter
    stop: tuple[str, ...] = ()  # stop strings: generation ends once the text contains one
    stop_token_ids: tuple[int, ...] = ()  # extra stop tokens (end-of-text is one unless ignore_eos)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            problems.append(f"max_tokens must be a positive integer (got {self.max_tokens!r})")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and 0 <= self.temperature <= 100):
            problems.append(f"temperature must be in [0, 100] (got {self.temperature!r})")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            problems.append(f"top_p must be in (0, 1] (got {self.top_p!r})")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            problems.append(f"top_k must be a non-negative integer (got {self.top_k!r})")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            problems.append(f"seed must be a non-negative integer (got {self.seed!r})")
        if any(not isinstance(s, str) or not s for s in self.stop):
            problems.append("stop strings must be non-empty strings")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams = field(default_factory=SamplingParams)

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError(f"request {self.request_id!r}: the prompt is empty")
        if any((not isinstance(t, int)) or t < 0 for t in self.prompt_token_ids):
            raise ValueError(f"request {self.request_id!r}: prompt token ids must be non-negative integers")


@dataclass(frozen=True)
class RequestStats:
    """Speculation statistics of one request.

    ``steps`` verify steps each emit ``accepted_k + 1`` tokens (the +1 is the target's own token:
    recovered after a rejection or the bonus after full acceptance), so
    τ = (accepted + steps) / steps. ``proposed_at[k]`` counts steps that verified at least k+1
    drafts and ``accepted_at[k]`` those that accepted at least k+1: accept@k = accepted_at/proposed_at.
    """

    steps: int = 0
    drafted: int = 0  # draft tokens sent to verification
    accepted: int = 0
    proposed_at: tuple[int, ...] = ()
    accepted_at: tuple[int, ...] = ()
    fallback_steps: int = 0  # steps decoded without drafts because the drafter failed

    @property
    def tau(self) -> float:
        return (self.accepted + self.steps) / self.steps if self.steps else 0.0

    def accept_rate_at(self) -> list[float]:
        return [a / p if p else float("nan") for a, p in zip(self.accepted_at, self.proposed_at)]


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    new_token_ids: tuple[int, ...]  # emitted by this step
    token_ids: tuple[int, ...]  # all generated so far
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    stats: RequestStats


def assert_no_tensors(obj: Any) -> None:
    """Raise TypeError if a tensor (anything with ``.shape`` and ``.dtype``) hides in ``obj``."""
    stack = [obj]
    while stack:
        x = stack.pop()
        if hasattr(x, "shape") and hasattr(x, "dtype"):
            raise TypeError(f"tensor-like {type(x).__name__} in a record that must carry none")
        if isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple, set, frozenset)):
            stack.extend(x)
        elif hasattr(x, "__dataclass_fields__"):
            stack.extend(getattr(x, f) for f in x.__dataclass_fields__)


# ---------------------------------------------------------------------------------------------
# Verifier replica <-> central scheduler actor (dspark.scheduler.actor). Ids, counts and a few
# floats only; a replica sends ReplicaInfo once and a Heartbeat every interval, and gets a
# BudgetReply back. Sequences are tuples so the records stay hashable and immutable; lists are
# accepted on construction and converted.
# ---------------------------------------------------------------------------------------------


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _sps_pairs(table: Any) -> tuple[tuple[int, float], ...] | None:
    """(tokens, steps/s) pairs as plain (int, float) tuples, or None if ``table`` is not a
    non-empty sequence of (integer, number) pairs. Numpy scalars and integral floats are
    converted, so a profile can be passed as ``array.tolist()``."""
    def as_int(b: Any) -> int:
        if isinstance(b, float) and b.is_integer():  # e.g. from ndarray.tolist() of a float table
            return int(b)
        return operator.index(b)

    try:
        pairs = tuple((as_int(b), float(v)) for b, v in table)
    except (TypeError, ValueError):
        return None
    return pairs or None


@dataclass(frozen=True)
class ReplicaInfo:
    """What a verifier replica tells the scheduler when it (re-)registers.

    ``sps_table`` is the replica's step-cost profile: (B, steps/s) pairs, B = tokens in one verify
    forward (every running request's anchor plus its verified drafts), strictly increasing.
    ``sps_id`` names the profile (device, model, settings); left empty it is derived from the
    table's content, so a refreshed profile with different numbers gets a new identity.
    ``draft_table`` is the draft cost: (R drafting requests, seconds per draft pass) pairs, R
    strictly increasing; empty when not measured (drafting then counts as free).
    """

    replica_id: str
    node: str  # host name or Ray node id: replicas on one node share its hardware
    max_batch_size: int  # most requests running at once (KV slots)
    gamma: int  # drafted block size γ: the most drafts one request can verify in a step
    sps_table: tuple[tuple[int, float], ...]
    sps_id: str = ""
    schema_version: int = SCHEMA_VERSION
    draft_table: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        table = _sps_pairs(self.sps_table)
        problems = []
        if not isinstance(self.replica_id, str) or not self.replica_id:
            problems.append("replica_id must be a non-empty string")
        if not isinstance(self.max_batch_size, int) or self.max_batch_size < 1:
            problems.append(f"max_batch_size must be a positive integer (got {self.max_batch_size!r})")
        if not isinstance(self.gamma, int) or self.gamma < 0:
            problems.append(f"gamma must be a non-negative integer (got {self.gamma!r})")
        if table is None:
            problems.append("sps_table must be a non-empty sequence of (positive integer tokens, steps/s) pairs")
        elif any(b < 1 for b, _ in table):
            problems.append("sps_table batch sizes must be positive")
        elif any(b2 <= b1 for (b1, _), (b2, _) in zip(table, table[1:])):
            problems.append("sps_table batch sizes must be strictly increasing")
        if table and any(not math.isfinite(v) or v <= 0 for _, v in table):
            problems.append("sps_table steps/s must be finite and positive")
        draft = _sps_pairs(self.draft_table) if len(self.draft_table) else ()
        if draft is None or any(r < 1 for r, _ in draft) or any(r2 <= r1 for (r1, _), (r2, _) in zip(draft, draft[1:])):
            problems.append("draft_table must be (positive, strictly increasing request count, seconds) pairs")
        elif any(not math.isfinite(v) or v < 0 for _, v in draft):
            problems.append("draft_table seconds must be finite and >= 0")
        if problems:
            raise ValueError(f"replica {self.replica_id!r}: " + "; ".join(problems))
        object.__setattr__(self, "sps_table", table)
        object.__setattr__(self, "draft_table", draft)
        if not self.sps_id:
            digest = hashlib.sha1(repr((table, draft)).encode()).hexdigest()[:12]
            object.__setattr__(self, "sps_id", f"sps-{digest}")


@dataclass(frozen=True)
class Heartbeat:
    """A replica's state over its last measurement window, sent every ``interval_s``.

    ``load`` is the fraction of the window the device was busy: GPU utilisation from NVML where
    there is a GPU (``load_source="nvml"``), otherwise the fraction of wall time spent inside the
    engine's step loop (``"busy"``). ``accept_rate`` is the mean conditional acceptance α of
    verified drafts (P[draft k accepted | drafts < k accepted]); ``tau`` the mean tokens emitted
    per request-step (1 + accepted). Both are None while the window holds no verified drafts.
    ``timestamp`` is the replica's wall clock, for display only: staleness is judged on the
    scheduler's own clock, so clocks of different nodes never need to agree.
    """

    replica_id: str
    seq: int  # strictly increasing per replica; an older or repeated seq is ignored
    timestamp: float
    load: float
    load_source: str  # "nvml" | "busy"
    queue_depth: int  # requests waiting for a slot
    running: int  # requests in the running batch
    accept_rate: float | None = None
    tau: float | None = None

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.replica_id, str) or not self.replica_id:
            problems.append("replica_id must be a non-empty string")
        if not isinstance(self.seq, int) or self.seq < 0:
            problems.append(f"seq must be a non-negative integer (got {self.seq!r})")
        if not _is_real(self.timestamp):
            problems.append(f"timestamp must be a finite number (got {self.timestamp!r})")
        if not (_is_real(self.load) and 0.0 <= self.load <= 1.0):
            problems.append(f"load must be in [0, 1] (got {self.load!r})")
        if self.load_source not in ("nvml", "busy"):
            problems.append(f"load_source must be 'nvml' or 'busy' (got {self.load_source!r})")
        for name in ("queue_depth", "running"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                problems.append(f"{name} must be a non-negative integer (got {v!r})")
        if self.accept_rate is not None and not (_is_real(self.accept_rate) and 0.0 <= self.accept_rate <= 1.0):
            problems.append(f"accept_rate must be in [0, 1] or None (got {self.accept_rate!r})")
        if self.tau is not None and not (_is_real(self.tau) and self.tau >= 1.0):
            problems.append(f"tau must be >= 1 or None (got {self.tau!r})")
        if problems:
            raise ValueError(f"heartbeat of {self.replica_id!r}: " + "; ".join(problems))


@dataclass(frozen=True)
class BudgetReply:
    """The scheduler's answer to a registration or heartbeat.

    ``budget_tokens`` caps the draft tokens the replica verifies per step, summed over its batch
    (Σ_r ℓ_r; the anchors are not counted); None = no budget from the scheduler (the replica's
    local policy decides alone). A budget is valid for ``valid_s`` seconds after it arrives; a
    replica without a newer reply by then falls back to its local default.
    ``registered=False`` means the scheduler does not know the replica (it restarted, or dropped
    the replica as stale): register again. ``epoch`` names the scheduler instance.
    """

    replica_id: str
    registered: bool
    budget_tokens: int | None
    view_version: int
    valid_s: float
    epoch: str


@dataclass(frozen=True)
class ReplicaView:
    """One replica as the scheduler last saw it (``age_s`` since its last message)."""

    replica_id: str
    node: str
    sps_id: str
    load: float | None  # None until its first heartbeat
    running: int
    queue_depth: int
    accept_rate: float | None
    budget_tokens: int | None
    goodput: float  # expected tokens/s at that budget under the scheduler's model
    age_s: float


@dataclass(frozen=True)
class ClusterView:
    """The scheduler's view of the cluster: live replicas only (stale ones are dropped)."""

    version: int
    epoch: str
    replicas: tuple[ReplicaView, ...]
    goodput: float  # Σ of the replicas' expected goodput



# ---------------------------------------------------------------------------------------------
# Verifier replica <-> draft worker. One call per drafting step: the context changes queued since
# the last call (ops, applied in order) plus the proposal. Tensors travel only where they must:
# the committed tokens' target features (the drafter's context) one way, and the drafted token
# ids and confidences back; draft logits only for the rows that sample (greedy verification needs
# the tokens alone). A session is one verifier replica's context cache on one worker; its epoch
# changes when the worker loses it (restart), which tells the replica its contexts are gone.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DraftOp:
    """One change to a session's draft context: ``append`` (tokens [R, n] int64, features [R, n, F],
    last_hidden [R, n, d], lengths [R] int64, for ``slots``), ``reset`` (slots), ``move``
    (slots = (src,), arg = dst) or ``truncate`` (slots = (slot,), arg = new length)."""

    kind: str
    slots: tuple[int, ...]
    tokens: Any = None
    features: Any = None
    last_hidden: Any = None
    lengths: Any = None
    arg: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("append", "reset", "move", "truncate"):
            raise ValueError(f"unknown draft op {self.kind!r}")
        if self.kind == "append" and any(x is None for x in (self.tokens, self.features, self.last_hidden, self.lengths)):
            raise ValueError("an append op needs tokens, features, last_hidden and lengths")


@dataclass(frozen=True)
class DraftProposal:
    """Draft a block for each of ``slots`` (anchor token and its position = the slot's context
    length). Sampling parameters per row; ``seeds`` make the sampled drafts of unkeyed rows
    reproducible (None = greedy rows, keyed rows or no seed); ``keys`` / ``offsets`` are the noise
    keys of keyed rows (seeded sampled requests, None otherwise) and the output index of each row's
    first draft, so the worker samples with the verifier's E(key, n) (``platform.sampling``);
    ``want_logits`` marks the rows whose draft logits must come back (unkeyed sampled rows: keyed
    ones are verified by matching and need none)."""

    slots: tuple[int, ...]
    anchors: tuple[int, ...]
    positions: tuple[int, ...]
    temperature: tuple[float, ...]
    top_k: tuple[int, ...]
    top_p: tuple[float, ...]
    seeds: tuple[int | None, ...]
    want_logits: tuple[bool, ...]
    keys: tuple[int | None, ...] = ()  # () = no keyed rows
    offsets: tuple[int, ...] = ()  # () = all 0

    def __post_init__(self) -> None:
        n = len(self.slots)
        if not self.keys:
            object.__setattr__(self, "keys", (None,) * n)
        if not self.offsets:
            object.__setattr__(self, "offsets", (0,) * n)
        if any(len(getattr(self, f)) != n for f in ("anchors", "positions", "temperature", "top_k", "top_p", "seeds",
                                                    "want_logits", "keys", "offsets")):
            raise ValueError("every DraftProposal field needs one entry per slot")


@dataclass(frozen=True)
class DraftCall:
    """What a replica sends a draft worker: its session, the session epoch its context belongs to
    (None = first contact), the cache shape, the queued ops and (optionally) a proposal."""

    session: str
    epoch: int | None
    max_slots: int
    max_len: int
    ops: tuple[DraftOp, ...] = ()
    proposal: DraftProposal | None = None
    # index of ops[0] in the session's op stream: a call re-sent after a timeout whose first
    # attempt did arrive is not applied twice (the worker skips the ops it has)
    first_op: int = 0
    schema_version: int = SCHEMA_VERSION


@dataclass(frozen=True)
class DraftReply:
    """The worker's answer. ``lost``: the caller's epoch is not the session's (the worker lost
    it), so no op was applied and nothing was drafted; every context must be rebuilt."""

    epoch: int
    lost: bool = False
    tokens: Any = None  # [R, γ] int64
    confidences: Any = None  # [R, γ] float32, or None without a confidence head
    logits: Any = None  # [R_s, γ, V] float32 for the rows with want_logits, in order; None if none
    worker: str = ""  # which worker answered (for metrics and tests)
