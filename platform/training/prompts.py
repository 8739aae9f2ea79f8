"""Prompt sources for data generation and evaluation.

* :func:`corpus_prompts`: code-completion prompts cut from one split of the demo corpus (the
  standard library's ``.py`` files): a window of the file's tokens starting at a line boundary.
  Deterministic for a given (split, seed, Python version).
* :func:`jsonl_prompts`: a JSONL file, one object per line, either ``{"prompt": "text"}`` (raw
  completion) or ``{"messages": [{"role": ..., "content": ...}, ...]}`` (chat: the conversation up
  to its last user turn, rendered with the tokenizer's chat template and the generation prompt).
  An optional ``"id"`` names the record. Bad lines raise :class:`PromptSourceError` naming the
  line and the reason.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

__all__ = ["Prompt", "PromptSourceError", "corpus_prompts", "jsonl_prompts"]


class PromptSourceError(ValueError):
    """A prompt source cannot be read (message is for users)."""


@dataclass(frozen=True)
class Prompt:
    id: str
    token_ids: tuple[int, ...]
    source: str  # "corpus:<split>" or the JSONL path


def corpus_prompts(
    tokenizer: Any,
    split: str,
    n: int,
    *,
    min_tokens: int = 16,
    max_tokens: int = 96,
    seed: int = 0,
    per_file: int = 4,
    fractions: tuple[float, float, float] = (0.9, 0.05, 0.05),
    max_corpus_mb: float | None = None,
) -> list[Prompt]:
    """Up to ``n`` prompts of ``min_tokens..max_tokens`` tokens, at most ``per_file`` per file,
    starting at line starts chosen by a generator seeded with (seed, file path)."""
    from dspark.platform.demo.corpus import read_split

    if not 1 <= min_tokens <= max_tokens:
        raise ValueError("need 1 <= min_tokens <= max_tokens")
    max_bytes = int(max_corpus_mb * 2**20) if max_corpus_mb else None
    out: list[Prompt] = []
    for f in read_split(split, fractions, max_bytes=max_bytes):  # type: ignore[arg-type]
        rng = random.Random(int.from_bytes(hashlib.sha256(f"{seed}:{f.relpath}".encode()).digest()[:8], "little"))
        starts = [0] + [i + 1 for i, ch in enumerate(f.text) if ch == "\n" and i + 1 < len(f.text)]
        picks = sorted(rng.sample(starts, min(per_file, len(starts))))
        for j, start in enumerate(picks):
            length = rng.randint(min_tokens, max_tokens)
            ids = tokenizer(f.text[start : start + 16 * length]).input_ids[:length]
            if len(ids) < min_tokens:
                continue
            out.append(Prompt(f"{split}:{f.relpath}:{start}", tuple(ids), f"corpus:{split}"))
            if len(out) == n:
                return out
    return out


def _render(tokenizer: Any, obj: Any, where: str) -> tuple[int, ...]:
    if not isinstance(obj, dict):
        raise PromptSourceError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "prompt" in obj:
        text = obj["prompt"]
        if not isinstance(text, str) or not text:
            raise PromptSourceError(f"{where}: 'prompt' must be a non-empty string")
        return tuple(tokenizer(text).input_ids)
    msgs = obj.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise PromptSourceError(f"{where}: needs a 'prompt' string or a non-empty 'messages' list")
    for m in msgs:
        if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") and isinstance(m.get("content"), str)):
            raise PromptSourceError(f"{where}: each message needs a role (system/user/assistant) and string content")
    last_user = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=None)
    if last_user is None:
        raise PromptSourceError(f"{where}: 'messages' has no user turn")
    if getattr(tokenizer, "chat_template", None) is None:
        raise PromptSourceError(f"{where}: chat messages need a tokenizer with a chat template")
    ids = tokenizer.apply_chat_template(msgs[: last_user + 1], add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return tuple(int(t) for t in ids)


def jsonl_prompts(tokenizer: Any, path: str | Path, limit: int | None = None) -> Iterator[Prompt]:
    """Prompts of a JSONL file, in file order (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise PromptSourceError(f"prompt file {path} {'is not a file' if path.exists() else 'does not exist'}")
    count = 0
    with path.open("rb") as fh:  # bytes, so that a bad encoding is reported with its line
        for lineno, raw in enumerate(fh, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise PromptSourceError(f"{where}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PromptSourceError(f"{where}: not valid JSON ({exc.msg})") from None
            ids = _render(tokenizer, obj, where)
            if not ids:
                raise PromptSourceError(f"{where}: the prompt tokenizes to nothing")
            rid = obj.get("id", f"{path.name}:{lineno}")
            if isinstance(rid, bool) or not isinstance(rid, (str, int)):
                raise PromptSourceError(f"{where}: 'id' must be a string or an integer")
            yield Prompt(str(rid), ids, str(path))
            count += 1
            if limit is not None and count >= limit:
                return
