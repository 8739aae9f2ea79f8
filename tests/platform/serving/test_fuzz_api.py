"""Fuzz of the OpenAI request parsing (no server): whatever bytes a client sends,
``parse_body`` + ``sampling_params`` either give a valid body and ``SamplingParams`` the engine
can run, or raise :class:`APIError` with a 4xx status and a message that encodes as strict JSON.
Any other exception would be a 500 on the server. Bodies come from the models' own JSON schema
(all of which must parse) and from junk mutations of them."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _api_fuzz import JUNK, encode, from_schema, request_bytes
from dspark.platform.contracts import SamplingParams
from dspark.platform.serving import openai_api as oai

KINDS = {"completions": oai.CompletionBody, "chat": oai.ChatBody}
MAX_BYTES = 1 << 18  # room for 100 000 levels of nesting; the server default is 1 MiB
# derandomized (the same examples on every run, so CI never flakes) and no example database
# written into the checkout; DSPARK_FUZZ_RANDOM=1 draws new examples (--hypothesis-seed=N replays)
RANDOM = bool(os.environ.get("DSPARK_FUZZ_RANDOM"))
FUZZ = settings(max_examples=1500, deadline=None, derandomize=not RANDOM, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FUZZ_LIGHT = settings(FUZZ, max_examples=700)
INT64_MAX = 2**63 - 1


def check_error(exc: oai.APIError) -> None:
    assert 400 <= exc.status < 500, (exc.status, exc.message)
    assert exc.message.strip()
    # what the ingress's JSONResponse does with the body: strict JSON, UTF-8
    json.dumps(exc.body(), ensure_ascii=False, allow_nan=False).encode("utf-8")


def parse(raw: bytes, kind: type) -> tuple[object | None, SamplingParams | None]:
    """(body, params), (body, None) or (None, None); asserts the error contract on the way."""
    try:
        body = oai.parse_body(raw, kind, max_bytes=MAX_BYTES)
    except oai.APIError as exc:
        check_error(exc)
        return None, None
    assert isinstance(body, kind)
    json.dumps(body.model_dump(), ensure_ascii=False).encode("utf-8")  # text the tokenizer can read
    try:
        params = oai.sampling_params(body, default_max_tokens=16)
    except oai.APIError as exc:
        check_error(exc)
        return body, None
    # what the engine relies on: every value fits its tensors (int64) and the sampling math
    assert isinstance(params, SamplingParams) and params.max_tokens >= 1
    assert params.temperature == 0 or oai.MIN_SAMPLING_TEMPERATURE <= params.temperature <= 2
    assert 0 < params.top_p <= 1 and 0 <= params.top_k <= INT64_MAX
    assert params.seed is None or 0 <= params.seed <= INT64_MAX
    assert all(isinstance(s, str) and s for s in params.stop) and len(params.stop) <= 4
    return body, params


@pytest.mark.parametrize("name", sorted(KINDS))
def test_every_body_the_schema_allows_parses(name):
    kind = KINDS[name]
    schema = kind.model_json_schema()

    @FUZZ_LIGHT
    @given(from_schema(schema))
    def run(body):
        raw = encode(body)
        if len(raw) > MAX_BYTES:  # the 413 path has its own test
            return
        body_, params = parse(raw, kind)
        assert body_ is not None, body  # the published schema and the parser agree
        # the only rules the schema cannot say are those on stop strings
        stop = body.get("stop")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        assert (params is None) == (any(not s for s in stops) or len(stops) > 4), body
        for key in ("model", "max_tokens", "top_k", "seed", "stream", "user", "ignore_eos"):
            if key in body:
                assert getattr(body_, key) == body[key]

    run()


@pytest.mark.parametrize("name", sorted(KINDS))
def test_mutated_bodies_give_a_body_or_a_4xx(name):
    kind = KINDS[name]

    @FUZZ
    @given(request_bytes(kind.model_json_schema(), max_bytes=MAX_BYTES))
    def run(raw):
        parse(raw, kind)

    run()


@FUZZ_LIGHT
@given(st.one_of(JUNK.map(encode), st.binary(max_size=200), st.text(max_size=200).map(lambda s: s.encode("utf-8"))))
def test_arbitrary_json_and_bytes_give_a_body_or_a_4xx(raw):
    for kind in KINDS.values():
        parse(raw, kind)


@pytest.mark.parametrize("raw,status,needle", [
    (b'{"model": "m", "prompt": "x", "temperature": ' + b"1" * 5000 + b"}", 400, "not valid JSON"),  # int digit limit
    (b'{"model": "m", "prompt": "x", "temperature": ' + b"1" * 400 + b"}", 400, "temperature"),  # float overflow
    (b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply"),
    (b'{"a": ' * 100_000, 400, "nested too deeply"),
    (b'{"model": "m", "prompt": "\\ud800"}', 400, "surrogate"),
    (b'{"model": "m", "prompt": "x", "stop": ["a\\udfff"]}', 400, "surrogate"),
    (b'{"model": "m", "prompt": "x", "top_k": ' + b"9" * 30 + b"}", 400, "top_k"),
    (b'{"model": "m", "prompt": "x", "temperature": NaN}', 400, "temperature"),
    (b'{"model": "m", "prompt": "x", "top_p": Infinity}', 400, "top_p"),
    (b'{"model": "m", "prompt": "x", "temperature": "0.5"}', 400, "temperature"),
    (b'{"model": "m", "prompt": "x", "temperature": true}', 400, "temperature"),
    (b'{"model": "m", "prompt": "x", "seed": 9223372036854775808}', 400, "seed"),
    (b'{"model": "m", "prompt": "x", "' + b"k" * 3000 + b'": 1}', 400, "unsupported field"),
    (b"\xff\xfe\x00", 400, "not valid JSON"),
    (b"x" * (MAX_BYTES + 1), 413, "exceeds the limit"),
])
def test_known_hostile_bodies(raw, status, needle):
    with pytest.raises(oai.APIError) as err:
        oai.parse_body(raw, oai.CompletionBody, max_bytes=MAX_BYTES if status == 413 else 1 << 20)
    assert err.value.status == status and needle in err.value.message, err.value.message
    assert len(err.value.message) < 500  # a junk key is not echoed in full
    check_error(err.value)


def test_tiny_temperatures_are_greedy_and_ints_are_floats():
    """T -> 0 is the argmax; below MIN_SAMPLING_TEMPERATURE logits / T would overflow float32."""
    for t, want in ((1e-45, 0.0), (5e-324, 0.0), (1e-6, 0.0), (1e-5, 1e-5), (1, 1.0), (0, 0.0)):
        body = oai.parse_body(json.dumps({"model": "m", "prompt": "x", "temperature": t}).encode(),
                              oai.CompletionBody, max_bytes=1 << 20)
        params = oai.sampling_params(body, default_max_tokens=4)
        assert params.temperature == want and type(params.temperature) is float


# ------------------------------------------------------------------------------ the ingress's API key
def _request(authorization: str | None):
    from starlette.requests import Request

    headers = [] if authorization is None else [(b"authorization", authorization.encode("latin-1"))]
    return Request({"type": "http", "method": "POST", "path": "/", "headers": headers})


def test_api_key_comparison_is_constant_time(monkeypatch):
    """Every check goes through hmac.compare_digest (time independent of where the bytes
    differ), whatever the header holds."""
    from dspark.platform.serving import app

    calls = []
    real = app.hmac.compare_digest
    monkeypatch.setattr(app.hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    auth = app.Ingress.func_or_class._auth
    ingress = SimpleNamespace(key="k3y-secret")  # all _auth reads of the replica
    auth(ingress, _request("Bearer k3y-secret"))
    for header in (None, "", "Bearer", "Bearer k3y-secreT", "Basic k3y-secret", "bearer k3y-secre"):
        with pytest.raises(oai.APIError) as err:
            auth(ingress, _request(header))
        assert err.value.status == 401 and "k3y-secret" not in err.value.message
    assert len(calls) == 7 and all(b == b"k3y-secret" for _, b in calls)


@pytest.mark.parametrize("content", ["", "\n", "   \nsecond-line-key\n"])
def test_blank_api_key_file_refuses_to_start(tmp_path, monkeypatch, content):
    """A blank key would let requests without a key in: the ingress does not start."""
    from dspark.platform.serving.app import _api_key
    from dspark.platform.serving.config import ServeConfig

    f = tmp_path / "key"
    f.write_text(content)
    with pytest.raises(RuntimeError, match="no key on its first line"):
        _api_key(ServeConfig(ingress={"api_key_file": str(f)}))
    f.write_text(" the-key \nignored\n")
    assert _api_key(ServeConfig(ingress={"api_key_file": str(f)})) == "the-key"
    monkeypatch.setenv("DSPARK_TEST_KEY", "  ")
    with pytest.raises(RuntimeError, match="DSPARK_TEST_KEY is not set"):
        _api_key(ServeConfig(ingress={"api_key_env": "DSPARK_TEST_KEY"}))
    monkeypatch.setenv("DSPARK_TEST_KEY", "k\n")
    assert _api_key(ServeConfig(ingress={"api_key_env": "DSPARK_TEST_KEY"})) == "k"
