"""Build (or reuse) the demo target: tokenizer + Qwen3 / Qwen3-MoE causal LM on stdlib code.

The result is a plain Hugging Face checkpoint directory (``save_pretrained``, safetensors,
tokenizer files, chat template) plus ``dspark_demo.json`` with the build record (config,
validation loss, timings, corpus statistics). It lives in the cache under a name keyed by the
config hash and the Python version (the corpus is the running Python's standard library), and
is written to a temporary directory first and renamed into place, so an interrupted build never
leaves a half-written target behind. A file lock serialises concurrent builds of the same key.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from dspark.platform.config import DemoTargetConfig, config_hash
from dspark.platform.demo.corpus import SPLITS, iter_sources, split_of
from dspark.platform.demo.tokenizer import EOS_TOKEN, train_bpe, wrap_for_transformers

__all__ = [
    "BUILD_FORMAT",
    "MANIFEST",
    "DemoTargetInfo",
    "cache_root",
    "demo_target_dir",
    "build_demo_target",
    "read_manifest",
    "resolve_target_path",
]

#: Bump when the build recipe changes in a way the config does not capture.
BUILD_FORMAT = "1"
MANIFEST = "dspark_demo.json"


@dataclass(frozen=True)
class DemoTargetInfo:
    path: Path
    built: bool  # False when an existing cached build was reused
    manifest: dict


def cache_root() -> Path:
    """``$DSPARK_CACHE`` or ``~/.cache/dspark``."""
    env = os.environ.get("DSPARK_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dspark"


def demo_target_dir(cfg: DemoTargetConfig, root: Path | None = None) -> Path:
    py = ".".join(map(str, sys.version_info[:3]))
    key = config_hash(cfg, py, BUILD_FORMAT)
    return (root or cache_root()) / f"demo-target{'-moe' if cfg.moe else ''}-{key}"


def read_manifest(path: Path) -> dict:
    return json.loads((Path(path) / MANIFEST).read_text())


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _model_config(cfg: DemoTargetConfig, vocab_size: int, eos_id: int):
    from transformers import Qwen3Config, Qwen3MoeConfig

    common = dict(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        eos_token_id=eos_id,
        bos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    if cfg.moe:
        return Qwen3MoeConfig(
            **common,
            num_experts=cfg.num_experts,
            num_experts_per_tok=cfg.experts_per_token,
            moe_intermediate_size=cfg.moe_intermediate_size,
            decoder_sparse_step=1,
            norm_topk_prob=True,
        )
    return Qwen3Config(**common)


def _lr_at(step: int, cfg: DemoTargetConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def _encode(tok, texts: list[str], eos_id: int) -> torch.Tensor:
    """Documents joined by end-of-text into one stream of token ids."""
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.int64)  # [n_tokens]


@torch.no_grad()
def _validation_loss(model, stream: torch.Tensor, cfg: DemoTargetConfig) -> tuple[float, int]:
    """Mean next-token cross-entropy over non-overlapping windows from the start of the stream."""
    s = cfg.seq_len
    n_windows = min(cfg.val_batches * cfg.batch_size, (len(stream) - 1) // s)
    if n_windows == 0:
        raise ValueError("validation split is shorter than one sequence; raise max_corpus_mb")
    model.eval()
    total, count = 0.0, 0
    for b in range(0, n_windows, cfg.batch_size):
        idx = torch.arange(b, min(b + cfg.batch_size, n_windows))
        x = torch.stack([stream[i * s : i * s + s + 1] for i in idx.tolist()])  # [B, s+1]
        logits = model(input_ids=x[:, :-1]).logits.float()  # [B, s, V]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
        total += loss.item()
        count += x[:, 1:].numel()
    model.train()
    return total / count, count


def build_demo_target(
    cfg: DemoTargetConfig,
    root: Path | None = None,
    *,
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> DemoTargetInfo:
    """Return the cached demo target for ``cfg``, building it first if needed."""
    out = demo_target_dir(cfg, root)
    if (out / MANIFEST).is_file() and not force:
        return DemoTargetInfo(out, False, read_manifest(out))
    with _file_lock(out.parent / f".{out.name}.lock"):
        if (out / MANIFEST).is_file() and not force:  # built by a concurrent process meanwhile
            return DemoTargetInfo(out, False, read_manifest(out))
        for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a killed build; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        tmp.mkdir(parents=True)
        try:
            manifest = _build_into(cfg, tmp, progress=progress, log=log)
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return DemoTargetInfo(out, True, manifest)


def _build_into(cfg: DemoTargetConfig, out: Path, *, progress: bool, log: Callable[[str], None]) -> dict:
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)

    # 1. corpus and split
    by_split: dict[str, list[str]] = {s: [] for s in SPLITS}
    names: dict[str, list[str]] = {s: [] for s in SPLITS}
    for f in iter_sources(max_bytes=int(cfg.max_corpus_mb * 2**20)):
        s = split_of(f.relpath, cfg.split_fractions)
        by_split[s].append(f.text)
        names[s].append(f.relpath)
    log(f"corpus: " + ", ".join(f"{s} {len(by_split[s])} files / {sum(map(len, by_split[s])) / 1e6:.1f} MB" for s in SPLITS))

    # 2. tokenizer (train split only)
    tok = train_bpe(by_split["train"], cfg.vocab_size)
    eos_id = tok.token_to_id(EOS_TOKEN)
    train_ids = _encode(tok, by_split["train"], eos_id)
    val_ids = _encode(tok, by_split["validation"], eos_id)
    t_tok = time.perf_counter() - t0
    log(f"tokenizer: vocab {tok.get_vocab_size()}, train {len(train_ids):,} tokens, validation {len(val_ids):,} tokens ({t_tok:.1f} s)")
    if len(train_ids) < cfg.seq_len + 2:
        raise ValueError("training split is shorter than one sequence; raise max_corpus_mb")

    # 3. model
    from transformers import AutoModelForCausalLM

    model_cfg = _model_config(cfg, tok.get_vocab_size(), eos_id)
    model = AutoModelForCausalLM.from_config(model_cfg)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    extra = {"output_router_logits": True} if cfg.moe else {}

    # 4. training: random windows of seq_len + 1 from the train stream
    model.train()
    t_train = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="demo target", disable=not progress, unit="step", dynamic_ncols=True)
    ema = None
    with _torch_threads(cfg.threads):
        for step in bar:
            starts = torch.randint(0, len(train_ids) - cfg.seq_len - 1, (cfg.batch_size,), generator=gen)
            x = torch.stack([train_ids[s : s + cfg.seq_len + 1] for s in starts.tolist()])  # [B, S+1]
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, cfg)
            loss = model(input_ids=x[:, :-1], labels=x[:, :-1], **extra).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
            bar.set_postfix(loss=f"{ema:.3f}")
        train_seconds = time.perf_counter() - t_train
        val_loss, val_tokens = _validation_loss(model, val_ids, cfg)
    log(f"validation loss {val_loss:.4f} nats/token (perplexity {math.exp(val_loss):.2f}) over {val_tokens:,} tokens")

    # 5. save: a normal Hugging Face checkpoint + the build record
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    wrap_for_transformers(tok, cfg.max_position).save_pretrained(out)
    import transformers

    manifest = {
        "format": BUILD_FORMAT,
        "config": cfg.model_dump(mode="json"),
        "architecture": type(model).__name__,
        "parameters": n_params,
        "validation_loss": val_loss,
        "validation_perplexity": math.exp(val_loss),
        "validation_tokens": val_tokens,
        "train_tokens_seen": cfg.steps * cfg.batch_size * cfg.seq_len,
        "corpus": {
            s: {"files": len(by_split[s]), "bytes": sum(map(len, by_split[s]))} for s in SPLITS
        }
        | {"train_tokens": len(train_ids), "validation_tokens": len(val_ids)},
        "test_files": names["test"],
        "seconds": {"tokenizer": round(t_tok, 2), "train": round(train_seconds, 2), "total": round(time.perf_counter() - t0, 2)},
        "threads": torch.get_num_threads() if cfg.threads == 0 else cfg.threads,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": f"{platform.machine()} / {os.cpu_count()} cpu",
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def resolve_target_path(target_path: str, demo_cfg: DemoTargetConfig, *, progress: bool = True, log: Callable[[str], None] = print) -> Path:
    """``"demo"`` -> the cached demo target (built on first use); anything else -> that path."""
    if target_path == "demo":
        info = build_demo_target(demo_cfg, progress=progress, log=log)
        return info.path
    return Path(target_path).expanduser()
