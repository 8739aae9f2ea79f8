"""Hypothesis strategies for fuzzing the OpenAI-compatible API (shared by the unit-level fuzz of
``openai_api`` and the fuzz of a running server).

* :func:`from_schema` turns a pydantic JSON schema into a strategy of bodies the schema allows
  (the subset of JSON Schema pydantic emits for our request models: ``$ref``, ``anyOf``, ``enum``,
  bounds, ``items``, ``properties`` / ``required`` / ``additionalProperties``);
* :data:`JUNK` is any JSON value a hostile client may send: wrong types, huge and negative
  numbers, NaN and infinities (bare or as strings), odd Unicode, lone surrogates, nested garbage;
* :func:`request_bytes` mutates a schema-valid body (a field replaced by junk, a required field
  dropped, an unknown field added) and then, sometimes, its bytes (truncation, junk bytes,
  invalid UTF-8, deep nesting, a byte-order mark).
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

__all__ = ["from_schema", "JUNK", "request_bytes", "encode"]

# strings clients put where they should not: number spellings JSON does not have, control
# characters, a lone surrogate, a long run of one character, right-to-left and zero-width marks
_ODD_STRINGS = st.sampled_from([
    "", " ", "NaN", "nan", "inf", "-inf", "Infinity", "-Infinity", "1e999", "-0", "0x10", "null",
    "true", "\x00", "\u202e\u200b", "\ud800", "a\udfffb", "\U0001F600" * 3, "<|endoftext|>", "<|mask|>",
    "x" * 5000, "{\"a\": 1}", "[1, 2]",
])

_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**53, max_value=10**40) | st.integers(min_value=-(10**40), max_value=-(2**53)),
    st.sampled_from([2**63 - 1, 2**63, 2**64, -1, 0, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e-45, 5e-324, 1e308, -0.0, 2.0000001, 1e-300]),
    st.text(max_size=40),
    _ODD_STRINGS,
)

#: any JSON value (Python's json writes NaN / Infinity for non-finite floats; the parser reads them)
JUNK = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


_NUMERIC = ["temperature", "top_p", "top_k", "seed", "max_tokens", "n", "max_completion_tokens"]
_EXTREMES = st.sampled_from([10**400, 2**63, 2**63 - 1, 2**64, -1, 0, 1e308, 5e-324, 1e-45, -0.0,
                             float("nan"), float("inf"), float("-inf"), True, "1"])


def _ref(schema: dict, defs: dict) -> dict:
    while "$ref" in schema:
        schema = defs[schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def from_schema(schema: dict, overrides: dict[str, st.SearchStrategy] | None = None, *,
                _defs: dict | None = None) -> st.SearchStrategy:
    """Values ``schema`` allows. ``overrides`` replaces the strategy of named top-level properties
    (e.g. a small ``max_tokens`` so that valid requests finish quickly on a real server)."""
    defs = _defs if _defs is not None else schema.get("$defs", {})
    s = _ref(schema, defs)
    sub = lambda x: from_schema(x, _defs=defs)  # noqa: E731
    if "anyOf" in s:
        return st.one_of([sub(x) for x in s["anyOf"]])
    if "enum" in s:
        return st.sampled_from(s["enum"])
    if "const" in s:
        return st.just(s["const"])
    t = s.get("type")
    if t == "null":
        return st.none()
    if t == "boolean":
        return st.booleans()
    if t == "integer":
        lo = s.get("minimum", s["exclusiveMinimum"] + 1 if "exclusiveMinimum" in s else None)
        hi = s.get("maximum", s["exclusiveMaximum"] - 1 if "exclusiveMaximum" in s else None)
        return st.integers(min_value=lo, max_value=hi)
    if t == "number":
        lo = s.get("minimum", s.get("exclusiveMinimum"))
        hi = s.get("maximum", s.get("exclusiveMaximum"))
        return st.floats(min_value=lo, max_value=hi, exclude_min="exclusiveMinimum" in s,
                         exclude_max="exclusiveMaximum" in s, allow_nan=False, allow_infinity=False)
    if t == "string":
        return st.text(min_size=s.get("minLength", 0), max_size=s.get("maxLength", 30))
    if t == "array":
        return st.lists(sub(s.get("items", {})), min_size=s.get("minItems", 0), max_size=s.get("maxItems", 4))
    if t == "object":
        props = s.get("properties", {})
        over = overrides or {}
        strat = {k: over[k] if k in over else sub(v) for k, v in props.items()}
        required = set(s.get("required", ()))
        extra = s.get("additionalProperties", True)

        @st.composite
        def obj(draw):
            out = {k: draw(strat[k]) for k in props if k in required}
            for k in props:
                if k not in required and draw(st.booleans()):
                    out[k] = draw(strat[k])
            if isinstance(extra, dict) and not props:
                out.update(draw(st.dictionaries(st.text(max_size=10), sub(extra), max_size=3)))
            return out

        return obj()
    return JUNK  # an unconstrained schema ({}) allows anything


def encode(value: Any, *, ascii_only: bool = True) -> bytes:
    """JSON bytes the way a sloppy client may write them: NaN/Infinity allowed, and without
    ``ascii_only`` lone surrogates go out as the (invalid UTF-8) bytes ``surrogatepass`` gives."""
    text = json.dumps(value, allow_nan=True, ensure_ascii=ascii_only)
    return text.encode("utf-8", "surrogatepass")


@st.composite
def _mutated(draw, valid: st.SearchStrategy, schema: dict) -> dict:
    body = dict(draw(valid))
    names = sorted(schema.get("properties", {}))
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["junk", "extreme", "text", "drop", "unknown", "null"]))
        if op == "junk":
            body[draw(st.sampled_from(names))] = draw(JUNK)
        elif op == "extreme":  # the numeric fields get the numbers that break naive code
            body[draw(st.sampled_from(_NUMERIC))] = draw(_EXTREMES)
        elif op == "text":  # odd text where the tokenizer will read it
            text = draw(_ODD_STRINGS | st.text(max_size=20))
            msgs = body.get("messages")
            if isinstance(msgs, list) and msgs and isinstance(msgs[0], dict) and draw(st.booleans()):
                body["messages"] = [{**msgs[0], "content": text}, *msgs[1:]]
            else:
                body[draw(st.sampled_from(["prompt", "stop", "user", "model"]))] = text
        elif op == "drop" and body:
            body.pop(draw(st.sampled_from(sorted(body))))
        elif op == "unknown":
            body[draw(st.sampled_from(["logprobs", "best_of", "tools", "functions", "echo", "suffix", "x", ""]) |
                      st.text(max_size=12))] = draw(JUNK)
        elif op == "null":
            body[draw(st.sampled_from(names))] = None
    return body


@st.composite
def _byte_mutation(draw, raw: bytes, max_bytes: int) -> bytes:
    op = draw(st.sampled_from(["none", "none", "truncate", "insert", "flip", "bom", "nest", "binary", "wrap",
                               "digits", "oversize"]))
    if op == "truncate" and raw:
        return raw[: draw(st.integers(0, len(raw) - 1))]
    if op == "insert":
        at = draw(st.integers(0, len(raw)))
        return raw[:at] + draw(st.binary(min_size=1, max_size=8)) + raw[at:]
    if op == "flip" and raw:
        at = draw(st.integers(0, len(raw) - 1))
        return raw[:at] + bytes([draw(st.integers(0, 255))]) + raw[at + 1:]
    if op == "bom":
        return b"\xef\xbb\xbf" + raw
    if op == "nest":
        n = draw(st.sampled_from([50, 1000, 100_000]))
        return b"[" * n + raw + b"]" * n
    if op == "binary":
        return draw(st.binary(max_size=64))
    if op == "wrap":
        return b'{"model": ' + raw + b"}"
    if op == "digits" and raw.endswith(b"}"):  # past Python's int-parsing limit (json.dumps cannot write it)
        key = draw(st.sampled_from(_NUMERIC)).encode()
        return raw[:-1] + b', "' + key + b'": ' + b"7" * draw(st.sampled_from([400, 4301, 20000])) + b"}"
    if op == "oversize":
        return raw + b" " * (max_bytes + 1 - len(raw)) if len(raw) <= max_bytes else raw
    return raw


def request_bytes(schema: dict, overrides: dict[str, st.SearchStrategy] | None = None, *,
                  max_bytes: int = 1 << 20) -> st.SearchStrategy:
    """Request bodies for an endpoint of ``schema``: a quarter schema-valid, the rest mutated
    (junk fields, then sometimes junk bytes; ``max_bytes`` sizes the oversized ones)."""
    valid = from_schema(schema, overrides)

    @st.composite
    def build(draw) -> bytes:
        body = draw(valid) if draw(st.integers(0, 3)) == 0 else draw(_mutated(valid, schema))
        raw = encode(body, ascii_only=draw(st.booleans()))
        return draw(_byte_mutation(raw, max_bytes))

    return build()
