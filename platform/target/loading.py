"""Loading a frozen Hugging Face causal LM from a local directory, and reading its features.

Contract of :class:`FrozenTarget`:

* Loaded with ``from_pretrained`` from a local directory, **safetensors only**
  (``use_safetensors=True``; a directory holding only ``*.bin``/pickle weights is refused, and a
  pickle file beside safetensors weights is never opened), ``trust_remote_code`` only when the
  config allows it; parameters frozen, module in eval mode.
* Every weight of the model comes from the checkpoint: a checkpoint that lacks some (which
  ``from_pretrained`` would fill with random values, with a warning) is refused, as are
  truncated or garbled safetensors files and unreadable ``config.json`` files, all with
  :class:`TargetLoadError` naming the directory and the reason.
* ``forward`` runs the decoder once and returns, in that one pass:
    - ``features``    ``[batch, seq, n_layers * hidden]``: the *raw* outputs of the decoder
      layers named by ``layer_ids`` (DeepSpec's ``target_layer_ids``; ``-1`` = embedding output),
      concatenated in ascending id order, captured with forward hooks;
    - ``last_hidden`` ``[batch, seq, hidden]``: the final-norm output (what the LM head reads);
    - ``logits``      ``[batch, seq', vocab]`` for the requested positions (all by default).
  It works with and without a KV cache (``past_key_values``), so the serving engine and the
  trainer share it.

The final decoder layer is refused as a feature layer: Hugging Face's ``output_hidden_states``
puts the *normed* final state at that index while the hook sees the raw layer output, so the two
views would disagree exactly where a drafter trained on one is served with the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from dspark.platform.config import TargetConfig

__all__ = ["TargetLoadError", "TargetOutput", "FrozenTarget", "default_layer_ids", "load_target", "check_layer_ids"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TargetLoadError(ValueError):
    """The target checkpoint or its configuration cannot be used. Message is meant for users."""


@dataclass
class TargetOutput:
    features: torch.Tensor  # [batch, seq, n_layers * hidden]
    last_hidden: torch.Tensor  # [batch, seq, hidden]
    logits: torch.Tensor | None  # [batch, seq', vocab]; None when no positions were requested
    past_key_values: Any  # the transformers Cache after this forward (None without cache)


def default_layer_ids(num_layers: int, n: int = 5) -> tuple[int, ...]:
    """Evenly spread feature layers, DeepSpec style: Qwen3-4B (36 layers) -> (1, 9, 17, 25, 33),
    Qwen3-14B (40) -> (1, 10, 19, 28, 37); shallow models get fewer, distinct ids."""
    if num_layers < 2:
        raise TargetLoadError(f"a target needs at least 2 decoder layers to feed a drafter (has {num_layers})")
    hi = num_layers - 3 if num_layers >= 5 else num_layers - 2
    lo = 1 if hi >= 2 else -1
    if n == 1 or hi == lo:
        return (hi,)
    ids = sorted({round(lo + (hi - lo) * k / (n - 1)) for k in range(n)})
    return tuple(ids)


def check_layer_ids(layer_ids: Sequence[int], num_layers: int) -> tuple[int, ...]:
    ids = tuple(sorted(layer_ids))
    final = num_layers - 1
    for i in ids:
        if i == final:
            raise TargetLoadError(
                f"layer id {i} is the target's final decoder layer; it cannot feed a drafter "
                f"(its hidden_states entry is normed, unlike every other layer). Use ids in -1..{final - 1}."
            )
        if i < -1 or i > final:
            raise TargetLoadError(f"layer id {i} is out of range for a target with {num_layers} layers (-1..{final - 1})")
    if len(set(ids)) != len(ids):
        raise TargetLoadError(f"layer ids must be distinct, got {list(layer_ids)}")
    return ids


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TargetLoadError(
            f"cannot find the decoder layers of {type(model).__name__} (expected model.get_decoder().layers)"
        )
    return layers


class FrozenTarget:
    """A frozen causal LM plus forward hooks that capture the chosen layers' outputs."""

    def __init__(self, model: nn.Module, layer_ids: Sequence[int] | None = None, tokenizer: Any = None):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.config = model.config
        self.decoder = model.get_decoder()
        self.layers = _decoder_layers(model)
        self.num_layers = len(self.layers)
        self.hidden_size = int(self.config.hidden_size)
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        ids = default_layer_ids(self.num_layers) if layer_ids is None else layer_ids
        self.layer_ids = check_layer_ids(ids, self.num_layers)
        self._captured: dict[int, torch.Tensor] = {}
        self._handles = []
        for i in self.layer_ids:
            module = model.get_input_embeddings() if i == -1 else self.layers[i]
            self._handles.append(module.register_forward_hook(self._make_hook(i)))

    # -- hooks ---------------------------------------------------------------------------------
    def _make_hook(self, layer_id: int):
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            # Decoder layers return a tensor in recent transformers, a tuple in older ones.
            self._captured[layer_id] = output[0] if isinstance(output, (tuple, list)) else output

        return hook

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # -- properties ----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def feature_dim(self) -> int:
        return len(self.layer_ids) * self.hidden_size

    @property
    def embed_tokens(self) -> nn.Module:
        return self.model.get_input_embeddings()

    @property
    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    # -- forward -------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,  # [batch, seq]
        *,
        attention_mask: torch.Tensor | None = None,  # [batch, past + seq] (1 = attend)
        position_ids: torch.Tensor | None = None,  # [batch, seq]
        past_key_values: Any = None,
        use_cache: bool | None = None,
        logits_positions: slice | torch.Tensor | None = slice(None),
        with_features: bool = True,
    ) -> TargetOutput:
        """One decoder pass; ``logits_positions`` selects which positions get logits
        (``slice(-1, None)`` for the last only, ``None`` for none). ``with_features=False``
        skips concatenating the hooked layers (plain decoding needs no drafter features);
        ``features`` is then an empty ``[batch, seq, 0]`` tensor."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        if use_cache is None:
            use_cache = past_key_values is not None
        self._captured.clear()
        out = self.decoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
        )
        last_hidden = out.last_hidden_state  # [b, s, d]
        if with_features:
            missing = [i for i in self.layer_ids if i not in self._captured]
            if missing:
                raise RuntimeError(f"feature hooks did not fire for layers {missing}")
            features = torch.cat([self._captured[i] for i in self.layer_ids], dim=-1)  # [b, s, L*d]
        else:
            features = last_hidden.new_empty((*last_hidden.shape[:2], 0))
        self._captured.clear()
        logits = None
        if logits_positions is not None:
            logits = self.lm_head(last_hidden[:, logits_positions])  # [b, s', V]
        return TargetOutput(
            features=features,
            last_hidden=last_hidden,
            logits=logits,
            past_key_values=out.past_key_values if use_cache else None,
        )

    __call__ = forward


def _check_checkpoint_dir(path: Path) -> None:
    if not path.exists():
        raise TargetLoadError(f"target checkpoint directory not found: {path}")
    if not path.is_dir():
        raise TargetLoadError(f"target path is not a directory: {path}")
    if not (path / "config.json").is_file():
        raise TargetLoadError(f"{path} has no config.json: not a Hugging Face checkpoint directory")
    if not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        hint = f" (found {', '.join(pickled)}: pickle weights are never loaded; convert them to safetensors)" if pickled else ""
        raise TargetLoadError(f"{path} has no *.safetensors weights{hint}")


def load_target(cfg: TargetConfig, path: str | Path | None = None, *, with_tokenizer: bool = True) -> FrozenTarget:
    """Load the target named by ``cfg`` (``path`` overrides ``cfg.path``, e.g. after the demo
    target was resolved to its cache directory)."""
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    ckpt = Path(path if path is not None else cfg.path).expanduser()
    _check_checkpoint_dir(ckpt)
    try:
        hf_config = AutoConfig.from_pretrained(ckpt, trust_remote_code=cfg.trust_remote_code)
    except ValueError as exc:
        hint = "" if cfg.trust_remote_code else " (if it ships its own modelling code, set target.trust_remote_code: true)"
        raise TargetLoadError(f"cannot read the model config in {ckpt}: {exc}{hint}") from None
    except Exception as exc:  # not JSON (OSError), inconsistent fields (huggingface_hub's validation errors), ...
        raise TargetLoadError(f"cannot read the model config {ckpt / 'config.json'}: {exc}") from None
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            ckpt,
            config=hf_config,
            dtype=_DTYPES[cfg.dtype],
            use_safetensors=True,
            trust_remote_code=cfg.trust_remote_code,
            output_loading_info=True,
        )
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        raise TargetLoadError(f"cannot load the target weights from {ckpt} (a damaged or incomplete "
                              f"checkpoint, or a config.json that does not match its weights): {exc}") from None
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise TargetLoadError(f"the checkpoint in {ckpt} lacks {len(missing)} weight(s) of its model "
                              f"({shown}); they would be random. Is a safetensors shard missing or truncated?")
    model.to(cfg.device)
    tokenizer = None
    if with_tokenizer:
        try:
            tokenizer = AutoTokenizer.from_pretrained(ckpt, trust_remote_code=cfg.trust_remote_code)
        except Exception as exc:  # a damaged tokenizer.json fails in many ways (KeyError, TypeError, ...)
            raise TargetLoadError(f"cannot load the tokenizer from {ckpt} (are tokenizer.json and "
                                  f"tokenizer_config.json intact?): {type(exc).__name__}: {exc}") from None
    return FrozenTarget(model, cfg.layer_ids, tokenizer=tokenizer)
