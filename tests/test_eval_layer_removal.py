"""Issue 3: the ShortGPT-style baseline: Block Influence and reversible layer removal."""

from __future__ import annotations

import pytest
import torch

from tiny_lm import one_thread, tiny_llama
from tokenfilter.eval.shortgpt import block_influence, layers_to_remove, removed_layers


def _state(model) -> tuple:
    layers = model.get_decoder().layers
    return len(layers), [layer.self_attn.layer_idx for layer in layers], model.config.num_hidden_layers


@pytest.fixture
def model():
    return tiny_llama(vocab=128, layers=6)


def _ids(n: int = 32) -> torch.Tensor:
    return torch.randint(1, 128, (2, n), generator=torch.Generator().manual_seed(0))


def test_removing_no_layer_changes_nothing(model):
    ids = _ids()
    with torch.no_grad():
        dense = model(ids).logits
        with removed_layers(model, []):
            assert torch.equal(model(ids).logits, dense)


def test_removal_is_undone_on_exit_and_after_an_error(model):
    ids = _ids()
    before = _state(model)
    with torch.no_grad():
        dense = model(ids).logits
        with removed_layers(model, [1, 4]):
            assert _state(model) == (4, [0, 1, 2, 3], 4)
            assert not torch.equal(model(ids).logits, dense)
        assert _state(model) == before
        assert torch.equal(model(ids).logits, dense)
        with pytest.raises(KeyError), removed_layers(model, [0]):
            raise KeyError("boom")
    assert _state(model) == before


def test_removed_model_equals_a_model_built_without_those_layers(model):
    ids = _ids()
    small = tiny_llama(vocab=128, layers=4)
    keep = [0, 2, 3, 5]
    small.model.embed_tokens.load_state_dict(model.model.embed_tokens.state_dict())
    small.model.norm.load_state_dict(model.model.norm.state_dict())
    small.lm_head.load_state_dict(model.lm_head.state_dict())
    for new, old in enumerate(keep):
        small.model.layers[new].load_state_dict(model.model.layers[old].state_dict())
    with torch.no_grad(), removed_layers(model, [1, 4]):
        assert torch.allclose(model(ids).logits, small(ids).logits, atol=1e-6)


def test_generation_with_the_kv_cache_works_inside_removal(model):
    ids = _ids(12)[:1]
    with one_thread(), torch.no_grad(), removed_layers(model, [0, 3]):
        out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        seq = ids
        for _ in range(6):  # the same greedy tokens without any cache
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)


def test_block_influence_ranks_an_identity_layer_first(model):
    layer = model.get_decoder().layers[2]
    with torch.no_grad():  # attention and MLP outputs zero: the layer passes its input through
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    with one_thread():
        influence = block_influence(model, _ids(48))
    assert len(influence) == 6
    assert influence[2] == pytest.approx(0.0, abs=1e-6)
    assert all(0 <= bi <= 2 for bi in influence)
    assert layers_to_remove(influence, 1) == [2]


def test_layers_to_remove_takes_the_lowest_and_sorts_them():
    assert layers_to_remove([0.5, 0.1, 0.9, 0.05, 0.3], 3) == [1, 3, 4]
    assert layers_to_remove([0.5, 0.1], 0) == []
