"""What the benchmark reads off the model: its shape for the results, and the few numbers the measurement needs."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from tokenfilter.stats import FlopModel


@dataclass(frozen=True)
class ModelFacts:
    """The numbers the trials and the cells need, read once."""

    fm: FlopModel
    device: torch.device
    element_size: int  # bytes per parameter (and cache) element
    entry_bytes: int  # bytes of one key/value entry of one token in one layer
    weight_bytes: int  # bytes one decode step reads (``read_weight_bytes``)
    logits_to_keep: bool  # the model can compute the LM head on the last position only
    max_positions: int | None

    @classmethod
    def read(cls, model: torch.nn.Module) -> ModelFacts:
        fm = FlopModel.from_config(model.config)
        param = next(model.parameters())
        return cls(
            fm=fm,
            device=param.device,
            element_size=param.element_size(),
            entry_bytes=fm.kv_entry_bytes(param.element_size()),
            weight_bytes=read_weight_bytes(model),
            logits_to_keep=supports_logits_to_keep(model),
            max_positions=getattr(model.config, "max_position_embeddings", None),
        )


def supports_logits_to_keep(model: torch.nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def read_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights one decode step reads: every parameter once (a tied LM head counted once), less an
    untied input embedding table (a step reads one row of it)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is not None and (head is None or head.weight is not emb.weight):
        total -= emb.weight.numel() * emb.weight.element_size()
    return total


def model_info(model: torch.nn.Module, name: str | None = None) -> dict:
    """The ``"model"`` section of the results."""
    cfg = model.config
    fm = FlopModel.from_config(cfg)
    param = next(model.parameters())
    return {
        "name": name or getattr(cfg, "_name_or_path", None) or type(model).__name__,
        "family": getattr(cfg, "model_type", None),
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(param.dtype).replace("torch.", ""),
        "layers": fm.layers,
        "hidden": fm.hidden,
        "q_heads": fm.q_heads,
        "kv_heads": fm.kv_heads,
        "head_dim": fm.head_dim,
        "intermediate": fm.intermediate,
        "vocab": fm.vocab,
        "max_positions": getattr(cfg, "max_position_embeddings", None),
        "attn_implementation": getattr(cfg, "_attn_implementation", None),
        "device": str(param.device),
        "weight_bytes_read_per_step": read_weight_bytes(model),
        "flops_per_token_no_attention": {
            "qo_proj": fm.qo_proj * fm.layers,
            "kv_proj": fm.kv_proj * fm.layers,
            "mlp": fm.mlp * fm.layers,
            "lm_head": fm.lm_head,
        },
    }
