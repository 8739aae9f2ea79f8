"""Faults under load, for real (Ray Serve on CPU, the tiny demo target, an untrained DSpark
drafter). Every request is bounded by a timeout, so a hang fails the test instead of blocking CI.

* killed draft worker: no request fails, outputs stay exact, and speculation resumes on the
  restarted worker (draft calls grow again, fallback steps stop growing);
* killed verifier replica (2 replicas): its in-flight requests end fast with a clear error, the
  others stay exact, and new requests succeed afterwards;
* killed scheduler actor: the replicas keep serving on local budgets, exact and without errors;
* client disconnect mid-stream: the request is aborted and its KV slot freed (``running`` back to
  0), and a full batch of new requests is served;
* the ``dspark reliability lossless`` machinery against the running app (a small run).

Training's kill-and-resume is ``tests/platform/training/test_train.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
import requests
import torch

from _helpers import wait_http

pytestmark = [pytest.mark.ray, pytest.mark.slow]

PORT = 8437
MAX_LEN = 160
BATCH = 4  # max_batch_size of every app
REQUEST_TIMEOUT = 90  # seconds any one request may take; past it the request counts as a hang


@pytest.fixture(scope="module")
def apps(tiny_demo_target, tmp_path_factory):
    """Two applications on one Serve instance: ``fd`` (disaggregated, one verifier, one draft
    worker) and ``fv`` (two verifier replicas, drafter colocated, prefix policy, the scheduler)."""
    import ray
    from ray import serve

    from dspark.drafter_service.checkpoint import save_drafter
    from dspark.drafter_service.registry import build_drafter
    from dspark.platform.config import DrafterConfig, TargetConfig
    from dspark.platform.serving.app import app_builder
    from dspark.platform.target.loading import load_target

    path = str(tiny_demo_target.path)
    target = load_target(TargetConfig(path=path), path)
    torch.manual_seed(0)
    drafter = build_drafter(DrafterConfig(kind="dspark", block_size=4, num_layers=1), target)
    dpath = save_drafter(drafter, tmp_path_factory.mktemp("drafter") / "drafter")
    ray.init(address="local", num_cpus=8, include_dashboard=False, object_store_memory=200 * 2**20,
             log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    small = {"num_cpus": 0.2}
    base = {"model_name": "tiny", "target": {"path": path}, "drafter_path": str(dpath),
            "engine": {"max_batch_size": BATCH, "max_model_len": MAX_LEN}, "verifier": small, "draft_worker": small,
            "ingress_deployment": {"num_cpus": 0.1}}
    serve.run(app_builder({**base, "topology": "disaggregated", "policy": {"name": "fixed"}, "use_scheduler": False,
                           "draft_timeout_s": 2.0}), name="fd", route_prefix="/fd", blocking=False)
    serve.run(app_builder({**base, "topology": "colocated", "policy": {"name": "prefix"}, "use_scheduler": True,
                           "verifier": {**small, "num_replicas": 2}}), name="fv", route_prefix="/fv", blocking=False)
    for prefix in ("/fd", "/fv"):
        wait_http(f"http://127.0.0.1:{PORT}{prefix}/health", timeout=180)
    yield {"target": target, "tokenizer": target.tokenizer, "drafter_path": str(dpath)}
    serve.shutdown()
    ray.shutdown()


def reference(setup, prompt: str, n: int) -> str:
    """The target's own greedy continuation (plain engine, no drafter), as text."""
    from dspark.platform.contracts import GenerationRequest, SamplingParams
    from dspark.verifier_service.engine import VerifierEngine

    tok = setup["tokenizer"]
    ids = tuple(tok(prompt, add_special_tokens=False)["input_ids"])
    eng = VerifierEngine(setup["target"], None, max_batch_size=1, max_model_len=MAX_LEN)
    out = eng.generate([GenerationRequest("r", ids, SamplingParams(max_tokens=n, ignore_eos=True))])["r"]
    return tok.decode(list(out.token_ids), skip_special_tokens=True)


async def stream(client, prompt: str, n: int, on_chunk=None) -> str:
    """One streaming completion, bounded by REQUEST_TIMEOUT; ``on_chunk(k)`` after the k-th chunk."""

    async def run() -> str:
        s = await client.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True})
        parts = []
        async for ch in s:
            parts.append(ch.choices[0].text if ch.choices else "")
            if on_chunk is not None:
                await on_chunk(len(parts))
        return "".join(parts)

    return await asyncio.wait_for(run(), REQUEST_TIMEOUT)


def aclient(prefix: str):
    import openai

    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{PORT}{prefix}/v1", api_key="unused", max_retries=0,
                              timeout=REQUEST_TIMEOUT)


def serve_actors(app: str, deployment: str) -> list[dict]:
    import ray

    return [a for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("SERVE_REPLICA::") and f"{app}#{deployment}#" in a["name"]]


def kill(actor: dict) -> None:
    import ray

    ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=False)


def replica_stats(app: str, want: int = 1, tries: int = 40) -> dict[str, dict]:
    """session -> VerifierReplica.stats() of ``want`` distinct replicas (Serve routes each call to one)."""
    from ray import serve

    h = serve.get_deployment_handle("VerifierReplica", app_name=app)
    seen: dict[str, dict] = {}
    for _ in range(tries):
        st = h.stats.remote().result(timeout_s=30)
        seen[st["session"]] = st
        if len(seen) >= want:
            break
    assert len(seen) >= want, f"reached {len(seen)} of {want} replicas"
    return seen


def until(cond, timeout: float, what: str, every: float = 0.5):
    t0 = time.time()
    while time.time() - t0 < timeout:
        got = cond()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


PROMPTS = ["def main(", "import os\n", "class Foo:", "for i in range(", "The value of", "return x +", "if not ", "# A"]


def test_killed_draft_worker_loses_nothing_and_speculation_resumes(apps):
    prompts = [p + " w" for p in PROMPTS[:6]]
    wants = [reference(apps, p, 40) for p in prompts]
    (s0,) = replica_stats("fd").values()
    (worker,) = serve_actors("fd", "DraftWorker")
    killed = asyncio.Event()

    async def kill_once(k):
        if k == 3 and not killed.is_set():
            killed.set()
            kill(worker)

    async def load():
        c = aclient("/fd")
        return await asyncio.gather(*(stream(c, p, 40, kill_once if i == 0 else None) for i, p in enumerate(prompts)))

    assert asyncio.run(load()) == wants  # no request failed, every output exact
    (s1,) = replica_stats("fd").values()
    assert s1["fallback_steps"] > s0["fallback_steps"], "the kill did not reach the drafting path"
    until(lambda: [a for a in serve_actors("fd", "DraftWorker") if a["name"] != worker["name"]], 120,
          "Serve to restart the draft worker")

    # the first call to the new worker answers `lost` (one plain step); then drafting is back
    def drafting_again():
        before = next(iter(replica_stats("fd").values()))
        got = asyncio.run(load_few(prompts[:BATCH]))
        after = next(iter(replica_stats("fd").values()))
        assert got == wants[:BATCH]
        return (after["draft_calls"] > before["draft_calls"] and after["fallback_steps"] == before["fallback_steps"]
                and after)

    async def load_few(ps):
        c = aclient("/fd")
        return await asyncio.gather(*(stream(c, p, 40) for p in ps))

    after = until(drafting_again, 150, "draft calls to succeed again without fallback steps", every=0)
    assert after["draft_sessions_lost"] >= 1  # the replica saw the new worker's empty session


def test_client_disconnect_aborts_the_request_and_frees_its_slot(apps):
    import concurrent.futures

    url = f"http://127.0.0.1:{PORT}/fd/v1/completions"

    def abandon(i: int) -> int:
        body = {"model": "tiny", "prompt": PROMPTS[i], "max_tokens": 120, "temperature": 0, "stream": True,
                "ignore_eos": True}
        with requests.post(url, json=body, stream=True, timeout=(5, REQUEST_TIMEOUT)) as r:
            assert r.status_code == 200
            for k, _ in enumerate(r.iter_lines(), 1):
                if k >= 4:
                    break
        return k  # leaving the block closes the connection mid-stream

    (s0,) = replica_stats("fd").values()
    with concurrent.futures.ThreadPoolExecutor(BATCH) as pool:
        assert all(k >= 4 for k in pool.map(abandon, range(BATCH), timeout=REQUEST_TIMEOUT))
    s1 = until(lambda: (st := next(iter(replica_stats("fd").values())))["running"] == 0 and st, 30,
               "the aborted requests' slots to free")
    # aborted, not run to the end: far fewer tokens than the BATCH x 120 asked for
    assert s1["tokens"] - s0["tokens"] < BATCH * 120 // 2, s1["tokens"] - s0["tokens"]
    # a full batch of new requests: every slot must be free again
    prompts = [p + " d" for p in PROMPTS[:BATCH]]
    wants = [reference(apps, p, 24) for p in prompts]

    async def full():
        c = aclient("/fd")
        return await asyncio.gather(*(stream(c, p, 24) for p in prompts))

    assert asyncio.run(full()) == wants


def test_unreachable_scheduler_leaves_replicas_serving_on_local_budgets(apps):
    import ray

    def scheduler():
        with contextlib.suppress(ValueError):
            return ray.get_actor("dspark-scheduler", namespace="dspark")

    # the replicas created the scheduler and both report to it
    sched = until(scheduler, 60, "the scheduler actor")
    until(lambda: len(ray.get(sched.cluster_view.remote(), timeout=10).replicas) == 2, 60, "both replicas to register")
    before = replica_stats("fv", want=2)
    assert all(st["scheduler_exchanges"] > 0 for st in before.values()), before
    ray.kill(sched, no_restart=True)

    def all_failing():
        now = replica_stats("fv", want=2)
        return all(now[k]["scheduler_failures"] > before[k]["scheduler_failures"] for k in before) and now

    until(all_failing, 30, "both replicas to notice the scheduler is gone")
    prompts = [p + " s" for p in PROMPTS]
    wants = [reference(apps, p, 30) for p in prompts]

    async def load():
        c = aclient("/fv")
        return await asyncio.gather(*(stream(c, p, 30) for p in prompts))

    assert asyncio.run(load()) == wants  # no error, exact, on both replicas
    # once the last budget's lease ran out, the replicas decide alone (and keep serving)
    until(lambda: not any(st["budget_from_scheduler"] for st in replica_stats("fv", want=2).values()), 30,
          "the scheduler's budgets to expire")
    assert asyncio.run(load()) == wants


def test_killed_verifier_replica_fails_its_requests_fast_and_the_other_serves(apps):
    prompts = [PROMPTS[i % len(PROMPTS)] + f" v{i}" for i in range(12)]
    wants = [reference(apps, p, 60) for p in prompts]
    replicas = serve_actors("fv", "VerifierReplica")
    assert len(replicas) == 2, replicas
    victim = replicas[0]
    killed_at: list[float] = []

    async def kill_once(k):
        if k == 3 and not killed_at:
            kill(victim)
            killed_at.append(time.monotonic())

    async def one(c, i, p, n=60):
        try:
            return "ok", await stream(c, p, n, kill_once if i == 0 else None), time.monotonic()
        except asyncio.TimeoutError:
            return "hang", None, time.monotonic()
        except Exception as exc:  # an HTTP error status, or the SSE error event the openai client raises
            return "error", f"{type(exc).__name__}: {exc}", time.monotonic()

    async def load():
        c = aclient("/fv")
        return await asyncio.gather(*(one(c, i, p) for i, p in enumerate(prompts)))

    results = asyncio.run(load())
    kinds = [r[0] for r in results]
    assert "hang" not in kinds, results
    assert killed_at, "the victim was never killed"
    for (kind, text, _), want in zip(results, wants):
        if kind == "ok":
            assert text == want  # requests on the other replica are untouched
    errors = [r for r in results if r[0] == "error"]
    assert errors, "the killed replica had requests in flight: they must fail, not succeed silently"
    assert kinds.count("ok") >= 1
    for _, msg, done in errors:
        assert "verifier replica failed" in msg or "503" in msg, msg  # a clear error
        assert done - killed_at[0] < 30, f"failed only {done - killed_at[0]:.0f} s after the kill"
    # new requests succeed afterwards
    fresh = [p + " n" for p in PROMPTS]
    fresh_wants = [reference(apps, p, 20) for p in fresh]

    async def again():
        c = aclient("/fv")
        return await asyncio.gather(*(one(c, i + 1, p, 20) for i, p in enumerate(fresh)))

    assert [(k, t) for k, t, _ in asyncio.run(again())] == [("ok", w) for w in fresh_wants]


def test_lossless_check_runs_against_the_app(apps):
    """``dspark reliability lossless`` end to end on a small workload (the real run is 500 requests)."""
    from dspark.platform.bench.serve import Endpoint
    from dspark.platform.reliability.lossless import run_lossless

    ep = Endpoint("fd", f"http://127.0.0.1:{PORT}/fd/v1", "tiny")
    res = run_lossless(lambda: contextlib.nullcontext(ep), apps["target"], requests=24, concurrency=8, sampled=4,
                       max_model_len=MAX_LEN, log=lambda m: None)
    assert res.errors == 0 and res.mismatches == [], res.mismatches[:3]
    assert res.sampled_as_plain == res.sampled_identical == res.sampled == 4  # the target's own seeded samples
