"""Where the time goes, for one cell: a breakdown by module (forward hooks) and by operator (torch.profiler).

The module breakdown times every decoder layer's attention (split into the layers that filter and the ones
that do not), every MLP, the LM head, and the rest (embeddings, norms, residual adds, mask building, Python),
for a prefill and for decode steps, dense and filtered. The hooks cost a few microseconds per module call, so
the totals here are slightly above the benchmark's timings. The operator view counts the aten operators one
decode step launches (the filter's bookkeeping shows up as extra small operators) and groups self CPU time.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections import defaultdict

import torch
from transformers import DynamicCache

from tokenfilter.config import TokenFilter
from tokenfilter.integration.families import decoder_layers


class ModuleTimer:
    """Accumulates wall time per category through forward pre/post hooks."""

    def __init__(self, model: torch.nn.Module, filtered_layers: set[int]) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self._handles = []
        self._start: dict[int, float] = {}
        layers = decoder_layers(model)
        for i, layer in enumerate(layers):
            attn_cat = "attention, filtered layers" if i in filtered_layers else "attention, other layers"
            self._watch(layer.self_attn, attn_cat)
            self._watch(layer.mlp, "mlp")
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is not None:
            self._watch(head, "lm_head")

    def _watch(self, module: torch.nn.Module, category: str) -> None:
        key = id(module)

        def pre(_m, _a):
            self._start[key] = time.perf_counter()

        def post(_m, _a, _o):
            self.totals[category] += time.perf_counter() - self._start.pop(key)

        self._handles.append(module.register_forward_pre_hook(pre))
        self._handles.append(module.register_forward_hook(post))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _op_category(name: str) -> str:
    if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_weight_int4pack_mm"):
        return "matmul"
    if "scaled_dot_product" in name or "flash_attention" in name or "_efficient_attention" in name:
        return "attention kernel"
    if name == "aten::cat":
        return "cat (cache growth, RoPE)"
    if name in ("aten::sort", "aten::argsort", "aten::nanquantile", "aten::quantile", "aten::topk"):
        return "sort / quantile"
    if name in ("aten::index", "aten::index_put_", "aten::_index_put_impl_", "aten::gather", "aten::scatter_",
                "aten::nonzero", "aten::masked_fill_", "aten::where"):
        return "gather / scatter / index"
    return "other small ops"


def _run(model, ids, tf, steps, logits_to_keep, timer_layers) -> dict:
    """Warm-up pass, then a timed pass (hooks) of prefill + ``steps`` decode steps, then ``steps`` more decode
    steps on the same cache under torch.profiler."""
    b, t = ids.shape
    mask = torch.ones(b, t + 2 * steps, dtype=torch.long)
    extra = {"logits_to_keep": 1} if logits_to_keep else {}
    manager = tf.apply(model) if tf is not None else contextlib.nullcontext()
    out: dict = {}

    def decode(cache, nxt, first: int, n: int):
        for i in range(first, first + n):
            o = model(input_ids=nxt, attention_mask=mask[:, : t + i + 1], past_key_values=cache, use_cache=True)
            nxt = o.logits[:, -1].argmax(-1, keepdim=True)
        return nxt

    with manager, torch.inference_mode():
        for measured in (False, True):  # the first pass warms up
            cache = DynamicCache(config=model.config)
            timer = ModuleTimer(model, timer_layers) if measured else None
            gc.collect()
            t0 = time.perf_counter()
            o = model(input_ids=ids, attention_mask=mask[:, :t], past_key_values=cache, use_cache=True, **extra)
            nxt = o.logits[:, -1].argmax(-1, keepdim=True)
            t1 = time.perf_counter()
            if timer is not None:
                out["prefill"] = _breakdown(timer.totals, t1 - t0)
                timer.totals.clear()
            t2 = time.perf_counter()
            nxt = decode(cache, nxt, 0, steps)
            t3 = time.perf_counter()
            if timer is None:
                continue
            out["decode"] = _breakdown(timer.totals, (t3 - t2) / steps, per=steps)
            timer.remove()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                decode(cache, nxt, steps, steps)
            by_cat: dict[str, float] = defaultdict(float)
            calls = 0
            for ev in prof.key_averages():
                calls += ev.count
                by_cat[_op_category(ev.key)] += ev.self_cpu_time_total / 1e6 / steps
            out["decode_ops"] = {
                "aten_calls_per_step": calls / steps,
                "self_cpu_s_per_step": dict(sorted(by_cat.items(), key=lambda kv: -kv[1])),
            }
    return out


def _breakdown(totals: dict[str, float], wall: float, per: int = 1) -> dict:
    parts = {k: v / per for k, v in totals.items()}
    parts["rest (embeddings, norms, masks, Python)"] = max(0.0, wall - sum(parts.values()))
    return {"wall_s": wall, "parts_s": dict(sorted(parts.items(), key=lambda kv: -kv[1]))}


def profile_cell(
    model: torch.nn.Module, ids: torch.Tensor, tf: TokenFilter, steps: int, logits_to_keep: bool = True
) -> dict:
    """Module breakdown of a prefill of ``ids`` and of ``steps`` decode steps (mean per step), dense and ``tf``;
    then the same decode steps under torch.profiler for the operator counts."""
    with tf.apply(model) as run:
        filtered = set(run.filtered_layers)
    result = {"batch": ids.shape[0], "length": ids.shape[1], "ratio": tf.ratio, "decode_steps": steps}
    for name, cfg in (("dense", None), ("filter", tf)):
        result[name] = _run(model, ids, cfg, steps, logits_to_keep, filtered)
    result["filtered_layers"] = sorted(filtered)
    return result
