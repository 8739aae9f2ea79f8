"""What a drafter needs of its target, without the target's decoder: for draft workers.

A drafter reuses the target's frozen input embedding and LM head and reads its config (widths,
layer count, feature layers); it never runs the decoder (the verifier sends the features). So a
draft worker loads :class:`TargetHeads` — ``config``, ``embed_tokens``, ``lm_head`` and the sizes
``FrozenTarget`` exposes — reading only those two tensors from the safetensors files (through the
shard index when there is one), instead of the whole model: for a 70B target that is about 2 GB
of weights instead of 140 GB.

Tensor names come from the model class itself, instantiated on the ``meta`` device (no memory),
so any architecture ``transformers`` knows works; a tied LM head (``tie_word_embeddings``) reuses
the embedding. Same rules as ``load_target``: safetensors only, clear :class:`TargetLoadError`
for a missing or damaged tensor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from dspark.platform.config import TargetConfig
from dspark.platform.target.loading import (
    _DTYPES,
    TargetLoadError,
    _check_checkpoint_dir,
    _decoder_layers,
    check_layer_ids,
    default_layer_ids,
)

__all__ = ["TargetHeads", "load_target_heads"]


@dataclass
class TargetHeads:
    config: Any
    embed_tokens: nn.Embedding  # frozen, [V, d]
    lm_head: nn.Linear  # frozen, d -> V
    num_layers: int
    layer_ids: tuple[int, ...]
    tokenizer: Any = None

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.lm_head.weight.shape[0])

    @property
    def feature_dim(self) -> int:
        return len(self.layer_ids) * self.hidden_size

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype


def _tensor_files(ckpt: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it."""
    from safetensors import safe_open

    index = ckpt / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise TargetLoadError(f"cannot read the shard index {index}: {exc}") from None
        return {name: ckpt / f for name, f in weight_map.items()}
    out: dict[str, Path] = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as fh:
                out.update({name: f for name in fh.keys()})
        except Exception as exc:
            raise TargetLoadError(f"cannot read the safetensors file {f}: {exc}") from None
    return out


def _read(files: dict[str, Path], name: str, ckpt: Path) -> torch.Tensor:
    from safetensors import safe_open

    try:
        with safe_open(str(files[name]), framework="pt") as fh:
            return fh.get_tensor(name)
    except Exception as exc:
        raise TargetLoadError(f"cannot read tensor {name!r} of the target in {ckpt}: {exc}") from None


def _param_names(model: nn.Module, param: nn.Parameter) -> list[str]:
    return [n for n, p in model.named_parameters(remove_duplicate=False) if p is param]


def load_target_heads(cfg: TargetConfig, path: str | Path | None = None) -> TargetHeads:
    """The embedding and LM head of the target named by ``cfg`` (``path`` overrides ``cfg.path``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    ckpt = Path(path if path is not None else cfg.path).expanduser()
    _check_checkpoint_dir(ckpt)
    try:
        hf_config = AutoConfig.from_pretrained(ckpt, trust_remote_code=cfg.trust_remote_code)
    except Exception as exc:
        raise TargetLoadError(f"cannot read the model config {ckpt / 'config.json'}: {exc}") from None
    with torch.device("meta"):  # the module tree and its tensor names, no memory
        skeleton = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=cfg.trust_remote_code)
    emb, head = skeleton.get_input_embeddings(), skeleton.get_output_embeddings()
    files = _tensor_files(ckpt)
    emb_names = [n for n in _param_names(skeleton, emb.weight) if n in files]
    if not emb_names:
        raise TargetLoadError(f"the checkpoint in {ckpt} has no input embedding "
                              f"({', '.join(_param_names(skeleton, emb.weight))})")
    dtype = _DTYPES[cfg.dtype]
    w_emb = _read(files, emb_names[0], ckpt).to(device=cfg.device, dtype=dtype)
    head_names = [n for n in _param_names(skeleton, head.weight) if n in files]
    if head_names and head_names[0] != emb_names[0]:
        w_head = _read(files, head_names[0], ckpt).to(device=cfg.device, dtype=dtype)
    elif head.weight is emb.weight or getattr(hf_config, "tie_word_embeddings", False):
        w_head = w_emb  # tied: the LM head is the embedding
    else:
        raise TargetLoadError(f"the checkpoint in {ckpt} has no LM head weight ({', '.join(_param_names(skeleton, head.weight))})")
    if getattr(head, "bias", None) is not None:
        raise TargetLoadError("an LM head with a bias is not supported by the drafters")
    embed = nn.Embedding.from_pretrained(w_emb, freeze=True)
    lm_head = nn.Linear(w_head.shape[1], w_head.shape[0], bias=False, device=w_head.device, dtype=w_head.dtype)
    with torch.no_grad():
        lm_head.weight.copy_(w_head)
    lm_head.requires_grad_(False)
    num_layers = len(_decoder_layers(skeleton))
    ids: Sequence[int] = default_layer_ids(num_layers) if cfg.layer_ids is None else cfg.layer_ids
    return TargetHeads(hf_config, embed, lm_head, num_layers, check_layer_ids(ids, num_layers))
