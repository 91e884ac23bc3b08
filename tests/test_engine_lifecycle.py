"""Issue 2, tests 7 and 8: patching is undone, double application and bad input get clear errors."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

from tokenfilter import TokenFilter, UnsupportedModelError

from conftest import left_pad, make_tiny, random_ids


def _patch_state(model):
    dec = model.get_decoder()
    return (
        [("forward" in layer.self_attn.__dict__, "forward" in layer.mlp.__dict__) for layer in dec.layers],
        len(dec._forward_pre_hooks) + len(dec._forward_hooks),
        hasattr(model, "_tokenfilter_run"),
    )


def test_patching_undone_on_exit(tiny):
    ids = random_ids(1, 40)
    before = _patch_state(tiny)
    with torch.no_grad():
        dense = tiny(ids).logits
    with TokenFilter(ratio=0.5, skip="block").apply(tiny), torch.no_grad():
        assert _patch_state(tiny) != before
        assert not torch.equal(tiny(ids).logits, dense)
    assert _patch_state(tiny) == before
    with torch.no_grad():
        assert torch.equal(tiny(ids).logits, dense)


def test_patching_undone_after_exception(tiny):
    before = _patch_state(tiny)
    with pytest.raises(KeyError), TokenFilter(ratio=0.5, skip="block").apply(tiny):
        raise KeyError("boom")
    assert _patch_state(tiny) == before


def test_applying_twice_raises(tiny):
    with TokenFilter(ratio=0.3).apply(tiny):
        with pytest.raises(RuntimeError, match="already applied"), TokenFilter(ratio=0.5).apply(tiny):
            pass
        # the outer run is intact
        assert hasattr(tiny, "_tokenfilter_run")
    assert not hasattr(tiny, "_tokenfilter_run")


def test_unsupported_model_is_one_clear_error():
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    supported = "supports the llama, mistral, qwen2, qwen3, phi3, gemma3_text families; this model is 'gpt2'."
    with pytest.raises(UnsupportedModelError, match=re.escape(supported)):
        TokenFilter(ratio=0.5).apply(model)


def test_gemma3_variants_we_do_not_run_are_one_clear_error():
    """Gemma 3's multimodal wrapper (model_type gemma3) and a bidirectional gemma3_text are refused in one sentence
    (the check reads only the config: a bare module carrying the wrapper's config is enough)."""
    from transformers import Gemma3Config

    wrapper = torch.nn.Module()
    wrapper.config = Gemma3Config(text_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                   num_key_value_heads=2, head_dim=16, intermediate_size=64))
    with pytest.raises(UnsupportedModelError, match=r"multimodal model .* text-only model is \(Gemma3ForCausalLM"):
        TokenFilter(ratio=0.5).apply(wrapper)
    model = make_tiny("gemma3_text")
    model.config.use_bidirectional_attention = True
    with pytest.raises(UnsupportedModelError, match="attends bidirectionally") as err:
        TokenFilter(ratio=0.5).apply(model)
    assert "\n" not in str(err.value)


def test_fused_projection_without_qkv_proj_is_refused():
    model = make_tiny("phi3")
    del model.get_decoder().layers[1].self_attn.qkv_proj
    with pytest.raises(UnsupportedModelError, match="lacks a fused qkv_proj and an o_proj"):
        TokenFilter(ratio=0.5).apply(model)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(ratio=1.0), r"ratio must be in \[0, 1\)"),
        (dict(ratio=-0.1), r"ratio must be in \[0, 1\)"),
        (dict(ratio=float("nan")), "ratio must be a number"),
        (dict(ratio=0.97), "above max_layer_ratio"),
        (dict(ratio=0.5, threshold=0.3), "either ratio or threshold"),
        (dict(), "Set ratio"),
        (dict(ratio=0.5, gamma=1.0), "gamma"),
        (dict(ratio=0.5, warmup=0), "warmup"),
        (dict(ratio=0.5, fusion="max"), "fusion"),
        (dict(ratio=0.5, schedule="cosine"), "schedule"),
        (dict(ratio=0.5, skip="mlp"), "skip"),
        (dict(ratio=0.5, kv="evict"), "kv"),
        (dict(ratio=0.5, path="slow"), "path"),
        (dict(ratio=0.5, lam=-1), "lam"),
        (dict(ratio=0.5, score="norm"), "score"),
    ],
)
def test_bad_config_is_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TokenFilter(**kwargs)


def test_schedule_errors_name_the_model(tiny):
    with pytest.raises(ValueError, match="one ratio per layer"):
        TokenFilter(schedule=[0.1, 0.2]).apply(tiny)
    with pytest.raises(ValueError, match="start_layer must be in"):
        TokenFilter(ratio=0.2, start_layer=9).apply(tiny)
    with pytest.raises(ValueError, match="one threshold per layer"):
        TokenFilter(threshold=[0.5]).apply(tiny)


def test_empty_input_is_clear_error(tiny):
    with TokenFilter(ratio=0.5).apply(tiny), pytest.raises(ValueError, match="input is empty"):
        tiny(torch.zeros(1, 0, dtype=torch.long))


def test_all_padding_row_is_harmless(tiny):
    seq = random_ids(1, 60)[0]
    ids, mask = left_pad([seq, seq[:1]])
    mask[1] = 0  # a row that is all padding
    with TokenFilter(ratio=0.5, record_decisions=True).apply(tiny) as run, torch.no_grad():
        both = tiny(ids, attention_mask=mask).logits
        alone = tiny(seq[None]).logits
        gen = tiny.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    torch.testing.assert_close(both[0], alone[0], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(both[0]).all()
    assert gen.shape == (2, 64)
    assert run.stats.tokens > 0


def test_four_d_mask_is_clear_error(tiny):
    ids = random_ids(1, 10)
    mask = torch.ones(1, 1, 10, 10, dtype=torch.bool).tril()
    with TokenFilter(ratio=0.5).apply(tiny), pytest.raises(ValueError, match="2D attention_mask"):
        tiny(ids, attention_mask=mask)


def test_prefilled_cache_from_outside_is_clear_error(tiny):
    ids = random_ids(1, 20)
    with torch.no_grad():
        cache = tiny(ids, use_cache=True).past_key_values
    with TokenFilter(ratio=0.5).apply(tiny), pytest.raises(ValueError, match="filled without Token Filtering"):
        tiny(ids[:, :1], past_key_values=cache, use_cache=True)


def test_use_cache_false_and_decisions_need_recording(tiny):
    ids = random_ids(1, 40)
    with TokenFilter(ratio=0.5).apply(tiny) as run, torch.no_grad():
        a = tiny(ids, use_cache=False).logits
        b = tiny(ids, use_cache=True).logits
    torch.testing.assert_close(a, b)
    with pytest.raises(RuntimeError, match="record_decisions=True"):
        run.decisions  # noqa: B018


# -- the cache must reach the filtered attention, whatever transformers calls it ------------------------------
def test_cache_under_an_unknown_name_is_a_loud_error(tiny, monkeypatch):
    from tokenfilter.integration import cache_args

    monkeypatch.setattr(cache_args, "CACHE_KWARGS", ("a_name_no_transformers_uses",))
    with TokenFilter(threshold=2.0).apply(tiny), pytest.raises(RuntimeError, match="transformers version"):
        tiny(random_ids(1, 10), use_cache=True)


def test_cache_that_never_reaches_the_attention_is_a_loud_error(tiny):
    def drop_cache(module, args, kwargs):
        return args, {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values")}

    handles = [layer.register_forward_pre_hook(drop_cache, with_kwargs=True) for layer in tiny.get_decoder().layers]
    try:
        with TokenFilter(threshold=2.0).apply(tiny), pytest.raises(RuntimeError, match="received no cache"):
            tiny(random_ids(1, 10), past_key_values=DynamicCache(config=tiny.config), use_cache=True)
    finally:
        for h in handles:
            h.remove()


def test_decode_step_without_its_cache_is_a_loud_error(tiny):
    ids = random_ids(1, 10)
    with TokenFilter(threshold=2.0).apply(tiny), pytest.raises(RuntimeError, match="carries no cache"):
        tiny(ids[:, -1:], attention_mask=torch.ones(1, 10, dtype=torch.long), use_cache=False)
