"""The lm-eval model type ``tokenfilter``: lm-eval's HFLM with Token Filtering around every forward.

    lm_eval --model tokenfilter --model_args pretrained=PATH,ratio=0.5 --tasks ...
    (through ``tokenfilter-lm-eval``, which registers the type and then runs lm-eval's own CLI)

Any ``TokenFilter`` field can be given in ``model_args``; with neither ``ratio`` nor ``threshold`` the model
runs dense. Loglikelihood requests are plain forwards, so the filter runs in its prefill (ratio) rule.
lm-eval right-pads batched requests with zeros and passes no mask; padding must not compete with real tokens
for the per-sequence filtering budget, so filtered batches get the attention mask of their real tokens
(each row's length is its last non-zero token): a batch gives the same log-likelihoods as one request at a time.
"""

from __future__ import annotations

import dataclasses

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from tokenfilter.config import TokenFilter
from tokenfilter.loading import load_model
from tokenfilter.stats import FilterStats, FlopModel, LayerCounts

FILTER_FIELDS = {f.name for f in dataclasses.fields(TokenFilter)}


def right_padding_mask(ids: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` ids right-padded with 0 -> ``[B, T]`` mask, 1 up to each row's last non-zero token."""
    positions = torch.arange(ids.shape[1], device=ids.device)
    last = torch.where(ids != 0, positions, -1).amax(dim=1, keepdim=True)
    return (positions <= last).long()


@register_model("tokenfilter")
class TokenFilterLM(HFLM):
    def __init__(
        self,
        pretrained: str | torch.nn.Module | None = None,
        tokenizer: object | None = None,
        token_filter: TokenFilter | None = None,
        dtype: str = "float32",
        device: str = "cpu",
        batch_size: int | str = 1,
        **kwargs: object,
    ) -> None:
        fields = {k: kwargs.pop(k) for k in list(kwargs) if k in FILTER_FIELDS}
        if fields:
            if token_filter is not None:
                raise ValueError("Give either token_filter or TokenFilter fields, not both.")
            token_filter = TokenFilter(**fields)
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            device = "cpu"  # lm-eval's CLI passes device=cuda:0 by default; its HFLM falls back the same way
        if pretrained is None or isinstance(pretrained, str):
            pretrained, tokenizer = load_model(pretrained, dtype=dtype, device=device)
        super().__init__(pretrained=pretrained, tokenizer=tokenizer, batch_size=batch_size, device=device, **kwargs)
        # dense = ratio 0: no layer is patched (bit-identical), but tokens and FLOPs are still counted
        self.token_filter = token_filter or TokenFilter(ratio=0.0)
        self.reset_filter_stats()

    def reset_filter_stats(self) -> None:
        self._counts = [LayerCounts() for _ in range(self.model.config.num_hidden_layers)]

    @property
    def filter_stats(self) -> FilterStats:
        """Token Filtering statistics summed over every forward since the last reset."""
        elem = next(self.model.parameters()).element_size()
        return FilterStats.from_counts(FlopModel.from_config(self.model.config), self._counts, elem)

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        if self.token_filter is None:  # counting off (e.g. a model with layers removed)
            return super()._model_call(inps, attn_mask, labels)
        with self.token_filter.apply(self.model) as run:
            if inps.shape[0] > 1 and attn_mask is None:
                with torch.no_grad():
                    out = self.model(inps, attention_mask=right_padding_mask(inps)).logits
            else:
                out = super()._model_call(inps, attn_mask, labels)
        self._add(run.stats.layers)
        return out

    def _add(self, layers: list[LayerCounts]) -> None:
        for total, c in zip(self._counts, layers, strict=True):
            for f in dataclasses.fields(LayerCounts):
                setattr(total, f.name, getattr(total, f.name) + getattr(c, f.name))
