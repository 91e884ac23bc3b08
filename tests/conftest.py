"""Shared fixtures: tiny random-weight models of every supported family, and the real stories260K.

The device switch: ``TOKENFILTER_TEST_DEVICE=cuda`` (and ``TOKENFILTER_TEST_DTYPE=bfloat16``, default float32)
runs the engine's guarantee tests (``test_engine_equivalence.py``: ratio 0 == dense, prefill == decode in threshold
mode, fast == reference, a padded batch == each sequence alone) on that device and dtype; unset, they run on the CPU
in float32, as they always have. ``TEST_TOL`` is the tolerance of a "same logits" check in that dtype.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from tokenfilter.integration.backends import BACKENDS as _BACKEND_REGISTRY

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STORIES = SHARED / "models" / "stories260K"

TEST_DEVICE = torch.device(os.environ.get("TOKENFILTER_TEST_DEVICE", "cpu"))
TEST_DTYPE = getattr(torch, os.environ.get("TOKENFILTER_TEST_DTYPE", "float32"))
TEST_FP32 = TEST_DTYPE is torch.float32
TEST_EXACT = TEST_FP32 and TEST_DEVICE.type == "cpu"  # where the bit-for-bit checks hold
TEST_TOL = dict(atol=1e-5, rtol=1e-5) if TEST_FP32 else dict(atol=3e-2, rtol=3e-2)
if TEST_DEVICE.type == "cuda" and TEST_FP32:
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 checks compare at fp32 precision
    torch.backends.cudnn.allow_tf32 = False


def on_test_device(x):
    """A tensor or model moved to the test device (models also to the test dtype)."""
    if isinstance(x, torch.nn.Module):
        return x.to(device=TEST_DEVICE, dtype=TEST_DTYPE)
    return x.to(TEST_DEVICE)


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3_text")
# the engine's attention backends (its registry); the equivalence tests run over all
BACKENDS = sorted(_BACKEND_REGISTRY)
_COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    pad_token_id=0,
    eos_token_id=None,
)


def make_tiny(family: str, dtype: torch.dtype = torch.float32, attn: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    """A tiny random model of ``family``: GQA everywhere; Mistral with a 24-token sliding window,
    Qwen2 with q/k/v biases, Qwen3 with q/k norms, Llama with attention biases; Phi-3 (the Phi-4 architecture) with
    its fused qkv_proj and RoPE on half of each head (``partial_rotary_factor``, as Phi-4-mini); Gemma 3 (text) with
    q/k norms, scaled embeddings, ``query_pre_attn_scalar`` scaling (not ``head_dim``), and local layers with a
    24-token window (their own RoPE base) interleaved with global ones, one of each among the filtered layers."""
    torch.manual_seed(seed)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**_COMMON, attention_bias=True))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(**_COMMON, sliding_window=24))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**_COMMON))
    elif family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**_COMMON, head_dim=16))
    elif family == "phi3":
        model = Phi3ForCausalLM(Phi3Config(**_COMMON, partial_rotary_factor=0.5))
    elif family == "gemma3_text":
        types = ["sliding_attention", "full_attention"] * 2
        model = Gemma3ForCausalLM(Gemma3TextConfig(
            **_COMMON, head_dim=16, query_pre_attn_scalar=24, sliding_window=24, layer_types=types))
    else:
        raise ValueError(family)
    model.config._attn_implementation = attn
    return model.to(dtype).eval()


@pytest.fixture(params=FAMILIES)
def tiny(request: pytest.FixtureRequest) -> torch.nn.Module:
    return make_tiny(request.param)


@pytest.fixture(scope="session")
def stories() -> torch.nn.Module:
    if not (STORIES / "config.json").exists():
        pytest.skip(f"{STORIES} is absent: the real-weights tests need ../shared/models/stories260K")
    return AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()


def random_ids(batch: int, length: int, vocab: int = 128, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g)


def pad_batch(seqs: list[torch.Tensor], side: str = "left", pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad 1-D id tensors on ``side`` ("left" or "right") into ``(input_ids, attention_mask)``."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), n, dtype=torch.long)
    for i, s in enumerate(seqs):
        at = slice(0, len(s)) if side == "right" else slice(n - len(s), n)
        ids[i, at], mask[i, at] = s.cpu(), 1
    return ids, mask


def left_pad(seqs: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return pad_batch(seqs, "left", pad_id)


def right_pad(seqs: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right padding: lm-eval's batches."""
    return pad_batch(seqs, "right", pad_id)


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def assert_ran_and_kept_everything(run, real: torch.Tensor | None = None) -> None:
    """A "nothing filtered" run in which the filtered path really ran: some layers were patched, each of them
    computed every (query, key) pair of the unmodified model itself (the counts of an unpatched layer come from
    the decoder's hook, those of a patched one from its own attention: a patched layer whose attention never ran
    would count none), and nothing was filtered or dropped. With ``record_decisions``: every real token
    (``real`` ``[B, T]``; default: all) has a finite score at every patched layer and no decision is True."""
    assert run.filtered_layers, "no layer was patched: the filtered path did not run"
    stats = run.stats
    assert stats.ratio == 0.0 and stats.kv_held_fraction == 1.0 and stats.pairs_fraction == 1.0
    for layer in run.filtered_layers:
        counts = stats.layers[layer]
        assert counts.tokens > 0 and counts.pairs == counts.pairs_dense > 0 and counts.filtered == 0
    if not run.config.record_decisions:
        return
    for layer in run.filtered_layers:
        scores, decisions = run.scores[layer], run.decisions[layer]
        r = torch.ones(scores.shape[0], scores.shape[-1], dtype=torch.bool) if real is None else real.bool()
        if scores.dim() == 3:  # per KV head: [B, H, T]
            r = r[:, None].expand_as(scores)
        assert torch.isfinite(scores[r]).all() and scores[~r].isnan().all(), f"layer {layer} was not scored"
        assert not decisions.any()


# -- the command-line tests' tiny model folder and text file ----------------------------------------------
CLI_TEXT = "\n\n".join(
    " ".join(f"Paragraph {p} sentence {i}: the answer is {(p * i) % 11}, said the question." for i in range(30))
    for p in range(60)
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tiny_lm import save_tiny_lm

    return save_tiny_lm(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(CLI_TEXT, encoding="utf-8")
    return path
