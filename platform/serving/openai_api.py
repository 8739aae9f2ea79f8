"""The OpenAI-compatible request and response shapes (no Ray, no FastAPI): strict parsing of
``/v1/completions`` and ``/v1/chat/completions`` bodies into our ``SamplingParams``, and the
response / stream-chunk dicts. Errors are :class:`APIError` with the HTTP status and the
OpenAI error body (``{"error": {"message", "type", "param", "code"}}``).

Accepted fields follow the OpenAI API; fields we do not implement (``n > 1``, ``logprobs``,
``best_of``, ``tools`` ...) are refused with a 400 naming them rather than silently ignored.
``dspark`` (an object) is our extension: ``{"acceptance": true}`` adds per-request acceptance
statistics to ``usage``.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dspark.platform.contracts import RequestOutput, SamplingParams

__all__ = ["APIError", "CompletionBody", "ChatBody", "parse_body", "sampling_params", "completion_response",
           "completion_chunk", "chat_response", "chat_chunk", "sse", "usage"]


_SURROGATE = re.compile("[\ud800-\udfff]")

#: temperatures below this are greedy decoding: logits / T overflows float32 for tiny T and the
#: softmax turns to NaN, while the limit T -> 0 of sampling is the argmax anyway
MIN_SAMPLING_TEMPERATURE = 1e-5


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Extension(_Strict):
    acceptance: bool = Field(False, description="Add per-request acceptance statistics to usage.")


class _Common(_Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, lt=2**63)  # not in OpenAI's API (others accept it); >= vocab = off
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, bool] | None = None
    n: int = Field(1, ge=1, le=1)
    user: str | None = None
    ignore_eos: bool = False
    dspark: Extension | None = None


class CompletionBody(_Common):
    prompt: str | list[int]


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatBody(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


def _check_text(data: Any) -> None:
    """Refuse strings no UTF-8 text can hold: JSON may escape a lone surrogate (``"\\ud800"``),
    which the tokenizer and the JSON encoder of the response both reject later. Iterative, so a
    deeply nested body costs no recursion."""
    stack = [data]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            if not x.isascii() and _SURROGATE.search(x):
                raise APIError(400, "request body holds a string with a lone UTF-16 surrogate escape "
                                    "(e.g. \"\\ud800\"): send valid Unicode text", code="invalid_unicode")
        elif isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)


def parse_body(raw: bytes, kind: type[_Strict], *, max_bytes: int) -> Any:
    """Bytes -> a validated body, or APIError 413 / 400 with the reason. Contract: whatever the
    bytes, the only exception is :class:`APIError` (tests fuzz this)."""
    if len(raw) > max_bytes:
        raise APIError(413, f"request body of {len(raw)} bytes exceeds the limit of {max_bytes}", code="body_too_large")
    try:
        data = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, and ints over Python's digit limit
        raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "request body is not valid JSON: nested too deeply", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    _check_text(data)
    try:
        return kind.model_validate(data)  # strict floats accept JSON integers (1 -> 1.0)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"])[:200] or None  # a key may be client junk: keep it short
        if err["type"] == "extra_forbidden":
            msg = f"unsupported field {param!r}"
        else:
            msg = f"invalid {param!r}: {err['msg']}"
        raise APIError(400, msg, param=param, code=err["type"]) from None


def sampling_params(body: _Common, *, default_max_tokens: int) -> SamplingParams:
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if any(not s for s in stop):
        raise APIError(400, "stop strings must be non-empty", param="stop")
    if len(stop) > 4:
        raise APIError(400, "at most 4 stop strings", param="stop")
    max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens or default_max_tokens
    temperature = body.temperature if body.temperature >= MIN_SAMPLING_TEMPERATURE else 0.0
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=body.top_p, top_k=body.top_k,
                          seed=body.seed, stop=stop, ignore_eos=body.ignore_eos)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, out: RequestOutput | None, acceptance: bool) -> dict:
    n = len(out.token_ids) if out is not None else 0
    u: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
    if acceptance and out is not None:
        s = out.stats
        u["dspark"] = {
            "verify_steps": s.steps, "drafted_tokens": s.drafted, "accepted_tokens": s.accepted,
            "acceptance_rate": (s.accepted / s.drafted) if s.drafted else None,
            "tokens_per_step": (len(out.token_ids) / s.steps) if s.steps else None,
            "fallback_steps": s.fallback_steps,
            # mean drafts accepted per verify step; per block position k = 1..γ: drafts verified
            # there, accepted there, and their ratio (None where none was verified)
            "mean_accepted_length": (s.accepted / s.steps) if s.steps else None,
            "drafted_at": list(s.proposed_at), "accepted_at": list(s.accepted_at),
            "acceptance_rate_at": [(a / p) if p else None for a, p in zip(s.accepted_at, s.proposed_at)],
        }
    return u


def _finish(out: RequestOutput | None) -> str | None:
    if out is None or not out.finished:
        return None
    return "length" if out.finish_reason == "length" else "stop"


def completion_response(rid: str, model: str, text: str, out: RequestOutput, prompt_tokens: int, acceptance: bool) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": _finish(out)}],
            "usage": usage(prompt_tokens, out, acceptance)}


def completion_chunk(rid: str, model: str, text: str, out: RequestOutput | None, extra: dict | None = None) -> dict:
    chunk = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
             "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": _finish(out)}]}
    if extra:
        chunk.update(extra)
    return chunk


def chat_response(rid: str, model: str, text: str, out: RequestOutput, prompt_tokens: int, acceptance: bool) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": _finish(out)}],
            "usage": usage(prompt_tokens, out, acceptance)}


def chat_chunk(rid: str, model: str, delta: dict, out: RequestOutput | None, extra: dict | None = None) -> dict:
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
             "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": _finish(out)}]}
    if extra:
        chunk.update(extra)
    return chunk


def sse(data: dict | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()
