"""Equal budgets: the press compression ratio that holds the same KV as a Token Filtering run on a prompt.

Accounting (SPEC, "Recent window": KV held is counted over **all** layers, as a snapshot at the end of the
prompt). A prompt has ``T = C + Q`` tokens: ``C`` of context (what kvpress compresses) and ``Q`` of question,
end of turn and answer prefix (which kvpress prefills after the compression and keeps whole). With ``L`` layers:

* dense holds ``L·T`` (token, layer) entries;
* Token Filtering holds ``H`` entries (the lead's KV-held statistic, per prompt: an input here);
* a press at ``compression_ratio = r`` (kvpress: the fraction of the context *removed*) keeps
  ``int(C·(1 - r))`` context entries per layer (``ScorerPress``; PyramidKV spreads the same total unevenly over
  the layers), so it holds ``L·(int(C·(1 - r)) + Q)``.

The matched ratio keeps ``K = round(H/L - Q)`` context tokens per layer (``1 <= K <= C``); the residual mismatch
is what remains from rounding to whole tokens, or from a budget below ``Q`` (flagged ``capped``: the press cannot
hold less than the question).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ModelShape:
    """What the accounting needs from the model config (bytes per entry = K and V of one token in one layer)."""

    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    element_size: int = 4  # float32 on CPU

    @classmethod
    def from_config(cls, config: object, element_size: int = 4) -> ModelShape:
        q_heads = config.num_attention_heads
        return cls(
            layers=config.num_hidden_layers,
            q_heads=q_heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or q_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // q_heads,
            element_size=element_size,
        )

    @property
    def entry_bytes(self) -> int:
        return 2 * self.kv_heads * self.head_dim * self.element_size

    @property
    def pair_flops(self) -> int:
        """Attention FLOPs of one (query, key) pair in one layer, all query heads (scores + weighted sum)."""
        return 4 * self.q_heads * self.head_dim


@dataclass(frozen=True)
class Budget:
    """The press setting matched to one Token Filtering row on one prompt."""

    config: str  # our configuration (row) it matches
    prompt: str  # prompt id
    ratio: float  # kvpress compression_ratio (fraction of the context removed)
    kept: int  # context tokens kept per layer
    ours_entries: float  # our KV held after the prompt, (token, layer) entries over all layers
    press_entries: int  # what the press holds after the prompt at that ratio (ScorerPress rounding)
    dense_entries: int
    capped: bool  # our budget is below the question's tokens: the press holds more than ours

    @property
    def mismatch_entries(self) -> float:
        """Press minus ours, entries (positive: the press holds more)."""
        return self.press_entries - self.ours_entries

    @property
    def mismatch_share(self) -> float:
        """Press minus ours, as a share of dense."""
        return self.mismatch_entries / self.dense_entries if self.dense_entries else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "mismatch_entries": self.mismatch_entries, "mismatch_share": self.mismatch_share}


def press_kept(context: int, ratio: float) -> int:
    """Context tokens per layer a ``ScorerPress`` keeps at ``ratio`` (kvpress rounds with ``int``)."""
    return int(context * (1 - ratio))


def ratio_for_kept(context: int, kept: int) -> float:
    """A ratio at which ``press_kept(context, ratio) == kept`` (half a token of margin against float error)."""
    if kept >= context:
        return 0.0
    return max(0.0, 1.0 - (kept + 0.5) / context)


def match(
    config: str, prompt: str, context: int, question: int, layers: int, ours_share: float
) -> Budget:
    """The ratio at which a press holds the KV that ours holds on this prompt.

    ``ours_share``: our KV held after the prompt as a share of dense, over all layers (``H / (L·T)``).
    """
    if context < 1 or question < 0 or layers < 1:
        raise ValueError(f"Need context >= 1, question >= 0, layers >= 1; got {context}, {question}, {layers}.")
    if not 0.0 <= ours_share <= 1.0:
        raise ValueError(f"KV held must be a share of dense in [0, 1], got {ours_share} for {config} on {prompt}.")
    tokens = context + question
    dense = layers * tokens
    ours = ours_share * dense
    want = ours / layers - question
    kept = min(context, max(1, round(want)))
    ratio = ratio_for_kept(context, kept)
    press = layers * (press_kept(context, ratio) + question)
    return Budget(config, prompt, ratio, kept, ours, press, dense, capped=want < 0.5)


def nominal_share(ratio: float) -> float:
    """KV held when a filter removes ``ratio`` of the (token, layer) entries and holds nothing in a window: a
    stand-in until the real per-prompt KV-held statistic is wired in (the table says which was used)."""
    return 1.0 - ratio


def match_all(
    ours: Mapping[str, Mapping[str, float]], prompts: Iterable[Mapping], layers: int
) -> list[Budget]:
    """Budgets for every (our row, prompt): ``ours[config][prompt_id]`` is our KV-held share on that prompt;
    ``prompts`` carry ``id``, ``context_ids`` and ``question_ids`` (the shared inputs)."""
    plist = list(prompts)
    out = []
    for config, per_prompt in ours.items():
        for p in plist:
            if p["id"] not in per_prompt:
                raise KeyError(f"No KV held for {config!r} on prompt {p['id']!r}; run ours on the same inputs.")
            out.append(
                match(config, p["id"], len(p["context_ids"]), len(p["question_ids"]), layers, per_prompt[p["id"]])
            )
    return out


# ---- FLOPs of a press run (attention only) --------------------------------------------------------
def press_pairs(context: int, question: int, kept_total: int, layers: int, new_tokens: int) -> tuple[int, int]:
    """(prefill pairs, decode pairs) over all layers for a press run: a dense causal prefill of the context
    (``C(C+1)/2`` per layer: a press compresses only after it), the question attending to the kept context and
    causally to itself, then each new token attending to everything held (kept context + question + tokens so far).
    ``kept_total``: context entries kept over all layers."""
    prefill = layers * (context * (context + 1) // 2 + question * (question + 1) // 2) + question * kept_total
    held = kept_total + layers * question
    decode = sum(held + layers * (i + 1) for i in range(max(new_tokens - 1, 0)))
    return prefill, decode


def dense_pairs(tokens: int, layers: int, new_tokens: int) -> tuple[int, int]:
    """(prefill pairs, decode pairs) of the unmodified model on ``tokens`` prompt tokens."""
    return press_pairs(tokens, 0, layers * tokens, layers, new_tokens)


def decoding_press_decode_pairs(target: int, layers: int, new_tokens: int, interval: int) -> int:
    """Decode pairs over all layers for kvpress's ``DecodingPress``: each layer holds ``target`` entries after the
    question (whose forward counts as the first decoding step), grows by one per new token and is pulled back to
    ``target`` once ``interval`` steps have been counted."""
    held, count, pairs = target, 1, 0
    for _ in range(max(new_tokens - 1, 0)):
        held += 1
        pairs += layers * held
        count += 1
        if count >= interval:
            held, count = target, 0
    return pairs
