"""FLOP model of a Llama-style decoder and the statistics a run reports.

FLOPs count multiply-adds as 2. Per real token and layer: Q and O projections ``2·2·D·Hq·d``; K and V
projections ``2·2·D·Hkv·d``; gated MLP ``3·2·D·I``. Per (query, key) pair attended: ``2·2·Hq·d`` (scores and
weighted sum). Once per token: the LM head ``2·D·V``. Norms, RoPE, softmax and the scoring are ignored.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class FlopModel:
    hidden: int
    q_heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    layers: int

    @classmethod
    def from_config(cls, config: object) -> FlopModel:
        hidden = config.hidden_size
        q_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or hidden // q_heads
        return cls(
            hidden=hidden,
            q_heads=q_heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or q_heads,
            head_dim=head_dim,
            intermediate=config.intermediate_size,
            vocab=config.vocab_size,
            layers=config.num_hidden_layers,
        )

    @property
    def qo_proj(self) -> int:
        return 4 * self.hidden * self.q_heads * self.head_dim

    @property
    def kv_proj(self) -> int:
        return 4 * self.hidden * self.kv_heads * self.head_dim

    @property
    def per_pair(self) -> int:
        return 4 * self.q_heads * self.head_dim

    @property
    def mlp(self) -> int:
        return 6 * self.hidden * self.intermediate

    @property
    def lm_head(self) -> int:
        return 2 * self.hidden * self.vocab

    def kv_entry_bytes(self, element_size: int) -> int:
        """Bytes of one token's key and value in one layer."""
        return 2 * self.kv_heads * self.head_dim * element_size


def layer_flop_fraction(config: object, seq_len: int) -> float:
    """Fraction of a causal forward's FLOPs over ``seq_len`` tokens spent in one decoder layer."""
    fm = FlopModel.from_config(config)
    pairs = seq_len * (seq_len + 1) / 2
    layer = seq_len * (fm.qo_proj + fm.kv_proj + fm.mlp) + pairs * fm.per_pair
    return layer / (fm.layers * layer + seq_len * fm.lm_head)


@dataclass
class LayerCounts:
    """What one layer did, accumulated over calls (real tokens only). With per-KV-head decisions a head's entry or
    pair counts ``1 / H`` of a token's, so ``filtered``, ``pairs`` and ``kv_dropped`` may be fractions."""

    tokens: int = 0  # real tokens seen
    filtered: int | float = 0  # of those, filtered (skipped their attention, or on the KV side: not kept as keys)
    pairs: int | float = 0  # (query, key) pairs actually attended, each once
    pairs_dense: int = 0  # pairs the unmodified model attends
    kv_dropped: int | float = 0  # entries dropped from this layer's cache (when they are dropped: a band delays it)
    # entries the unmodified model's cache holds after each sequence's latest call (on a sliding-window layer the
    # latest window - 1 tokens only), and those this layer's cache holds (tokens less kv_dropped where it filters)
    kv_dense: int = 0
    kv_held: int | float = 0
    mlp_skipped: int = 0  # tokens whose MLP was skipped (skip="block")
    qo_skipped: int = 0  # tokens whose Q and O projections were skipped (the query side; not skip="none")
    peak_held: int | None = None  # under a KV budget: the most entries held for one sequence after a call

    def add(self, other: dict) -> None:
        """Add another run's counts (``asdict`` of a ``LayerCounts``): sums, and the larger ``peak_held``."""
        for name, value in other.items():
            if name == "peak_held":
                if value is not None:
                    self.peak_held = max(self.peak_held or 0, value)
            else:
                setattr(self, name, getattr(self, name) + value)


@dataclass
class FilterStats:
    """Summary of a run. Fractions are of the unmodified model's FLOPs on the same inputs."""

    ratio: float
    ratio_per_layer: list[float]
    tokens: int
    attention_flops_skipped: float
    total_flops_skipped: float
    kv_bytes_saved: int
    kv_bytes_dense: int
    flops_dense: float
    flops_actual: float
    # KV held as a share of dense over all layers (unfiltered ones included): the entries still in the caches
    # after the latest call of each sequence (kept, plus filtered ones a recent band still reads)
    kv_held_fraction: float = 1.0
    # attention (query, key) pairs computed, each once, as a share of the unmodified model's, over all layers:
    # on the KV side this, not the ratio, is the attention saved (nothing is saved while a prompt fits the band)
    pairs_fraction: float = 1.0
    layers: list[LayerCounts] = field(repr=False, default_factory=list)

    @property
    def peak_held_per_layer(self) -> list[int | None]:
        """Under a KV budget (``TokenFilter(budget=N)``): per layer, the most entries its cache held for one sequence
        after any call (at most N); None for a layer without a budget."""
        return [c.peak_held for c in self.layers]

    @property
    def kv_saved_fraction(self) -> float:
        return self.kv_bytes_saved / self.kv_bytes_dense if self.kv_bytes_dense else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["kv_saved_fraction"] = self.kv_saved_fraction
        return d

    @classmethod
    def from_counts(cls, fm: FlopModel, layers: list[LayerCounts], kv_elem_bytes: int) -> FilterStats:
        tokens = layers[0].tokens if layers else 0
        attn_dense = attn_actual = other_dense = other_actual = 0.0
        for c in layers:
            attn_dense += c.tokens * (fm.qo_proj + fm.kv_proj) + c.pairs_dense * fm.per_pair
            attn_actual += (c.tokens - c.qo_skipped) * fm.qo_proj + c.tokens * fm.kv_proj + c.pairs * fm.per_pair
            other_dense += c.tokens * fm.mlp
            other_actual += (c.tokens - c.mlp_skipped) * fm.mlp
        head = tokens * fm.lm_head
        dense = attn_dense + other_dense + head
        actual = attn_actual + other_actual + head
        entry = fm.kv_entry_bytes(kv_elem_bytes)
        total_filtered = sum(c.filtered for c in layers)
        kv_dense = sum(c.kv_dense for c in layers) * entry
        kv_saved = round(sum(c.kv_dense - c.kv_held for c in layers) * entry)  # below 0 where a layer holds more
        pairs_dense = sum(c.pairs_dense for c in layers)
        return cls(
            ratio=total_filtered / (tokens * len(layers)) if tokens else 0.0,
            ratio_per_layer=[c.filtered / c.tokens if c.tokens else 0.0 for c in layers],
            tokens=tokens,
            attention_flops_skipped=1 - attn_actual / attn_dense if attn_dense else 0.0,
            total_flops_skipped=1 - actual / dense if dense else 0.0,
            kv_bytes_saved=kv_saved,
            kv_bytes_dense=kv_dense,
            flops_dense=dense,
            flops_actual=actual,
            kv_held_fraction=1 - kv_saved / kv_dense if kv_dense else 1.0,
            pairs_fraction=sum(c.pairs for c in layers) / pairs_dense if pairs_dense else 1.0,
            layers=[LayerCounts(**asdict(c)) for c in layers],
        )
