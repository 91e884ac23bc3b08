"""The ideal speed ratios: what the FLOP and byte models predict for the decisions a run actually made.

The ideal ratio is ``flops_dense / flops_actual`` from the FLOP model (``tokenfilter.stats``), with the LM head
charged only on the rows that are computed (the last position in prefill). Efficiency is measured / ideal. Decode
also gets a byte ideal (``byte_ideal``): the bytes a step must read, weights once per step plus every key/value entry
attended, dense over filtered.
"""

from __future__ import annotations

from tokenfilter.stats import FilterStats, FlopModel


def ideal_ratio(stats: FilterStats | None, fm: FlopModel, head_rows: int | None = None) -> float:
    """``flops_dense / flops_actual`` of a run; ``head_rows``: LM-head rows really computed (None: every token)."""
    if stats is None or stats.flops_actual <= 0:
        return 1.0
    adjust = 0.0 if head_rows is None else (stats.tokens - head_rows) * fm.lm_head
    return (stats.flops_dense - adjust) / (stats.flops_actual - adjust)


def byte_ideal(
    stats: FilterStats | None, fm: FlopModel, weight_bytes: int, element_size: int, batch: int, steps: int
) -> float | None:
    """The decode byte ideal: ``bytes_dense / bytes_actual`` of ``steps`` decode steps, where a step reads every
    weight once (``weight_bytes``, the LM head included, the embedding table not) and every key/value entry it
    attends (one per (query, key) pair and layer). A filtered token saves the read of its Q/O weights (and MLP
    weights with ``skip="block"``); at batch > 1 that read is saved only when the batch's rows skip together,
    which the ideal assumes (``skipped / batch``), so there it is an upper bound."""
    if stats is None or not steps:
        return None
    entry = fm.kv_entry_bytes(element_size)
    qo = 2 * fm.hidden * fm.q_heads * fm.head_dim * element_size
    mlp = 3 * fm.hidden * fm.intermediate * element_size
    pairs = sum(c.pairs for c in stats.layers)
    pairs_dense = sum(c.pairs_dense for c in stats.layers)
    saved_w = sum(c.qo_skipped * qo + c.mlp_skipped * mlp for c in stats.layers) / batch
    dense = steps * weight_bytes + pairs_dense * entry
    actual = steps * weight_bytes - saved_w + pairs * entry
    return dense / actual if actual > 0 else None
