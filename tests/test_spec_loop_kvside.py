"""The default filter (``TokenFilter(ratio=0.5)``: KV side, recent window, the two-horizon key score, uniform
schedule) against the independent per-token oracle of ``spec_loop.py``: on left-padded batches, over a prefill
and decode steps, the engine's scores, decisions and logits equal those of a forward whose filtered layers score,
decide and attend token by token under the SPEC's visibility rule."""

from __future__ import annotations

import math

import pytest
import torch

from masked_eager import layer_window
from test_engine_equivalence import thresholds_that_filter
from tokenfilter import TokenFilter

from conftest import BACKENDS, left_pad, make_tiny, positions, random_ids
from spec_loop import LoopScorer, loop_scores, oracle_forward, uniform_schedule

NEW_TOKENS = 5
# the engine computes in float32 and the oracle in double; a score differs by rounding only
SCORE_TOL = 2e-5
LOGIT_TOL = dict(atol=2e-4, rtol=2e-4)


def engine_run(model, ids, mask, cfg):
    """Prefill logits, then ``generate`` (greedy, ``NEW_TOKENS``) under ``cfg``: ``(prefill logits, prefill
    scores/decisions, generate output, scores/decisions of the generate call, stats)``."""
    with cfg.apply(model) as run, torch.no_grad():
        pre = model(ids, attention_mask=mask, position_ids=positions(mask)).logits
        pre_scores, pre_dec = run.scores, run.decisions
        gen = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                             do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        return pre, (pre_scores, pre_dec), gen, (run.scores, run.decisions), run.filtered_layers, run.stats


def check_against_oracle(model, ids, mask, cfg):
    n_layers = model.config.num_hidden_layers
    pre, (pre_scores, pre_dec), gen, (scores, decisions), filtered_layers, stats = engine_run(model, ids, mask, cfg)
    assert cfg.schedule == "uniform" and cfg.skip == "none" and cfg.kv == "drop" and cfg.pre_rope
    if cfg.mode == "ratio":
        ratios = uniform_schedule(cfg.ratio, n_layers, cfg.start_layer, cfg.max_layer_ratio)
        assert filtered_layers == [i for i, r in enumerate(ratios) if r > 0]
        targets = dict(ratio_per_layer=ratios)
    else:  # a per-layer list (None: the layer never filters)
        assert filtered_layers == [i for i, tau in enumerate(cfg.threshold) if tau is not None]
        targets = dict(tau_per_layer=list(cfg.threshold))

    prompt = ids.shape[1]
    full = gen.sequences[:, :-1]  # the prompt and every decoded token but the last (which no step has read)
    full_mask = torch.cat([mask, torch.ones(mask.shape[0], NEW_TOKENS - 1, dtype=mask.dtype)], dim=1)
    rule = dict(**targets, warmup=cfg.warmup, score=cfg.score, gamma=cfg.gamma, fusion=cfg.fusion,
                lam=cfg.lam)
    o_logits, o_scores, o_dec = oracle_forward(model, full, full_mask, prompt, recent=cfg.window, **rule)
    real = full_mask.bool()
    # the inputs are long enough for the window to hide filtered keys: without it, the oracle's logits differ
    # (unless the model's own window is no wider: then the band covers all a query may read, SPEC "Recent window")
    unwindowed = oracle_forward(model, full, full_mask, prompt, recent=10**9, **rule)[0]
    windows = [layer_window(model, layer) for layer in filtered_layers]
    hides = any(w is None or cfg.window < w for w in windows)
    assert ((unwindowed - o_logits)[real].abs().max() > 1e-3) == hides

    # scores and decisions, the prefill's and the whole generate call's (prompt + decode steps)
    for got_scores, got_dec, width in ((pre_scores, pre_dec, prompt), (scores, decisions, full.shape[1])):
        assert len(got_scores) == n_layers and all(s.shape == (ids.shape[0], width) for s in got_scores)
        for layer in range(n_layers):
            if layer not in o_scores:
                assert got_scores[layer].isnan().all() and not got_dec[layer].any()
                continue
            for b in range(ids.shape[0]):
                for t in range(width):
                    s = o_scores[layer][b][t]
                    if s is None:
                        assert got_scores[layer][b, t].isnan(), (layer, b, t)
                    else:
                        assert got_scores[layer][b, t].item() == pytest.approx(s, abs=SCORE_TOL), (layer, b, t)
            assert got_dec[layer].tolist() == [row[:width] for row in o_dec[layer]], layer

    # logits: the prefill at every real prompt position, then each decode step's
    torch.testing.assert_close(pre[real[:, :prompt]], o_logits[:, :prompt][real[:, :prompt]], **LOGIT_TOL)
    for i, step in enumerate(gen.logits):
        torch.testing.assert_close(step, o_logits[:, prompt - 1 + i], **LOGIT_TOL)

    # the run really filtered, in the prefill and in the decode steps
    decoded = sum(int(d[:, prompt:].sum()) for d in decisions)
    assert stats.ratio > 0.2 and decoded > 0
    return o_dec


DEFAULT = {}  # TokenFilter(ratio=0.5) itself: recent="auto" (64), the two-horizon key score, gamma 0.95, ...
SHORT_WINDOW = {"recent": 8}  # the window shorter than the prompts, so the visibility rule hides filtered keys


@pytest.mark.parametrize("path", BACKENDS)
@pytest.mark.parametrize("extra", [DEFAULT, SHORT_WINDOW], ids=["default", "recent8"])
def test_default_filter_equals_loop_oracle(tiny, path, extra):
    # 90 real tokens: longer than the default window of 64, so its band too leaves filtered keys behind
    ids, mask = left_pad([random_ids(1, 90, seed=21)[0], random_ids(1, 73, seed=22)[0]])
    cfg = TokenFilter(ratio=0.5, path=path, record_decisions=True, **extra)
    check_against_oracle(tiny, ids, mask, cfg)


@pytest.mark.parametrize("path", BACKENDS)
def test_default_filter_equals_loop_oracle_real_weights(stories, path):
    g = torch.Generator().manual_seed(5)
    seqs = [torch.cat([torch.tensor([1]), torch.randint(3, 512, (n - 1,), generator=g)]) for n in (100, 81)]
    ids, mask = left_pad(seqs)
    cfg = TokenFilter(ratio=0.5, path=path, record_decisions=True)
    check_against_oracle(stories, ids, mask, cfg)


@pytest.mark.parametrize("path", BACKENDS)
@pytest.mark.parametrize("score,fusion", [("two-horizon", "variance"), ("two-horizon", "min"),
                                          ("cumulative-mean", "key-min"), ("similarity", "mean")])
def test_threshold_mode_equals_loop_oracle(path, score, fusion):
    """The loop's other scores and fusions, under per-layer thresholds (the decode steps decide by them too)."""
    model = make_tiny("llama")
    ids, mask = left_pad([random_ids(1, 40, seed=31)[0], random_ids(1, 33, seed=32)[0]])
    kwargs = dict(score=score, fusion=fusion, gamma=0.8, lam=0.7, recent=6)
    taus = thresholds_that_filter(model, ids, **kwargs)
    cfg = TokenFilter(threshold=taus, path=path, record_decisions=True, **kwargs)
    check_against_oracle(model, ids, mask, cfg)


# -- the oracle's own pieces ---------------------------------------------------------------------------------
def test_loop_two_horizon_is_the_lower_of_its_horizons():
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(1, 12, 2, 8, generator=g), torch.randn(1, 12, 2, 8, generator=g)
    real = torch.ones(1, 12, dtype=torch.bool)
    both = {s: loop_scores(keys, values, real, 0.95, "key", 1.0, score=s)[0]
            for s in ("similarity", "cumulative-mean", "two-horizon")}
    assert both["two-horizon"] == [min(a, c) for a, c in zip(both["similarity"], both["cumulative-mean"],
                                                                strict=True)]
    assert both["two-horizon"][0] == pytest.approx(1.0)  # the first token against itself, on both horizons
    # by hand at token 2: the EMA anchor (k0 -> 0.95 k0 + 0.05 k1) and the mean of k0, k1, key heads averaged
    k = keys[0].double()
    ema = 0.95 * k[0] + 0.05 * k[1]
    mean = (k[0] + k[1]) / 2
    cos = torch.nn.functional.cosine_similarity
    assert both["similarity"][2] == pytest.approx(float(cos(k[2], ema, dim=-1).mean()))
    assert both["cumulative-mean"][2] == pytest.approx(float(cos(k[2], mean, dim=-1).mean()))
    scorer = LoopScorer("two-horizon", 0.95, "key")
    assert [scorer(keys[0, t], values[0, t]) for t in range(12)] == both["two-horizon"]
    assert not math.isnan(both["two-horizon"][-1])
