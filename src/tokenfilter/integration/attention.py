"""The layer path of a filtered layer, installed in place of ``self_attn.forward``; one path for prefill and decode.

Shapes: B batch, T tokens in this call, D hidden size, H/Hq key-value/query heads, d head dim.

Per call, for one layer (its options resolved once in its ``LayerPlan``, ``integration/plan.py``):
1. project: K and V for every token (the decision needs them), through the layer's ``LayerAttention``
   (``integration/families.py``: separate or fused projections, the family's k-norm if any);
2. score: against the score's running memory (pre- or post-RoPE keys); the first ``warmup`` real tokens of a row
   are not eligible;
3. decide: the plan's ``Rule`` (ratio or threshold; a budget decides nothing here: its store evicts) -> filtered;
   the ``Visibility`` says which tokens read and which are stored;
4. store: keys (with RoPE) and values of the stored tokens go into the layer's ``FilteredCacheLayer``; on the KV
   side its ring slides over the call's real tokens (the recent band's entries), unless the ring holds no entry only
   the band reads, before the call or after it (then every entry of it is dead, wherever it sits);
5. attend: the plan's backend (``integration/backends/``) computes the attention of the reading tokens;
6. record: the counts (filtered, pairs attended, entries dropped, Q/O projections skipped), once.

A decode step with one real token per row, every row past warm-up (``lean``), takes the same path with shortcuts
that compute the same numbers: the score's one-token step, no compaction, the history's insertion instead of a
sort, one host sync for the counts, the store's one-column append (its columns and lengths written when first read),
and the backend's one-query attention. The rope tables are built once per forward call, for every layer.

With per-KV-head decisions (``granularity="head"``) steps 1-4 run on rows that are (sequence, KV head) pairs
holding one head each (``integration/units.py``); only the queries and the output are reshaped around attention.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import transformers

from tokenfilter.algorithm.scores import ScoreState
from tokenfilter.integration.backends import Reading
from tokenfilter.integration.backends.kernels import compact_order, gather_rows
from tokenfilter.integration.cache_args import cache_argument
from tokenfilter.integration.cache_layer import FilteredCacheLayer, layer_state
from tokenfilter.integration.families import LayerAttention
from tokenfilter.integration.kv_store import RecentRing
from tokenfilter.integration.plan import LayerPlan

if TYPE_CHECKING:
    from tokenfilter.integration.run import CallContext, FilterRun


RopeTables = tuple[torch.Tensor, torch.Tensor]


def rope_tables(cos: torch.Tensor, sin: torch.Tensor) -> RopeTables:
    """``cos, sin``: ``[B, T, r]`` -> what ``rope`` multiplies by: ``cos`` and ``sin`` with its first half negated,
    each ``[B, T, 1, r]``. Computed once per forward call and shared by every filtered layer (``CallContext.rotary``):
    they do not depend on the layer."""
    half = sin.shape[-1] // 2
    signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    return cos.unsqueeze(2), signed.unsqueeze(2)


def rope(x: torch.Tensor, tables: RopeTables) -> torch.Tensor:
    """RoPE as the supported families apply it, ``x * cos + rotate_half(x) * sin``, in fewer operators: with ``h``
    half the rotated dimensions, ``rotate_half(x) = roll(x, h) * [-1, 1]``, and the sign is in the table (a sign
    flip is exact, so the numbers are the model's own). ``x``: ``[B, T, H, d]``; ``tables`` from ``rope_tables``:
    the first ``r`` dimensions of each head rotate, the rest pass unchanged (partial rotary, Phi-3's
    ``partial_rotary_factor``; ``r == d`` elsewhere)."""
    cos, sin = tables
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return (x * cos) + (x.roll(r // 2, -1) * sin)
    turned, passed = x[..., :r], x[..., r:]
    return torch.cat(((turned * cos) + (turned.roll(r // 2, -1) * sin), passed), dim=-1)


def _pads_after_real(real: torch.Tensor, idx: torch.Tensor) -> torch.Tensor | None:
    """``[B, T]``: padding columns after a real token of their row (right padding), or None where there is none.
    The unmodified model computes them (``generate`` reads a right-padded row's next token from its last column),
    so the backends do too (``Reading.pads``); padding before a row's first token stays 0."""
    pads = ~real & (idx >= 0)
    return pads if bool(pads.any()) else None


class FilteredAttention:
    """Replacement forward for one layer's attention module (see the module docstring); also the ``Projections``
    its backend calls."""

    def __init__(self, run: FilterRun, plan: LayerPlan, attn: LayerAttention) -> None:
        self.run, self.plan, self.attn, self.idx = run, plan, attn, plan.index
        self.scale = attn.scale

    def __call__(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: object,
    ) -> tuple[torch.Tensor, None]:
        plan, call = self.plan, self.run.call
        vis, units = plan.vis, plan.units
        cache = self._cache(kwargs)
        k, v, real, cos, sin, tables = self._project(hidden_states, position_embeddings)
        b, t = real.shape
        state = self._state(cache, b, hidden_states.device)
        decoding = t == 1 and state.columns > 0
        lean = decoding and self._is_lean(state)
        k_rot = rope(k, tables if units.per == 1 else (units.rows(tables[0]), units.rows(tables[1])))
        # [B] each row's real tokens before this call (scoring counts this call's); a lean step counts its token
        # after storing it and reads this only where it needs it (most steps do not: no operator)
        seen = None if lean else state.real_seen
        scores, eligible = self._score(k if plan.pre_rope else k_rot, v, real, state, lean)
        filtered = plan.rule.decide(scores, eligible, real, state.history, decoding)
        n_filtered = int(filtered if filtered.numel() == 1 else filtered.sum())  # one host sync
        # the tokens kept (a lean step's tokens are all real)
        keep = real if n_filtered == 0 else ~filtered if lean else real & ~filtered
        readers, stored = vis.readers(real, keep), vis.stored(real, keep)
        n_unstored = 0 if vis.filtered_stored else n_filtered  # real tokens whose entry is not stored for good
        n_unread = 0 if vis.filtered_reads else n_filtered  # tokens that skip Q, attention and O (per token)

        fresh = state.kv.empty
        evicted_before = state.kv.evicted
        held_before = state.ring.held if state.ring is not None else 0
        cols, idx, band = store_call(state, call, k_rot, v, real, seen, stored, scores, n_unstored, lean, held_before)
        if lean:
            state.advance_real(1, plan.warmup)
        # an entry not stored for good is dropped when it leaves the ring (at once without a band)
        dropped = held_before + n_unstored - (state.ring.held if state.ring is not None else 0)
        state.columns += t

        pads = None if call.all_real else _pads_after_real(real, idx)
        reading = Reading(hidden_states, cos, sin, readers, stored, cols, idx, band, fresh, lean, b - n_unread, pads,
                          band_live=held_before + n_unstored if band is not None else 0, aligned=call.aligned,
                          all_read=call.all_real and n_unread == 0)
        out, pairs, selection = plan.backend.attend(reading, self, vis, units, state.kv)
        call.keep[self.idx] = (units.any_unit(readers if pads is None else readers | pads), selection)
        evicted = state.kv.evicted - evicted_before  # a budget's evictions: entries no longer held
        if vis.window is not None and vis.slots is None:  # entries the model's window has passed leave the store,
            first = state.columns - (vis.window - 1)  # as the unmodified model's cache keeps the latest window - 1
            if first > state.kv.horizon:
                dropped += state.kv.evict_before(first)
        self.run.record_layer(
            self.idx, n_filtered + evicted, pairs, dropped + evicted, n_unread,
            filtered=units.per_sequence(filtered), scores=units.per_sequence(scores), held=state.kv.peak_held,
        )
        return out, None

    # -- the Projections its backend calls ---------------------------------------------------------------
    def queries(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``h``: ``[B, Q, D]`` -> queries with RoPE ``[B, Hq, Q, d]``."""
        return rope(self.attn.queries(h), self.run.call.tables(cos, sin)).transpose(1, 2)

    def output(self, o: torch.Tensor) -> torch.Tensor:
        """``[B, Hq, Q, d]`` -> ``[B, Q, D]``."""
        return self.attn.output(o.transpose(1, 2).reshape(o.shape[0], o.shape[2], -1))

    # -- the steps -------------------------------------------------------------------------------------------
    def _project(
        self, h: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, ...]:
        """``(k, v [rows, T, H / per, d], real [rows, T], cos, sin [B, T, r], their rope tables)``: rows per
        ``Units``."""
        units = self.plan.units
        cos, sin, tables = self.run.call.rope(*position_embeddings, h.shape[0])
        k, v = self.attn.keys_values(h)  # the family's projections: keys before RoPE
        return units.kv(k), units.kv(v), units.rows(self.run.call.real), cos, sin, tables

    def _is_lean(self, state: FilteredCacheLayer) -> bool:
        """A decode step the lean branch computes: every row's token real and past warm-up, every stored entry in
        the model's window, a backend that has the branch."""
        vis = self.plan.vis
        # past the window: every stored entry is in it when the store has evicted up to the new token's window
        # (and the band fits in it)
        in_window = vis.window is None or state.columns < vis.window or (
            vis.slots is None and vis.recent <= vis.window and state.kv.horizon >= state.columns - vis.window + 1)
        return (
            self.plan.backend.lean
            and self.run.call.all_real
            and state.min_real_seen >= self.plan.warmup
            and in_window
        )

    def _score(
        self, k: torch.Tensor, v: torch.Tensor, real: torch.Tensor, state: FilteredCacheLayer, lean: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scores ``[B, T]`` (NaN for padding) and eligibility ``[B, T]`` (None: every token is; lean only);
        advances the score's memory and (but on a lean step) the count of real tokens."""
        if lean:  # its token is counted after it is stored (``__call__``)
            return self._score_step(k, v, state)[:, None], None
        b, t = real.shape
        warmup, seen = self.plan.warmup, state.real_seen
        if self.run.call.all_real:  # no padding: the tokens are already left-aligned, nothing to gather
            scores = self.plan.score(k, v, self._score_state(state, None))
            state.advance_real(t, warmup)  # every row gained t real tokens
            return scores, seen[:, None] + torch.arange(t, device=k.device)[None, :] >= warmup
        aligned = self.run.call.aligned
        order, valid, n = compact_order(real, aligned)
        if n == 0:
            nan = torch.full((b, t), float("nan"), device=k.device)
            return nan, torch.zeros(b, t, dtype=torch.bool, device=k.device)
        k, v = gather_rows(k, order, aligned), gather_rows(v, order, aligned)  # the real tokens, left-aligned
        s = self.plan.score(k, v, self._score_state(state, valid))
        index = seen[:, None] + torch.arange(n, device=k.device)[None, :]
        state.advance_real(valid.sum(-1), warmup)
        scores = torch.full((b, t), float("nan"), device=k.device)
        eligible = torch.zeros(b, t, dtype=torch.bool, device=k.device)
        scores.scatter_(1, order, s.masked_fill(~valid, float("nan")))
        eligible.scatter_(1, order, valid & (index >= warmup))
        return scores, eligible

    def _score_step(self, k: torch.Tensor, v: torch.Tensor, state: FilteredCacheLayer) -> torch.Tensor:
        """Scores ``[B]`` of one real token per row: the score's decode step where it has one, else the score."""
        score = self.plan.score
        if score.step is not None:
            scores = score.step(k, v, self._score_state(state, None, step=True))
            if scores is not None:
                return scores
        return score(k, v, self._score_state(state, None))[:, 0]

    def _score_state(self, state: FilteredCacheLayer, valid: torch.Tensor | None, step: bool = False) -> ScoreState:
        """What the layer's score reads; a decode ``step`` reads no counts (``StepFn``), so they are not settled
        for it."""
        return ScoreState(valid=valid, seen=None if step else state.real_seen, memory=state.score_memory,
                          generator=self.run.generator, params=self.plan.score_params)

    # -- state -----------------------------------------------------------------------------------------------
    def _cache(self, kwargs: dict) -> object | None:
        cache = cache_argument(kwargs)
        if cache is None and self.run.call.cache is not None:
            raise RuntimeError(
                f"Layer {self.idx}'s attention received no cache although the model was given one: this "
                f"transformers version ({transformers.__version__}) passes it in a way Token Filtering does not "
                "know; install a transformers version that tokenfilter supports (see pyproject.toml)."
            )
        return cache

    def _state(self, cache: object | None, rows: int, device: torch.device) -> FilteredCacheLayer:
        call = self.run.call
        return layer_state(cache, self.idx, call.transient, self._new_layer, rows, device, call.past)

    def _new_layer(self) -> FilteredCacheLayer:
        plan = self.plan
        ring = None if plan.ring is None else RecentRing(plan.ring, with_values=plan.backend.ring_values)
        return FilteredCacheLayer(new_kv=plan.backend.new_kv, ring=ring, units=plan.units)


def store_call(
    state: FilteredCacheLayer, call: CallContext, k_rot: torch.Tensor, v: torch.Tensor, real: torch.Tensor,
    seen: torch.Tensor | None, stored: torch.Tensor, scores: torch.Tensor, n_unstored: int, lean: bool,
    held_before: int,
) -> tuple[torch.Tensor | None, torch.Tensor | None, tuple[torch.Tensor, ...] | None]:
    """Step 4 of a filtered layer's call: write its stored entries (``k_rot, v``: ``[B, T, H, d]``; ``seen`` ``[B]``
    each row's real tokens before the call, None on a lean step: read from the state where needed) and slide the
    ring; returns ``(cols [T],
    idx [B, T], band)``: the call's columns, each token's index among its row's real tokens and the band's
    sources (``RecentRing.extend``; None without a band, and all three None on a lean step that needs none)."""
    b, t = real.shape
    if lean:  # one column per row, [B, H, d], stored without a host sync
        state.kv.append_one(k_rot[:, 0], v[:, 0], state.columns, stored, b - n_unstored)
    # a call that leaves nothing only the band reads, as before it, need not slide the ring: its entries are all
    # dead, and a dead entry is never read whatever its place (a lean step then needs no columns or indices)
    quiet = held_before == 0 and n_unstored == 0
    if lean and quiet:
        return None, None, None
    cols = state.columns + torch.arange(t, device=real.device)
    idx = state.real_seen[:, None] if lean else seen[:, None] + real.long().cumsum(-1) - 1
    k_rot, v = k_rot.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, d]
    if not lean:
        n_store = b * t - n_unstored if call.all_real else None  # every token real: the count is known
        state.kv.append(k_rot, v, cols, stored, real=real, idx=idx, n_store=n_store, scores=scores)
    band = None if quiet else advance_ring(state, call, k_rot, v, cols, idx, real, stored)
    return cols, idx, band


def advance_ring(
    state: FilteredCacheLayer,
    call: CallContext,
    k: torch.Tensor,
    v: torch.Tensor,
    cols: torch.Tensor,
    idx: torch.Tensor,
    real: torch.Tensor,
    stored: torch.Tensor,
) -> tuple[torch.Tensor, ...] | None:
    """Slide the layer's ring over this call's real tokens (``k, v``: ``[B, H, T, d]``; the rest ``[B, T]``,
    ``cols`` ``[T]``); return the band's sources (``RecentRing.extend``), or None without a band."""
    ring = state.ring
    if ring is None:
        return None
    b, t = real.shape
    if call.all_real:  # already left-aligned: nothing to gather
        return ring.extend(k, v, cols.expand(b, t), idx, ~stored, None)
    aligned = call.aligned
    order, valid, _ = compact_order(real, aligned)
    live = gather_rows(real & ~stored, order, aligned) & valid
    k_c = v_c = None
    if ring.with_values:
        k_c = gather_rows(k.transpose(1, 2), order, aligned).transpose(1, 2)
        v_c = gather_rows(v.transpose(1, 2), order, aligned).transpose(1, 2)
    return ring.extend(k_c, v_c, cols[order], idx.gather(1, order), live, valid.sum(-1))
