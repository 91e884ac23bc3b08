"""What the options mean for each layer, resolved once: the only code that reads ``TokenFilter``'s option strings.

``layer_targets`` says which layers filter and how much (schedule, or thresholds); ``LayerPlan.build`` turns the
options into the objects the layer path executes without knowing any option name: the decision ``Rule``, the
``Visibility`` (who reads whom), the decision ``Units`` (token, or KV head), the ``Score`` with its parameters,
the attention backend, and whether the MLP is skipped too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tokenfilter.algorithm.decisions import Rule
from tokenfilter.algorithm.schedule import Schedule, first_layer, resolve
from tokenfilter.algorithm.scores import SCORES, Score
from tokenfilter.algorithm.visibility import Visibility
from tokenfilter.integration.backends import AttentionBackend, backend_for
from tokenfilter.integration.families import LayerAttention
from tokenfilter.integration.units import Units

if TYPE_CHECKING:
    from tokenfilter.config import TokenFilter


def layer_targets(cfg: TokenFilter, num_layers: int) -> tuple[Schedule | None, dict[int, float]]:
    """The resolved schedule (ratio mode) and ``{layer: its ratio or threshold}`` for the layers that filter."""
    if not cfg.enabled:
        return None, {}
    if cfg.mode == "budget":
        return None, {i: float(cfg.budget) for i in range(first_layer(cfg.start_layer, num_layers), num_layers)}
    if cfg.mode == "ratio":
        sched = resolve(cfg.schedule, cfg.ratio, num_layers, cfg.start_layer, cfg.max_layer_ratio)
        return sched, {i: r for i, r in enumerate(sched.ratios) if r > 0}
    start = first_layer(cfg.start_layer, num_layers)
    if isinstance(cfg.threshold, int | float):
        taus = {i: float(cfg.threshold) for i in range(start, num_layers)}
    else:
        given = list(cfg.threshold)
        if len(given) != num_layers:
            raise ValueError(f"Give one threshold per layer ({num_layers} for this model), got {len(given)}.")
        taus = {i: float(t) for i, t in enumerate(given) if t is not None}
    # "score > +inf" never holds: such a layer can filter nothing, so it keeps its own code (no scoring at all),
    # unless the scores are to be recorded
    return None, {i: t for i, t in taus.items() if t != float("inf") or cfg.record_decisions}


def decision_units(cfg: TokenFilter, kv_heads: int) -> int:
    """Decision units per token: 1, or the KV heads with ``granularity="head"``."""
    return kv_heads if cfg.granularity == "head" else 1


@dataclass(frozen=True)
class LayerPlan:
    """Everything one filtered layer executes."""

    index: int
    rule: Rule
    vis: Visibility
    units: Units
    score: Score
    score_params: dict[str, Any]
    pre_rope: bool  # score the keys before RoPE
    warmup: int  # the first real tokens of each row are never filtered
    backend: AttentionBackend
    skip_mlp: bool  # a token that does not read skips the MLP too (skip="block")
    record: bool  # keep every decision and score (record_decisions)

    @classmethod
    def build(cls, cfg: TokenFilter, index: int, attn: LayerAttention, target: float) -> LayerPlan:
        kv_side = cfg.skip == "none"
        recent = (cfg.window or 1) if kv_side else 0
        if attn.window is not None and cfg.mode != "budget":
            # a band wider than the layer's own window reads no more than the window (a real-token gap never exceeds
            # its column gap), so it is the window: the ring then holds no entry the model would have let go
            recent = min(recent, attn.window)
        vis = Visibility(
            filtered_reads=kv_side,
            filtered_stored=cfg.kv == "keep",
            recent=recent,
            sinks=cfg.warmup,
            window=attn.window,  # the layer's own window (its family's rule: every layer, or its layer type)
            slots=cfg.budget - cfg.warmup - ((cfg.window or 1) - 1) if cfg.mode == "budget" else None,
        )
        units = Units(per=decision_units(cfg, attn.kv_heads))
        score = SCORES[cfg.score]
        return cls(
            index=index,
            rule=Rule(cfg.mode, target),
            vis=vis,
            units=units,
            score=score,
            score_params={name: getattr(cfg, name) for name in score.params},
            pre_rope=cfg.pre_rope,
            warmup=cfg.warmup,
            backend=backend_for(cfg.path, units, vis),
            skip_mlp=cfg.skip == "block",
            record=cfg.record_decisions,
        )

    @property
    def ring(self) -> int | None:
        """Size of the layer's recent ring (KV side), or None without a band (or with a budget: its store holds
        the band)."""
        return self.vis.ring if self.vis.recent and self.vis.slots is None else None
