"""The central scheduler's verify budgets as ``dspark demo`` sees them: a thread samples the
scheduler actor's cluster view (``SchedulerActor.cluster_view``, one small call) while the sweep
runs, and files each replica's budget under the concurrency being measured and the endpoint the
replica serves. The budget is the number of draft tokens a replica may verify per step, summed
over its batch; the local policy treats it as a cap."""

from __future__ import annotations

import statistics
import threading
from dataclasses import dataclass
from typing import Any, Sequence

__all__ = ["BudgetStats", "BudgetWatch"]


@dataclass(frozen=True)
class BudgetStats:
    """The scheduler's budget for one replica over one run: draft tokens it may verify per step,
    summed over its batch (median and range of the samples taken while it had requests)."""

    samples: int
    median: float | None
    low: int | None
    high: int | None
    load: float | None  # median busy fraction the replica reported
    accept_rate: float | None  # the latest acceptance rate it reported

    @staticmethod
    def of(views: Sequence[Any]) -> "BudgetStats":
        busy = [v for v in views if v.running > 0] or list(views)
        b = [v.budget_tokens for v in busy if v.budget_tokens is not None]
        loads = [v.load for v in busy if v.load is not None]
        acc = [v.accept_rate for v in busy if v.accept_rate is not None]
        return BudgetStats(len(b), statistics.median(b) if b else None, min(b) if b else None, max(b) if b else None,
                           statistics.median(loads) if loads else None, acc[-1] if acc else None)


class BudgetWatch:
    """Samples the scheduler actor's cluster view every ``interval_s`` on a thread; samples are
    filed under the current concurrency and the speculative endpoint each replica serves."""

    def __init__(self, sessions: dict[str, str], default_label: str | None, interval_s: float = 0.5):
        self.sessions, self.default_label, self.interval_s = sessions, default_label, interval_s
        self.samples: dict[tuple[int, str], list] = {}
        self.current: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="demo-budgets", daemon=True)

    def __enter__(self) -> "BudgetWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        import ray

        from dspark.scheduler.actor import SchedulerConfig

        sc, handle = SchedulerConfig(), None
        while not self._stop.wait(self.interval_s):
            try:
                handle = handle or ray.get_actor(sc.name, namespace=sc.namespace)
                view = ray.get(handle.cluster_view.remote(), timeout=2.0)
            except Exception:  # not created yet (or restarting): try again next tick
                handle = None
                continue
            c = self.current
            if c is None:
                continue
            for rv in view.replicas:
                label = self.sessions.get(rv.replica_id, self.default_label)
                if label is not None:
                    self.samples.setdefault((c, label), []).append(rv)

    def stats(self) -> dict[tuple[int, str], BudgetStats]:
        return {k: BudgetStats.of(v) for k, v in self.samples.items()}
