"""An independent, deliberately slow implementation of the SPEC's scoring, decisions and KV-side reading.

It walks each sequence token by token in plain Python/torch (double precision), with no code shared with the
package: anchors, per-head cosine, head fusion, warm-up, padding, the ratio and threshold rules (the prefill's
top-k and the decode's running quantile), the scores ``similarity`` (the SPEC's EMA anchor), ``cumulative-mean``
and ``two-horizon`` (the lower of the two, the default), the uniform schedule, and the KV side's visibility rule
(``readable(t, j) = in_window and (stored(j) or t - j < recent or j < sinks)``) applied in a whole-model forward
(``oracle_forward``) whose filtered layers attend token by token.
"""

from __future__ import annotations

import math

import torch

from masked_eager import layer_window, project

LOOP_SCORES = ("similarity", "cumulative-mean", "two-horizon")


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a @ b) / max(float(a.norm() * b.norm()), 1e-8))


def _fuse(sk: list[float], sv: list[float], fusion: str, lam: float, eps: float = 1e-6) -> float:
    h = len(sk)
    mk, mv = sum(sk) / h, sum(sv) / h
    if fusion == "mean":
        return (mk + mv) / 2
    if fusion == "key":
        return mk
    if fusion == "value":
        return mv
    if fusion == "min":  # per part, the most novel head; then the mean of the key and value parts
        return (min(sk) + min(sv)) / 2
    if fusion == "key-min":
        return min(sk)
    assert fusion == "variance", fusion
    dk = math.sqrt(sum((x - mk) ** 2 for x in sk) / h)
    dv = math.sqrt(sum((x - mv) ** 2 for x in sv) / h)
    ik, iv = 1 / (dk * dk + eps), 1 / (dv * dv + eps)
    wk = ik / (ik + iv)
    return wk * (mk - lam * dk) + (1 - wk) * (mv - lam * dv)


class LoopScorer:
    """One layer's score for one sequence, fed its real tokens one at a time (``k, v``: ``[H, d]``).

    ``similarity``: cosine to the EMA anchor before the token's update (the first token's anchor is itself);
    ``cumulative-mean``: cosine to the mean of every earlier real token (the first token: to itself);
    ``two-horizon``: the lower of the two fused scores.
    """

    def __init__(self, score: str = "similarity", gamma: float = 0.9, fusion: str = "variance", lam: float = 1.0):
        assert score in LOOP_SCORES, score
        self.score, self.gamma, self.fusion, self.lam = score, gamma, fusion, lam
        self.ak = self.av = None  # EMA anchors
        self.sum_k = self.sum_v = None  # sums of every earlier real token
        self.n = 0

    def _fused(self, k: torch.Tensor, v: torch.Tensor, ak: torch.Tensor, av: torch.Tensor) -> float:
        sk = [_cos(k[h], ak[h]) for h in range(k.shape[0])]
        sv = [_cos(v[h], av[h]) for h in range(v.shape[0])]
        return _fuse(sk, sv, self.fusion, self.lam)

    def __call__(self, k: torch.Tensor, v: torch.Tensor) -> float:
        k, v = k.double(), v.double()
        if self.n == 0:
            self.ak, self.av = k.clone(), v.clone()
            self.sum_k, self.sum_v = torch.zeros_like(k), torch.zeros_like(v)
        ema = self._fused(k, v, self.ak, self.av)
        mean_k, mean_v = (k, v) if self.n == 0 else (self.sum_k / self.n, self.sum_v / self.n)
        cum = self._fused(k, v, mean_k, mean_v)
        self.ak = self.gamma * self.ak + (1 - self.gamma) * k
        self.av = self.gamma * self.av + (1 - self.gamma) * v
        self.sum_k, self.sum_v = self.sum_k + k, self.sum_v + v
        self.n += 1
        return {"similarity": ema, "cumulative-mean": cum, "two-horizon": min(ema, cum)}[self.score]


def loop_scores(keys, values, real, gamma=0.9, fusion="variance", lam=1.0, score="similarity"):
    """``keys, values``: ``[B, T, H, d]``; ``real``: ``[B, T]`` -> scores ``[B][T]`` (None for padding)."""
    out = []
    for b in range(keys.shape[0]):
        scorer = LoopScorer(score, gamma, fusion, lam)
        out.append([scorer(keys[b, t], values[b, t]) if real[b, t] else None for t in range(keys.shape[1])])
    return out


def loop_decisions(scores, warmup, *, tau=None, ratio=None):
    """Threshold rule (``tau``) or prefill ratio rule (``ratio``), token by token / row by row."""
    out = []
    for row in scores:
        real_idx = 0
        eligible = []
        for t, s in enumerate(row):
            if s is None:
                continue
            if real_idx >= warmup:
                eligible.append((s, t))
            real_idx += 1
        filtered = set()
        if tau is not None:
            filtered = {t for s, t in eligible if s > tau}
        else:
            n_real = sum(s is not None for s in row)
            k = min(len(eligible), int(torch.round(torch.tensor(ratio * n_real)).item()))
            filtered = {t for _, t in sorted(eligible, key=lambda p: -p[0])[:k]}
        out.append([t in filtered for t in range(len(row))])
    return out


# -- the rules of a whole run: schedule, decode decisions, visibility -------------------------------------------
def uniform_schedule(ratio: float, layers: int, start: int, cap: float) -> list[float]:
    """SPEC "Where and when", the uniform schedule: the same ratio on every layer from ``start`` on, with mean
    ``ratio`` over all layers; the start moves one layer earlier while the cap cannot reach it."""
    while start > 0 and (layers - start) * cap < ratio * layers - 1e-12:
        start -= 1
    per_layer = ratio * layers / (layers - start)
    return [per_layer if i >= start and ratio > 0 else 0.0 for i in range(layers)]


def loop_quantile(values: list[float], level: float) -> float:
    """The ``level`` quantile of ``values`` with linear interpolation (NaN when empty)."""
    if not values:
        return math.nan
    s = sorted(values)
    rank = level * (len(s) - 1)
    lo, hi = math.floor(rank), math.ceil(rank)
    return s[lo] + (s[hi] - s[lo]) * (rank - lo)


def loop_run_decisions(row: list[float | None], prompt_len: int, warmup: int, *, ratio=None, tau=None) -> list[bool]:
    """One sequence's decisions at one layer over a prefill of its first ``prompt_len`` columns, then one decode
    step per later column: threshold mode ``s > tau``; ratio mode the prefill's top ``round(ratio * n_real)``
    eligible scores, then, per step, ``s >`` a quantile of every earlier eligible score whose level the decode
    controller sets from the filtered tokens so far (``decode_controller``)."""
    if tau is not None:
        return loop_decisions([row], warmup, tau=tau)[0]
    out = loop_decisions([row[:prompt_len]], warmup, ratio=ratio)[0]
    real_idx = sum(s is not None for s in row[:prompt_len])
    n_filtered = sum(out)
    history = [s for s in row[:prompt_len] if s is not None][warmup:]  # the eligible ones: real, past warm-up
    for s in row[prompt_len:]:
        assert s is not None, "decode steps are real tokens"
        eligible = real_idx >= warmup
        decision = decode_controller(s, eligible, history, n_filtered, real_idx, ratio)
        out.append(decision)
        n_filtered += decision
        if eligible:
            history.append(s)
        real_idx += 1
    return out


def decode_controller(s, eligible, history, n_filtered, n_real, ratio, horizon=32, above=2, below=8) -> bool:
    """One decode decision: ``excess`` is how many more tokens were filtered than ``ratio`` of the ``n_real`` real
    tokens so far; the quantile level moves by ``excess / horizon`` (aiming at a ratio the excess pays back), and
    the excess never leaves ``[-below, above]``: a token is kept when filtering it would pass ``above``, and
    filtered (if eligible) when keeping it would pass ``-below``."""
    excess = n_filtered - ratio * n_real
    aim = min(max(ratio - excess / horizon, 0.0), 1.0)
    tau = loop_quantile(history, 1 - aim)
    decision = eligible and not math.isnan(tau) and s > tau
    kept_excess = excess - ratio  # after this token, if it is kept
    if kept_excess + 1 > above:
        decision = False
    if kept_excess < -below:
        decision = eligible
    return decision


def readable(t_col, t_idx, j_col, j_idx, j_filtered, *, recent, sinks, window) -> bool:
    """SPEC "Recent window": the query of real token t reads the key of real token j (``idx``: index among the
    sequence's real tokens; ``col``: column, padding included) iff j is not after t, inside the model's own
    window (columns), and j is kept, or among the ``recent`` latest real tokens (t's own included), or a sink."""
    if j_col > t_col or (window is not None and t_col - j_col >= window):
        return False
    return (not j_filtered) or t_idx - j_idx < recent or j_idx < sinks


def oracle_forward(model, ids, mask, prompt_len, *, ratio_per_layer=None, tau_per_layer=None, recent, warmup,
                   score, gamma, fusion, lam, pre_rope=True):
    """The KV-side filter (``skip="none"``, ``kv="drop"``) of a whole run, recomputed in one forward of the full
    sequence ``ids`` ``[B, T]`` (left-padded by ``mask``; columns from ``prompt_len`` on are decode steps):
    every filtered layer's attention is replaced by a per-token loop that scores (pre-RoPE keys), decides
    (``loop_run_decisions``) and lets each real query read the keys ``readable`` allows, in double precision.

    Returns ``(logits [B, T, V], scores {layer: [B][T] float | None}, decisions {layer: [B][T] bool})``. Only
    the real positions' logits mean anything. The model's own layers run with ``use_cache=False``."""
    targets = ratio_per_layer if ratio_per_layer is not None else tau_per_layer
    layers = model.get_decoder().layers
    real = mask.bool()
    idx_of = (mask.long().cumsum(-1) - 1).tolist()
    scores: dict[int, list] = {}
    decisions: dict[int, list] = {}

    def make_forward(layer: int, attn: torch.nn.Module):
        def forward(hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
            b, t, _ = hidden_states.shape
            d = attn.head_dim
            window = layer_window(model, layer)
            q, k, v, q_rot, k_rot = project(attn, hidden_states, position_embeddings)  # rotated: [B, H, T, d]
            groups = q_rot.shape[1] // k_rot.shape[1]
            out = torch.zeros(b, t, q_rot.shape[1], d, dtype=torch.float64)
            layer_scores, layer_dec = [], []
            for row in range(b):
                scorer = LoopScorer(score, gamma, fusion, lam)
                key_for_score = k[row] if pre_rope else k_rot[row].transpose(0, 1)
                s_row = [scorer(key_for_score[c], v[row, c]) if real[row, c] else None for c in range(t)]
                rule = dict(ratio=targets[layer]) if ratio_per_layer is not None else dict(tau=targets[layer])
                f_row = loop_run_decisions(s_row, prompt_len, warmup, **rule)
                layer_scores.append(s_row)
                layer_dec.append(f_row)
                for tc in range(t):  # each real query, over the keys the rule lets it read
                    if not real[row, tc]:
                        continue
                    cols = [jc for jc in range(tc + 1) if real[row, jc] and readable(
                        tc, idx_of[row][tc], jc, idx_of[row][jc], f_row[jc],
                        recent=recent, sinks=warmup, window=window)]
                    keys = k_rot[row][:, cols].double().repeat_interleave(groups, dim=0)  # [Hq, n, d]
                    vals = v[row, cols].transpose(0, 1).double().repeat_interleave(groups, dim=0)
                    logits = (keys @ q_rot[row, :, tc].double()[:, :, None])[..., 0] * attn.scaling  # [Hq, n]
                    out[row, tc] = (torch.softmax(logits, dim=-1)[:, :, None] * vals).sum(1)
            scores[layer], decisions[layer] = layer_scores, layer_dec
            o = out.to(hidden_states.dtype).reshape(b, t, -1)
            return attn.o_proj(o), None

        return forward

    patched = []
    try:
        for layer, target in enumerate(targets):
            if target is None or (ratio_per_layer is not None and target == 0):  # a layer that never filters
                continue
            attn = layers[layer].self_attn
            attn.forward = make_forward(layer, attn)
            patched.append(attn)
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            out = model(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    finally:
        for attn in patched:
            attn.__dict__.pop("forward", None)
    return out, scores, decisions
