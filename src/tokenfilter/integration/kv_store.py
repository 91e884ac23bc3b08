"""Key/value storage of one filtered layer for one batch of sequences.

Two layouts, same interface, so the attention code does not care which one it reads:

* ``RaggedKV`` (fast path): each sequence keeps only its stored entries, left-aligned in a
  ``[B, H_kv, capacity, d]`` buffer with per-sequence ``lengths`` (the varlen idea in a padded tensor).
  Appends write in place; the buffer grows by a quarter (at least 16 entries) when full, so decoding does not
  reallocate every step and the slack stays bounded. Python mirrors of the longest/shortest row and the
  total (``max_len``, ``min_len``, ``total``) let the decode step avoid host syncs and masks.
* ``MaskedKV`` (reference path): every column is stored, plus a ``[B, S]`` validity mask, which tokens are
  real and their index among the real tokens (what the recent band counts).
* ``BudgetKV`` (a layer under a KV budget, fast path): only the entries the layer holds now, unordered.

Every store counts the entries it ``evicted`` (a budget's; 0 for the others, whose drops the layer path counts from
its decisions) and the most a row held after a call (``peak_held``; None where it is not tracked). On a layer with
its own sliding window, ``RaggedKV`` and ``MaskedKV`` drop what the window has passed (``evict_before``, which the
layer path calls after every call that moves the window past an entry, and counts).

``RecentRing`` (KV side) holds what only the recent band may still read: the entries of the last R - 1 real
tokens of each sequence, flagged ``live`` where the token is not stored for good (filtered).
"""

from __future__ import annotations

import torch


class _Settled:
    """An attribute of ``RaggedKV`` (held as ``_name``) that settles the store's deferred decode steps before it is
    read or written."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = "_" + name

    def __get__(self, obj: RaggedKV | None, owner: type | None = None) -> torch.Tensor | None:
        if obj is None:
            return self
        obj._settle()
        return getattr(obj, self.slot)

    def __set__(self, obj: RaggedKV, value: torch.Tensor) -> None:
        obj._settle()
        setattr(obj, self.slot, value)


class RaggedKV:
    evicted = 0
    peak_held: int | None = None
    horizon = 0  # every entry before this column has been evicted (the model's window passed it)
    pos = _Settled()  # [B, cap] column index of each entry
    lengths = _Settled()  # [B] entries each row holds

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None  # [B, H, cap, d]
        self.values: torch.Tensor | None = None
        self._pos: torch.Tensor | None = None
        self._lengths: torch.Tensor | None = None
        self.max_len = 0  # Python mirrors of lengths.max(), lengths.min(), lengths.sum() (always exact)
        self.min_len = 0
        self.total = 0
        # decode steps every row stored at the same slot, in consecutive slots and columns from (slot, column), not
        # yet written into _pos and _lengths: a lean step writes only the keys and values, and the first reader of
        # ``pos`` or ``lengths`` settles the run in two operators
        self._run = (0, 0, 0)  # (first slot, first column, steps)

    def _settle(self) -> None:
        slot, col, steps = self._run
        if steps:
            self._run = (0, 0, 0)
            self._pos[:, slot : slot + steps] = torch.arange(col, col + steps, device=self._pos.device)
            self._lengths = self._lengths + steps

    def _init(self, b: int, h: int, d: int, like_k: torch.Tensor, like_v: torch.Tensor) -> None:
        if self.keys is None:
            self.keys = like_k.new_empty(b, h, 0, d)
            self.values = like_v.new_empty(b, h, 0, d)
            self.pos = torch.empty(b, 0, dtype=torch.long, device=like_k.device)
            self.lengths = torch.zeros(b, dtype=torch.long, device=like_k.device)

    def _reserve(self, need: int) -> None:
        b, h, cap, d = self.keys.shape
        if need <= cap:
            return
        grow = max(need, cap + max(cap // 4, 16)) - cap
        if cap == 0:  # the first entries: nothing to copy
            self.keys, self.values = self.keys.new_zeros(b, h, grow, d), self.values.new_zeros(b, h, grow, d)
            self.pos = self.pos.new_zeros(b, grow)
            return
        self.keys = torch.cat([self.keys, self.keys.new_zeros(b, h, grow, d)], dim=2)
        self.values = torch.cat([self.values, self.values.new_zeros(b, h, grow, d)], dim=2)
        self.pos = torch.cat([self.pos, self.pos.new_zeros(b, grow)], dim=1)

    def _mirror(self) -> None:
        if self.lengths.numel():
            self.max_len, self.min_len, self.total = torch.stack(
                [self.lengths.max(), self.lengths.min(), self.lengths.sum()]
            ).tolist()
        else:
            self.max_len = self.min_len = self.total = 0

    def append(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        cols: torch.Tensor,
        store: torch.Tensor,
        real: torch.Tensor | None = None,
        idx: torch.Tensor | None = None,
        n_store: int | None = None,
        scores: torch.Tensor | None = None,
    ) -> None:
        """``k, v``: ``[B, H, T, d]``; ``cols``: ``[T]``; ``store``: ``[B, T]`` bool (entries to keep).
        ``real, idx`` are what the masked layout records; this one keeps only the stored entries (a decode step's
        one column: ``append_one``). ``n_store``: how many entries ``store`` holds, when the caller knows it."""
        b, h, t, d = k.shape
        self._init(b, h, d, k, v)
        start, aligned, before, old_lengths = self.max_len, self.max_len == self.min_len, self.total, self.lengths
        if n_store == b * t:  # every column of every row (the caller counted them): no count to take
            self.lengths = old_lengths + t
            self.max_len, self.min_len, self.total = self.max_len + t, self.min_len + t, self.total + b * t
        else:
            self.lengths = old_lengths + store.sum(-1)
            self._mirror()
        self._reserve(self.max_len)
        if aligned and self.total - before == b * t:  # every row stores every column at the same offset
            self.keys[:, :, start : start + t] = k
            self.values[:, :, start : start + t] = v
            self.pos[:, start : start + t] = cols
            return
        dest = old_lengths[:, None] + store.long().cumsum(-1) - 1  # [B, T]
        bi, ti = store.nonzero(as_tuple=True)
        di = dest[bi, ti]
        self.keys[bi, :, di] = k[bi, :, ti]
        self.values[bi, :, di] = v[bi, :, ti]
        self.pos[bi, di] = cols[ti]

    def append_one(self, k: torch.Tensor, v: torch.Tensor, col: int, store: torch.Tensor, n_store: int) -> None:
        """One new column (a decode step). ``k, v``: ``[B, H, d]``; ``store``: ``[B]`` or ``[B, 1]`` bool (read only
        when some row does not store); ``n_store``: how many rows store (known to the caller, so no host sync is
        needed).

        Rows that do not store get the entry written just past their end, where it is never read (``view``
        and ``lean_view`` stop at each row's length) and the next stored entry overwrites it.
        """
        if n_store == 0:
            return
        b, h, d = k.shape
        self._init(b, h, d, k, v)
        self._reserve(self.max_len + 1)
        if n_store == b and self.max_len == self.min_len:  # every row stores at the same offset: a slice
            at = self.max_len
            self.keys[:, :, at] = k
            self.values[:, :, at] = v
            slot, first, steps = self._run
            if not (steps and slot + steps == at and first + steps == col):
                self._settle()
                slot, first, steps = at, col, 0
            self._run = (slot, first, steps + 1)  # its column and length are written when first read
            self.max_len, self.min_len, self.total = self.max_len + 1, self.min_len + 1, self.total + b
            return
        rows = torch.arange(b, device=k.device)
        lengths = self.lengths
        self.keys[rows, :, lengths] = k
        self.values[rows, :, lengths] = v
        self.pos[rows, lengths] = col
        if n_store == b:
            self.lengths = lengths + 1
            self.max_len, self.min_len, self.total = self.max_len + 1, self.min_len + 1, self.total + b
        else:
            self.lengths = lengths + store.long().view(b)
            self._mirror()

    @property
    def empty(self) -> bool:
        """Nothing stored yet (in any row)."""
        return self.total == 0

    def view(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(keys [B,H,L,d], values, pos [B,L], valid [B,L])`` with L the longest sequence's length."""
        n = self.max_len
        valid = torch.arange(n, device=self.pos.device)[None, :] < self.lengths[:, None]
        return self.keys[:, :, :n], self.values[:, :, :n], self.pos[:, :n], valid

    def lean_view(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(keys [B,H,L,d], values, mask)``: ``mask`` is None when every row has L entries, else the
        ``[B, 1, 1, L]`` bool mask of the valid entries (for one query per row)."""
        n = self.max_len
        mask = None
        if self.min_len != n:
            mask = (torch.arange(n, device=self.lengths.device)[None, :] < self.lengths[:, None])[:, None, None, :]
        return self.keys[:, :, :n], self.values[:, :, :n], mask

    def lean_view_with_band(
        self, band_keys: torch.Tensor, band_values: torch.Tensor, live: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A lean step's keys over the stored entries and a recent band at once, when every row holds L entries
        (``min_len == max_len``). ``band_keys, band_values``: ``[B, H, S, d]``, ``live``: ``[B, S]`` (the band's
        entries only the band reads). The band is written into the free slots just past the stored entries (the next
        append overwrites them), so one attention call reads both: ``(keys [B, H, L + S, d], values, mask [B, 1, 1,
        L + S])``, the mask True on the stored entries and the live band entries."""
        n, s = self.max_len, band_keys.shape[2]
        self._reserve(n + s)
        self.keys[:, :, n : n + s] = band_keys
        self.values[:, :, n : n + s] = band_values
        mask = live.new_ones(live.shape[0], n + s)
        mask[:, n:] = live
        return self.keys[:, :, : n + s], self.values[:, :, : n + s], mask[:, None, None, :]

    def evict_before(self, first: int) -> int:
        """Drop every entry of a column before ``first`` (no later query reads it: the model's window has passed it).
        Each row's entries are in column order, so its dead entries are its first ones: when every row drops as many
        the buffers become a view past them, else they are gathered into smaller ones. Returns how many left."""
        self.horizon = first
        if self.keys is None or self.total == 0:
            return 0
        n = self.max_len
        dead = ((self.pos[:, :n] < first) & (torch.arange(n, device=self.pos.device) < self.lengths[:, None])).sum(-1)
        worst, least, gone = torch.stack([dead.max(), dead.min(), dead.sum()]).tolist()
        if worst == 0:
            return 0
        self.lengths = self.lengths - dead
        self._mirror()
        if worst == least:  # every row drops its first `worst` entries: a view (the next growth frees the rest)
            self.keys, self.values, self.pos = self.keys[:, :, worst:], self.values[:, :, worst:], self.pos[:, worst:]
            return gone
        cap = self.max_len + max(self.max_len // 4, 16)
        at = (dead[:, None] + torch.arange(cap, device=dead.device)).clamp(max=self.keys.shape[2] - 1)  # [B, cap]
        g = at[:, None, :, None].expand(-1, self.keys.shape[1], -1, self.keys.shape[3])
        self.keys, self.values, self.pos = self.keys.gather(2, g), self.values.gather(2, g), self.pos.gather(1, at)
        return gone

    def stored_entries(self) -> int:
        return self.total if self.lengths is not None else 0

    def allocated_bytes(self) -> int:
        if self.keys is None:
            return 0
        return self.keys.untyped_storage().nbytes() + self.values.untyped_storage().nbytes()

    def select_batch(self, index: torch.Tensor) -> None:
        if self.keys is not None:
            self.keys, self.values = self.keys[index], self.values[index]
            self.pos, self.lengths = self.pos[index], self.lengths[index]
            self._mirror()


class MaskedKV:
    horizon = 0  # every column before this one has been evicted (the model's window passed it)

    def __init__(self) -> None:
        self.evicted = 0  # a budget's (its backend counts them, and the entries held now)
        self.held_total = 0
        self.peak_held: int | None = None
        self.keys: torch.Tensor | None = None  # [B, H, S, d]
        self.values: torch.Tensor | None = None
        self.cols: torch.Tensor | None = None  # [S]
        self.valid: torch.Tensor | None = None  # [B, S] stored for good
        self.real: torch.Tensor | None = None  # [B, S] a real token (not padding)
        self.idx: torch.Tensor | None = None  # [B, S] index among the sequence's real tokens
        self.scores: torch.Tensor | None = None  # [B, S] each token's score (NaN: none given)

    def append(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        cols: torch.Tensor,
        store: torch.Tensor,
        real: torch.Tensor | None = None,
        idx: torch.Tensor | None = None,
        n_store: int | None = None,
        scores: torch.Tensor | None = None,
    ) -> None:
        """``k, v``: ``[B, H, T, d]``; ``cols``: ``[T]``; ``store, real, idx, scores``: ``[B, T]`` (every column is
        kept; ``real`` defaults to ``store`` and ``idx`` to the column)."""
        real = store if real is None else real
        idx = cols[None, :].expand_as(store) if idx is None else idx
        scores = torch.full(store.shape, float("nan"), device=store.device) if scores is None else scores.float()
        if self.keys is None:
            self.keys, self.values, self.cols, self.valid, self.real, self.idx = k, v, cols, store, real, idx
            self.scores = scores
            return
        self.scores = torch.cat([self.scores, scores], dim=1)
        self.keys = torch.cat([self.keys, k], dim=2)
        self.values = torch.cat([self.values, v], dim=2)
        self.cols = torch.cat([self.cols, cols])
        self.valid = torch.cat([self.valid, store], dim=1)
        self.real = torch.cat([self.real, real], dim=1)
        self.idx = torch.cat([self.idx, idx], dim=1)

    @property
    def empty(self) -> bool:
        """No column written yet."""
        return self.keys is None

    def view(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.keys, self.values, self.cols[None, :].expand_as(self.valid), self.valid

    def view_all(self) -> tuple[torch.Tensor, ...]:
        """``(keys [B,H,S,d], values, cols [B,S], stored [B,S], real [B,S], idx [B,S])``: every column."""
        return self.keys, self.values, self.cols[None, :].expand_as(self.valid), self.valid, self.real, self.idx

    def evict_before(self, first: int) -> int:
        """Drop the columns before ``first`` (the model's window has passed them). Returns how many stored entries
        left with them."""
        self.horizon = first
        if self.keys is None:
            return 0
        n = int((self.cols < first).sum())  # columns are in order
        if n == 0:
            return 0
        gone = int(self.valid[:, :n].sum())
        self.keys, self.values = self.keys[:, :, n:].clone(), self.values[:, :, n:].clone()
        self.cols, self.scores = self.cols[n:], self.scores[:, n:]
        self.valid, self.real, self.idx = self.valid[:, n:], self.real[:, n:], self.idx[:, n:]
        return gone

    def stored_entries(self) -> int:
        return int(self.valid.sum()) if self.valid is not None else 0

    def allocated_bytes(self) -> int:
        if self.keys is None:
            return 0
        return (self.keys.numel() + self.values.numel()) * self.keys.element_size()

    def select_batch(self, index: torch.Tensor) -> None:
        if self.keys is not None:
            self.keys, self.values, self.valid = self.keys[index], self.values[index], self.valid[index]
            self.real, self.idx, self.scores = self.real[index], self.idx[index], self.scores[index]


class BudgetKV:
    """What a layer under a KV budget holds (``Visibility.held``): per row its held entries, left-aligned in any order
    (attention does not care), ``keys, values`` ``[B, H, L, d]`` with ``cols, idx, score, valid`` ``[B, L]`` (column,
    real-token index, score on arrival, a held entry), and ``seen`` ``[B]`` the row's real tokens so far.

    ``append`` only stages a call's tokens (``pending``); the budget backend attends over the held entries and the
    staged ones, then keeps what ``Visibility.held`` keeps (``hold``), counting what left (``evicted``)."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.cols: torch.Tensor | None = None
        self.idx: torch.Tensor | None = None
        self.score: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None
        self.seen: torch.Tensor | None = None
        self.pending: tuple[torch.Tensor, ...] | None = None
        self.total = 0  # entries held, all rows (Python)
        self.evicted = 0
        self.peak_held: int | None = 0

    def append(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        cols: torch.Tensor,
        store: torch.Tensor,
        real: torch.Tensor | None = None,
        idx: torch.Tensor | None = None,
        n_store: int | None = None,
        scores: torch.Tensor | None = None,
    ) -> None:
        """Stage a call: ``k, v`` ``[B, H, T, d]``, ``cols`` ``[T]``, ``real, idx, scores`` ``[B, T]``."""
        real = store if real is None else real
        if self.keys is None:
            b, h, _, d = k.shape
            self.keys, self.values = k.new_empty(b, h, 0, d), v.new_empty(b, h, 0, d)
            self.cols = torch.empty(b, 0, dtype=torch.long, device=k.device)
            self.idx, self.valid = self.cols.clone(), torch.empty(b, 0, dtype=torch.bool, device=k.device)
            self.score = torch.empty(b, 0, device=k.device)
            self.seen = torch.zeros(b, dtype=torch.long, device=k.device)
        self.pending = (k, v, cols, real, idx, scores.float())

    def hold(self, keep: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, cols: torch.Tensor,
             idx: torch.Tensor, score: torch.Tensor, capacity: int = 0) -> None:
        """Keep the entries ``keep`` ``[B, P]`` of a pool (``keys, values`` ``[B, H, P, d]``, the rest ``[B, P]``),
        left-aligned in buffers of at least ``capacity`` slots (the free ones ``valid`` False)."""
        # here, not at the top: the backends package imports this module
        from tokenfilter.integration.backends.kernels import compact_order

        order, self.valid, n = compact_order(keep)
        g = order[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[3])
        self.keys, self.values = keys.gather(2, g), values.gather(2, g)
        self.cols, self.idx, self.score = cols.gather(1, order), idx.gather(1, order), score.gather(1, order)
        if n < capacity:  # free slots, so that a decode step writes in place
            extra = capacity - n
            for name in ("keys", "values"):
                t = getattr(self, name)
                setattr(self, name, torch.cat([t, t.new_zeros(t.shape[0], t.shape[1], extra, t.shape[3])], dim=2))
            for name in ("cols", "idx", "score", "valid"):
                t = getattr(self, name)
                setattr(self, name, torch.cat([t, t.new_zeros(t.shape[0], extra)], dim=1))
        self.total = int(self.valid.sum())
        self.peak_held = max(self.peak_held or 0, n)

    @property
    def empty(self) -> bool:
        return self.total == 0

    def stored_entries(self) -> int:
        return self.total

    def allocated_bytes(self) -> int:
        if self.keys is None:
            return 0
        return (self.keys.numel() + self.values.numel()) * self.keys.element_size()

    def select_batch(self, index: torch.Tensor) -> None:
        if self.keys is not None:
            for name in ("keys", "values", "cols", "idx", "score", "valid", "seen"):
                setattr(self, name, getattr(self, name)[index])
            self.total = int(self.valid.sum())


class RecentRing:
    """The last ``size`` real tokens of each sequence, oldest first, for the recent band (KV side).

    ``keys, values``: ``[B, H, size, d]`` (only with ``with_values``: the reference path reads its keys from
    ``MaskedKV`` and needs only the flags, for the counts); ``cols, idx``: ``[B, size]`` column and real-token
    index; ``live``: ``[B, size]`` True where the slot holds a token that is *not* stored for good (filtered), so
    that only the band reads it. A slot that leaves the ring is dropped; ``held`` counts the live slots (KV held).
    Slots of kept tokens hold a copy the band never reads (``live`` False): the ring is a fixed ``size`` buffer.
    """

    def __init__(self, size: int, with_values: bool = True) -> None:
        self.size, self.with_values = size, with_values
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.cols: torch.Tensor | None = None
        self.idx: torch.Tensor | None = None
        self.live: torch.Tensor | None = None
        self.held = 0  # Python mirror of live.sum()

    def _init(self, b: int, k: torch.Tensor | None, v: torch.Tensor | None, device: torch.device) -> None:
        if self.live is not None:
            return
        m = self.size
        self.cols = torch.full((b, m), -(2**40), dtype=torch.long, device=device)  # before everything
        self.idx = self.cols.clone()
        self.live = torch.zeros(b, m, dtype=torch.bool, device=device)
        if self.with_values:
            self.keys = k.new_zeros(b, k.shape[1], m, k.shape[3])
            self.values = v.new_zeros(b, v.shape[1], m, v.shape[3])

    def extend(
        self,
        k: torch.Tensor | None,
        v: torch.Tensor | None,
        cols: torch.Tensor,
        idx: torch.Tensor,
        live: torch.Tensor,
        counts: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Add a call's real tokens and slide the ring past them.

        ``k, v``: ``[B, H, N, d]`` (or None without values), ``cols, idx, live``: ``[B, N]``, left-aligned: row b's
        first ``counts[b]`` entries are its real tokens in order, the rest padding (``live`` False there); ``counts``
        None: every entry of every row is real.
        Returns the band's sources, the ring before the call followed by the call's tokens: ``(keys [B, H,
        size + N, d], values, cols [B, size + N], idx, live)``; the real token at compacted position i of the call
        reads positions ``i .. i + size`` of them (itself last).
        """
        b, n = live.shape
        self._init(b, k, v, live.device)
        src_cols = torch.cat([self.cols, cols], dim=1)
        src_idx = torch.cat([self.idx, idx], dim=1)
        src_live = torch.cat([self.live, live], dim=1)
        src_k = src_v = None
        if self.with_values:
            src_k, src_v = torch.cat([self.keys, k], dim=2), torch.cat([self.values, v], dim=2)
        if self.size and counts is None:  # the newest entries are the last ``size`` of every row: a slice
            self.cols, self.idx, self.live = src_cols[:, n:], src_idx[:, n:], src_live[:, n:]
            if self.with_values:  # a copy after a long call, so that the view does not keep all of it alive
                self.keys, self.values = src_k[:, :, n:], src_v[:, :, n:]
                if n > self.size:
                    self.keys, self.values = self.keys.clone(), self.values.clone()
            self.held = int(self.live.sum())
        elif self.size:
            at = counts[:, None] + torch.arange(self.size, device=live.device)[None, :]  # [B, size]: the newest
            self.cols, self.idx, self.live = src_cols.gather(1, at), src_idx.gather(1, at), src_live.gather(1, at)
            if self.with_values:
                g = at[:, None, :, None].expand(-1, src_k.shape[1], -1, src_k.shape[3])
                self.keys, self.values = src_k.gather(2, g), src_v.gather(2, g)
            self.held = int(self.live.sum())
        return src_k, src_v, src_cols, src_idx, src_live

    def select_batch(self, index: torch.Tensor) -> None:
        if self.live is not None:
            for name in ("keys", "values", "cols", "idx", "live"):
                t = getattr(self, name)
                if t is not None:
                    setattr(self, name, t[index])
            self.held = int(self.live.sum())
