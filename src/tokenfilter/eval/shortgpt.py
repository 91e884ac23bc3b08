"""ShortGPT-style layer removal, the calibration-based structured baseline.

Block Influence of layer l = 1 - mean over tokens of cos(h_in, h_out) on calibration text; the layers
with the lowest influence are removed. Removal is reversible (a context manager).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from tokenfilter.integration.families import decoder_layers


def block_influence(model, calib: torch.Tensor) -> list[float]:
    """``calib``: ``[n, T]`` token ids -> per-layer Block Influence (captured with hooks on each layer)."""
    layers = decoder_layers(model)
    influence = [0.0] * len(layers)

    def hook(i: int):
        def fn(module, args, output):
            h_in = args[0].float()
            h_out = (output[0] if isinstance(output, tuple) else output).float()
            cos = torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1)
            influence[i] += float((1 - cos).mean()) / calib.shape[0]

        return fn

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            for row in calib:
                model(row[None].to(next(model.parameters()).device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return influence


def layers_to_remove(influence: list[float], n: int) -> list[int]:
    return sorted(sorted(range(len(influence)), key=lambda i: influence[i])[:n])


@contextlib.contextmanager
def removed_layers(model, remove: list[int]) -> Iterator[None]:
    """Run the model without the layers in ``remove``; everything is restored on exit."""
    decoder = model.get_decoder()
    original = decoder.layers
    cfg = model.config
    n_layers, layer_types = cfg.num_hidden_layers, getattr(cfg, "layer_types", None)
    keep = [i for i in range(len(original)) if i not in set(remove)]
    old_idx = {i: original[i].self_attn.layer_idx for i in keep}
    try:
        decoder.layers = nn.ModuleList(original[i] for i in keep)
        for new, i in enumerate(keep):
            original[i].self_attn.layer_idx = new
        cfg.num_hidden_layers = len(keep)
        if layer_types is not None:
            cfg.layer_types = [layer_types[i] for i in keep]
        yield
    finally:
        decoder.layers = original
        for i, idx in old_idx.items():
            original[i].self_attn.layer_idx = idx
        cfg.num_hidden_layers = n_layers
        if layer_types is not None:
            cfg.layer_types = layer_types
