"""Our side on the shared inputs: greedy answers over ``context_ids + question_ids`` for dense and Token Filtering.

Per prompt it records the answer, its score, the wall time, and (for a filter) the statistics at the end of the
prompt (a snapshot taken after the prefill) and at the end of the answer. Our KV held after the prompt comes from
:func:`kv_held_share`, which reads the engine's KV-held statistic (SPEC "Recent window").

A row may also be a :class:`Matched` sliding window: ``TokenFilter.sliding_window`` sized on each prompt (by the
``TokenFilter.sliding_window_holding``) to hold the KV that another of our rows measured on that prompt.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from tokenfilter.integration.families import layer_windows
from tokenfilter.longctx.longbench import ENGLISH_TASKS
from tokenfilter.longctx.runner import greedy_ids
from tokenfilter.peers import inputs
from tokenfilter.peers.inputs import SplitPrompt


@dataclass
class Matched:
    """Our sliding-window preset (``warmup`` sinks + a recent window), sized per prompt to hold the KV share that row
    ``reference`` holds on it (``held``: prompt id -> share, filled in once the reference has run)."""

    reference: str
    warmup: int = 4
    held: dict[str, float] = field(default_factory=dict)

    def __call__(self, prompt: SplitPrompt, windows: Sequence[int | None] | None = None) -> object:
        from tokenfilter.config import TokenFilter

        if prompt.id not in self.held:
            raise KeyError(f"No KV held of {self.reference!r} on {prompt.id!r}: run it before its sliding window.")
        return TokenFilter.sliding_window_holding(self.held[prompt.id], prompt.tokens, self.warmup, windows)


class _AfterPrefill:
    """Stopping criterion that never stops: on its first call (right after the prefill) it snapshots the stats."""

    def __init__(self, run: object | None) -> None:
        self.run, self.snapshot = run, None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **_: object) -> torch.Tensor:
        if self.snapshot is None and self.run is not None:
            self.snapshot = self.run.stats.as_dict()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def generate(
    model: object, tokenizer: object, ids: Sequence[int], max_new_tokens: int, first_line: bool, run: object | None
) -> tuple[str, int, dict | None]:
    """Greedy continuation through ``runner.greedy_ids`` (same eos, pad and first-line stop), plus the stats after
    the prefill. Returns (answer, new tokens, stats snapshot or None)."""
    probe = _AfterPrefill(run)
    new = greedy_ids(model, tokenizer, ids, max_new_tokens, first_line, criteria=[probe])
    return tokenizer.decode(new, skip_special_tokens=True), int(new.shape[0]), probe.snapshot


def kv_held_share(stats: Mapping | None) -> float:
    """Our KV held at the end of the prompt as a share of dense over all layers (SPEC "KV held": kept entries plus
    filtered ones still inside the recent window), as the engine reports it (``kv_held_fraction``)."""
    if not stats:
        return 1.0
    return float(stats["kv_held_fraction"])


def _pairs(stats: Mapping | None) -> int | None:
    return None if not stats else int(sum(c["pairs"] for c in stats.get("layers", [])))


def run_ours(
    model: object,
    tokenizer: object,
    methods: Mapping[str, object | None],
    prompts: Sequence[SplitPrompt],
    progress: object = print,
) -> dict:
    """``{"rows": [...]}``: one row per (method, prompt). ``methods``: name -> ``TokenFilter``, None (dense) or a
    :class:`Matched` sliding window (its row says ``budget_of`` = the reference row and its window ``recent``)."""
    rows = []
    windows = layer_windows(model) if any(isinstance(m, Matched) for m in methods.values()) else None
    for name, method in methods.items():
        for i, p in enumerate(prompts):
            first_line = p.family == "longbench" and ENGLISH_TASKS[p.task].first_line
            tf = method(p, windows) if isinstance(method, Matched) else method
            t0 = time.perf_counter()
            if tf is None:
                answer, new, snap = generate(model, tokenizer, p.input_ids, p.max_new_tokens, first_line, None)
                end = None
            else:
                with tf.apply(model) as run:
                    answer, new, snap = generate(model, tokenizer, p.input_ids, p.max_new_tokens, first_line, run)
                    end = run.stats.as_dict()
            seconds = time.perf_counter() - t0
            pre, total = _pairs(snap), _pairs(end)
            rows.append(
                {
                    "method": name,
                    "ratio": getattr(tf, "ratio", None),
                    "budget_of": method.reference if isinstance(method, Matched) else name,
                    "recent": getattr(tf, "recent", None),
                    "filter": None if tf is None else repr(tf),  # --reuse runs a row again when its filter changed
                    "prompt": p.id,
                    "tokens": p.tokens,
                    "answer": answer,
                    "new_tokens": new,
                    "score": inputs.score(p, answer),
                    "seconds": round(seconds, 3),
                    "kv_held_share": kv_held_share(snap),
                    "prefill_pairs": pre,
                    "decode_pairs": None if pre is None or total is None else total - pre,
                }
            )
            progress(f"[ours {name} {i + 1}/{len(prompts)}] {p.id}: {answer[:40]!r}")
    return {"rows": rows}
