"""Left and right padding (issue "Engine III", item 8).

A right-padded batch puts padding *after* the real tokens of its shorter rows. The unmodified model still computes
those padding columns: each attends to the real tokens before it (the padding keys are masked), and ``generate``
takes a right-padded row's first new token from the logits of its last column, which is padding. So a filtered
layer computes its padding columns too (over its stored entries), and with nothing filtered the logits at every
column after a row's first real token, and ``generate``, equal the unmodified model's on both padding sides.

The thresholds are finite and above every score, so that the layers really are patched, score, and filter nothing
(``threshold=inf`` or ``ratio=0`` would patch no layer at all).
"""

from __future__ import annotations

import pytest
import torch

from tokenfilter import TokenFilter

import conftest
from conftest import TEST_FP32, TEST_TOL, make_tiny, on_test_device

NOTHING = 1e9  # above every score: the layers score every token and filter none

CONFIGS = {
    "default": TokenFilter(threshold=NOTHING),
    "recent4": TokenFilter(threshold=NOTHING, recent=4),
    "kv-no-window": TokenFilter(threshold=NOTHING, recent=None),
    "paper": TokenFilter.paper(threshold=NOTHING),
    "paper-block": TokenFilter.paper(threshold=NOTHING, skip="block"),
}


def pad(seqs: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of 1-D id tensors padded (id 0) on ``side``, on the test device."""
    ids, mask = conftest.pad_batch(seqs, side)
    return on_test_device(ids), on_test_device(mask)


def forward(model, ids, mask, **kw):
    with torch.no_grad():
        return model(ids, attention_mask=mask, position_ids=conftest.positions(mask), **kw)


def generate(model, ids, mask, n: int = 8):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)


@pytest.fixture(params=["llama", "mistral", "gemma3_text"])  # 24-token windows (every layer, local layers)
def tiny(request: pytest.FixtureRequest) -> torch.nn.Module:
    return on_test_device(make_tiny(request.param))


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("path", ["fast", "reference"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_nothing_filtered_equals_dense_on_both_padding_sides(tiny, side, path, name):
    seqs = [conftest.random_ids(1, n, seed=s)[0] for n, s in ((30, 4), (17, 5))]
    ids, mask = pad(seqs, side)
    computed = mask.cumsum(-1) > 0  # every column from the row's first real token on (right padding included)
    dense = forward(tiny, ids, mask).logits
    dense_gen = generate(tiny, ids, mask)
    cfg = CONFIGS[name].replace(path=path, record_decisions=True)
    with cfg.apply(tiny) as run:
        out = forward(tiny, ids, mask).logits
        gen = generate(tiny, ids, mask)
    assert run.filtered_layers
    torch.testing.assert_close(out[computed], dense[computed], **TEST_TOL)
    if TEST_FP32:
        assert torch.equal(gen, dense_gen)
    assert not any(bool(d.any()) for d in run.decisions), "nothing is filtered"
    assert all(not bool(run.scores[i].isnan().all()) for i in run.filtered_layers), "every patched layer scored"
    assert run.stats.ratio == 0.0


@pytest.mark.parametrize("side", ["left", "right"])
def test_nothing_filtered_per_kv_head_equals_dense(side):
    model = on_test_device(make_tiny("qwen3"))
    seqs = [conftest.random_ids(1, n, seed=s)[0] for n, s in ((30, 4), (17, 5))]
    ids, mask = pad(seqs, side)
    computed = mask.cumsum(-1) > 0
    dense = forward(model, ids, mask).logits
    dense_gen = generate(model, ids, mask)
    cfg = TokenFilter(threshold=NOTHING, granularity="head", path="reference", record_decisions=True)
    with cfg.apply(model) as run:
        out = forward(model, ids, mask).logits
        gen = generate(model, ids, mask)
    torch.testing.assert_close(out[computed], dense[computed], **TEST_TOL)
    if TEST_FP32:
        assert torch.equal(gen, dense_gen)
    assert not any(bool(d.any()) for d in run.decisions)
    assert all(not bool(run.scores[i].isnan().all()) for i in run.filtered_layers)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("path", ["fast", "reference"])
@pytest.mark.parametrize("reading", ["default", "paper"])
def test_right_padded_batch_equals_each_row_alone(family, path, reading):
    """Ratio 0.5 (tokens really filtered): per row, a right-padded prefill makes the decisions and gives the logits
    (at the real tokens) of that row alone; then a decode step placed after the padding, at the row's own next
    position, gives the logits of that row alone decoding the same token. (Not on a sliding-window model: there the
    model's own window counts columns, padding included, so even the unmodified model's step differs from alone.)"""
    tiny = on_test_device(make_tiny(family))
    make = TokenFilter.paper if reading == "paper" else TokenFilter
    cfg = make(ratio=0.5, path=path, record_decisions=True)
    seqs = [conftest.random_ids(1, n, seed=s)[0] for n, s in ((72, 4), (40, 5), (57, 6))]
    ids, mask = pad(seqs, "right")
    nxt = on_test_device(torch.tensor([[7], [8], [9]]))
    mask2 = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    step_pos = mask.sum(-1, keepdim=True)  # each row's own next position
    with cfg.apply(tiny) as run:
        from transformers import DynamicCache

        cache = DynamicCache(config=tiny.config)
        batch = forward(tiny, ids, mask, past_key_values=cache, use_cache=True).logits
        with torch.no_grad():
            step = tiny(nxt, attention_mask=mask2, position_ids=step_pos, past_key_values=cache, use_cache=True).logits
        batch_dec = run.decisions
        assert run.stats.ratio > 0
        for i, s in enumerate(seqs):
            n = len(s)
            cache = DynamicCache(config=tiny.config)
            alone = forward(tiny, s[None], torch.ones_like(s[None]), past_key_values=cache, use_cache=True).logits
            with torch.no_grad():
                alone_step = tiny(nxt[i : i + 1], past_key_values=cache, use_cache=True).logits
            alone_dec = run.decisions
            assert not any(bool(d[i, n:-1].any()) for d in batch_dec), "padding is never 'filtered'"
            for a, b in zip(batch_dec, alone_dec, strict=True):
                assert torch.equal(a[i, :n], b[0, :n]), "the same prefill decisions"
                assert torch.equal(a[i, -1:], b[0, -1:]), "the same decode-step decision"
            torch.testing.assert_close(batch[i, :n], alone[0], **TEST_TOL)
            torch.testing.assert_close(step[i], alone_step[0], **TEST_TOL)


FILTERING = {  # ratio 0.5: tokens really filtered; the KV side's band covering the whole call or not, the query side
    "within-band": TokenFilter(ratio=0.5, recent=128),
    "band": TokenFilter(ratio=0.5, recent=8),
    "paper": TokenFilter.paper(ratio=0.5),
}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("name", list(FILTERING))
def test_right_padding_columns_fast_equals_reference(family, name):
    """With tokens filtered, the padding columns of a right-padded batch read the stored entries before them (the
    reference backend's definition; not the band), on the fast backend too, where they are queries of the readers'
    own calls: the logits at every computed column, padding included, agree, and so do the counts (padding columns
    are not counted)."""
    tiny = on_test_device(make_tiny(family))
    seqs = [conftest.random_ids(1, n, seed=s)[0] for n, s in ((72, 4), (40, 5), (57, 6))]
    ids, mask = pad(seqs, "right")
    computed = mask.cumsum(-1) > 0
    out, counts = {}, {}
    for path in ("fast", "reference"):
        with FILTERING[name].replace(path=path).apply(tiny) as run:
            out[path] = forward(tiny, ids, mask).logits
        assert run.stats.ratio > 0
        counts[path] = [(c.filtered, c.pairs) for c in run.stats.layers]
    assert counts["fast"] == counts["reference"]
    assert bool((~mask.bool() & computed).any()), "the batch has padding columns to compute"
    torch.testing.assert_close(out["fast"][computed], out["reference"][computed], **TEST_TOL)
