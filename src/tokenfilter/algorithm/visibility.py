"""Who may read whom at one filtered layer (SPEC: "What a filtered token skips", "KV-side filtering",
"Recent window"), as one small frozen object that the attention executes without knowing option names
(``integration/plan.py`` builds it from the options).

Two position systems: ``col`` is the column of the call sequence (padding included; the model's own sliding
window counts columns, as the unmodified model does), ``idx`` is the index among the sequence's real tokens
(what warm-up and the recent band count: padding never counts).

The rule, for the query of real token t and the key of real token j at one layer:
    readable(t, j) = in_window(t, j) and (stored(j) or t - j < recent or j < sinks)
where ``in_window`` is causality plus the model's own window, ``stored(j)`` says j's entry is kept in the
layer's cache (kept, or any real token with ``kv="keep"``), and only *readers* compute attention at all.

With a KV budget (``slots`` set: ``TokenFilter(budget=N)``, ``slots = N - sinks - (recent - 1)``) nothing is decided
when a token arrives; ``stored(j)`` is read at the time of the query instead:
    stored_at(t, j) = sinks <= j <= t - recent and j is among the ``slots`` least redundant such keys
(lowest score first; between equal scores the newer key stays, so equal scores give StreamingLLM's window). It is
what holding at most N entries and evicting the most redundant one whenever a key leaves the band gives, online:
evicted keys never come back, and the ``slots`` lowest of a growing set only ever lose members. After a call, a
layer holds the sinks, the last ``recent - 1`` real tokens and ``stored_at(next, .)`` for the row's next token:
at most N entries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Visibility:
    """The read rule of one layer.

    Attributes:
        filtered_reads: a filtered token still computes its attention (KV side, ``skip="none"``); False: the
            paper's query-side reading, where it skips its Q projection, attention and O projection.
        filtered_stored: a filtered token's key and value stay readable by later tokens (``kv="keep"``).
        recent: the band: key j is readable by query t when ``0 <= t - j < recent`` (real tokens), whatever
            j's decision; 0 = no band. KV side without a window is ``recent=1`` (a token reads its own key).
        sinks: the first ``sinks`` real tokens (the warm-up) are readable by every later query. They are never
            filtered, so they are always stored too; the term states the rule rather than relying on it.
        window: the model's own sliding window in columns (None: full attention); it applies on top of all
            the rest, so a band wider than it acts as it.
        slots: with a KV budget, the entries held besides the sinks and the band (``stored_at`` above); None
            without one.
    """

    filtered_reads: bool
    filtered_stored: bool
    recent: int
    sinks: int
    window: int | None
    slots: int | None = None

    @property
    def ring(self) -> int:
        """How many of the latest real tokens a layer must hold beyond its stored entries, after a call: a
        later query t reads non-stored keys j with ``t - j < recent``, i.e. the last ``recent - 1`` before it."""
        return max(self.recent - 1, 0)

    @property
    def stored_are_readers(self) -> bool:
        """True when the stored entries are exactly the tokens that read, whatever the decisions."""
        return not self.filtered_reads and not self.filtered_stored

    # -- per token ---------------------------------------------------------------------------------------
    def readers(self, real: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` bool: the tokens that compute Q, attention and the O projection."""
        return real if self.filtered_reads else keep

    def stored(self, real: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` bool: the tokens whose entry is kept in the layer's cache for good."""
        return real if self.filtered_stored else keep

    # -- per (query, key) pair ---------------------------------------------------------------------------
    def in_window(self, q_col: torch.Tensor, k_col: torch.Tensor) -> torch.Tensor:
        """Causality and the model's own window. ``q_col``: ``[B, Q, 1]``; ``k_col``: ``[B, 1, K]`` (or any
        broadcastable shapes) -> ``[B, Q, K]`` bool."""
        ok = k_col <= q_col
        if self.window is not None:
            ok = ok & (k_col > q_col - self.window)
        return ok

    def in_band(self, q_idx: torch.Tensor, k_idx: torch.Tensor) -> torch.Tensor:
        """The recent band by real-token index (same broadcasting as ``in_window``)."""
        gap = q_idx - k_idx
        return (gap >= 0) & (gap < self.recent)

    def allowed(
        self,
        q_col: torch.Tensor,
        q_idx: torch.Tensor,
        k_col: torch.Tensor,
        k_idx: torch.Tensor,
        k_real: torch.Tensor,
        k_stored: torch.Tensor | None,
        k_score: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The whole rule over every column (the reference path). Queries ``[B, Q]``, keys ``[B, K]`` ->
        ``[B, Q, K]`` bool; whether the query reads at all is ``readers``, applied by the caller. With a budget,
        ``k_stored`` is not read: ``k_score`` ``[B, K]`` (the keys' scores) decides ``stored_at``."""
        budget = self.slots is not None
        k_stored = self.held_slots(q_idx, k_idx, k_score, k_real) if budget else k_stored[:, None, :]
        q_col, q_idx = q_col[:, :, None], q_idx[:, :, None]
        k_col, k_idx = k_col[:, None, :], k_idx[:, None, :]
        extra = self.in_band(q_idx, k_idx) | (k_idx < self.sinks)
        return self.in_window(q_col, k_col) & k_real[:, None, :] & (k_stored | extra)

    # -- with a KV budget ------------------------------------------------------------------------------------
    def held_slots(
        self, q_idx: torch.Tensor, k_idx: torch.Tensor, k_score: torch.Tensor, k_real: torch.Tensor
    ) -> torch.Tensor:
        """``stored_at(t, j)`` for queries ``q_idx`` ``[B, Q]`` and keys ``k_idx, k_score, k_real`` ``[B, K]``
        (real-token indices, scores, real) -> ``[B, Q, K]`` bool. The keys need not be every key of the row: any
        set that holds the ``slots`` kept before the first query and every key that arrived since gives the same
        answer."""
        k = k_idx[:, None, :]
        cand = k_real[:, None, :] & (k >= self.sinks) & (k <= q_idx[:, :, None] - self.recent)
        order = keep_order(k_score, k_idx)[:, None, :].expand_as(cand)  # least redundant first
        ranked = cand.gather(2, order)
        before = ranked.long().cumsum(-1) - ranked.long()  # candidates ranked ahead of each key
        return torch.zeros_like(cand).scatter_(2, order, ranked & (before < self.slots))

    def held_at(
        self, q_idx: torch.Tensor, k_idx: torch.Tensor, k_score: torch.Tensor, k_real: torch.Tensor
    ) -> torch.Tensor:
        """With a budget: the keys a layer holds when the real token ``q_idx`` ``[B, Q]`` arrives (the sinks, the band
        before it and ``stored_at``): keys ``[B, K]`` -> ``[B, Q, K]`` bool, at most ``sinks + recent - 1 + slots``
        per query."""
        q, k = q_idx[:, :, None], k_idx[:, None, :]
        before = k_real[:, None, :] & (k < q)
        slots = self.held_slots(q_idx, k_idx, k_score, k_real)
        return before & ((k < self.sinks) | (q - k < self.recent) | slots)

    def held(
        self, next_idx: torch.Tensor, k_idx: torch.Tensor, k_score: torch.Tensor, k_real: torch.Tensor
    ) -> torch.Tensor:
        """``held_at`` for one token per row, each row's next ``next_idx`` ``[B]`` -> ``[B, K]``."""
        return self.held_at(next_idx[:, None], k_idx, k_score, k_real)[:, 0]


def keep_order(score: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``[B, K]`` -> the permutation ``[B, K]`` that lists each row's keys least redundant first: by score ascending
    (NaN last), between equal scores the newer (larger ``idx``) first."""
    by_age = idx.argsort(dim=-1, descending=True, stable=True)
    s = score.float().nan_to_num(nan=float("inf")).gather(-1, by_age)
    return by_age.gather(-1, s.argsort(dim=-1, stable=True))
