"""The nothing-filtered overhead measured finely: dense and the filter alternate at the smallest grain.

The grid's rounds alternate whole trials (a prefill and all its decode steps), a few times per cell: on a machine
whose cores are shared with other jobs their spread is several percent, more than the 3 % target it is to resolve.
Here the two run in the same process, interleaved step by step: ``prefills`` prefill pairs of the context (each
pair in alternating order), then ``steps`` decode steps on two caches, a dense step and a filtered step in turn
(alternating which goes first). Load drift hits both sides of a pair alike, so the median of the per-pair ratios
resolves about a percent where a trial-level median does not. Clocks as in the grid (CUDA events on a GPU, else
``perf_counter`` and ``process_time``).
"""

from __future__ import annotations

import contextlib
import gc
import statistics

import torch
from transformers import DynamicCache

from tokenfilter.bench.trial import Clock
from tokenfilter.config import TokenFilter


def _summary(dense: list[float], other: list[float]) -> dict:
    extra = sorted(o / d - 1 for d, o in zip(dense, other, strict=True) if d > 0)
    if not extra:
        return {"n": 0, "extra": None, "q25": None, "q75": None}

    def q(f: float) -> float:
        return extra[round(f * (len(extra) - 1))]

    return {
        "n": len(extra),
        "extra": float(statistics.median(extra)),
        "q25": q(0.25),
        "q75": q(0.75),
        "extra_of_medians": statistics.median(other) / statistics.median(dense) - 1,
        "dense_median_s": statistics.median(dense),
    }


def paired_overhead(
    model: torch.nn.Module,
    ids: torch.Tensor,
    tf: TokenFilter,
    steps: int,
    prefills: int,
    logits_to_keep: bool = True,
) -> dict:
    """``{"prefill": ..., "decode": ...}``, each ``{"n", "extra", "q25", "q75", ...}`` for the wall clock and, under
    ``"cpu"``, for process CPU time: ``extra`` is the median over pairs of (filtered time / dense time - 1)."""
    b, t = ids.shape
    device = ids.device
    mask = torch.ones(b, t + steps + 2, dtype=torch.long, device=device)
    extra = {"logits_to_keep": 1} if logits_to_keep else {}
    sides = (None, tf)

    def ctx(cfg: TokenFilter | None):
        return cfg.apply(model) if cfg is not None else contextlib.nullcontext()

    def prefill(cfg: TokenFilter | None, cache: DynamicCache, clock: Clock | None = None) -> torch.Tensor:
        with ctx(cfg), torch.inference_mode():
            if clock is not None:
                clock.mark()
            out = model(input_ids=ids, attention_mask=mask[:, :t], past_key_values=cache, use_cache=True, **extra)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            if clock is not None:
                clock.mark()
        return nxt

    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        pre = {0: Clock(device), 1: Clock(device)}
        for r in range(prefills):
            for i in ((0, 1) if r % 2 == 0 else (1, 0)):
                prefill(sides[i], DynamicCache(config=model.config), pre[i])
        caches = [DynamicCache(config=model.config) for _ in sides]
        nxt = [prefill(cfg, cache) for cfg, cache in zip(sides, caches, strict=True)]
        dec = {0: Clock(device), 1: Clock(device)}
        warm = 2
        for s in range(steps + warm):
            for i in ((0, 1) if s % 2 == 0 else (1, 0)):
                clock = dec[i] if s >= warm else None
                with ctx(sides[i]), torch.inference_mode():
                    if clock is not None:
                        clock.mark()
                    out = model(input_ids=nxt[i], attention_mask=mask[:, : t + s + 1], past_key_values=caches[i],
                                use_cache=True)
                    nxt[i] = out.logits[:, -1].argmax(-1, keepdim=True)
                    if clock is not None:
                        clock.mark()
    finally:
        if was:
            gc.enable()
    result = {"steps": steps, "prefills": prefills}
    for phase, clocks in (("prefill", pre), ("decode", dec)):
        (wall_d, cpu_d), (wall_f, cpu_f) = clocks[0].spans(), clocks[1].spans()
        result[phase] = {**_summary(wall_d, wall_f), "cpu": _summary(cpu_d, cpu_f)}
    return result
