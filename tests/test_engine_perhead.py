"""Per-KV-head decisions (``granularity="head"``, reference path): each KV head ranks and keeps its own tokens.

The SPEC's guarantees 1, 2, 4, 5, 6 with decisions ``[B, H_kv, T]``; the read rule per head against an independent
eager re-derivation; statistics in (token, head) units against brute force; and, on a model whose KV heads are
copies of one another, per-head decisions equal to per-token ones (so the fold into rows loses nothing)."""

from __future__ import annotations

import pytest
import torch

from masked_eager import forward_with_layer_masks, layer_window
from test_engine_equivalence import logits, thresholds_that_filter
from test_engine_kvside import greedy, held_entries, rule_mask
from tokenfilter import TokenFilter

from conftest import assert_ran_and_kept_everything, left_pad, make_tiny, random_ids

RECENT = [None, 4, 8]
HEAD = dict(skip="none", granularity="head", path="reference")


def per_head(make_mask, dec: torch.Tensor) -> torch.Tensor:
    """``[B, H, T]`` decisions -> ``[B, H, T, T]``: ``make_mask`` (``[B, T]`` -> ``[B, T, T]``) for each head."""
    return torch.stack([make_mask(dec[:, h]) for h in range(dec.shape[1])], dim=1)


def twin_heads(family: str) -> torch.nn.Module:
    """A tiny model whose KV heads are copies of the first (its K and V projections, biases and k-norm alike; the K
    and V rows of a fused qkv_proj)."""
    model = make_tiny(family)
    cfg = model.config
    with torch.no_grad():
        for layer in model.get_decoder().layers:
            attn = layer.self_attn
            d, heads = attn.head_dim, cfg.num_key_value_heads
            if hasattr(attn, "qkv_proj"):
                q = cfg.num_attention_heads * d
                parts = [(attn.qkv_proj, q), (attn.qkv_proj, q + heads * d)]
            else:
                parts = [(attn.k_proj, 0), (attn.v_proj, 0)]
            for proj, at in parts:
                rows = slice(at, at + heads * d)
                proj.weight[rows] = proj.weight[at : at + d].repeat(heads, 1)
                if proj.bias is not None:
                    proj.bias[rows] = proj.bias[at : at + d].repeat(heads)
    return model


# -- 1. nothing filtered: the unmodified model, bit for bit --------------------------------------------------
# ratio=0 patches no layer; the per-head path runs under a finite threshold above every score (a cosine: <= 1)
# and under threshold=inf with the scores recorded: every head of every token scored, none filtered, and the
# unmodified model's bits (measured: exact on the CPU in float32, prefill and generate).
@pytest.mark.parametrize("recent", [None, 4])
def test_nothing_filtered_is_bit_identical(tiny, recent):
    ids = random_ids(2, 36)
    dense = logits(tiny, ids)
    dense_gen, dense_steps = greedy(tiny, ids[:, :12], 8)
    with TokenFilter(ratio=0.0, recent=recent, **HEAD).apply(tiny) as run:
        assert not run.filtered_layers  # ratio 0: the unmodified code, no layer patched
        assert torch.equal(dense, logits(tiny, ids))
    heads = tiny.config.num_key_value_heads
    nothing = (dict(threshold=1.5), dict(threshold=1.5, record_decisions=True),
               dict(threshold=float("inf"), record_decisions=True))
    for cfg in (TokenFilter(**how, recent=recent, **HEAD) for how in nothing):
        with cfg.apply(tiny) as run:
            out = logits(tiny, ids)
            assert_ran_and_kept_everything(run)
            if cfg.record_decisions:
                assert run.scores[run.filtered_layers[0]].shape == (2, heads, 36)  # one score per KV head
            gen, steps = greedy(tiny, ids[:, :12], 8)
            assert_ran_and_kept_everything(run)
        assert torch.equal(dense, out)
        assert torch.equal(dense_gen, gen)
        assert torch.equal(dense_steps, steps)


# -- 2. threshold mode: one prefill == token by token == chunks of 7 -----------------------------------------
def _chunked(model, ids, size):
    cache, steps = None, []
    for s in range(0, ids.shape[1], size):
        out = model(ids[:, s : s + size], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        steps.append(out.logits)
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("recent", RECENT)
def test_threshold_prefill_equals_decode_and_chunks(tiny, recent):
    ids = random_ids(2, 36)
    taus = thresholds_that_filter(tiny, ids, **HEAD)
    cfg = TokenFilter(threshold=taus, recent=recent, record_decisions=True, **HEAD)
    with cfg.apply(tiny) as run, torch.no_grad():
        prefill = tiny(ids).logits
        decisions = run.decisions
        for size in (1, 7):
            torch.testing.assert_close(_chunked(tiny, ids, size), prefill, atol=1e-5, rtol=1e-5)
            assert all(torch.equal(a, b) for a, b in zip(decisions, run.decisions, strict=True))
    assert sum(int(d.sum()) for d in decisions) > 0, "the thresholds should filter some entries"


def test_threshold_prefill_equals_decode_real_weights(stories):
    ids = torch.tensor([[1] + list(range(40, 80))])
    taus = thresholds_that_filter(stories, ids, **HEAD)
    with TokenFilter(threshold=taus, recent=4, **HEAD).apply(stories) as run, torch.no_grad():
        prefill = stories(ids).logits
        torch.testing.assert_close(_chunked(stories, ids, 1), prefill, atol=1e-5, rtol=1e-5)
    assert run.stats.ratio > 0


# -- 3. the rule per head == an independent eager computation -------------------------------------------------
@pytest.mark.parametrize("recent", RECENT)
def test_rule_per_head_equals_independent_eager_attention(tiny, recent):
    ids = random_ids(2, 32, seed=7)
    cfg = TokenFilter(ratio=0.5, recent=recent, record_decisions=True, **HEAD)
    with cfg.apply(tiny) as run:
        out = logits(tiny, ids)
    masks = {}
    for layer in run.filtered_layers:
        window = layer_window(tiny, layer)
        masks[layer] = per_head(lambda d, w=window: rule_mask(d, recent, cfg.warmup, w), run.decisions[layer])
    expected = forward_with_layer_masks(tiny, ids, masks)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    dec = run.decisions[run.filtered_layers[0]]
    assert not torch.equal(dec[:, 0], dec[:, 1]), "the heads should disagree somewhere"


# -- 4. left padding: each sequence as if alone --------------------------------------------------------------
@pytest.mark.parametrize("recent", [None, 4])
def test_left_padded_batch_equals_alone(tiny, recent):
    seqs = [random_ids(1, n, seed=s)[0] for n, s in ((30, 4), (22, 5), (37, 6))]
    ids, mask = left_pad(seqs)
    cfg = TokenFilter(ratio=0.5, recent=recent, record_decisions=True, **HEAD)
    with cfg.apply(tiny) as run:
        batch = logits(tiny, ids, mask)
        batch_dec = run.decisions
        with torch.no_grad():
            batch_gen = tiny.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        for i, s in enumerate(seqs):
            n = len(s)
            torch.testing.assert_close(batch[i, -n:], logits(tiny, s[None])[0], atol=1e-5, rtol=1e-5)
            for layer_dec, alone_dec in zip(batch_dec, run.decisions, strict=True):
                assert torch.equal(layer_dec[i, :, -n:], alone_dec[0])
                assert not layer_dec[i, :, :-n].any()
            with torch.no_grad():
                gen = tiny.generate(s[None], max_new_tokens=6, do_sample=False)
            assert torch.equal(batch_gen[i, -6:], gen[0, -6:])


# -- 5, 6. realized ratio, recorded decisions [B, H, T] ---------------------------------------------------------
def test_realized_ratio_and_decisions_per_head(tiny):
    ids, mask = left_pad([random_ids(1, n, seed=n)[0] for n in (64, 90, 71)])
    cfg = TokenFilter(ratio=0.5, recent=8, record_decisions=True, **HEAD)
    with cfg.apply(tiny) as run, torch.no_grad():
        tiny(ids, attention_mask=mask)
    heads = tiny.config.num_key_value_heads
    assert abs(run.stats.ratio - 0.5) <= 0.02
    real = mask.bool()
    for layer, dec in enumerate(run.decisions):
        assert dec.shape == (ids.shape[0], heads, ids.shape[1]) and dec.dtype == torch.bool
        assert not (dec & ~real[:, None]).any()
        assert dec.any() == (layer in run.filtered_layers)
        if layer in run.filtered_layers:  # every head of every sequence keeps its own share
            share = dec.sum(-1) / real.sum(-1, keepdim=True)
            assert torch.allclose(share, torch.full_like(share, run.stats.ratio_per_layer[layer]), atol=0.02)
    assert run.scores[run.filtered_layers[0]].shape == (ids.shape[0], heads, ids.shape[1])


# -- heads that are copies: per head == per token -------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("mode", [dict(ratio=0.5), dict(threshold=0.3)], ids=["ratio", "threshold"])
def test_identical_heads_decide_as_one_token(family, mode):
    model = twin_heads(family)
    ids = random_ids(2, 40, seed=3)
    outs = {}
    for granularity in ("token", "head"):
        cfg = TokenFilter(**mode, recent=4, skip="none", path="reference", granularity=granularity,
                          record_decisions=True)
        with cfg.apply(model) as run:
            out = logits(model, ids)
            with torch.no_grad():  # beam search reorders the cache's rows every step
                beams = model.generate(ids[:, :16], max_new_tokens=6, num_beams=3, do_sample=False)
        outs[granularity] = (out, run.decisions, beams, run.stats)
    (t_out, t_dec, t_beams, t_stats), (h_out, h_dec, h_beams, h_stats) = outs["token"], outs["head"]
    torch.testing.assert_close(h_out, t_out, atol=1e-5, rtol=1e-5)
    for token_dec, head_dec in zip(t_dec, h_dec, strict=True):
        assert torch.equal(head_dec, token_dec[:, None].expand_as(head_dec))
    assert torch.equal(h_beams, t_beams)
    assert t_stats.ratio > 0
    assert h_stats.ratio == pytest.approx(t_stats.ratio)
    assert h_stats.kv_bytes_saved == t_stats.kv_bytes_saved
    assert h_stats.pairs_fraction == pytest.approx(t_stats.pairs_fraction)


# -- statistics in (token, head) units against brute force ----------------------------------------------------
@pytest.mark.parametrize("recent", RECENT)
def test_stats_equal_brute_force(tiny, recent):
    prompt, new = 30, 5
    ids = random_ids(2, prompt, seed=9)
    cfg = TokenFilter(ratio=0.5, recent=recent, record_decisions=True, **HEAD)
    with cfg.apply(tiny) as run, torch.no_grad():
        out = tiny(ids, use_cache=True)
        prefill = run.stats
        cache = out.past_key_values
        for _ in range(new):
            out = tiny(out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
    fm, heads = run.flops, tiny.config.num_key_value_heads
    entry = fm.kv_entry_bytes(4) / heads  # one head's key and value
    for stats, n in ((prefill, prompt), (run.stats, prompt + new)):
        held = dense = 0  # in one head's entries
        for layer in range(fm.layers):
            window = layer_window(tiny, layer)
            layer_dense = heads * held_entries(torch.zeros(2, n, dtype=torch.bool), None, window)[1]
            dense += layer_dense
            if layer not in run.filtered_layers:
                held += layer_dense
                continue
            dec = run.decisions[layer][..., :n]
            pairs = int(per_head(lambda d, w=window: rule_mask(d, recent, cfg.warmup, w), dec).sum())
            assert stats.layers[layer].pairs == pytest.approx(pairs / heads)
            held += sum(held_entries(dec[:, h], recent, window)[0] for h in range(heads))
            assert stats.ratio_per_layer[layer] == pytest.approx(int(dec.sum()) / (2 * n * heads))
        assert stats.kv_bytes_saved == pytest.approx((dense - held) * entry, abs=1)
        assert stats.kv_held_fraction == pytest.approx(held / dense)


def test_random_score_per_head_reproduces(tiny):
    ids = random_ids(1, 48)
    runs = []
    for _ in range(2):
        with TokenFilter(ratio=0.5, score="random", seed=3, record_decisions=True, **HEAD).apply(tiny) as run:
            logits(tiny, ids)
        runs.append(run.decisions)
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(granularity="head", skip="attention", path="reference"), 'needs skip="none"'),
        (dict(granularity="layer"), "granularity must be one of token, head"),
    ],
)
def test_bad_granularity_is_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TokenFilter(ratio=0.5, **kwargs)


def test_fast_backend_falls_back_to_reference_per_head(recwarn):
    """The fast backend does not run per-KV-head decisions: it says so in one sentence and the layer runs on the
    reference backend, with the reference backend's results."""
    from tokenfilter.integration import backends

    backends._WARNED.clear()
    model = make_tiny("qwen3")
    ids, mask = left_pad([random_ids(1, 30, seed=3)[0], random_ids(1, 24, seed=4)[0]])
    runs = []
    for path in ("fast", "reference"):
        with TokenFilter(ratio=0.5, **{**HEAD, "path": path}, record_decisions=True).apply(model) as run:
            out = logits(model, ids, mask)
        runs.append((out, run.decisions))
    messages = [str(w.message) for w in recwarn if "tokenfilter:" in str(w.message)]
    assert len(messages) == 1 and "per-token decisions only" in messages[0] and "reference backend" in messages[0]
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1], strict=True))


def test_records_of_earlier_runs_still_match():
    """A field added later is left out of repr() and as_record() at its default, so the filters that results
    recorded before it existed (docs/*.json, kept rows) still match and --resume / --reuse keep them."""
    token, head = TokenFilter(ratio=0.5), TokenFilter(ratio=0.5, **HEAD)
    assert "granularity" not in repr(token) and "granularity" not in token.as_record()
    assert "granularity='head'" in repr(head) and head.as_record()["granularity"] == "head"
    assert eval(repr(head), {"TokenFilter": TokenFilter}) == head  # noqa: S307 (our own repr)
