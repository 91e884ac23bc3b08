"""KV-side filtering (``skip="none"``) with and without a recent window (``recent=R``): SPEC guarantees 1-6,
the read rule against an independent eager re-derivation, and statistics against brute-force counts."""

from __future__ import annotations

import pytest
import torch

from masked_eager import forward_with_layer_masks, layer_window
from test_engine_equivalence import logits, thresholds_that_filter
from tokenfilter import TokenFilter
from tokenfilter.integration.backends import kernels

from conftest import BACKENDS, assert_ran_and_kept_everything, left_pad, make_tiny, random_ids

RECENT = [None, 4, 8]


def rule_mask(filtered: torch.Tensor, recent: int | None, warmup: int, window: int | None) -> torch.Tensor:
    """SPEC "Recent window", written out for unpadded rows: query t reads key j iff j <= t, j is in the model's
    window, and (j kept, or t - j < R, or j < W). ``filtered``: ``[B, T]`` -> ``[B, T, T]``."""
    r = recent or 1
    b, t = filtered.shape
    mask = torch.zeros(b, t, t, dtype=torch.bool)
    for row in range(b):
        for q in range(t):
            for j in range(q + 1):
                if window is not None and q - j >= window:
                    continue
                mask[row, q, j] = (not filtered[row, j]) or q - j < r or j < warmup
    return mask


def held_after(filtered: torch.Tensor, recent: int | None) -> int:
    """Filtered entries a later token can still read after the last one (the last R - 1 real tokens)."""
    r = recent or 1
    return int(filtered[:, filtered.shape[1] - (r - 1) :].sum()) if r > 1 else 0


def in_window(n: int, window: int | None) -> int:
    """The first of ``n`` unpadded columns that a layer with the model's ``window`` still holds after the last one
    (transformers keeps the latest ``window - 1``)."""
    return 0 if window is None else max(n - (window - 1), 0)


def held_entries(filtered: torch.Tensor, recent: int | None, window: int | None) -> tuple[int, int]:
    """After unpadded rows ``filtered`` ``[B, n]``: the entries a filtered layer holds (its kept entries in the model's
    window, plus the band's live ones) and those the unmodified model's layer holds (its window's, or every token)."""
    b, n = filtered.shape
    first = in_window(n, window)
    return int((~filtered[:, first:]).sum()) + held_after(filtered, recent), b * (n - first)


# -- 1. nothing filtered: the unmodified model, bit for bit --------------------------------------------------
# ratio=0 patches no layer (the unmodified code runs: guarantee 1 as stated). The KV-side path itself runs under a
# finite threshold above every score (the score is a cosine: <= 1), and under threshold=inf with the scores
# recorded (such a layer is patched only to record them); it computes scores, keeps every token, and its attention
# (each query over its stored keys, the band adding none) gives the unmodified model's bits (measured: exact on
# the CPU in float32, fast and reference paths, prefill and generate).
def nothing_filtered_kv_side(recent, path):
    kv = dict(skip="none", recent=recent, path=path)
    return (TokenFilter(threshold=1.5, **kv), TokenFilter(threshold=1.5, record_decisions=True, **kv),
            TokenFilter(threshold=float("inf"), record_decisions=True, **kv))


def greedy(model, ids, n):
    """Greedy ``generate``: the tokens and every step's logits ``[B, n, V]`` (the decode steps' own outputs)."""
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits, dim=1)


@pytest.mark.parametrize("path", BACKENDS)
@pytest.mark.parametrize("recent", [None, 4])
def test_nothing_filtered_is_bit_identical(tiny, recent, path):
    ids = random_ids(2, 36)
    dense = logits(tiny, ids)
    dense_gen, dense_steps = greedy(tiny, ids[:, :12], 8)
    with TokenFilter(ratio=0.0, skip="none", recent=recent, path=path).apply(tiny) as run:
        assert not run.filtered_layers  # ratio 0: the unmodified code, no layer patched
        assert torch.equal(dense, logits(tiny, ids))
    for cfg in nothing_filtered_kv_side(recent, path):
        with cfg.apply(tiny) as run:
            out = logits(tiny, ids)
            assert_ran_and_kept_everything(run)  # the prefill (36 columns) went through the KV-side path
            gen, steps = greedy(tiny, ids[:, :12], 8)
            assert_ran_and_kept_everything(run)  # and so did generate's prefill and decode steps (19 columns)
        assert torch.equal(dense, out)
        assert torch.equal(dense_gen, gen)
        assert torch.equal(dense_steps, steps)


@pytest.mark.parametrize("path", BACKENDS)
def test_nothing_filtered_real_weights(stories, path):
    ids = torch.tensor([[1] + list(range(20, 90))])
    dense = logits(stories, ids)
    dense_gen, dense_steps = greedy(stories, ids[:, :8], 12)
    for cfg in nothing_filtered_kv_side(8, path):
        with cfg.apply(stories) as run:
            assert torch.equal(dense, logits(stories, ids))
            assert_ran_and_kept_everything(run)
            gen, steps = greedy(stories, ids[:, :8], 12)
            assert_ran_and_kept_everything(run)
        assert torch.equal(dense_gen, gen) and torch.equal(dense_steps, steps)


# -- 2. threshold mode: one prefill == token by token == chunks of 7 -----------------------------------------
def _counting(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> dict[str, int]:
    """Replace ``owner.name`` (a method or a module's function) by one that counts its calls in the returned
    ``{"n": calls}`` and then runs it."""
    calls = {"n": 0}
    original = getattr(owner, name)

    def counted(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def _chunked(model, ids, size):
    cache, steps = None, []
    for s in range(0, ids.shape[1], size):
        out = model(ids[:, s : s + size], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        steps.append(out.logits)
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("recent", RECENT)
def test_threshold_prefill_equals_decode_and_chunks(tiny, recent):
    ids = random_ids(1, 36)
    taus = thresholds_that_filter(tiny, ids)
    cfg = TokenFilter(threshold=taus, skip="none", recent=recent, record_decisions=True)
    with cfg.apply(tiny) as run, torch.no_grad():
        prefill = tiny(ids).logits
        decisions = run.decisions
        for size in (1, 7):
            torch.testing.assert_close(_chunked(tiny, ids, size), prefill, atol=1e-5, rtol=1e-5)
            assert all(torch.equal(a, b) for a, b in zip(decisions, run.decisions, strict=True))
    assert sum(int(d.sum()) for d in decisions) > 0, "the thresholds should filter some tokens"


def test_threshold_prefill_equals_decode_real_weights(stories):
    ids = torch.tensor([[1] + list(range(40, 80))])
    taus = thresholds_that_filter(stories, ids)
    with TokenFilter(threshold=taus, skip="none", recent=4).apply(stories) as run, torch.no_grad():
        prefill = stories(ids).logits
        torch.testing.assert_close(_chunked(stories, ids, 1), prefill, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(_chunked(stories, ids, 7), prefill, atol=1e-5, rtol=1e-5)
    assert run.stats.ratio > 0


# -- 3. fast == reference; the rule == an independent eager computation ---------------------------------------
@pytest.mark.parametrize("recent", RECENT)
@pytest.mark.parametrize("mode", ["ratio", "threshold"])
def test_fast_equals_reference(tiny, recent, mode):
    ids, mask = left_pad([random_ids(1, 40, seed=2)[0], random_ids(1, 29, seed=3)[0]])
    extra = dict(ratio=0.5) if mode == "ratio" else dict(threshold=thresholds_that_filter(tiny, ids))
    results = {}
    for path in ("fast", "reference"):
        cfg = TokenFilter(**extra, skip="none", recent=recent, path=path, record_decisions=True)
        with cfg.apply(tiny) as run:
            out = logits(tiny, ids, mask)
            with torch.no_grad():
                gen = tiny.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
            results[path] = (out, run.decisions, gen, run.stats)
    (f_out, f_dec, f_gen, f_stats), (r_out, r_dec, r_gen, r_stats) = results["fast"], results["reference"]
    real = mask.bool()
    torch.testing.assert_close(f_out[real], r_out[real], atol=1e-5, rtol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(f_dec, r_dec, strict=True))
    assert torch.equal(f_gen, r_gen)
    assert f_stats.ratio > 0
    assert f_stats.as_dict() == r_stats.as_dict()


def test_band_in_blocks_shorter_than_the_band_equals_reference(tiny, monkeypatch):
    """A band longer than ``_BAND_BLOCK`` is read in blocks of that many queries (here 3, for a band of 8): the
    same outputs, decisions and counts as the reference, prefill and decode, padded."""
    monkeypatch.setattr(kernels, "_BAND_BLOCK", 3)
    ids, mask = left_pad([random_ids(1, 40, seed=2)[0], random_ids(1, 29, seed=3)[0]])
    results = {}
    for path in ("fast", "reference"):
        cfg = TokenFilter(ratio=0.5, recent=8, path=path, record_decisions=True)
        with cfg.apply(tiny) as run:
            out = logits(tiny, ids, mask)
            with torch.no_grad():
                gen = tiny.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
            results[path] = (out, run.decisions, gen, run.stats.as_dict())
    (f_out, f_dec, f_gen, f_stats), (r_out, r_dec, r_gen, r_stats) = results["fast"], results["reference"]
    real = mask.bool()
    torch.testing.assert_close(f_out[real], r_out[real], atol=1e-5, rtol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(f_dec, r_dec, strict=True))
    assert torch.equal(f_gen, r_gen) and f_stats == r_stats


@pytest.mark.parametrize("recent", RECENT)
def test_rule_equals_independent_eager_attention(tiny, recent):
    ids = random_ids(2, 32, seed=7)
    cfg = TokenFilter(ratio=0.5, skip="none", recent=recent, record_decisions=True)
    with cfg.apply(tiny) as run:
        out = logits(tiny, ids)
    masks = {layer: rule_mask(run.decisions[layer], recent, cfg.warmup, layer_window(tiny, layer))
             for layer in run.filtered_layers}
    expected = forward_with_layer_masks(tiny, ids, masks)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert run.stats.ratio > 0.2


# -- 4. left padding: each sequence as if alone --------------------------------------------------------------
@pytest.mark.parametrize("recent", [None, 4])
@pytest.mark.parametrize("path", BACKENDS)
def test_left_padded_batch_equals_alone(tiny, recent, path):
    seqs = [random_ids(1, n, seed=s)[0] for n, s in ((30, 4), (22, 5), (37, 6))]
    ids, mask = left_pad(seqs)
    cfg = TokenFilter(ratio=0.5, skip="none", recent=recent, path=path, record_decisions=True)
    with cfg.apply(tiny) as run:
        batch = logits(tiny, ids, mask)
        batch_dec = run.decisions
        with torch.no_grad():
            batch_gen = tiny.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        for i, s in enumerate(seqs):
            n = len(s)
            torch.testing.assert_close(batch[i, -n:], logits(tiny, s[None])[0], atol=1e-5, rtol=1e-5)
            for layer_dec, alone_dec in zip(batch_dec, run.decisions, strict=True):
                assert torch.equal(layer_dec[i, -n:], alone_dec[0])
                assert not layer_dec[i, :-n].any()
            with torch.no_grad():
                gen = tiny.generate(s[None], max_new_tokens=6, do_sample=False)
            assert torch.equal(batch_gen[i, -6:], gen[0, -6:])


# -- 5, 6. realized ratio, recorded decisions ----------------------------------------------------------------
@pytest.mark.parametrize("recent", [None, 8])
def test_realized_ratio_and_decisions(tiny, recent):
    ids, mask = left_pad([random_ids(1, n, seed=n)[0] for n in (64, 90, 71)])
    cfg = TokenFilter(ratio=0.5, skip="none", recent=recent, record_decisions=True)
    with cfg.apply(tiny) as run, torch.no_grad():
        tiny(ids, attention_mask=mask)
    assert abs(run.stats.ratio - 0.5) <= 0.02
    assert len(run.decisions) == tiny.config.num_hidden_layers
    for layer, dec in enumerate(run.decisions):
        assert dec.shape == ids.shape and dec.dtype == torch.bool
        assert not (dec & ~mask.bool()).any()
        assert dec.any() == (layer in run.filtered_layers)


# -- statistics: pairs, KV held, bytes saved and FLOPs against brute force ------------------------------------
@pytest.mark.parametrize("recent", RECENT)
@pytest.mark.parametrize("path", BACKENDS)
def test_stats_equal_brute_force(tiny, recent, path):
    prompt, new = 30, 5
    ids = random_ids(2, prompt, seed=9)
    cfg = TokenFilter(ratio=0.5, skip="none", recent=recent, path=path, record_decisions=True)
    with cfg.apply(tiny) as run, torch.no_grad():
        out = tiny(ids, use_cache=True)
        prefill = run.stats
        cache = out.past_key_values
        seq = ids
        for _ in range(new):  # decode steps by hand, so that the cache stays inspectable
            nxt = out.logits[:, -1:].argmax(-1)
            seq = torch.cat([seq, nxt], dim=1)
            out = tiny(nxt, past_key_values=cache, use_cache=True)
    fm, s = run.flops, run.stats
    entry = fm.kv_entry_bytes(4)
    for stats, n in ((prefill, prompt), (s, prompt + new)):
        held = dense = pairs_total = 0
        expected_flops = n * 2 * fm.lm_head
        for layer in range(tiny.config.num_hidden_layers):
            dec = run.decisions[layer][:, :n]
            window = layer_window(tiny, layer)
            dense_mask = rule_mask(torch.zeros_like(dec), None, cfg.warmup, window)
            layer_dense = held_entries(torch.zeros_like(dec), None, window)[1]
            dense += layer_dense
            if layer in run.filtered_layers:
                pairs = int(rule_mask(dec, recent, cfg.warmup, window).sum())
                held += held_entries(dec, recent, window)[0]
            else:
                pairs = int(dense_mask.sum())
                held += layer_dense
            assert stats.layers[layer].pairs == pairs
            assert stats.layers[layer].pairs_dense == int(dense_mask.sum())
            pairs_total += pairs
            # KV side: every token still computes Q, attention, O projection and MLP
            expected_flops += 2 * n * (fm.qo_proj + fm.kv_proj + fm.mlp) + pairs * fm.per_pair
        assert stats.kv_bytes_saved == (dense - held) * entry
        assert stats.kv_bytes_dense == dense * entry
        assert stats.kv_held_fraction == pytest.approx(held / dense)
        assert stats.flops_actual == pytest.approx(expected_flops)
        assert stats.pairs_fraction == pytest.approx(pairs_total / sum(c.pairs_dense for c in stats.layers))
    # what the caches really hold at the end: kept entries, plus the band's live ones
    if path == "fast":
        for layer in run.filtered_layers:
            dec = run.decisions[layer]
            entry_layer = cache.layers[layer]
            first = in_window(dec.shape[1], layer_window(tiny, layer))  # what the model's window passed is gone
            assert entry_layer.kv.stored_entries() == int((~dec[:, first:]).sum())
            assert entry_layer.ring.held == held_after(dec, recent)


def test_flop_model_keeps_qo_projections_on_the_kv_side(tiny):
    ids = random_ids(1, 64)
    stats = {}
    for skip in ("attention", "none"):
        with TokenFilter(ratio=0.5, skip=skip).apply(tiny) as run, torch.no_grad():
            tiny(ids)
        stats[skip] = run.stats
        assert all(c.mlp_skipped == 0 for c in run.stats.layers)
    assert all(c.qo_skipped == 0 for c in stats["none"].layers)
    assert sum(c.qo_skipped for c in stats["attention"].layers) == sum(c.filtered for c in stats["attention"].layers)
    assert stats["none"].attention_flops_skipped < stats["attention"].attention_flops_skipped


def test_window_wider_than_the_models_acts_as_the_models():
    """Mistral's own window (24): with R >= 24 every key inside the window is readable, so the logits are the
    dense model's although half the tokens are filtered; R = 24 and R = 100 are the same computation."""
    model = make_tiny("mistral")
    ids = random_ids(1, 40)
    dense = logits(model, ids)
    outs = []
    for recent in (24, 100):
        with TokenFilter(ratio=0.5, skip="none", recent=recent).apply(model) as run:
            outs.append(logits(model, ids))
        assert run.stats.ratio > 0.3
        assert all(c.pairs == c.pairs_dense for c in run.stats.layers)
    torch.testing.assert_close(outs[0], dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(skip="none", kv="keep"), 'kv="keep" keeps the entries of filtered tokens'),
        (dict(kv="keep"), 'use it with skip="attention"'),  # the default is the KV side
        (dict(recent=8, skip="attention"), 'needs skip="none"'),
        (dict(recent=8, skip="block"), 'needs skip="none"'),
        (dict(recent=0, skip="none"), "recent must be an integer >= 1"),
        (dict(recent=2.5, skip="none"), "recent must be an integer >= 1"),
    ],
)
def test_bad_kv_side_config_is_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TokenFilter(ratio=0.5, **kwargs)


def test_paper_preset_pins_the_query_side_reading():
    cfg = TokenFilter.paper(ratio=0.3)
    pinned = (cfg.skip, cfg.kv, cfg.recent, cfg.schedule, cfg.start_layer)
    assert pinned == ("attention", "drop", None, "tail-linear", None)
    default = TokenFilter(ratio=0.3)  # the KV side with its window of 64 (issue 15's study)
    assert (default.skip, default.recent, default.window) == ("none", "auto", 64)
    assert TokenFilter(ratio=0.3, skip="attention").window is None
    assert TokenFilter(ratio=0.3, recent=None).window is None
    assert cfg.window is None and default.replace(skip="attention").window is None


# -- the sliding-window preset: StreamingLLM's sinks + window, from the same engine ---------------------------
def streaming_mask(b: int, t: int, recent: int, sinks: int, window: int | None) -> torch.Tensor:
    """StreamingLLM's rule with no decisions at all: query t reads key j iff j <= t and (j < sinks or t - j <
    recent), inside the model's own window. -> ``[B, T, T]``."""
    q = torch.arange(t)[:, None]
    j = torch.arange(t)[None, :]
    mask = (j <= q) & ((j < sinks) | (q - j < recent))
    if window is not None:
        mask &= q - j < window
    return mask.expand(b, t, t)


@pytest.mark.parametrize("recent", [1, 6, 16])
@pytest.mark.parametrize("band_block", [256, 4])  # 4: the band's queries in blocks shorter than the band
def test_sliding_window_preset_equals_streaming_llm(tiny, recent, band_block, monkeypatch):
    monkeypatch.setattr(kernels, "_BAND_BLOCK", band_block)
    b, t, sinks = 2, 30, 3
    ids = random_ids(b, t, seed=13)
    cfg = TokenFilter.sliding_window(recent=recent, warmup=sinks)
    with cfg.apply(tiny) as run, torch.no_grad():
        out = logits(tiny, ids)
        prefill = run.stats
        torch.testing.assert_close(_chunked(tiny, ids, 1), out, atol=1e-5, rtol=1e-5)
    n_layers = tiny.config.num_hidden_layers
    expected = forward_with_layer_masks(
        tiny, ids, {layer: streaming_mask(b, t, recent, sinks, layer_window(tiny, layer)) for layer in range(n_layers)}
    )
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert run.filtered_layers == list(range(n_layers))
    assert prefill.ratio == pytest.approx((t - sinks) / t)
    # per layer and sequence, after the prompt: the sinks and the band, less what the model's own window passed
    held = dense = 0
    for layer in range(n_layers):
        first = in_window(t, layer_window(tiny, layer))
        held += max(sinks - first, 0) + min(recent - 1, t - sinks)
        dense += t - first
    assert prefill.kv_held_fraction == pytest.approx(held / dense)


def test_sliding_window_preset_real_weights(stories):
    ids = torch.tensor([[1] + list(range(30, 70))])
    with TokenFilter.sliding_window(recent=8).apply(stories), torch.no_grad():
        out = logits(stories, ids)
    masks = {layer: streaming_mask(1, ids.shape[1], 8, 4, None) for layer in range(stories.config.num_hidden_layers)}
    torch.testing.assert_close(out, forward_with_layer_masks(stories, ids, masks), atol=1e-4, rtol=1e-4)


def test_eval_method_names_build_kv_side_filters():
    from tokenfilter.eval.methods import filter_for

    assert filter_for("kv-side", 0.5).replace(ratio=None, threshold=0.1).skip == "none"
    window = filter_for("kv-window", 0.5)
    assert (window.skip, window.recent, window.score) == ("none", 64, "similarity")
    assert filter_for("kv-window-random", 0.3).score == "random"


def test_bf16_fast_equals_reference(tiny):
    tiny = tiny.to(torch.bfloat16)
    ids = random_ids(2, 40)
    outs, decs = [], []
    for path in ("fast", "reference"):
        cfg = TokenFilter(ratio=0.5, skip="none", recent=4, path=path, record_decisions=True)
        with cfg.apply(tiny) as run:
            outs.append(logits(tiny, ids).float())
            decs.append(run.decisions)
    assert all(torch.equal(a, b) for a, b in zip(*decs, strict=True))
    torch.testing.assert_close(outs[0], outs[1], atol=3e-2, rtol=3e-2)


def test_beam_search_reorders_the_ring(tiny):
    """Beam search reorders the cache every step, the ring of the recent band included."""
    ids = random_ids(2, 20)
    kwargs = dict(max_new_tokens=8, num_beams=3, do_sample=False, num_return_sequences=2)
    outs = []
    with torch.no_grad():
        for path in ("fast", "reference"):
            with TokenFilter(threshold=0.2, warmup=2, skip="none", recent=4, path=path).apply(tiny) as run:
                outs.append(tiny.generate(ids, **kwargs))
            assert run.stats.ratio > 0
    assert torch.equal(outs[0], outs[1])


def test_use_cache_false_equals_cached(tiny):
    ids = random_ids(1, 40)
    with TokenFilter(ratio=0.5, skip="none", recent=4).apply(tiny), torch.no_grad():
        torch.testing.assert_close(tiny(ids, use_cache=False).logits, tiny(ids, use_cache=True).logits)


@pytest.mark.parametrize("recent", RECENT)
@pytest.mark.parametrize("mode", [dict(ratio=0.5), dict(threshold=0.3)], ids=["ratio", "threshold"])
def test_lean_band_decode_is_taken_and_equals_reference(monkeypatch, recent, mode):
    from tokenfilter.integration.backends.fast import FastBackend

    calls = {"n": 0}
    original = FastBackend._attend_one

    def counted(self, r, *args, **kwargs):
        calls["n"] += 1  # the lean step (its band left out when the ring holds nothing live before or after it)
        calls["idle"] = calls.get("idle", 0) + (r.band is None)
        return original(self, r, *args, **kwargs)

    monkeypatch.setattr(FastBackend, "_attend_one", counted)
    model = make_tiny("llama")
    ids, mask = left_pad([random_ids(1, 30, seed=3)[0], random_ids(1, 24, seed=4)[0]])
    runs = {}
    for path in ("fast", "reference"):
        cfg = TokenFilter(**mode, skip="none", recent=recent, path=path, record_decisions=True)
        with cfg.apply(model) as run, torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                                 output_scores=True, return_dict_in_generate=True)
        runs[path] = (out.sequences, torch.stack(out.scores), run)
        if path == "fast":
            assert calls["n"] == 9 * len(run.filtered_layers)  # every decode step took the lean path
    (f_seq, f_logits, f_run), (r_seq, r_logits, r_run) = runs["fast"], runs["reference"]
    assert torch.equal(f_seq, r_seq)
    torch.testing.assert_close(f_logits, r_logits, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(f_run.decisions, r_run.decisions, strict=True))
    assert f_run.stats.as_dict() == r_run.stats.as_dict()
    assert f_run.stats.ratio > 0


@pytest.mark.parametrize("padded", [False, True])
def test_first_call_within_the_band_is_causal_attention_and_equals_reference(monkeypatch, padded):
    """A prompt no longer than the recent window: every token reads every earlier one whatever the decisions, so
    the fast backend runs one causal attention; the same logits, decisions and statistics as the reference."""
    from tokenfilter.integration.backends.fast import FastBackend

    calls = _counting(monkeypatch, FastBackend, "_attend_within_band")
    model = make_tiny("llama")
    if padded:
        ids, mask = left_pad([random_ids(1, 30, seed=3)[0], random_ids(1, 24, seed=4)[0]])
    else:
        ids = random_ids(2, 30)
        mask = torch.ones_like(ids)
    runs = {}
    for path in BACKENDS:
        cfg = TokenFilter(ratio=0.5, recent=32, path=path, record_decisions=True)
        with cfg.apply(model) as run, torch.no_grad():
            runs[path] = (logits(model, ids, mask), run.decisions, run.stats.as_dict())
    assert calls["n"] == len(run.filtered_layers)  # the fast run's prefill, every filtered layer
    real = mask.bool()
    assert runs["fast"][2]["ratio"] > 0
    for path in BACKENDS:
        torch.testing.assert_close(runs[path][0][real], runs["reference"][0][real], atol=1e-5, rtol=1e-5)
        assert all(torch.equal(a, b) for a, b in zip(runs[path][1], runs["reference"][1], strict=True))
        assert runs[path][2] == runs["reference"][2]


@pytest.mark.parametrize("family", ["mistral", "gemma3_text"])
def test_window_layers_hold_no_more_than_the_model_and_the_stats_say_so(family):
    """On a layer with its own sliding window, what the window has passed leaves the filtered store as it leaves the
    model's own cache; the statistics count KV against what the unmodified model holds (its latest window - 1
    tokens), and they equal what the caches measure. Decode runs past the window (the lean step included)."""
    from transformers import DynamicCache

    from tokenfilter.bench.kv import measure_cache
    from tokenfilter.stats import FlopModel

    model = make_tiny(family)
    ids = random_ids(2, 40, seed=4)
    entry = FlopModel.from_config(model.config).kv_entry_bytes(4)
    run_args = dict(max_new_tokens=30, min_new_tokens=30, do_sample=False)
    dense_cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model.generate(ids, past_key_values=dense_cache, **run_args)
    dense_bytes = measure_cache(dense_cache, entry).used_bytes
    outs = {}
    for path in BACKENDS:
        cache = DynamicCache(config=model.config)
        with TokenFilter(ratio=0.5, recent=8, path=path).apply(model) as run, torch.no_grad():
            outs[path] = model.generate(ids, past_key_values=cache, **run_args)
        stats = run.stats
        assert stats.kv_bytes_dense == dense_bytes
        assert stats.kv_bytes_dense - measure_cache(cache, entry).used_bytes == stats.kv_bytes_saved > 0
        for layer in run.filtered_layers:
            window = layer_window(model, layer)
            if window is not None:
                assert cache.layers[layer].kv.stored_entries() <= 2 * (window - 1)
    assert torch.equal(outs["fast"], outs["reference"])


def test_a_lean_step_with_nothing_live_in_the_band_leaves_the_ring_and_equals_dense(monkeypatch):
    """Every score below the threshold: no token is ever only in the band, so no call slides the ring (the prefill
    included) and no lean step has a band, and generation equals the unmodified model's."""
    import tokenfilter.integration.attention as attention_module
    from tokenfilter.integration.backends.fast import FastBackend

    seen = {"lean": 0, "idle": 0}
    attend_one = FastBackend._attend_one

    def counted(self, r, *args, **kwargs):
        seen["lean"] += 1
        seen["idle"] += r.band is None
        return attend_one(self, r, *args, **kwargs)

    monkeypatch.setattr(FastBackend, "_attend_one", counted)
    slid = _counting(monkeypatch, attention_module, "advance_ring")
    model = make_tiny("llama")
    ids = random_ids(1, 30, seed=3)
    args = dict(max_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        dense = model.generate(ids, **args)
    with TokenFilter(threshold=2.0, skip="none", recent=8).apply(model) as run, torch.no_grad():
        out = model.generate(ids, **args)
    layers = len(run.filtered_layers)
    assert layers > 0 and seen["lean"] == seen["idle"] == 7 * layers and slid["n"] == 0
    assert torch.equal(out.sequences, dense.sequences)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(dense.scores), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("padded", [False, True])
def test_a_ring_left_alone_by_quiet_calls_serves_the_first_filtered_tokens(monkeypatch, padded):
    """A prompt inside the warm-up (nothing filtered: the ring is not slid, it holds no entry only the band reads),
    then decode steps that filter every token: their bands read the ring from there on. Fast and reference agree on
    every token, decision and statistic."""
    import tokenfilter.integration.attention as attention_module

    slid = _counting(monkeypatch, attention_module, "advance_ring")
    model = make_tiny("llama")
    if padded:
        ids, mask = left_pad([random_ids(1, 20, seed=3)[0], random_ids(1, 16, seed=4)[0]])
    else:
        ids, mask = random_ids(2, 20, seed=3), None
    runs = {}
    for path in ("fast", "reference"):
        cfg = TokenFilter(threshold=-2.0, warmup=20, recent=4, path=path, record_decisions=True)
        with cfg.apply(model) as run, torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                 output_scores=True, return_dict_in_generate=True)
        runs[path] = (out.sequences, torch.stack(out.scores), run)
    (f_seq, f_logits, f_run), (r_seq, r_logits, r_run) = runs["fast"], runs["reference"]
    filtered = f_run.decisions[f_run.filtered_layers[0]]  # [B, prompt + 8]
    assert not filtered[:, : ids.shape[1]].any() and filtered[:, -3:].all()  # past the warm-up, every token
    layers = len(f_run.filtered_layers)
    assert slid["n"] == 2 * 7 * layers  # the decode steps only (each path: the prefill is quiet)
    assert torch.equal(f_seq, r_seq)
    torch.testing.assert_close(f_logits, r_logits, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(f_run.decisions, r_run.decisions, strict=True))
    assert f_run.stats.as_dict() == r_run.stats.as_dict()
