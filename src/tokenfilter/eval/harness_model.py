"""The lm-eval model type ``tokenfilter``: lm-eval's HFLM with Token Filtering around every forward.

    lm_eval --model tokenfilter --model_args pretrained=PATH,ratio=0.5 --tasks ...
    (through ``tokenfilter-lm-eval``, which registers the type and then runs lm-eval's own CLI)

Any ``TokenFilter`` field can be given in ``model_args``; with neither ``ratio`` nor ``threshold`` the model
runs dense. Loglikelihood requests are plain forwards, so the filter runs in its prefill (ratio) rule.
lm-eval right-pads batched requests with zeros and passes no mask; padding must not compete with real tokens
for the per-sequence filtering budget, so filtered batches get the attention mask of their real tokens
(each row's length is its last non-zero token): a batch gives the same log-likelihoods as one request at a time.

Data parallel: launched as several processes (``accelerate launch --num_processes N`` or ``torchrun``), each
process loads the model onto its own device and lm-eval splits the documents over the processes and gathers the
results, exactly as it does for its own ``hf`` model type given a hub id (lm-eval's HFLM sets this up only when
it loads the model itself; this class loads it, so it does the same setup). ``filter_stats`` is this process's
share; ``gathered_filter_stats()`` sums every process's counts.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
from accelerate import Accelerator, InitProcessGroupKwargs
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from tokenfilter.config import SlidingWindowShare, TokenFilter, for_input
from tokenfilter.loading import load_model
from tokenfilter.stats import FilterStats, FlopModel, LayerCounts

FILTER_FIELDS = {f.name for f in dataclasses.fields(TokenFilter)}
COUNT_FIELDS = [f.name for f in dataclasses.fields(LayerCounts) if f.name != "peak_held"]  # summed over processes
_RECORDERS: list[list[TokenFilterLM]] = []  # open ``recording_instances()`` blocks


@contextmanager
def recording_instances() -> Iterator[list[TokenFilterLM]]:
    """Collects every ``TokenFilterLM`` created inside the block (how ``tokenfilter-lm-eval`` reaches the instance
    lm-eval's CLI builds, to print its statistics); the references are dropped when the block ends."""
    created: list[TokenFilterLM] = []
    _RECORDERS.append(created)
    try:
        yield created
    finally:
        _RECORDERS.remove(created)


def launched_processes() -> int:
    """How many processes the launcher (``accelerate launch``, ``torchrun``) started; 1 when run directly."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def data_parallel_accelerator(device: str) -> Accelerator | None:
    """The ``Accelerator`` lm-eval splits the requests over when several processes were launched, else None.

    Like lm-eval's HFLM: one process group for the whole evaluation (a year's timeout, as HFLM sets, since ranks
    wait for each other at the end of every task). On CPU (no CUDA, or ``device=cpu``) the group uses gloo.
    """
    if launched_processes() <= 1:
        return None
    cpu = str(device) == "cpu" or not torch.cuda.is_available()
    accelerator = Accelerator(cpu=cpu, kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(weeks=52))])
    return accelerator if accelerator.num_processes > 1 else None


class _DropHFLMSingleProcessWarnings(logging.Filter):
    """HFLM warns that a model object means "single process, do not launch via accelerate"; not true here."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.startswith("`pretrained` model kwarg is not of type `str`") or "already-initialized" in msg)


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
        token_filter: TokenFilter | SlidingWindowShare | None = None,
        dtype: str = "float32",
        device: str = "cpu",
        batch_size: int | str = 1,
        **kwargs: object,
    ) -> None:
        fields = {k: kwargs.pop(k) for k in list(kwargs) if k in FILTER_FIELDS}
        fields = {k: None if v in ("None", "none") else v for k, v in fields.items()}  # model_args are strings
        if fields:
            if token_filter is not None:
                raise ValueError("Give either token_filter or TokenFilter fields, not both.")
            token_filter = TokenFilter(**fields)
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            device = "cpu"  # lm-eval's CLI passes device=cuda:0 by default; its HFLM falls back the same way
        accelerator = data_parallel_accelerator(device)
        if accelerator is not None and accelerator.device.type != "cpu":
            device = str(accelerator.device)  # each process on its own GPU
        if pretrained is None or isinstance(pretrained, str):
            pretrained, tokenizer = load_model(pretrained, dtype=dtype, device=device)
        hflm_log = logging.getLogger(HFLM.__module__)
        quiet = _DropHFLMSingleProcessWarnings()
        hflm_log.addFilter(quiet)
        try:
            super().__init__(pretrained=pretrained, tokenizer=tokenizer, batch_size=batch_size, device=device, **kwargs)
        finally:
            hflm_log.removeFilter(quiet)
        if accelerator is not None:  # what HFLM.__init__ sets for data parallel when it loads a hub id itself
            self.accelerator = accelerator
            self._rank = accelerator.process_index
            self._world_size = accelerator.num_processes
        # dense = ratio 0: no layer is patched (bit-identical), but tokens and FLOPs are still counted
        self.token_filter = token_filter or TokenFilter(ratio=0.0)
        self.reset_filter_stats()
        for created in _RECORDERS:
            created.append(self)

    def reset_filter_stats(self) -> None:
        self._counts = [LayerCounts() for _ in range(self.model.config.num_hidden_layers)]

    @property
    def filter_stats(self) -> FilterStats:
        """Token Filtering statistics summed over every forward since the last reset."""
        elem = next(self.model.parameters()).element_size()
        return FilterStats.from_counts(FlopModel.from_config(self.model.config), self._counts, elem)

    def gathered_filter_stats(self) -> FilterStats:
        """``filter_stats`` summed over every data-parallel process: a collective call, so every process must
        make it (with one process it is ``filter_stats``)."""
        if self.world_size <= 1:
            return self.filter_stats
        local = torch.tensor([[getattr(c, f) for f in COUNT_FIELDS] for c in self._counts], device=self.device)
        total = self.accelerator.reduce(local, reduction="sum").tolist()
        counts = [LayerCounts(**dict(zip(COUNT_FIELDS, row, strict=True))) for row in total]
        elem = next(self.model.parameters()).element_size()
        return FilterStats.from_counts(FlopModel.from_config(self.model.config), counts, elem)

    def stats_line(self, stats: FilterStats | None = None) -> str:
        """One line: the realized pruning ratio and the FLOPs skipped, of the forwards counted."""
        s = self.filter_stats if stats is None else stats
        return (
            f"tokenfilter: realized ratio {s.ratio:.4f} over {s.tokens} tokens x {len(s.layers)} layers; "
            f"FLOPs skipped: attention {s.attention_flops_skipped:.2%}, total {s.total_flops_skipped:.2%}; "
            f"KV cache saved {s.kv_saved_fraction:.2%}"
        )

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        if self.token_filter is None:  # counting off (e.g. a model with layers removed)
            return super()._model_call(inps, attn_mask, labels)
        with for_input(self.token_filter, inps.shape[1], self.model).apply(self.model) as run:
            if inps.shape[0] > 1 and attn_mask is None:
                with torch.no_grad():
                    out = self.model(inps, attention_mask=right_padding_mask(inps)).logits
            else:
                out = super()._model_call(inps, attn_mask, labels)
        self._add(run.stats.layers)
        return out

    def _add(self, layers: list[LayerCounts]) -> None:
        for total, c in zip(self._counts, layers, strict=True):
            total.add(dataclasses.asdict(c))
