"""One tensor-parallel verifier replica on Ray: ``world_size`` rank actors running engines in lockstep.

Topology. :class:`TPGroup` reserves a placement group of ``world_size`` bundles (``{"CPU": num_cpus,
"GPU": num_gpus}`` each, the GPU key only when ``num_gpus > 0``; strategy PACK by default, so the
ranks share a node and its fast interconnect when they fit), starts one actor per bundle, lets
rank 0 pick the rendezvous (its node's IP and a free port), initialises ``torch.distributed`` in
every rank (gloo without a GPU, nccl with one) and calls the user's ``engine_factory(rank,
world_size)`` in each: it loads the target, calls :func:`~dspark.verifier_service.tp.sharding.shard_target`
and builds a :class:`~dspark.verifier_service.engine.VerifierEngine` (with or without a drafter).

Lockstep. Every call (``add_request``, ``abort``, ``set_verify_budget``, ``step``) goes to every
rank in the same order. Each rank sees the same inputs, the same all-reduced hidden states and
logits, and per-request generators seeded the same way, so all ranks take the same accept/reject
decisions and emit the same tokens; rank 0's outputs are returned. Each rank also returns a digest
of what it emitted; a mismatch raises :class:`TPDivergenceError` (a bug or non-determinism, never
expected). Any rank failing or dying, or a call outliving its timeout, raises :class:`TPGroupError`
and marks the group broken (the surviving ranks may be blocked in a collective): later calls raise
at once; ``shutdown()`` kills the actors and frees the placement group.

The per-rank logic is the plain class :class:`_Rank`; this module only fans calls out and checks
the answers.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Iterable, NoReturn, Sequence

from dspark.platform.contracts import GenerationRequest, RequestOutput

__all__ = ["ShardedEngineFactory", "TPDivergenceError", "TPGroup", "TPGroupError", "check_agreement", "outputs_digest"]

log = logging.getLogger(__name__)

EngineFactory = Callable[[int, int], Any]  # (rank, world_size) -> VerifierEngine, after dist init


class TPGroupError(RuntimeError):
    """A rank failed, died or timed out; the group cannot be used any more (shut it down)."""


class TPDivergenceError(TPGroupError):
    """The ranks emitted different tokens in one step."""


def outputs_digest(outputs: Sequence[RequestOutput]) -> str:
    """A short hash of what a step emitted (ids, new tokens, finish state), compared across ranks."""
    h = hashlib.blake2b(digest_size=12)
    for o in outputs:
        h.update(repr((o.request_id, o.new_token_ids, o.finished, o.finish_reason)).encode())
    return h.hexdigest()


def check_agreement(digests: Sequence[Any], what: str) -> None:
    """Raise :class:`TPDivergenceError` unless every rank reported the same value."""
    if any(d != digests[0] for d in digests[1:]):
        bad = [r for r, d in enumerate(digests) if d != digests[0]]
        raise TPDivergenceError(f"tensor-parallel ranks diverged in {what}: ranks {bad} disagree with rank 0 ({list(digests)})")


@dataclass(frozen=True)
class ShardedEngineFactory:
    """A picklable ``engine_factory``: load the target, shard it for this rank, build the engine.

    ``drafter(target)`` (optional) builds the colocated drafter from the sharded target (whose
    config, embeddings and LM head are those of the full model); ``remote_drafter()`` (optional,
    instead) builds rank 0's remote drafter (a ``RemoteDrafter`` over a draft-worker transport),
    which every rank then sees through a :class:`~dspark.verifier_service.tp.drafter.BroadcastDrafter`;
    ``engine_kwargs`` go to :class:`VerifierEngine` (``policy``, ``max_batch_size``, ``seed``, ...)."""

    target: Any  # dspark.platform.config.TargetConfig
    engine_kwargs: dict = field(default_factory=dict)
    drafter: Callable[[Any], Any] | None = None
    with_tokenizer: bool = True
    remote_drafter: Any = None  # e.g. dspark.drafter_service.remote.RemoteDrafterSpec (has .block_size)

    def __call__(self, rank: int, world_size: int) -> Any:
        from dspark.platform.target.loading import load_target
        from dspark.verifier_service.engine import VerifierEngine
        from dspark.verifier_service.tp.sharding import shard_target

        target = shard_target(load_target(self.target, with_tokenizer=self.with_tokenizer), rank, world_size)
        drafter = self.drafter(target) if self.drafter is not None else None
        if self.remote_drafter is not None:
            from dspark.verifier_service.tp.drafter import BroadcastDrafter

            inner = self.remote_drafter() if rank == 0 else None
            drafter = BroadcastDrafter(inner, self.remote_drafter.block_size, target.vocab_size)
        return VerifierEngine(target, drafter, **self.engine_kwargs)


class _Rank:
    """One rank: its process-group membership and its engine. Plain class (wrapped as an actor)."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.engine: Any = None

    def rendezvous(self) -> tuple[str, int]:
        """(this node's IP, a free TCP port): rank 0's answer is every rank's init address."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def init_distributed(self, addr: str, port: int, backend: str | None, timeout_s: float) -> str:
        import torch
        import torch.distributed as dist

        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(0)  # Ray exposes this actor's GPU(s) only; the first is ours
        dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=self.rank,
                                world_size=self.world_size, timeout=timedelta(seconds=timeout_s))
        return backend

    def build(self, factory: EngineFactory) -> None:
        self.engine = factory(self.rank, self.world_size)
        self._records: list[Any] = []
        if self.rank == 0:  # rank 0's step records travel back with its outputs (observers run in the caller)
            self.engine.add_observer(self._records.append)

    def info(self) -> dict:
        e = self.engine
        return {"max_batch_size": e.max_batch_size, "max_model_len": e.max_model_len, "vocab_size": e.vocab_size,
                "gamma": e.gamma, "has_drafter": e.drafter is not None}

    def measure_sps(self, kwargs: dict) -> Any:
        """Every rank times the same forwards in lockstep (they all-reduce); rank 0's profile counts."""
        from dspark.verifier_service.profiling import measure_sps

        profile = measure_sps(self.engine, **kwargs)
        return profile if self.rank == 0 else None

    def set_policy(self, policy_config: dict, sps: Any) -> None:
        """The same policy and profile on every rank: the ranks must take the same decisions."""
        from dspark.scheduler.registry import build_policy_from_config, parse_policy_config

        self.engine.sps_profile = sps
        self.engine.policy = build_policy_from_config(parse_policy_config(policy_config), sps=sps)

    def counters(self) -> dict:
        e = self.engine
        return {"timings": e.timings, "total_fallback_steps": e.total_fallback_steps,
                "skipped_draft_steps": e.skipped_draft_steps, "context_failures": e.context_failures,
                "draft_steps": e.draft_steps,
                "waiting": len(e.waiting),
                "drafter": {k: getattr(e.drafter, k) for k in _DRAFTER_COUNTERS if hasattr(e.drafter, k)}}

    def state(self) -> tuple[bool, int]:
        return self.engine.has_unfinished(), self.engine.num_running

    def add_request(self, request: GenerationRequest) -> tuple[str | None, tuple[bool, int]]:
        """(the rejection message or None, state); a rejection is an answer, not a failure."""
        from dspark.verifier_service.engine import RequestRejected

        try:
            self.engine.add_request(request)
            return None, self.state()
        except RequestRejected as exc:
            return str(exc), self.state()

    def abort(self, request_id: str) -> tuple[RequestOutput | None, tuple[bool, int]]:
        return self.engine.abort(request_id), self.state()

    def set_verify_budget(self, n: int | None) -> None:
        self.engine.verify_budget = n

    def step(self) -> tuple[list[RequestOutput] | None, str, tuple[bool, int], tuple[list, dict] | None]:
        """(outputs on rank 0 only, digest of the outputs, state, rank 0's step records and counters)."""
        outputs = self.engine.step()
        extra = None
        if self.rank == 0:
            extra, self._records[:] = (list(self._records), self.counters()), []
        return (outputs if self.rank == 0 else None), outputs_digest(outputs), self.state(), extra

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


_DRAFTER_COUNTERS = ("calls", "failures", "sessions_lost", "sent_bytes", "received_bytes", "last_worker")


class _RankDrafter:
    """Stands for the drafter that lives in the ranks (``engine.drafter is not None`` checks), with
    rank 0's drafter counters as of the last step (a remote drafter's calls, bytes ...)."""

    def __init__(self, counters: dict):
        self.__dict__.update(counters)


class TPGroup:
    """A verifier replica split over ``world_size`` Ray actors; the API mirrors the engine's
    (``add_request``, ``abort``, ``step``, ``generate``, ``has_unfinished``, ``num_running``,
    ``verify_budget``), so it can stand in for a :class:`VerifierEngine` in a serving loop.

    ``num_cpus``/``num_gpus`` are per rank (with GPUs: one whole GPU per rank, and the factory
    loads the target on ``"cuda"``); ``strategy`` is the placement-group strategy (``PACK``,
    ``STRICT_PACK``, ``SPREAD``, ...); ``backend`` overrides gloo/nccl. ``start_timeout_s`` bounds
    the reservation, the process-group set-up and the engine build; ``step_timeout_s`` every later
    call (and the ranks' collectives)."""

    def __init__(
        self,
        engine_factory: EngineFactory,
        world_size: int,
        *,
        num_cpus: float = 1,
        num_gpus: float = 0,
        strategy: str = "PACK",
        backend: str | None = None,
        start_timeout_s: float = 600.0,
        step_timeout_s: float = 300.0,
    ):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self.step_timeout_s = step_timeout_s
        self._broken: str | None = None
        self._state: tuple[bool, int] = (False, 0)
        self._actors: list[Any] = []
        self._budget: int | None = None
        self.observers: list[Callable[[Any], None]] = []
        self.sps_profile: Any = None
        self.start_timeout_s = start_timeout_s
        bundle = {"CPU": num_cpus, **({"GPU": num_gpus} if num_gpus else {})}
        self._pg = placement_group([dict(bundle) for _ in range(world_size)], strategy=strategy)
        try:
            ready, _ = ray.wait([self._pg.ready()], timeout=start_timeout_s)
            if not ready:
                raise TPGroupError(f"could not reserve {world_size} × {bundle} ({strategy}) within {start_timeout_s:.0f} s")
            actor_cls = ray.remote(_Rank)
            self._actors = [
                actor_cls.options(
                    num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=r),
                ).remote(r, world_size)
                for r in range(world_size)
            ]
            addr, port = self._gather([self._actors[0].rendezvous.remote()], "rendezvous", start_timeout_s)[0]
            self.backend = self._call_all("init_distributed", addr, port, backend, step_timeout_s, timeout=start_timeout_s)[0]
            self._call_all("build", engine_factory, timeout=start_timeout_s)
            self._state = self._call_all("state", timeout=start_timeout_s)[0]
            self._info = self._call_all("info", timeout=start_timeout_s)[0]
            self._counters = self._call_all("counters", timeout=start_timeout_s)[0]
        except BaseException:
            self.shutdown()
            raise

    # ------------------------------------------------------------------ fan-out
    def _fail(self, message: str, cause: BaseException | None = None) -> NoReturn:
        self._broken = message
        raise TPGroupError(message) from cause

    def _gather(self, refs: list[Any], what: str, timeout_s: float) -> list[Any]:
        """Every ref's value in rank order. The first rank to fail raises at once (the others may be
        blocked in a collective waiting for it); no answer within ``timeout_s`` raises too."""
        import ray

        index = {ref: i for i, ref in enumerate(refs)}
        values: list[Any] = [None] * len(refs)
        pending, deadline = list(refs), time.monotonic() + timeout_s
        while pending:
            left = deadline - time.monotonic()
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(left, 0))
            if not ready:
                late = sorted(index[r] for r in pending)
                self._fail(f"tensor-parallel {what}: ranks {late} did not answer within {timeout_s:.0f} s")
            for ref in ready:
                try:
                    values[index[ref]] = ray.get(ref)
                except Exception as exc:  # RayActorError (rank died), RayTaskError (rank raised)
                    self._fail(f"tensor-parallel {what}: rank {index[ref]} failed: {type(exc).__name__}: {exc}", exc)
        return values

    def _agree(self, values: Sequence[Any], what: str) -> None:
        try:
            check_agreement(values, what)
        except TPDivergenceError as exc:
            self._broken = str(exc)
            raise

    def _call_all(self, method: str, *args: Any, timeout: float | None = None) -> list[Any]:
        if self._broken is not None:
            raise TPGroupError(f"the tensor-parallel group is broken ({self._broken}); shut it down and start a new one")
        refs = [getattr(a, method).remote(*args) for a in self._actors]
        return self._gather(refs, method, self.step_timeout_s if timeout is None else timeout)

    # ------------------------------------------------------------------ engine API
    def add_request(self, request: GenerationRequest) -> None:
        from dspark.verifier_service.engine import RequestRejected

        answers = self._call_all("add_request", request)
        self._agree(answers, f"add_request({request.request_id!r})")
        rejected, self._state = answers[0]
        if rejected is not None:
            raise RequestRejected(rejected)

    def abort(self, request_id: str) -> RequestOutput | None:
        answers = self._call_all("abort", request_id)
        self._agree(answers, f"abort({request_id!r})")
        out, self._state = answers[0]
        return out

    def set_verify_budget(self, n: int | None) -> None:
        """Cap Σ ℓ per step on every rank (the engine's ``verify_budget``; None = no cap)."""
        self._call_all("set_verify_budget", n)
        self._budget = n

    @property
    def verify_budget(self) -> int | None:
        return self._budget

    @verify_budget.setter
    def verify_budget(self, n: int | None) -> None:  # drop-in for ``engine.verify_budget = n``
        if n != self._budget:
            self.set_verify_budget(n)

    def step(self) -> list[RequestOutput]:
        answers = self._call_all("step")
        self._agree([(digest, state) for _, digest, state, _ in answers], "step")
        outputs, _, self._state, (records, counters) = answers[0]
        self._counters = counters
        for record in records:
            for fn in self.observers:
                try:
                    fn(record)
                except Exception:
                    log.exception("step observer failed")
        return outputs

    def has_unfinished(self) -> bool:
        return self._state[0]

    # what a serving loop, the scheduler client and the metrics read of an engine (rank 0's values)
    def add_observer(self, fn: Callable[[Any], None]) -> None:
        """``fn(StepRecord)`` after every step, with rank 0's records, in this process."""
        self.observers.append(fn)

    def measure_sps(self, **kwargs: Any) -> Any:
        """``profiling.measure_sps`` on the group (every rank in lockstep) -> rank 0's profile."""
        return self._call_all("measure_sps", kwargs, timeout=self.start_timeout_s)[0]

    def set_policy(self, policy_config: dict, sps: Any = None) -> None:
        self._call_all("set_policy", policy_config, sps)
        self.sps_profile = sps

    @property
    def broken(self) -> str | None:
        """Why the group cannot be used any more, or None."""
        return self._broken

    max_batch_size = property(lambda self: self._info["max_batch_size"])
    max_model_len = property(lambda self: self._info["max_model_len"])
    vocab_size = property(lambda self: self._info["vocab_size"])
    gamma = property(lambda self: self._info["gamma"])
    drafter = property(lambda self: _RankDrafter(self._counters["drafter"]) if self._info["has_drafter"] else None)
    timings = property(lambda self: self._counters["timings"])
    total_fallback_steps = property(lambda self: self._counters["total_fallback_steps"])
    skipped_draft_steps = property(lambda self: self._counters["skipped_draft_steps"])
    draft_steps = property(lambda self: self._counters["draft_steps"])
    context_failures = property(lambda self: self._counters["context_failures"])
    waiting = property(lambda self: range(self._counters["waiting"]))  # only its length is meaningful

    @property
    def num_running(self) -> int:
        return self._state[1]

    def generate(self, requests: Iterable[GenerationRequest]) -> dict[str, RequestOutput]:
        """Run requests to completion; returns the final output of each (as the engine's)."""
        from dspark.verifier_service.engine import run_to_completion

        return run_to_completion(self, requests)

    def shutdown(self) -> None:
        """Kill the rank actors and remove the placement group (idempotent)."""
        import ray
        from ray.util.placement_group import remove_placement_group

        if self._actors and self._broken is None:
            try:  # a clean group leaves its process group first; a broken one may be stuck in a collective
                ray.wait([a.close.remote() for a in self._actors], num_returns=len(self._actors), timeout=10)
            except Exception:
                pass
        for a in self._actors:
            ray.kill(a, no_restart=True)
        self._actors = []
        if self._pg is not None:
            remove_placement_group(self._pg)
            self._pg = None
        self._broken = self._broken or "shut down"
