"""The operator-count shortcuts of the decode step compute what the general code computes.

* the decode steps registered beside the scores (``Score.step``): the one-token ``similarity``, ``cumulative-mean``
  and ``two-horizon`` equal the scores, bit for bit (scores and running memories), for every fusion and in bf16;
* a layer whose threshold is ``+inf`` can filter nothing, so it keeps its own code (no scoring), unless the scores
  are recorded; the logits are the unmodified model's either way.
"""

from __future__ import annotations

import pytest
import torch

from tokenfilter import TokenFilter
from tokenfilter.algorithm.scores import FUSIONS, SCORES, ScoreState
from tokenfilter.algorithm.scores.similarity import similarity_step, two_horizon_step

from conftest import make_tiny, random_ids


def _params(fusion: str) -> dict:
    return {"gamma": 0.9, "fusion": fusion, "lam": 1.0}


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_similarity_step_is_the_registry_score_bit_for_bit(fusion, batch, dtype):
    g = torch.Generator().manual_seed(batch)
    k, v = (torch.randn(batch, 1, 3, 16, generator=g).to(dtype) for _ in range(2))
    anchors = torch.randn(batch, 1 if fusion in ("key", "key-min") else 2, 3, 16, generator=g)
    state = ScoreState(valid=None, seen=torch.full((batch,), 5), memory={"anchors": anchors}, generator=g,
                       params=_params(fusion))
    want = SCORES["similarity"](k, v, state)[:, 0]
    memory = {"anchors": anchors}
    got = similarity_step(k, v, ScoreState(None, state.seen, memory, params=_params(fusion)))
    assert got.dtype == want.dtype == torch.float32 and got.shape == (batch,)
    assert torch.equal(got, want)
    assert torch.equal(memory["anchors"], state.memory["anchors"])


@pytest.mark.parametrize("name", ["cumulative-mean", "two-horizon"])
@pytest.mark.parametrize("fusion", FUSIONS)
# 100 rows: 600 similarities per score, 1200 for the two-horizon step's two scores fused in one call (either side
# of fuse_stacked's few-rows limit): each must still give the numbers its own score gives
@pytest.mark.parametrize("batch", [1, 3, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mean_steps_are_the_registry_scores_bit_for_bit(name, fusion, batch, dtype):
    g = torch.Generator().manual_seed(batch)
    k, v = (torch.randn(batch, 1, 3, 16, generator=g).to(dtype) for _ in range(2))
    parts = 1 if fusion in ("key", "key-min") else 2  # a fusion of the keys alone keeps the keys' sums only
    memory = {"anchors": torch.randn(batch, parts, 3, 16, generator=g),
              "sum": torch.randn(batch, parts, 3, 16, generator=g)}
    seen = torch.arange(5, 5 + batch)  # rows at different lengths
    state = ScoreState(valid=None, seen=seen, memory=dict(memory), generator=g, params=_params(fusion))
    want = SCORES[name](k, v, state)[:, 0]
    got = SCORES[name].step(k, v, ScoreState(None, seen, memory, params=_params(fusion)))
    assert got.dtype == want.dtype == torch.float32 and got.shape == (batch,)
    assert torch.equal(got, want)
    assert memory.keys() == state.memory.keys()
    for key in memory:
        assert torch.equal(memory[key], state.memory[key]), key


def test_similarity_step_without_anchors_does_nothing():
    memory: dict = {}
    seen = torch.ones(1, dtype=torch.long)
    ones = torch.ones(1, 1, 2, 4)
    assert similarity_step(ones, ones, ScoreState(None, seen, memory, params=_params("variance"))) is None
    assert memory == {}
    assert SCORES["similarity"].step is similarity_step and SCORES["key-norm"].step is None
    memory = {"anchors": torch.ones(1, 1, 2, 4)}  # one of the two memories: neither is touched
    assert two_horizon_step(ones, ones, ScoreState(None, seen, memory, params=_params("key"))) is None
    assert torch.equal(memory["anchors"], torch.ones(1, 1, 2, 4)) and list(memory) == ["anchors"]


def _patched(model) -> list[int]:
    return [i for i, layer in enumerate(model.model.layers) if "forward" in layer.self_attn.__dict__]


def test_infinite_threshold_leaves_the_layers_alone():
    model = make_tiny("llama")
    ids = random_ids(2, 20)
    with torch.no_grad():
        dense = model(ids).logits
    taus = [None, float("inf"), 0.5, float("inf")]
    with TokenFilter(threshold=float("inf"), start_layer=0).apply(model) as run:
        assert _patched(model) == [] and run.filtered_layers == []
        with torch.no_grad():
            assert torch.equal(model(ids).logits, dense)
        assert run.stats.ratio == 0.0
    with TokenFilter(threshold=taus).apply(model) as run:
        assert _patched(model) == run.filtered_layers == [2]
    with TokenFilter(threshold=float("inf"), start_layer=0, record_decisions=True).apply(model) as run:
        assert _patched(model) == [0, 1, 2, 3]  # the scores are wanted: computed, nothing filtered
        with torch.no_grad():
            assert torch.equal(model(ids).logits, dense)
        assert all(torch.isfinite(s).all() for s in run.scores) and not any(d.any() for d in run.decisions)


@pytest.mark.parametrize("rotary", [16, 8])  # every dimension of a head, or half of it (Phi-3's partial rotary)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_by_roll_is_the_models_rope_bit_for_bit(rotary, dtype):
    from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb

    from tokenfilter.integration.attention import rope, rope_tables

    g = torch.Generator().manual_seed(rotary)
    q, k = (torch.randn(2, 3, 5, 16, generator=g).to(dtype) for _ in range(2))  # [B, H, T, d]
    angles = torch.randn(2, 5, rotary // 2, generator=g).repeat(1, 1, 2)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)  # [B, T, r]
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
    tables = rope_tables(cos, sin)
    for x, want in ((q, want_q), (k, want_k)):
        got = rope(x.transpose(1, 2), tables).transpose(1, 2)  # rope reads [B, T, H, d]
        assert got.dtype == dtype and torch.equal(got, want)


@pytest.mark.parametrize(("family", "embeddings"), [("llama", 1), ("gemma3_text", 2)])
def test_rope_tables_are_built_once_per_call_and_position_embedding(family, embeddings, monkeypatch):
    import tokenfilter.integration.run as run_module

    built = []
    real_tables = run_module.rope_tables

    def counting(cos, sin):
        built.append(cos.shape)
        return real_tables(cos, sin)

    monkeypatch.setattr(run_module, "rope_tables", counting)
    model = make_tiny(family)
    ids = random_ids(2, 30)
    with torch.no_grad():
        dense = model.generate(ids, max_new_tokens=4, do_sample=False)
        with TokenFilter(threshold=2.0, start_layer=0).apply(model) as run:  # every layer scored, nothing filtered
            out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert len(run.filtered_layers) == 4 and torch.equal(out, dense)
    assert len(built) == 4 * embeddings  # the prefill and three decode steps, each once per embedding


def test_ragged_kv_settles_deferred_decode_steps_before_anything_reads_them():
    from tokenfilter.integration.kv_store import RaggedKV

    b, h, d = 2, 1, 2
    kv = RaggedKV()

    def column(c: int, t: int = 1) -> torch.Tensor:
        return torch.arange(c, c + t, dtype=torch.float32).view(1, 1, t, 1).expand(b, h, t, d).clone()

    kv.append(column(0, 5), column(0, 5), torch.arange(5), torch.ones(b, 5, dtype=torch.bool))
    expected = list(range(5))
    for col in [*range(5, 40), *range(50, 60)]:  # a gap in the columns starts a new run; the buffer grows inside runs
        kv.append_one(column(col)[:, :, 0], column(col)[:, :, 0], col, None, b)
        expected.append(col)
        if col == 20:  # the window passes columns 0..9 mid-run: what it reads is settled first
            assert kv.evict_before(10) == b * 10
            expected = expected[10:]
    assert (kv.max_len, kv.min_len, kv.total) == (len(expected),) * 2 + (b * len(expected),)
    keys, _, pos, valid = kv.view()
    assert valid.all() and kv.lengths.tolist() == [len(expected)] * b
    for r in range(b):
        assert pos[r].tolist() == expected and keys[r, 0, :, 0].tolist() == [float(c) for c in expected]
    kv.append_one(column(60)[:, :, 0], column(60)[:, :, 0], 60, torch.tensor([True, False]), 1)  # one row stores
    kv.select_batch(torch.tensor([1, 0]))
    assert kv.lengths.tolist() == [len(expected), len(expected) + 1] and kv.pos[1, len(expected)].item() == 60
