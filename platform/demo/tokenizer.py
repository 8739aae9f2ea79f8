"""Byte-level BPE tokenizer for the demo target, trained with ``tokenizers``.

Special tokens (ids are fixed, in this order, at the start of the vocabulary):

====================  ==================================================================
``<|endoftext|>``     end of a document / generation (also used as padding)
``<|mask|>``          the drafters' block-filler token (DSpark: anchor + γ−1 masks)
``<|im_start|>``      chat turn start (ChatML, so ``apply_chat_template`` works)
``<|im_end|>``        chat turn end
====================  ==================================================================
"""

from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

__all__ = ["SPECIAL_TOKENS", "EOS_TOKEN", "MASK_TOKEN", "CHAT_TEMPLATE", "train_bpe", "wrap_for_transformers"]

EOS_TOKEN = "<|endoftext|>"
MASK_TOKEN = "<|mask|>"
SPECIAL_TOKENS = [EOS_TOKEN, MASK_TOKEN, "<|im_start|>", "<|im_end|>"]

# ChatML, the Qwen family's format: the demo target was never chat-tuned, but serving needs a
# template so that /v1/chat/completions renders messages the same way everywhere.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE on ``texts`` (every byte is in the alphabet, so nothing is ever
    unknown)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def wrap_for_transformers(tok: Tokenizer, model_max_length: int):
    """A ``PreTrainedTokenizerFast`` that ``save_pretrained``/``AutoTokenizer`` round-trip."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        mask_token=MASK_TOKEN,
        additional_special_tokens=SPECIAL_TOKENS[2:],
        model_max_length=model_max_length,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
