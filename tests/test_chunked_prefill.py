"""Chunked prefill through transformers' own option, ``generate(..., prefill_chunk_size=N)``: a long prompt in
calls of N tokens, so the prefill never holds more than one chunk's activations beside what the cache keeps.

* threshold mode decides each token as one call would (a decision depends on the token's score only): chunked
  and unchunked runs give the same decisions, statistics and text;
* ratio mode applies the prefill rule to each call: every chunk filters ``round(ratio * its real tokens)`` of its
  own eligible tokens at each layer, ranked within the chunk, where one call ranks the whole prompt. The ratio is
  then met chunk by chunk instead of over the prompt, so the decisions differ (``README``, "Use it").
"""

from __future__ import annotations

import pytest
import torch

from tokenfilter import TokenFilter

from conftest import make_tiny, random_ids

CHUNK = 16


def _generate(model, cfg, ids, chunk):
    with cfg.apply(model) as run, torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                             prefill_chunk_size=chunk, output_scores=True, return_dict_in_generate=True)
    return out, run


@pytest.mark.parametrize("skip", ["none", "attention"])
def test_chunked_prefill_in_threshold_mode_decides_as_one_call(skip):
    model = make_tiny("llama")
    ids = random_ids(2, 60)
    cfg = TokenFilter(threshold=0.3, skip=skip, recent=8 if skip == "none" else None, record_decisions=True)
    (whole, whole_run), (chunked, chunked_run) = (_generate(model, cfg, ids, c) for c in (None, CHUNK))
    assert whole_run.stats.ratio > 0
    assert torch.equal(whole.sequences, chunked.sequences)
    torch.testing.assert_close(torch.stack(whole.scores), torch.stack(chunked.scores), atol=1e-5, rtol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(whole_run.decisions, chunked_run.decisions, strict=True))
    assert whole_run.stats.as_dict() == chunked_run.stats.as_dict()


def test_chunked_prefill_in_ratio_mode_meets_the_ratio_chunk_by_chunk():
    model = make_tiny("llama")
    ids = random_ids(1, 64)
    cfg = TokenFilter(ratio=0.5, recent=8, warmup=4, record_decisions=True)
    _, run = _generate(model, cfg, ids, CHUNK)
    _, whole = _generate(model, cfg, ids, None)
    prompt = ids.shape[1]
    changed = False
    for layer in run.filtered_layers:
        decided = run.decisions[layer][0, :prompt]
        for start in range(0, prompt, CHUNK):
            chunk = decided[start : start + CHUNK]
            eligible = CHUNK - max(0, cfg.warmup - start)  # the first real tokens of the row are never filtered
            want = int(torch.round(torch.tensor(run.targets[layer] * CHUNK)))  # the layer's ratio, on the chunk
            assert int(chunk.sum()) == min(eligible, want), (layer, start)
        changed |= not torch.equal(decided, whole.decisions[layer][0, :prompt])
    assert changed, "ranking within chunks and within the prompt should differ somewhere"
    # the first chunk is a prefill of its own: the decisions of those tokens alone
    with cfg.apply(model) as alone, torch.no_grad():
        model(ids[:, :CHUNK])
    for layer in run.filtered_layers:
        assert torch.equal(run.decisions[layer][0, :CHUNK], alone.decisions[layer][0])
