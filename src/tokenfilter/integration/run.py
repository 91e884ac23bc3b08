"""``FilterRun``: installs Token Filtering on a model for the duration of a ``with`` block.

Installed: a replacement ``forward`` on the attention module of every layer that filters (and on its
MLP with ``skip="block"``), and a pre-hook on the decoder that reads each call's 2D attention mask (which
tokens are real) and counts the dense work for the statistics. Layers that never filter keep their
original code, so with nothing to filter the model is exactly the unmodified one. Everything is removed
on exit, also when the body raises.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from tokenfilter.integration.attention import FilteredAttention, RopeTables, rope_tables
from tokenfilter.integration.cache_args import cache_argument
from tokenfilter.integration.families import attention_layers, decoder_layers
from tokenfilter.integration.mlp import FilteredMLP
from tokenfilter.integration.plan import LayerPlan, decision_units, layer_targets
from tokenfilter.stats import FilterStats, FlopModel, LayerCounts

if TYPE_CHECKING:
    from tokenfilter.config import TokenFilter

_RUN_ATTR = "_tokenfilter_run"


@dataclass
class CallContext:
    """What one forward call of the decoder shares between its layers."""

    real: torch.Tensor  # [B, T] True = real token, False = padding
    all_real: bool = False  # no padding in this call
    aligned: bool = False  # each row's real tokens are its first columns (no padding, or right padding only)
    cache: object | None = None  # the cache the decoder was given (or None: use_cache=False)
    past: int = 0  # columns already processed before this call
    keep: dict[int, tuple] = field(default_factory=dict)  # layer -> (keep [B,T], kept-token gather or None)
    transient: dict = field(default_factory=dict)  # layer -> state, when the call has no cache
    rotary: dict = field(default_factory=dict)  # (id(cos), id(sin), rows) -> (cos, sin, cos_b, sin_b, tables)

    def rope(self, cos: torch.Tensor, sin: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor, RopeTables]:
        """The position embeddings ``cos, sin`` (``[1 or rows, T, r]``, as the model hands them to every layer)
        expanded to ``rows`` sequences, and their rope tables: built once per call and embedding (Gemma 3 has two),
        not once per layer."""
        key = (id(cos), id(sin), rows)
        hit = self.rotary.get(key)
        if hit is None:  # the entry holds its sources, so their ids are not reused while the call lasts
            cos_b, sin_b = (cos, sin) if cos.shape[0] == rows else (cos.expand(rows, -1, -1), sin.expand(rows, -1, -1))
            hit = self.rotary[key] = (cos, sin, cos_b, sin_b, rope_tables(cos_b, sin_b))
        return hit[2], hit[3], hit[4]

    def tables(self, cos: torch.Tensor, sin: torch.Tensor) -> RopeTables:
        """The rope tables of ``cos, sin`` ``[B, T, r]``: the call's own when they are what ``rope`` returned, else
        built (a backend's gathered rows)."""
        for _, _, cos_b, sin_b, tables in self.rotary.values():
            if cos_b is cos and sin_b is sin:
                return tables
        return rope_tables(cos, sin)


class FilterRun:
    """The handle returned by ``TokenFilter.apply``; use it as a context manager."""

    def __init__(self, config: TokenFilter, model: nn.Module) -> None:
        self.config = config
        self.model = model
        self.layers = decoder_layers(model)
        self.attention = attention_layers(model)  # what the family says of each layer's attention
        self.num_layers = len(self.layers)
        self.flops = FlopModel.from_config(model.config)
        self._units = decision_units(config, self.flops.kv_heads)  # decision units per token
        self._windows = [a.window for a in self.attention]
        self.schedule, self.targets = layer_targets(config, self.num_layers)
        self.plans = {i: LayerPlan.build(config, i, self.attention[i], t) for i, t in self.targets.items()}
        self.call: CallContext | None = None
        self._handles: list = []
        self._patched: list[nn.Module] = []
        self._generator = torch.Generator().manual_seed(config.seed)
        self.reset_stats()

    @property
    def filtered_layers(self) -> list[int]:
        return sorted(self.targets)

    # -- install / remove ------------------------------------------------------------------------------
    def __enter__(self) -> FilterRun:
        if getattr(self.model, _RUN_ATTR, None) is not None:
            raise RuntimeError("Token Filtering is already applied to this model; exit the other `with` block first.")
        try:
            for idx in self.filtered_layers:
                layer, plan = self.layers[idx], self.plans[idx]
                self._patch(layer.self_attn, FilteredAttention(self, plan, self.attention[idx]))
                if plan.skip_mlp:
                    self._patch(layer.mlp, FilteredMLP(self, idx, layer.mlp))
            decoder = self.model.get_decoder() if hasattr(self.model, "get_decoder") else self.model
            self._signature = inspect.signature(decoder.forward)
            self._handles.append(decoder.register_forward_pre_hook(self._before_call, with_kwargs=True))
            self._handles.append(decoder.register_forward_hook(self._after_call, always_call=True))
            setattr(self.model, _RUN_ATTR, self)
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._remove()

    def _patch(self, module: nn.Module, forward: object) -> None:
        module.forward = forward  # instance attribute shadows the class's forward
        self._patched.append(module)

    def _remove(self) -> None:
        for module in self._patched:
            module.__dict__.pop("forward", None)
        self._patched.clear()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.call = None
        if getattr(self.model, _RUN_ATTR, None) is self:
            delattr(self.model, _RUN_ATTR)

    # -- per call ----------------------------------------------------------------------------------------
    def _before_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        bound = self._signature.bind_partial(*args, **kwargs).arguments
        ids, embeds = bound.get("input_ids"), bound.get("inputs_embeds")
        ref = ids if ids is not None else embeds
        if ref is None:
            return
        b, t = ref.shape[:2]
        if b == 0 or t == 0:
            raise ValueError("The input is empty: give at least one token per sequence.")
        cache = cache_argument(bound)
        past = cache.get_seq_length() if cache is not None else 0
        mask = bound.get("attention_mask")
        if mask is not None and not isinstance(mask, torch.Tensor):
            mask = None if not self.targets else _raise_mask()
        if mask is not None and mask.dim() != 2:
            if self.targets:
                _raise_mask()
            mask = None
        if mask is None:
            real = torch.ones(b, t, dtype=torch.bool, device=ref.device)
            seen = past + torch.arange(1, t + 1, device=ref.device).expand(b, t)
            all_real = True
        else:
            real = mask[:, -t:].bool()
            all_real = None
            seen = mask.long().cumsum(-1)[:, -t:] if mask.shape[1] >= t else None
            if seen is None or mask.shape[1] < past + t:  # mask covers only this chunk: past assumed real
                seen = past + mask[:, -t:].long().cumsum(-1)
        if past == 0:
            self._decisions, self._scores = [], []
        tokens = int(real.sum())
        if cache is None and mask is not None and mask.shape[1] > t and self.targets:
            raise RuntimeError(
                "This call continues a sequence (its attention_mask is longer than its input) but carries no cache: "
                "Token Filtering needs the cache of the earlier calls (pass past_key_values/cache, use_cache=True)."
            )
        all_real = all_real or tokens == b * t
        aligned = all_real or not bool((~real[:, :-1] & real[:, 1:]).any())  # no real token after a padding one
        self.call = CallContext(real=real, all_real=all_real, aligned=aligned, cache=cache, past=past)
        self._call_decisions, self._call_scores = {}, {}
        if past == 0:
            self._held_dense = {}
        dense = _dense_call(set(self._windows), seen, real, mask, past, self._held_dense)
        for idx, c in enumerate(self._counts):
            dense_pairs, dense_held = dense[self._windows[idx]]
            c.tokens += tokens
            c.pairs_dense += dense_pairs
            c.kv_dense += dense_held
            if idx in self.targets:
                c.kv_held += tokens  # the call's entries; record_layer takes off those the layer drops
            else:
                c.pairs += dense_pairs
                c.kv_held += dense_held

    def _after_call(self, module: nn.Module, args: tuple, output: object) -> None:
        if self.call is not None and self.config.record_decisions:
            b, t = self.call.real.shape
            shape = (b, t) if self._units == 1 else (b, self._units, t)
            none = torch.zeros(shape, dtype=torch.bool, device=self.call.real.device)
            nan = torch.full(shape, float("nan"), device=self.call.real.device)
            self._decisions.append([self._call_decisions.get(i, none) for i in range(self.num_layers)])
            self._scores.append([self._call_scores.get(i, nan) for i in range(self.num_layers)])
        self.call = None

    def record_layer(
        self,
        idx: int,
        n_filtered: int,
        pairs: torch.Tensor | int,
        dropped: int,
        qo_skipped: int,
        filtered: torch.Tensor | None = None,
        scores: torch.Tensor | None = None,
        held: int | None = None,
    ) -> None:
        """One layer's call: the decisions that filtered, the pairs attended and the entries dropped from the layer's
        cache in this call, the tokens that skipped their Q/O projections; with ``record_decisions``, the decisions
        ``filtered`` and ``scores`` ``[B, T]`` (``[B, H, T]`` per KV head). Per KV head, the decisions, pairs and
        entries are one head's: each counts ``1 / H`` of a token's (the counts may then be fractions). ``held``: the
        most entries the layer's store held for one sequence after a call so far (a budget's; None: not tracked)."""
        n_pairs = int(pairs)
        if self._units > 1:
            n_filtered, n_pairs, dropped = n_filtered / self._units, n_pairs / self._units, dropped / self._units
        c = self._counts[idx]
        c.filtered += n_filtered
        c.pairs += n_pairs
        c.kv_dropped += dropped
        c.kv_held -= dropped
        c.qo_skipped += qo_skipped
        if held is not None:
            c.peak_held = max(c.peak_held or 0, held)
        if self.plans[idx].skip_mlp:
            c.mlp_skipped += n_filtered
        if self.config.record_decisions:
            self._call_decisions[idx] = filtered.detach().clone()
            self._call_scores[idx] = scores.detach().clone()

    @property
    def generator(self) -> torch.Generator:
        """The run's seeded CPU generator (``seed``), for scores that draw."""
        return self._generator

    # -- results -------------------------------------------------------------------------------------------
    def reset_stats(self) -> None:
        self._counts = [LayerCounts() for _ in range(self.num_layers)]
        self._held_dense: dict[int | None, int] = {}  # per window: real entries a dense layer holds now, all rows
        self._decisions: list[list[torch.Tensor]] = []
        self._scores: list[list[torch.Tensor]] = []
        self._call_decisions: dict[int, torch.Tensor] = {}
        self._call_scores: dict[int, torch.Tensor] = {}

    @property
    def stats(self) -> FilterStats:
        param = next(self.model.parameters())
        return FilterStats.from_counts(self.flops, self._counts, param.element_size())

    @property
    def decisions(self) -> list[torch.Tensor]:
        """Per layer, ``[batch, seq]`` bool (True = filtered; ``[batch, kv_heads, seq]`` with ``granularity="head"``)
        for the latest sequence (prompt + decoded)."""
        return self._concat(self._decisions)

    @property
    def scores(self) -> list[torch.Tensor]:
        """Per layer, ``[batch, seq]`` float32 scores (NaN for padding and for layers that never filter; ``[batch,
        kv_heads, seq]`` with ``granularity="head"``)."""
        return self._concat(self._scores)

    def _concat(self, calls: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        if not self.config.record_decisions:
            raise RuntimeError("Decisions were not recorded: use TokenFilter(..., record_decisions=True).")
        if not calls:
            return []
        return [torch.cat([call[i] for call in calls], dim=-1) for i in range(self.num_layers)]


def _dense_call(
    windows: set[int | None], seen: torch.Tensor, real: torch.Tensor, mask: torch.Tensor | None, past: int,
    held: dict[int | None, int],
) -> dict[int | None, tuple[int, int]]:
    """What the unmodified model does in this call, per layer window (None: full attention): the (query, key) pairs it
    attends, and the entries its cache gains, over all rows. ``seen``: ``[B, T]`` real tokens up to each column;
    ``held``: per window, the entries held after the previous call, updated here."""
    tokens, out = int(real.sum()), {}
    for window in windows:
        pairs = int(((seen.clamp(max=window) if window else seen) * real).sum())
        if window is None:
            out[window] = (pairs, tokens)
            continue
        after = _dense_held(mask, real.shape[0], past, real.shape[1], window)
        out[window] = (pairs, after - held.get(window, 0))
        held[window] = after
    return out


def _dense_held(mask: torch.Tensor | None, b: int, past: int, t: int, window: int) -> int:
    """Real entries, over the ``b`` rows, that the unmodified model's cache of a sliding-window layer holds after this
    call: the real tokens among the last ``window - 1`` columns (transformers keeps those; the next token reads them
    and itself). ``mask``: ``[B, columns]``, this call's or the whole sequence's (None: every column real)."""
    keep = window - 1
    if keep <= 0:
        return 0
    if mask is None:
        return b * min(past + t, keep)
    held = int(mask[:, -keep:].sum())
    if mask.shape[1] < past + t:  # the mask covers only this call: the earlier columns are real
        held += b * min(past, max(keep - mask.shape[1], 0))
    return held


def _raise_mask() -> None:
    raise ValueError(
        "Token Filtering needs a 2D attention_mask [batch, length] (1 = real token); "
        "a 4D or custom mask is not supported."
    )
