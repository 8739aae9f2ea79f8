"""Fuzz of the running server (Ray Serve on CPU, the tiny demo target, an untrained DSpark
drafter colocated, an API key): hypothesis-generated requests, valid and hostile, at
``/v1/completions`` and ``/v1/chat/completions``. Every answer is a 2xx or a 4xx whose JSON body
carries a message; none is a 5xx and none hangs; a greedy request running beside the fuzz keeps
getting the target's exact greedy text, and so does one after it; the API key appears in no
response and in no log of the Ray session."""

from __future__ import annotations

import json
import os
import secrets
import threading
import time

import pytest

from _helpers import wait_http
import requests
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from _api_fuzz import request_bytes
from dspark.platform.serving import openai_api as oai

pytestmark = [pytest.mark.ray, pytest.mark.slow]

PORT = 8433
MAX_LEN = 96
MAX_BODY = 1 << 18
KEY_ENV = "DSPARK_FUZZ_API_KEY"
BASE = f"http://127.0.0.1:{PORT}/f/v1"
TIMEOUT = (5, 60)  # (connect, read) seconds: a request slower than this counts as a hang


@pytest.fixture(scope="module")
def server(tiny_demo_target, tmp_path_factory):
    import ray
    from ray import serve

    from dspark.drafter_service.checkpoint import save_drafter
    from dspark.drafter_service.registry import build_drafter
    from dspark.platform.config import DrafterConfig, TargetConfig
    from dspark.platform.serving.app import app_builder
    from dspark.platform.target.loading import load_target

    key = "sk-fuzz-" + secrets.token_hex(16)
    os.environ[KEY_ENV] = key  # before ray.init: the replicas inherit the environment
    path = str(tiny_demo_target.path)
    target = load_target(TargetConfig(path=path), path)
    torch.manual_seed(0)
    drafter = build_drafter(DrafterConfig(kind="dspark", block_size=4, num_layers=1), target)
    dpath = save_drafter(drafter, tmp_path_factory.mktemp("drafter") / "drafter")
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=100 * 2**20, log_to_driver=False)
    logs = ray._private.worker._global_node.get_logs_dir_path()
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    args = {"model_name": "tiny", "target": {"path": path}, "drafter_path": str(dpath), "topology": "colocated",
            "use_scheduler": False, "engine": {"max_batch_size": 4, "max_model_len": MAX_LEN},
            "policy": {"name": "fixed"}, "verifier": {"num_cpus": 0.5},
            "ingress": {"api_key_env": KEY_ENV, "max_body_bytes": MAX_BODY, "max_tokens_default": 4}}
    serve.run(app_builder(args), name="fuzz", route_prefix="/f", blocking=False)
    wait_http(f"http://127.0.0.1:{PORT}/f/health")
    try:
        yield {"target": target, "tokenizer": target.tokenizer, "key": key, "logs": logs}
    finally:
        serve.shutdown()
        ray.shutdown()
        os.environ.pop(KEY_ENV, None)


def reference(server, ids: list[int], n: int) -> str:
    """The target's own greedy continuation (plain decoding, no drafter), as text."""
    from dspark.platform.contracts import GenerationRequest, SamplingParams
    from dspark.verifier_service.engine import VerifierEngine

    eng = VerifierEngine(server["target"], None, max_batch_size=1, max_model_len=MAX_LEN)
    out = eng.generate([GenerationRequest("r", tuple(ids), SamplingParams(max_tokens=n, ignore_eos=True))])["r"]
    return server["tokenizer"].decode(list(out.token_ids), skip_special_tokens=True)


def post(path: str, data: bytes, key: str | None) -> requests.Response:
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    return requests.post(f"{BASE}/{path}", data=data, headers=headers, timeout=TIMEOUT)


def check_answer(r: requests.Response, key: str) -> None:
    """The contract of every answer, whatever was sent."""
    assert r.status_code < 500, (r.status_code, r.text[:500])
    assert key not in r.text
    if r.status_code >= 300:
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"].strip(), r.text
        return
    if r.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", r.text[-300:]
        for e in events[:-1]:
            assert "error" not in json.loads(e), e
    else:
        assert r.json()["choices"], r.text


# valid requests stay small so they finish in a few steps; hostile ones come from mutations
_SMALL = st.integers(1, 4) | st.none()
_OVERRIDES = {"model": st.just("tiny") | st.sampled_from(["", "TINY", "tiny "]),
              "max_tokens": _SMALL, "max_completion_tokens": _SMALL,
              "prompt": st.text(max_size=40) | st.lists(st.integers(0, 420), max_size=12)}
_REQUESTS = st.one_of(
    st.tuples(st.just("completions"), request_bytes(oai.CompletionBody.model_json_schema(), _OVERRIDES, max_bytes=MAX_BODY)),
    st.tuples(st.just("chat/completions"), request_bytes(oai.ChatBody.model_json_schema(), _OVERRIDES, max_bytes=MAX_BODY)),
)
_AUTH = st.sampled_from(["good"] * 8 + ["missing", "wrong"])


def test_fuzzed_requests_get_a_result_or_a_4xx_and_lose_nothing(server):
    tok, key = server["tokenizer"], server["key"]
    canary_prompt = "def main("
    want = reference(server, tok(canary_prompt, add_special_tokens=False)["input_ids"], 8)
    canary_body = json.dumps({"model": "tiny", "prompt": canary_prompt, "max_tokens": 8, "temperature": 0,
                              "ignore_eos": True}).encode()
    stop, canary = threading.Event(), []

    def run_canary():  # valid greedy requests beside the fuzz: hostile neighbours must not touch them
        while not stop.is_set():
            r = post("completions", canary_body, key)
            canary.append(r.json()["choices"][0]["text"] if r.status_code == 200 else (r.status_code, r.text))

    seen: dict[int, int] = {}

    @settings(max_examples=150, deadline=None, derandomize=not os.environ.get("DSPARK_FUZZ_RANDOM"), database=None,
              phases=[Phase.explicit, Phase.generate],  # no shrinking against a live server
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(_REQUESTS, _AUTH)
    def fuzz(request, auth):
        path, raw = request
        r = post(path, raw, {"good": key, "missing": None, "wrong": key[:-1] + "x"}[auth])
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        check_answer(r, key)
        if auth != "good":
            assert r.status_code == 401, r.text

    thread = threading.Thread(target=run_canary, daemon=True)
    thread.start()
    try:
        fuzz()
    finally:
        stop.set()
        thread.join(TIMEOUT[1] + 5)
    assert seen.get(200, 0) >= 10 and sum(v for k, v in seen.items() if 400 <= k < 500) >= 50, seen
    assert canary and all(c == want for c in canary), [c for c in canary if c != want][:3]

    # after the fuzz the server still gives the target's exact greedy text, on both endpoints
    from dspark.platform.serving.app import chat_ids

    for prompt in ("import os\n", "class Foo:"):
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 10, "temperature": 0, "ignore_eos": True}
        r = post("completions", json.dumps(body).encode(), key)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == reference(
            server, tok(prompt, add_special_tokens=False)["input_ids"], 10), r.text
    msgs = [{"role": "user", "content": "hello there"}]
    body = {"model": "tiny", "messages": msgs, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    r = post("chat/completions", json.dumps(body).encode(), key)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == reference(server, chat_ids(tok, msgs), 8)


@pytest.mark.parametrize("body,status,needle", [
    (b"x" * (MAX_BODY + 1), 413, "exceeds the limit"),
    (json.dumps({"model": "tiny", "prompt": "word " * 200, "max_tokens": 4}).encode(), 400, "context length"),
    (json.dumps({"model": "tiny", "prompt": list(range(1, 95)), "max_tokens": 4}).encode(), 400, "context length"),
    (b'{"model": "tiny", "prompt": "\\ud800 x"}', 400, "surrogate"),
    (b'{"model": "tiny", "prompt": "x", "top_k": 9223372036854775808}', 400, "top_k"),
    (b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply"),
])
def test_oversized_overlong_and_hostile_bodies(server, body, status, needle):
    r = post("completions", body, server["key"])
    assert r.status_code == status and needle in r.json()["error"]["message"], r.text
    if status == 400 and needle == "context length":
        assert r.json()["error"]["code"] == "context_length_exceeded"


def test_api_key_is_required_and_never_logged(server):
    key = server["key"]
    body = json.dumps({"model": "tiny", "prompt": "a", "max_tokens": 2}).encode()
    for sent in (None, "", key.upper(), key + "x", key[:-1]):
        r = post("completions", body, sent)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key" and key not in r.text
    r = requests.get(f"{BASE}/models", timeout=TIMEOUT)
    assert r.status_code == 401
    assert post("completions", body, key).status_code == 200
    leaked = []
    for root, _dirs, files in os.walk(server["logs"]):
        for name in files:
            try:
                with open(os.path.join(root, name), "rb") as fh:
                    if key.encode() in fh.read():
                        leaked.append(name)
            except OSError:
                pass
    assert not leaked, leaked
