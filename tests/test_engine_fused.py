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


def _prefill_state(parts: int, padded: bool, fusion: str = "variance") -> tuple[torch.Tensor, ScoreState]:
    """Tokens ``[3, 40, parts, 3, 16]`` of a fresh row, a continuing row and (``padded``) a row of 25 real tokens
    then padding, with running memories."""
    g = torch.Generator().manual_seed(parts + 2 * padded)
    x = torch.randn(3, 40, parts, 3, 16, generator=g)
    valid = None
    if padded:
        valid = torch.ones(3, 40, dtype=torch.bool)
        valid[2, 25:] = False
    memory = {"anchors": torch.randn(3, parts, 3, 16, generator=g), "sum": torch.randn(3, parts, 3, 16, generator=g)}
    return x, ScoreState(valid, torch.tensor([0, 7, 0]), memory, params=_params(fusion))


@pytest.mark.parametrize("parts", [1, 2])
@pytest.mark.parametrize("padded", [False, True])
def test_cosines_to_the_previous_anchors_are_head_cosine_bit_for_bit(parts, padded):
    """The prefill takes each token's cosine to its previous anchor on the reductions (the anchors are not copied
    shifted): the numbers are ``head_cosine``'s against the previous anchors built out, for a fresh row (its first
    token compared with itself), a continuing row and padding; the memories are each row's last real anchors."""
    from tokenfilter.algorithm.anchors import ema_scan, sum_scan
    from tokenfilter.algorithm.scores import head_cosine
    from tokenfilter.algorithm.scores.similarity import horizon_cosines

    x, state = _prefill_state(parts, padded)
    anchors, sums = state.memory["anchors"], state.memory["sum"]
    got = horizon_cosines(x, state)
    b, n = x.shape[:2]
    past = (state.seen > 0)[:, None, None, None]
    first = torch.where(past, anchors, x[:, 0])
    after = ema_scan(x.reshape(b, n, parts * 3, 16), first.reshape(b, parts * 3, 16), 0.9).view(x.shape)
    want_ema = head_cosine(x, torch.cat([first[:, None], after[:, :-1]], dim=1))
    real = torch.ones(b, n, dtype=torch.bool) if state.valid is None else state.valid
    xs = x * real[:, :, None, None, None]
    total = sum_scan(xs.reshape(b, n, parts * 3, 16), sums.reshape(b, parts * 3, 16)).view(x.shape)
    earlier = torch.cat([sums[:, None], total[:, :-1]], dim=1)
    count = state.seen[:, None] + torch.arange(n)
    want_sum = head_cosine(xs, torch.where((count > 0)[:, :, None, None, None], earlier, xs))
    assert torch.equal(got[0][real], want_ema[real]) and torch.equal(got[1][real], want_sum[real])
    last = real.sum(-1) - 1
    assert torch.equal(state.memory["anchors"], after[torch.arange(b), last])
    assert torch.equal(state.memory["sum"], total[torch.arange(b), last])


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("padded", [False, True])
def test_two_horizon_is_the_lower_of_its_two_scores_bit_for_bit(fusion, padded):
    """``two-horizon`` computes both horizons together; each is what its own score gives, memories included."""
    x, state = _prefill_state(2, padded, fusion)
    k, v = x[:, :, 0], x[:, :, 1]
    if fusion in ("key", "key-min"):  # a fusion of the keys alone keeps the keys' memories only
        state.memory = {key: m[:, :1] for key, m in state.memory.items()}
    alone = {}
    for name, key in (("similarity", "anchors"), ("cumulative-mean", "sum")):
        own = ScoreState(state.valid, state.seen, dict(state.memory), params=state.params)
        alone[name] = SCORES[name](k, v, own)
        alone[key] = own.memory[key]
    got = SCORES["two-horizon"](k, v, state)
    real = torch.ones(3, 40, dtype=torch.bool) if state.valid is None else state.valid
    want = torch.minimum(alone["similarity"], alone["cumulative-mean"])
    assert torch.equal(got[real], want[real])
    assert torch.equal(state.memory["anchors"], alone["anchors"]) and torch.equal(state.memory["sum"], alone["sum"])


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


def test_decode_steps_count_their_tokens_when_the_count_is_next_read():
    """A lean step adds its token to the layer's count of real tokens lazily (no operator per step); whoever reads
    the count next (the band's indices, a later chunk) gets every step's token."""
    from transformers import DynamicCache

    model = make_tiny("llama")
    ids = random_ids(2, 30)
    with TokenFilter(threshold=2.0, start_layer=0).apply(model) as run, torch.no_grad():  # nothing filtered
        cache = DynamicCache(config=model.config)
        model(ids, past_key_values=cache)
        layer = cache.layers[run.filtered_layers[0]]
        assert layer.real_seen.tolist() == [30, 30] and layer._unsettled == 0
        for i in range(3):
            model(ids[:, i : i + 1], past_key_values=cache)
        assert layer._unsettled == 3  # the steps never read the count
        assert layer.real_seen.tolist() == [33, 33] and layer._unsettled == 0
        model(ids[:, 3:4], past_key_values=cache)
        model(ids[:, :5], past_key_values=cache)  # a chunk reads the count: the step before it is in it
        assert layer.real_seen.tolist() == [39, 39] and layer._unsettled == 0
