"""One memory trial in a process of its own: ``python memory_child.py SPEC.json OUT.json``.

Run by :mod:`tokenfilter.bench.memory` in our venv (dense and Token Filtering rows) or in the peer venv (kvpress
rows), so it imports only the standard library, torch and transformers at the top; ``tokenfilter`` or ``kvpress``
only for the rows that need them.

The child loads the model, collects garbage, records its resident set (``VmRSS``) and resets the peak
(``/proc/self/clear_refs``), then runs one ``generate(ids, max_new_tokens=new_tokens)``: the prefill of the whole
prompt (in chunks of ``chunk`` tokens when given, transformers' ``prefill_chunk_size``) and the first token, or a
long greedy generation of exactly ``new_tokens`` (``tokenfilter longgen``'s memory part). It reports
the peak resident set of that call (``VmHWM``), and the key/value bytes the cache held: at the end of the call,
and at their largest during it (read after every attention module's forward, before any kvpress hook
compresses that layer: kvpress prefills densely and prunes afterwards, so its peak includes a dense layer).

SPEC.json: ``{"model": {"path", "kwargs", "dtype", "threads"}, "ids": [...], "chunk": int | null, "new_tokens":
int | null (1), "method": {"kind": "dense" | "tokenfilter" | "kvpress", "preset": "default" | "sliding-window" |
"budget", "ratio", "recent", "budget", "press"}}``. OUT.json: ``{"rss_loaded", "peak_rss", "kv_end", "kv_peak",
"seconds", "versions", "kv_held_fraction"}`` (bytes, except where named).
"""

from __future__ import annotations

import gc
import importlib.metadata
import json
import sys
import time
from pathlib import Path


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _tensor_bytes(t: object) -> int:
    import torch

    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def cache_bytes(cache: object) -> int:
    """Bytes of the key/value tensors a transformers ``Cache`` holds (a filtered layer: its store and its ring)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        store = getattr(layer, "kv", None)
        if store is not None and hasattr(store, "allocated_bytes"):
            total += int(store.allocated_bytes())
            ring = getattr(layer, "ring", None)
            if ring is not None:
                total += _tensor_bytes(ring.keys) + _tensor_bytes(ring.values)
        else:
            total += _tensor_bytes(getattr(layer, "keys", None)) + _tensor_bytes(getattr(layer, "values", None))
    return total


def _attention_modules(model: object) -> list:
    return [m for name, m in model.named_modules() if name.endswith("self_attn")]


def _filter(method: dict):
    from tokenfilter import TokenFilter

    if method["preset"] == "sliding-window":
        return TokenFilter.sliding_window(recent=int(method.get("recent") or 64))
    if method["preset"] == "budget":
        return TokenFilter(budget=int(method["budget"]))
    return TokenFilter(ratio=float(method["ratio"]))


def _press(method: dict):
    import kvpress

    return getattr(kvpress, method["press"])(compression_ratio=float(method["ratio"]))


def run(spec: dict) -> dict:
    import contextlib

    import torch
    from transformers import AutoModelForCausalLM, DynamicCache
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(int(spec["model"].get("threads") or 1))
    m = spec["model"]
    model = AutoModelForCausalLM.from_pretrained(m["path"], dtype=getattr(torch, m["dtype"]), **m["kwargs"]).eval()
    ids = torch.tensor([spec["ids"]], dtype=torch.long)  # [1, T]
    method, chunk = spec["method"], spec.get("chunk")
    new_tokens = int(spec.get("new_tokens") or 1)  # 1: the prefill (and its first token); more: a long generate
    cache = DynamicCache(config=model.config)
    peak_kv = [0]

    def watch(*_args) -> None:
        peak_kv[0] = max(peak_kv[0], cache_bytes(cache))

    hooks = [a.register_forward_hook(watch) for a in _attention_modules(model)]  # before any press's hooks
    if method["kind"] == "tokenfilter":
        scope = _filter(method).apply(model)
    elif method["kind"] == "kvpress":
        scope = _press(method)(model)
    else:
        scope = contextlib.nullcontext()
    extra = {"prefill_chunk_size": int(chunk)} if chunk else {}
    gc.collect()
    rss_loaded = _status_kib("VmRSS")
    resettable = _reset_peak()
    t0 = time.perf_counter()
    with scope as run_or_none, torch.inference_mode():
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            num_beams=1,
            past_key_values=cache,
            pad_token_id=0,
            **extra,
        )
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM") if resettable else None
    for h in hooks:
        h.remove()
    stats = getattr(run_or_none, "stats", None)
    return {
        "rss_loaded": rss_loaded * 1024 if rss_loaded is not None else None,
        "peak_rss": peak * 1024 if peak is not None else None,
        "kv_end": cache_bytes(cache),
        "kv_peak": peak_kv[0],
        "seconds": round(seconds, 3),
        "kv_held_fraction": getattr(stats, "kv_held_fraction", None),
        "realized": getattr(stats, "ratio", None),  # over the prompt and every generated token, all filtered layers
        "versions": {p: importlib.metadata.version(p) for p in ("torch", "transformers")},
    }


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python memory_child.py SPEC.json OUT.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    Path(argv[1]).write_text(json.dumps(run(spec)), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
