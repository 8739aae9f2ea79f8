"""Plain (non-speculative) completion from a frozen target, through ``transformers.generate``.

This is the reference every speculative path is compared against: greedy output of the
speculative engine must be token-identical to ``generate(do_sample=False)``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from dspark.platform.config import GenerateConfig
from dspark.platform.target.loading import FrozenTarget

__all__ = ["Completion", "PromptTooLongError", "generate_completion"]


class PromptTooLongError(ValueError):
    """Prompt plus requested tokens exceed the target's context length."""


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: tuple[int, ...]  # generated ids only
    prompt_tokens: int
    seconds: float  # wall time of generation (prefill included)

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")


@torch.no_grad()
def generate_completion(target: FrozenTarget, gcfg: GenerateConfig) -> Completion:
    tok = target.tokenizer
    if tok is None:
        raise ValueError("the target was loaded without a tokenizer")
    ids = tok(gcfg.prompt, return_tensors="pt").input_ids.to(target.device)  # [1, n]
    limit = int(getattr(target.config, "max_position_embeddings", 0) or 0)
    if limit and ids.shape[1] + gcfg.max_new_tokens > limit:
        raise PromptTooLongError(
            f"prompt ({ids.shape[1]} tokens) + max_new_tokens ({gcfg.max_new_tokens}) exceeds the "
            f"target's context length ({limit})"
        )
    kwargs: dict = dict(max_new_tokens=gcfg.max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    if gcfg.temperature > 0:
        kwargs.update(do_sample=True, temperature=gcfg.temperature, top_p=gcfg.top_p, top_k=gcfg.top_k or None)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    torch.manual_seed(gcfg.seed)
    t0 = time.perf_counter()
    out = target.model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)  # [1, n + new]
    seconds = time.perf_counter() - t0
    new = out[0, ids.shape[1] :].tolist()
    return Completion(tok.decode(new, skip_special_tokens=True), tuple(new), ids.shape[1], seconds)
