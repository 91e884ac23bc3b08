"""An independent re-derivation of filtered attention: plain eager softmax attention under a given mask.

Given, per layer, a ``[B, T, T]`` bool mask of which query may read which key (the test builds it from the
rule and the recorded decisions, in plain Python), ``forward_with_layer_masks`` runs the model with those
layers' attention replaced by ``softmax(q k^T * scale + mask) v`` over every column. Nothing of the package
is used: no store, no band, no log-sum-exp merge.
"""

from __future__ import annotations

import sys

import torch


def project(attn: torch.nn.Module, hidden_states: torch.Tensor, position_embeddings: tuple) -> tuple[torch.Tensor, ...]:
    """The family's own projections: ``(q, k, v [B, T, H, d], q_rot, k_rot [B, H, T, d])`` (with q/k norms), as the
    model's own attention computes them: separate q/k/v projections, or Phi-3's fused ``qkv_proj`` (Q, K, V along
    its output, split by the config's head counts), and RoPE by the family's own ``apply_rotary_pos_emb`` (Phi-3's
    rotates only part of each head)."""
    b, t, _ = hidden_states.shape
    d = attn.head_dim
    if hasattr(attn, "qkv_proj"):
        qkv = attn.qkv_proj(hidden_states)
        nq, nkv = attn.config.num_attention_heads * d, attn.config.num_key_value_heads * d
        q, k, v = qkv[..., :nq], qkv[..., nq : nq + nkv], qkv[..., nq + nkv :]
    else:
        q, k, v = attn.q_proj(hidden_states), attn.k_proj(hidden_states), attn.v_proj(hidden_states)
    q, k, v = q.reshape(b, t, -1, d), k.reshape(b, t, -1, d), v.reshape(b, t, -1, d)
    if getattr(attn, "q_norm", None) is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    cos, sin = position_embeddings
    apply_rotary_pos_emb = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    q_rot, k_rot = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    return q, k, v, q_rot, k_rot


def layer_window(model: torch.nn.Module, layer: int) -> int | None:
    """The model's own sliding window at ``layer``, as its decoder picks each layer's mask: per layer type where the
    config has ``layer_types`` (Gemma 3's local layers, Qwen2/3), else ``sliding_window`` on every layer (Mistral,
    Phi-3; None or absent: full attention)."""
    cfg = model.config
    types = getattr(cfg, "layer_types", None)
    if types is not None:
        return cfg.sliding_window if types[layer] == "sliding_attention" else None
    return getattr(cfg, "sliding_window", None)


def _eager(attn: torch.nn.Module, mask: torch.Tensor, reads: torch.Tensor):
    def forward(hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        b, t, _ = hidden_states.shape
        _, _, v, q, k = project(attn, hidden_states, position_embeddings)
        v = v.transpose(1, 2)
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        s = (q.double() @ k.double().transpose(-1, -2)) * attn.scaling
        per_head = mask.repeat_interleave(groups, dim=1) if mask.dim() == 4 else mask[:, None]
        s = s.masked_fill(~per_head, float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)
        o = (p @ v.double()).to(q.dtype).transpose(1, 2).reshape(b, t, -1)
        return attn.o_proj(o) * reads[..., None].to(o.dtype), None

    return forward


def forward_with_layer_masks(
    model: torch.nn.Module,
    ids: torch.Tensor,
    masks: dict[int, torch.Tensor],
    reads: dict[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Logits ``[B, T, V]`` of ``model`` on ``ids`` (no padding) with layer l's attention replaced by eager attention
    under ``masks[l]`` ``[B, T, T]`` (or ``[B, H_kv, T, T]``, one mask per KV head); ``reads[l]`` ``[B, T]`` zeroes
    the output of tokens that do not attend."""
    layers = model.get_decoder().layers
    patched = []
    try:
        for idx, mask in masks.items():
            attn = layers[idx].self_attn
            r = reads[idx] if reads is not None else torch.ones(mask.shape[0], mask.shape[-1], dtype=torch.bool)
            attn.forward = _eager(attn, mask, r)
            patched.append(attn)
        with torch.no_grad():
            return model(ids, use_cache=False).logits
    finally:
        for attn in patched:
            attn.__dict__.pop("forward", None)
