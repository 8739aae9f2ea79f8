"""The Serve app for real (Ray Serve on CPU, the tiny demo target, an untrained DSpark drafter):
the ``openai`` client gets the target's own greedy text (completions, chat, streaming), 16
concurrent streams all match, disaggregated and colocated give identical tokens, killing the draft
worker mid-stream loses no request, and malformed requests get a 4xx with the reason."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import requests
import torch

pytestmark = [pytest.mark.ray, pytest.mark.slow]

PORT = 8431
MAX_LEN = 160


@pytest.fixture(scope="module")
def setup(demo_cache, tmp_path_factory):
    import ray
    from ray import serve

    from dspark.drafter_service.checkpoint import save_drafter
    from dspark.drafter_service.registry import build_drafter
    from dspark.platform.config import DrafterConfig, TargetConfig
    from dspark.platform.serving.app import app_builder
    from dspark.platform.target.loading import load_target

    from _helpers import tiny_demo_config, wait_http
    from dspark.platform.demo.build import build_demo_target

    # two key/value heads, so the tensor-parallel app can split attention over 2 ranks
    path = str(build_demo_target(tiny_demo_config(num_kv_heads=2), demo_cache, progress=False, log=lambda m: None).path)
    target = load_target(TargetConfig(path=path), path)
    torch.manual_seed(0)
    drafter = build_drafter(DrafterConfig(kind="dspark", block_size=4, num_layers=1), target)
    dpath = save_drafter(drafter, tmp_path_factory.mktemp("drafter") / "drafter")
    ray.init(num_cpus=6, include_dashboard=False, object_store_memory=200 * 2**20, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    small = {"num_cpus": 0.3}
    base = {"model_name": "tiny", "target": {"path": path}, "drafter_path": str(dpath), "use_scheduler": False,
            "engine": {"max_batch_size": 8, "max_model_len": MAX_LEN}, "policy": {"name": "fixed"},
            "verifier": small, "draft_worker": small, "draft_timeout_s": 5.0}
    serve.run(app_builder({**base, "topology": "disaggregated"}), name="disagg", route_prefix="/d", blocking=False)
    serve.run(app_builder({**base, "topology": "colocated"}), name="colo", route_prefix="/c", blocking=False)
    # a tensor-parallel verifier (2 rank actors over gloo) with disaggregated drafting
    serve.run(app_builder({**base, "topology": "disaggregated", "tensor_parallel_size": 2}), name="tp",
              route_prefix="/t", blocking=False)
    for prefix in ("/d", "/c", "/t"):
        wait_http(f"http://127.0.0.1:{PORT}{prefix}/health")
    yield {"target": target, "tokenizer": target.tokenizer}
    serve.shutdown()
    ray.shutdown()


def client(prefix="/d", async_=False):
    import openai

    cls = openai.AsyncOpenAI if async_ else openai.OpenAI
    return cls(base_url=f"http://127.0.0.1:{PORT}{prefix}/v1", api_key="unused", max_retries=0, timeout=120)


def reference(setup, ids: list[int], n: int) -> str:
    """The target's own greedy continuation (plain decoding, no drafter), as text."""
    from dspark.platform.contracts import GenerationRequest, SamplingParams
    from dspark.verifier_service.engine import VerifierEngine

    eng = VerifierEngine(setup["target"], None, max_batch_size=1, max_model_len=MAX_LEN)
    out = eng.generate([GenerationRequest("r", tuple(ids), SamplingParams(max_tokens=n, ignore_eos=True))])["r"]
    return setup["tokenizer"].decode(list(out.token_ids), skip_special_tokens=True)


PROMPTS = ["def main(", "import os\n", "class Foo:", "for i in range(", "The value of", "return x +", "if not ", "# A"]


def test_completions_chat_and_streaming_match_the_target(setup):
    tok = setup["tokenizer"]
    c = client()
    for prompt in PROMPTS[:3]:
        want = reference(setup, tok(prompt, add_special_tokens=False)["input_ids"], 12)
        r = c.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
        assert r.choices[0].text == want and r.usage.completion_tokens == 12
        chunks = c.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                      extra_body={"ignore_eos": True})
        assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == want
    msgs = [{"role": "user", "content": "hello there"}]
    from dspark.platform.serving.app import chat_ids

    want = reference(setup, chat_ids(tok, msgs), 10)
    r = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == want
    s = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0, stream=True,
                                  stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    parts = list(s)
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == want
    assert parts[-1].usage.completion_tokens == 10
    assert [m.id for m in c.models.list().data] == ["tiny"]
    # the acceptance extension
    r = c.completions.create(model="tiny", prompt="def f(", max_tokens=8, temperature=0,
                             extra_body={"ignore_eos": True, "dspark": {"acceptance": True}})
    assert r.usage.model_extra["dspark"]["verify_steps"] >= 1


def test_sixteen_concurrent_streams_and_both_topologies_agree(setup):
    tok = setup["tokenizer"]
    prompts = [PROMPTS[i % len(PROMPTS)] + str(i) for i in range(16)]
    wants = [reference(setup, tok(p, add_special_tokens=False)["input_ids"], 10 + i % 5) for i, p in enumerate(prompts)]

    async def one(c, p, n):
        s = await c.completions.create(model="tiny", prompt=p, max_tokens=n, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
        return "".join([ch.choices[0].text async for ch in s if ch.choices])

    async def all_(prefix):
        c = client(prefix, async_=True)
        return await asyncio.gather(*(one(c, p, 10 + i % 5) for i, p in enumerate(prompts)))

    assert asyncio.run(all_("/d")) == wants
    assert asyncio.run(all_("/c")) == wants
    assert asyncio.run(all_("/t")) == wants  # TP=2 gives TP=1's tokens


def test_tensor_parallel_replica_samples_like_tp1_and_drafts_remotely(setup):
    """Seeded sampling through the TP=2 app equals the TP=1 app (same draft worker recipe, same
    random streams), and its rank 0 drafted through the draft-worker deployment."""
    def sample(prefix):
        c = client(prefix)
        return [c.completions.create(model="tiny", prompt=p, max_tokens=16, temperature=0.9, seed=7 + i,
                                     extra_body={"ignore_eos": True}).choices[0].text for i, p in enumerate(PROMPTS[:4])]

    assert sample("/t") == sample("/d")
    stats = requests.get(f"http://127.0.0.1:{PORT}/t/dspark/stats", timeout=30).json()
    assert stats["draft_calls"] > 0 and stats["steps"] > 0 and stats["topology"] == "disaggregated"


def test_killing_the_draft_worker_mid_stream_loses_no_request(setup):
    import ray

    tok = setup["tokenizer"]
    prompts = [PROMPTS[i] + " z" for i in range(6)]
    wants = [reference(setup, tok(p, add_special_tokens=False)["input_ids"], 40) for p in prompts]

    async def run():
        c = client("/d", async_=True)

        async def one(p):
            s = await c.completions.create(model="tiny", prompt=p, max_tokens=40, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
            out = []
            async for ch in s:
                out.append(ch.choices[0].text if ch.choices else "")
                if len(out) == 3 and p == prompts[0]:
                    workers = [a for a in ray.util.list_named_actors(all_namespaces=True)
                               if "disagg" in a["name"] and "DraftWorker" in a["name"]]
                    assert workers, ray.util.list_named_actors(all_namespaces=True)
                    for w in workers:
                        ray.kill(ray.get_actor(w["name"], namespace=w["namespace"]), no_restart=False)
            return "".join(out)

        return await asyncio.gather(*(one(p) for p in prompts))

    assert asyncio.run(run()) == wants


@pytest.mark.parametrize("body,status,needle", [
    (b"{not json", 400, "not valid JSON"),
    (json.dumps({"model": "nope", "prompt": "x"}).encode(), 404, "does not exist"),
    (json.dumps({"model": "tiny", "prompt": "x", "max_tokens": -1}).encode(), 400, "max_tokens"),
    (json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 10**6}).encode(), 400, "context length"),
    (json.dumps({"model": "tiny", "prompt": "x", "temperature": 7}).encode(), 400, "temperature"),
    (json.dumps({"model": "tiny", "prompt": "word " * 400, "max_tokens": 4}).encode(), 400, "context length"),
    (json.dumps({"model": "tiny", "prompt": 12}).encode(), 400, "prompt"),
    (json.dumps({"model": "tiny", "prompt": "x", "max_tokens": "5"}).encode(), 400, "max_tokens"),
    (json.dumps({"model": "tiny", "prompt": "x", "n": 3}).encode(), 400, "'n'"),
    (json.dumps({"model": "tiny", "prompt": "x", "logprobs": 2}).encode(), 400, "unsupported field 'logprobs'"),
    (json.dumps({"model": "tiny", "prompt": [1, 2, 10**9]}).encode(), 400, "token ids"),
    (json.dumps({"model": "tiny", "messages": []}).encode(), 400, "messages"),
    (b"[1, 2]", 400, "JSON object"),
    (b"x" * (2 << 20), 413, "exceeds the limit"),
])
def test_malformed_requests_get_4xx_with_the_reason(setup, body, status, needle):
    path = "chat/completions" if b'"messages"' in body else "completions"
    r = requests.post(f"http://127.0.0.1:{PORT}/d/v1/{path}", data=body, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"], r.text
    # and the server still serves
    ok = requests.post(f"http://127.0.0.1:{PORT}/d/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200
