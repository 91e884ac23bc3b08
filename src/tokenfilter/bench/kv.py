"""Measuring the KV cache: the bytes its tensors really occupy, and the entries (token, layer) it stores.

A dense layer is a transformers ``DynamicLayer`` (``keys``/``values`` of ``[B, H, S, d]``); a filtered layer
is a :class:`~tokenfilter.integration.cache_layer.FilteredCacheLayer` whose store reports its own
``allocated_bytes()`` (buffer capacity, which may exceed what is in use) and ``stored_entries()``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from tokenfilter.integration.cache_layer import FilteredCacheLayer


@dataclass
class KVMeasure:
    allocated_bytes: int = 0  # bytes of the key/value tensors as allocated (capacity included)
    used_bytes: int = 0  # bytes of the entries actually stored
    stored_entries: int = 0  # (sequence, token) pairs held, summed over layers (KV side: a band's entries too)
    filtered_layers_allocated_bytes: int = 0
    filtered_layers_stored_entries: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def _tensor_bytes(t: torch.Tensor | None) -> int:
    if t is None or not isinstance(t, torch.Tensor):
        return 0
    return t.numel() * t.element_size()


def measure_cache(cache: object, entry_bytes: int) -> KVMeasure:
    """Sum over the layers of ``cache`` (a transformers ``Cache``). ``entry_bytes``: one token's K+V in one layer."""
    m = KVMeasure()
    for layer in getattr(cache, "layers", []):
        if isinstance(layer, FilteredCacheLayer):
            alloc, entries = layer.kv.allocated_bytes(), layer.kv.stored_entries()
            ring = layer.ring
            if ring is not None:  # KV side: filtered entries the recent band still reads are held too
                entries += ring.held
                alloc += _tensor_bytes(ring.keys) + _tensor_bytes(ring.values)
            m.filtered_layers_allocated_bytes += alloc
            m.filtered_layers_stored_entries += entries
        else:
            keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
            alloc = _tensor_bytes(keys) + _tensor_bytes(values)
            entries = keys.shape[0] * keys.shape[-2] if isinstance(keys, torch.Tensor) and keys.dim() == 4 else 0
        m.allocated_bytes += alloc
        m.stored_entries += entries
    m.used_bytes = m.stored_entries * entry_bytes
    return m
