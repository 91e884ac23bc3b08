"""The engine's performance shortcuts (added for the benchmark) compute what the general path computes.

* the lean decode step (the layer path's one-token branch, whose attention is ``FastBackend._attend_one``): one
  token per row, every row real and past warm-up, on the query side and on the KV side with its band;
* causal prefill shortcut: a prefill into an empty store whose stored tokens are the queries;
* ``RaggedKV`` Python mirrors (``max_len``, ``min_len``, ``total``) and its bounded growth.
"""

from __future__ import annotations

import pytest
import torch

from tiny_lm import one_thread
from tokenfilter import TokenFilter
from tokenfilter.config import SPEC_SCORE
from tokenfilter.integration.backends import BACKENDS
from tokenfilter.integration.backends import fast as fast_backend
from tokenfilter.integration.kv_store import RaggedKV

from conftest import left_pad, make_tiny, random_ids


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls on a shared machine: one thread avoids waiting on descheduled OpenMP workers."""
    with one_thread():
        yield


@pytest.fixture
def count_fast_decode(monkeypatch):
    calls = {"n": 0}
    original = fast_backend.FastBackend._attend_one

    def counted(self, *args, **kwargs):
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(fast_backend.FastBackend, "_attend_one", counted)
    return calls


def _inputs(batch: int):
    seqs = [random_ids(1, 40, seed=3)[0], random_ids(1, 33, seed=4)[0], random_ids(1, 37, seed=5)[0]][:batch]
    return left_pad(seqs)


def _generate(model, cfg, ids, mask, new=12):
    with cfg.apply(model) as run, torch.no_grad():
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0,
            output_scores=True, return_dict_in_generate=True,
        )
    return out.sequences, torch.stack(out.scores), run


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("kv", ["drop", "keep"])
@pytest.mark.parametrize("skip", ["attention", "block"])
@pytest.mark.parametrize("mode", [dict(ratio=0.5), dict(threshold=0.3)], ids=["ratio", "threshold"])
def test_decode_fast_path_equals_reference(count_fast_decode, family, batch, kv, skip, mode):
    model = make_tiny(family)
    ids, mask = _inputs(batch)
    fast_seq, fast_logits, fast_run = _generate(model, TokenFilter(**mode, kv=kv, skip=skip, record_decisions=True),
                                                ids, mask)
    assert count_fast_decode["n"] == 11 * len(fast_run.filtered_layers)  # every decode step took the fast path
    ref_seq, ref_logits, ref_run = _generate(
        model, TokenFilter(**mode, kv=kv, skip=skip, path="reference", record_decisions=True), ids, mask
    )
    assert torch.equal(fast_seq, ref_seq)
    torch.testing.assert_close(fast_logits, ref_logits, atol=1e-5, rtol=1e-5)
    for a, b in zip(fast_run.decisions, ref_run.decisions, strict=True):
        assert torch.equal(a, b)
    assert fast_run.stats.as_dict() == ref_run.stats.as_dict()
    assert fast_run.stats.ratio > 0
    # without recording, the fast path counts in Python: same statistics, same tokens
    plain_seq, _, plain_run = _generate(model, TokenFilter(**mode, kv=kv, skip=skip), ids, mask)
    assert torch.equal(plain_seq, ref_seq)
    assert plain_run.stats.as_dict() == ref_run.stats.as_dict()


def test_decode_fast_path_scores_are_bitwise_the_general_ones(count_fast_decode):
    """kv=keep, one sequence: fast and reference caches hold the same entries, so every score is the same bits
    (the SPEC's score, the one with a fused decode step)."""
    model = make_tiny("llama")
    ids = random_ids(1, 30)
    mask = torch.ones_like(ids)
    runs = []
    for path in ("fast", "reference"):
        cfg = TokenFilter(ratio=0.5, skip="attention", kv="keep", path=path, record_decisions=True, **SPEC_SCORE)
        _, _, run = _generate(model, cfg, ids, mask)
        runs.append(run)
    assert count_fast_decode["n"] > 0
    for a, b in zip(runs[0].scores, runs[1].scores, strict=True):
        assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))


def test_past_the_layers_own_window_decode_reads_the_evicted_store_and_equals_the_reference(count_fast_decode):
    """Past a layer's own window the store has let go of what the window passed (the band is capped at the
    window), so the lean step reads it whole; it gives the reference path's tokens and logits."""
    model = make_tiny("mistral")  # window 24 on every layer, below the default band of 64
    ids = random_ids(1, 30)
    out = {p: _generate(model, TokenFilter(ratio=0.5, path=p), ids, torch.ones_like(ids), new=6) for p in BACKENDS}
    assert count_fast_decode["n"] > 0
    assert torch.equal(out["fast"][0], out["reference"][0])
    torch.testing.assert_close(out["fast"][1], out["reference"][1], rtol=1e-4, atol=1e-5)


def test_a_budget_past_the_layers_own_window_uses_the_general_path(count_fast_decode):
    model = make_tiny("mistral")  # a budget does not evict by the layer's window: the general step masks it
    ids = random_ids(1, 30)
    _generate(model, TokenFilter(budget=16, recent=8), ids, torch.ones_like(ids), new=4)
    assert count_fast_decode["n"] == 0


@pytest.mark.parametrize("kv", ["drop", "keep"])
def test_causal_prefill_shortcut_equals_reference(monkeypatch, kv):
    model = make_tiny("llama")
    ids, mask = _inputs(3)
    seen = []
    original = fast_backend.attend

    def spy(*args, causal=False, **kwargs):
        seen.append(causal)
        return original(*args, causal=causal, **kwargs)

    monkeypatch.setattr(fast_backend, "attend", spy)
    outs = {}
    for path in ("fast", "reference"):
        # the query side's shortcut
        cfg = TokenFilter(ratio=0.5, skip="attention", kv=kv, path=path, record_decisions=True)
        with cfg.apply(model) as run, torch.no_grad():
            outs[path] = (model(ids, attention_mask=mask).logits, run.decisions, run.stats.as_dict())
    # kv=drop: the stored tokens are the kept queries, so the shortcut applies; kv=keep: it must not
    assert any(seen) == (kv == "drop")
    real = mask.bool()
    torch.testing.assert_close(outs["fast"][0][real], outs["reference"][0][real], atol=1e-5, rtol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(outs["fast"][1], outs["reference"][1], strict=True))
    assert outs["fast"][2] == outs["reference"][2]


def test_ragged_kv_mirrors_contents_and_bounded_growth():
    g = torch.Generator().manual_seed(0)
    b, h, d = 3, 2, 4
    kv = RaggedKV()
    rows: list[list[int]] = [[] for _ in range(b)]  # the columns each row stores, in order
    col = 0
    for step in range(60):
        if step % 7 == 0:  # a chunk through the general append
            t = 5
            store = torch.rand(b, t, generator=g) < 0.6
            k = torch.arange(col, col + t, dtype=torch.float32).view(1, 1, t, 1).expand(b, h, t, d).clone()
            kv.append(k, k.clone(), torch.arange(col, col + t), store)
            for r in range(b):
                rows[r] += [col + i for i in range(t) if store[r, i]]
            col += t
        else:  # one column through append_one
            store = torch.rand(b, generator=g) < 0.5
            if step % 3 == 0:
                store[:] = True
            n = int(store.sum())
            k = torch.full((b, h, d), float(col))
            kv.append_one(k, k.clone(), col, None if n == b else store, n)
            for r in range(b):
                if store[r]:
                    rows[r].append(col)
            col += 1
        lengths = [len(r) for r in rows]
        assert (kv.max_len, kv.min_len, kv.total) == (max(lengths), min(lengths), sum(lengths))
        assert kv.lengths.tolist() == lengths
        keys, values, pos, valid = kv.view()
        for r in range(b):
            assert pos[r][valid[r]].tolist() == rows[r]
            assert keys[r, 0, : lengths[r], 0].tolist() == [float(c) for c in rows[r]]
        lk, lv, mask = kv.lean_view()
        assert lk.shape[2] == max(lengths)
        assert (mask is None) == (min(lengths) == max(lengths))
        if mask is not None:
            assert torch.equal(mask[:, 0, 0], valid)
        cap = kv.keys.shape[2]
        assert cap <= max(kv.max_len + kv.max_len // 4 + 16, 16)  # slack bounded: a quarter, or 16 entries
    assert kv.stored_entries() == sum(len(r) for r in rows)
    assert kv.allocated_bytes() == 2 * b * h * kv.keys.shape[2] * d * 4
