"""``tokenfilter bench --memory``: each trial in a child process of its own, on a tiny random Llama saved to disk.

The child must report what its cache really held (a filtered run holds fewer key/value bytes than dense, and the
peak during the call is at least what is left at the end), the comparison must be the arithmetic it names, and
kvpress rows (peer venv only) must show the dense layer kvpress holds before it prunes.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

import pytest

import tiny_lm
from tokenfilter.bench import cli as bench_cli
from tokenfilter.bench import memory
from tokenfilter.peers import env as peer_env

LENGTH = 200


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("tiny-memory")
    tiny_lm.tiny_llama(128, layers=4).save_pretrained(folder)
    return {"path": str(folder), "kwargs": {}, "dtype": "float32", "threads": 1}


def _ids(n: int = LENGTH) -> list[int]:
    return [3 + (7 * i) % 120 for i in range(n)]


def _child(tiny_model: dict, method: dict, chunk: int | None, tmp_path: Path, python=sys.executable) -> dict:
    spec = {"model": tiny_model, "ids": _ids(), "chunk": chunk, "method": method}
    return memory.run_child(python, spec, tmp_path)


def _entry_bytes(tiny_model: dict) -> int:
    return 2 * 2 * 16 * 4  # K and V, 2 KV heads of 16, float32


@pytest.mark.parametrize("chunk", [None, 64])
def test_a_child_reports_the_cache_it_held(tiny_model, tmp_path, chunk):
    dense = _child(tiny_model, {"kind": "dense"}, chunk, tmp_path)
    tf = _child(tiny_model, {"kind": "tokenfilter", "preset": "default", "ratio": 0.5}, chunk, tmp_path)
    window = _child(tiny_model, {"kind": "tokenfilter", "preset": "sliding-window", "recent": 16}, chunk, tmp_path)
    assert dense["kv_end"] == dense["kv_peak"] == 4 * LENGTH * _entry_bytes(tiny_model)  # 4 layers, every token
    assert 0 < tf["kv_end"] < dense["kv_end"] and tf["kv_peak"] >= tf["kv_end"]
    assert tf["kv_held_fraction"] < 1
    assert window["kv_end"] < tf["kv_end"]
    for row in (dense, tf, window):
        assert row["rss_loaded"] > 0 and row["peak_rss"] >= row["rss_loaded"] * 0.5
        assert row["versions"]["torch"]


def test_a_long_generate_under_a_budget_holds_its_bound(tiny_model, tmp_path):
    """``longgen``'s memory part: a child generating ``new_tokens`` greedily; under ``budget=N`` the filtered layers
    (2 and 3) hold at most N + 1 slots each (the free slot a decode step writes into), however long the text."""
    spec = {"model": tiny_model, "ids": _ids(), "chunk": None, "new_tokens": 120}
    dense = memory.run_child(sys.executable, {**spec, "method": {"kind": "dense"}}, tmp_path)
    budget = memory.run_child(sys.executable, {**spec, "method": {"kind": "tokenfilter", "preset": "budget",
                                                                  "budget": 80}}, tmp_path)
    e = _entry_bytes(tiny_model)
    assert dense["kv_end"] == 4 * (LENGTH + 119) * e  # the last new token is returned, not fed back
    assert budget["kv_end"] <= 2 * (LENGTH + 119) * e + 2 * 81 * e
    assert budget["kv_end"] >= 2 * (LENGTH + 119) * e + 2 * 80 * e
    assert budget["kv_held_fraction"] < 0.7


def test_a_failing_child_is_one_sentence(tiny_model, tmp_path):
    with pytest.raises(RuntimeError, match="memory trial .* failed"):
        _child(tiny_model, {"kind": "tokenfilter", "preset": "default", "ratio": 7.0}, None, tmp_path)


def test_compare_is_the_arithmetic_it_names():
    def row(kind, python, kv, peak, chunk=0, loaded=100):
        return {
            "length": 8,
            "chunk": chunk,
            "label": kind,
            "method": {"kind": kind},
            "python": python,
            "kv_end": kv,
            "kv_peak": kv,
            "peak_rss": peak,
            "rss_loaded": loaded,
            "seconds": 1.0,
        }

    rows = [
        row("dense", "ours", 100, 1000),
        row("tokenfilter", "ours", 40, 940),
        row("dense", "peer", 100, 900),
        row("kvpress", "peer", 40, 930, loaded=170),
        row("dense", "ours", 100, 800, chunk=4),
        row("tokenfilter", "ours", 40, 770, 4),
    ]
    out = memory.compare(rows)
    # kvpress's imports raise the resident set before the call by 70: its call peak (760) is 40 below dense's (800)
    assert [r["peak_saved_per_kv"] for r in out] == [None, 1.0, None, pytest.approx(40 / 60), None, 0.5]
    assert out[1]["call_peak"] == 840 and out[3]["kv_not_held"] == 60
    text = memory.render(
        {
            "command": "x",
            "model_name": "m",
            "dtype": "float32",
            "threads": 1,
            "inputs": "i",
            "versions": {},
            "kvpress": None,
            "rows": rows,
        }
    )
    assert text.count("\n| 8 |") == len(rows)


def test_the_child_imports_only_what_both_venvs_have():
    tree = ast.parse(memory.CHILD.read_text(encoding="utf-8"))
    top = {n.names[0].name.split(".")[0] for n in tree.body if isinstance(n, ast.Import)}
    top |= {n.module.split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom) and n.module}
    assert top - set(sys.stdlib_module_names) == set()


def test_memory_refuses_a_random_shape():
    parser = argparse.ArgumentParser()
    bench_cli.add_arguments(parser)
    args = parser.parse_args(["--memory", "--shape", "smollm2-135m"])
    with pytest.raises(ValueError, match="--memory measures a checkpoint"):
        bench_cli.run(args)


def test_kvpress_holds_a_dense_layer_before_it_prunes(tiny_model, tmp_path):
    if peer_env.installed_pins() != peer_env.PINS:
        pytest.skip(f"The peer venv is not built (building takes minutes): run `{peer_env.SETUP_COMMAND}` first.")
    python = peer_env.venv_dir() / "bin" / "python"
    dense = _child(tiny_model, {"kind": "dense"}, None, tmp_path, python)
    press = _child(tiny_model, {"kind": "kvpress", "press": "KnormPress", "ratio": 0.5}, None, tmp_path, python)
    layer = dense["kv_end"] // 4
    assert press["kv_end"] == pytest.approx(dense["kv_end"] / 2, rel=0.02)
    assert press["kv_peak"] >= press["kv_end"] + layer // 2  # one layer dense before its hook prunes it
