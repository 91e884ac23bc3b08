"""Which Hugging Face architectures we support, and where their pieces live."""

from __future__ import annotations

from torch import nn

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


class UnsupportedModelError(ValueError):
    pass


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a supported causal LM (or of its base model); raise a plain error otherwise."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        name = model_type or type(model).__name__
        raise UnsupportedModelError(
            f"Token Filtering supports the {', '.join(SUPPORTED)} families; this model is {name!r}."
        )
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if layers is None or len(layers) == 0:
        raise UnsupportedModelError(f"Could not find the decoder layers of this {model_type} model.")
    for layer in layers:
        attn = getattr(layer, "self_attn", None)
        if attn is None or not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
            raise UnsupportedModelError(
                f"This {model_type} model's attention lacks separate q/k/v/o projections; it is not supported."
            )
    return layers


def sliding_window(attn: nn.Module) -> int | None:
    """The attention window of one layer, or None for full attention."""
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    config = attn.config
    if getattr(config, "model_type", None) == "mistral":
        return getattr(config, "sliding_window", None)
    return None
