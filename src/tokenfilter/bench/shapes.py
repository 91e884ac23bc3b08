"""Named model shapes for ``tokenfilter bench --shape``: a random-weight model built from a transformers config.

Timing does not depend on the weights, and in ratio mode the filter makes exactly the same number of decisions
whatever the weights are, so a model of the real shape measures what the real model would (the quality of the
decisions is another matter: ``tokenfilter eval``). ``config(name)`` builds only the config (nothing allocated),
``build(name, ...)`` the model; ``layers=`` scales the depth down (e.g. for a check on a small machine).

``max_position_embeddings`` is raised to 131072 for every shape (Llama-3.1's own limit; SmolLM2-135M's is 8192), so
that the long contexts asked for fit (the GPU grid's 32k; 16384 with ``--shape smollm2-135m --layers 2`` on a CPU):
RoPE computes every position alike, so nothing the bench times changes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import LlamaConfig

# fields of transformers.LlamaConfig
SHAPES: dict[str, dict] = {
    "llama-3-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False,
    ),
    "llama-2-7b": dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000, max_position_embeddings=131072, rope_theta=10000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False,
    ),
    "smollm2-135m": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, max_position_embeddings=131072, rope_theta=100000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=True,
    ),
}


def config(name: str, layers: int | None = None) -> LlamaConfig:
    """The ``LlamaConfig`` of shape ``name`` (``layers`` overrides the depth); allocates nothing."""
    from transformers import LlamaConfig

    if name not in SHAPES:
        raise ValueError(f"Unknown shape {name!r}; use one of {', '.join(SHAPES)}.")
    fields = dict(SHAPES[name])
    if layers is not None:
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}.")
        fields["num_hidden_layers"] = layers
    cfg = LlamaConfig(**fields, bos_token_id=1, eos_token_id=2, pad_token_id=None)
    cfg._attn_implementation = "sdpa"
    return cfg


def build(
    name: str,
    dtype: torch.dtype | str = "float32",
    device: str | torch.device = "cpu",
    layers: int | None = None,
    seed: int = 0,
) -> torch.nn.Module:
    """A random-weight ``LlamaForCausalLM`` of shape ``name``, built directly on ``device`` in ``dtype``."""
    import torch
    from transformers import LlamaForCausalLM

    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    cfg = config(name, layers)
    torch.manual_seed(seed)
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(before)
    model.config.name_or_path = f"random {name}"
    return model.eval()
