"""Long-context evaluation on the real SmolLM2-135M-Instruct (slow: loads the model, generates)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokenfilter.longctx import longbench
from tokenfilter.longctx.needle import HAYSTACK_DIR, NeedleBuilder

pytestmark = pytest.mark.slow


def _load() -> tuple[object, object]:
    try:
        from tokenfilter.models import load_model
    except ImportError:
        from tokenfilter.loading import load_model
    try:
        return load_model()
    except ValueError as exc:  # the default model package is not installed
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def smollm2() -> tuple[object, object]:
    return _load()


def _need(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"{path} is absent")


def test_needle_builder_smollm2_tokenizer(smollm2: tuple[object, object]) -> None:
    _need(HAYSTACK_DIR)
    _, tok = smollm2
    builder = NeedleBuilder(tok)
    assert builder.chat  # SmolLM2-Instruct has a chat template
    for p in builder.grid((1024, 4096, 8176), (0, 25, 50, 75, 100)):
        assert abs(len(p.input_ids) - p.length) <= 2
        assert abs(p.actual_depth - p.depth) <= 3
        assert tok.decode(p.input_ids[p.needle_start : p.needle_end]).strip() == builder.needle.sentence


def test_run_longctx_smollm2(smollm2: tuple[object, object], tmp_path: Path) -> None:
    _need(HAYSTACK_DIR)
    _need(longbench.MINILONGBENCH_DIR)
    from tokenfilter import TokenFilter
    from tokenfilter.longctx.runner import run_longctx

    model, tok = smollm2
    methods = {"dense": None, "ratio=0.1": TokenFilter(ratio=0.1)}
    result = run_longctx(
        model,
        tok,
        methods,
        limit=1,
        output_dir=tmp_path,
        progress=False,
        needle_lengths=(512,),
        needle_depths=(0, 100),
        max_length=512,
        tasks=["trec", "passage_retrieval_en"],
        needle_max_new_tokens=10,
        max_new_tokens_cap=16,
    )
    dense, filtered = result["methods"]["dense"], result["methods"]["ratio=0.1"]
    assert dense["stats"] is None
    assert abs(filtered["stats"]["ratio"] - 0.1) < 0.05
    for entry in (dense, filtered):
        assert set(entry["needle"]["grid"]["512"]) == {"0", "100"}
        assert all(t["n"] == 1 for t in entry["longbench"]["tasks"].values())
    # a 512-token needle is easy: the dense model finds it at least once
    assert dense["needle"]["mean"] > 0
    assert (tmp_path / "needle_dense.png").exists() and (tmp_path / "needle_ratio_0.1.png").exists()
    assert json.loads((tmp_path / "longctx.json").read_text())["config"]["needle_lengths"] == [512]
