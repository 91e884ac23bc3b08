"""Which Hugging Face architectures we support, and everything Token Filtering needs to know of each.

The layer path (``integration/attention.py``) never asks which family a model is: it calls the
``LayerAttention`` of its layer, built here from the family's ``Family`` description:

* the projections: separate ``q_proj``/``k_proj``/``v_proj`` (Llama, Mistral, Qwen2/3, Gemma 3), or one fused
  ``qkv_proj`` whose output stacks Q, K and V in that order (Phi-3, the Phi-4 architecture); the keys before RoPE
  (what the score reads by default) are the K part, after the family's k-norm where it has one (Qwen3, Gemma 3);
* the heads: the config's query and key-value heads, the attention module's head size and ``scaling`` (Gemma 3:
  ``query_pre_attn_scalar ** -0.5``, not ``head_dim ** -0.5``);
* the model's own sliding window, per layer: none (Llama), one window on every layer (Mistral, Phi-3:
  ``config.sliding_window``), or the window on the layers ``config.layer_types`` marks ``"sliding_attention"``
  (Qwen2/3, Gemma 3's local layers), which is how the decoder picks each layer's mask.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


class UnsupportedModelError(ValueError):
    pass


def _gemma3_refusal(config: object) -> str | None:
    if getattr(config, "use_bidirectional_attention", False):
        return "This gemma3_text model attends bidirectionally (use_bidirectional_attention); it is not supported."
    return None


@dataclass(frozen=True)
class Family:
    """One architecture, by its ``config.model_type``.

    Attributes:
        model_type: the config's ``model_type``.
        fused_qkv: one ``qkv_proj`` (Q, K, V stacked along its output) instead of ``q_proj``/``k_proj``/``v_proj``.
        window: where the model's own sliding window is: ``None`` (full attention everywhere), ``"every-layer"``
            (``config.sliding_window`` on every layer, None meaning full), ``"layer-types"`` (on the layers whose
            ``config.layer_types`` entry is ``"sliding_attention"``).
        refusal: a variant of the family that is not supported, as one sentence (None: this config is fine).
    """

    model_type: str
    fused_qkv: bool = False
    window: Literal["every-layer", "layer-types"] | None = None
    refusal: Callable[[object], str | None] | None = None

    def layer_window(self, config: object, index: int) -> int | None:
        """Layer ``index``'s own attention window in columns, or None for full attention."""
        if self.window == "every-layer":
            return getattr(config, "sliding_window", None)
        if self.window == "layer-types":
            types = getattr(config, "layer_types", None)
            if types is not None and types[index] == "sliding_attention":
                return config.sliding_window
        return None

    @property
    def projections(self) -> tuple[str, ...]:
        return ("qkv_proj", "o_proj") if self.fused_qkv else ("q_proj", "k_proj", "v_proj", "o_proj")


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("llama"),
        Family("mistral", window="every-layer"),
        Family("qwen2", window="layer-types"),
        Family("qwen3", window="layer-types"),
        Family("phi3", fused_qkv=True, window="every-layer"),
        Family("gemma3_text", window="layer-types", refusal=_gemma3_refusal),
    )
}
SUPPORTED = tuple(FAMILIES)
# model types that are near a supported one, with the sentence that says what to load instead
_NEAR = {
    "gemma3": "Gemma 3's multimodal model (model_type 'gemma3') is not supported; its text-only model is "
    "(Gemma3ForCausalLM, model_type 'gemma3_text').",
}


def family_of(model: nn.Module) -> Family:
    """The ``Family`` of a supported causal LM (or of its base model); raise a plain error otherwise."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in _NEAR:
        raise UnsupportedModelError(_NEAR[model_type])
    if model_type not in FAMILIES:
        name = model_type or type(model).__name__
        raise UnsupportedModelError(
            f"Token Filtering supports the {', '.join(SUPPORTED)} families; this model is {name!r}."
        )
    family = FAMILIES[model_type]
    reason = family.refusal(config) if family.refusal is not None else None
    if reason is not None:
        raise UnsupportedModelError(reason)
    return family


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a supported causal LM (or of its base model); raise a plain error otherwise."""
    family = family_of(model)
    model_type = family.model_type
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if layers is None or len(layers) == 0:
        raise UnsupportedModelError(f"Could not find the decoder layers of this {model_type} model.")
    for layer in layers:
        attn = getattr(layer, "self_attn", None)
        if attn is None or not all(hasattr(attn, p) for p in family.projections):
            kind = "a fused qkv_proj and an o_proj" if family.fused_qkv else "separate q/k/v/o projections"
            raise UnsupportedModelError(
                f"This {model_type} model's attention lacks {kind}; it is not supported."
            )
    return layers


class LayerAttention:
    """One decoder layer's attention as the layer path calls it: its projections (before RoPE, with the family's
    q/k norms), its output projection, and its facts (heads, head size, ``scale``, the model's own ``window``).

    Shapes: ``h`` ``[B, T, D]`` -> queries ``[B, T, Hq, d]``, keys and values ``[B, T, H, d]``.

    With a fused ``qkv_proj`` that is a plain ``nn.Linear``, the Q and the K/V rows of its weight are applied
    separately (slices of the weight, no copy), so a token that skips its Q projection does not compute it (on the
    CPU each part gives the same bits as the fused product); any other module is called whole and sliced."""

    def __init__(self, family: Family, attn: nn.Module, config: object, index: int) -> None:
        self.module = attn
        self.head_dim: int = attn.head_dim
        self.q_heads: int = config.num_attention_heads
        self.kv_heads: int = getattr(config, "num_key_value_heads", None) or self.q_heads
        self.scale: float = attn.scaling
        self.window = family.layer_window(config, index)
        self.fused = family.fused_qkv
        q, kv = self.q_heads * self.head_dim, self.kv_heads * self.head_dim
        self._q, self._k, self._v = slice(0, q), slice(q, q + kv), slice(q + kv, q + 2 * kv)
        self._q_norm = getattr(attn, "q_norm", None)
        self._k_norm = getattr(attn, "k_norm", None)

    def _fused(self, h: torch.Tensor, *parts: slice) -> list[torch.Tensor]:
        proj = self.module.qkv_proj
        if type(proj) is not nn.Linear:  # a wrapped or quantized module: its own forward, then the parts
            out = proj(h)
            return [out[..., p] for p in parts]
        bias = proj.bias
        return [F.linear(h, proj.weight[p], None if bias is None else bias[p]) for p in parts]

    def queries(self, h: torch.Tensor) -> torch.Tensor:
        """``[B, T, Hq, d]`` before RoPE (after the q-norm where the family has one)."""
        q = self._fused(h, self._q)[0] if self.fused else self.module.q_proj(h)
        q = q.reshape(*h.shape[:2], -1, self.head_dim)
        return self._q_norm(q) if self._q_norm is not None else q

    def keys_values(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k, v)``, each ``[B, T, H, d]``: keys before RoPE (after the k-norm where the family has one)."""
        if self.fused:
            k, v = self._fused(h, self._k, self._v)
        else:
            k, v = self.module.k_proj(h), self.module.v_proj(h)
        shape = (*h.shape[:2], -1, self.head_dim)
        k, v = k.reshape(shape), v.reshape(shape)
        return (self._k_norm(k) if self._k_norm is not None else k), v

    def output(self, o: torch.Tensor) -> torch.Tensor:
        """The O projection: ``[B, T, Hq * d]`` -> ``[B, T, D]``."""
        return self.module.o_proj(o)


def attention_layers(model: nn.Module) -> list[LayerAttention]:
    """Every decoder layer's ``LayerAttention`` (the checks of ``decoder_layers`` first)."""
    family, layers = family_of(model), decoder_layers(model)
    return [LayerAttention(family, layer.self_attn, model.config, i) for i, layer in enumerate(layers)]


def layer_windows(model: nn.Module) -> list[int | None]:
    """Each decoder layer's own attention window in columns (None: full attention), without patching anything."""
    family, n = family_of(model), len(decoder_layers(model))
    return [family.layer_window(model.config, i) for i in range(n)]


def global_layers(model: nn.Module) -> list[int]:
    """The layers without a sliding window of their own (Gemma 3's global layers; every layer of a model without
    windows). Where the model keeps only a window of keys, filtering saves little memory; on these it saves what
    dense holds, so a per-layer schedule may filter them alone, e.g.
    ``TokenFilter(schedule=[0.9 if i in global_layers(model) else 0.0 for i in range(n_layers)])``."""
    return [i for i, a in enumerate(attention_layers(model)) if a.window is None]
