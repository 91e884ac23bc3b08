"""Issue 3: ``tokenfilter eval`` end to end on a tiny model, and its errors: one plain sentence, exit 2."""

from __future__ import annotations

import json

import pytest

from tiny_lm import olmo_eval_or_skip, one_thread
from tokenfilter.cli import main


def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_missing_model_file_is_one_sentence(capsys, tmp_path, text_file):
    olmo_eval_or_skip()
    err = _error(capsys, ["eval", "--model", str(tmp_path / "missing.gguf"), "--tasks", "boolq",
                          "--ppl-file", str(text_file)])
    assert "missing.gguf" in err and "does not exist" in err


def test_unknown_task_is_one_sentence(capsys):
    err = _error(capsys, ["eval", "--tasks", "boolq,squad"])
    assert "Unknown task 'squad'" in err


def test_unknown_method_is_one_sentence(capsys):
    err = _error(capsys, ["eval", "--methods", "dense,magic"])
    assert "Unknown method 'magic'" in err


def test_missing_perplexity_file_is_one_sentence(capsys, tmp_path):
    olmo_eval_or_skip()
    err = _error(capsys, ["eval", "--tasks", "boolq", "--ppl-file", str(tmp_path / "nope.txt")])
    assert "nope.txt does not exist" in err


@pytest.mark.parametrize("ratios", ["1.5", "0.3,abc", "-0.1"])
def test_bad_ratio_exits_2_without_a_traceback(capsys, ratios):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--ratios", ratios])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "--ratios" in err.splitlines()[-1]


def test_bench_subcommand_is_registered(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--help"])
    assert exit_.value.code == 0


def test_eval_end_to_end_writes_json_markdown_and_a_png(tiny_dir, text_file, tmp_path, capsys):
    olmo_eval_or_skip()
    out, md = tmp_path / "out", tmp_path / "docs" / "results.md"
    argv = ["eval", "--model", str(tiny_dir), "--tasks", "boolq,winogrande", "--limit", "2",
            "--methods", "dense,token-filter,random,shortgpt,shortgpt-calib2", "--ratios", "0.5",
            "--ppl-file", str(text_file), "--ppl-window", "128", "--ppl-windows", "2", "--no-lambada",
            "--calib-file", str(text_file), "--output", str(out), "--results-md", str(md)]
    with one_thread():
        assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "token-filter" in printed and "shortgpt-calib2" in printed

    result = json.loads((out / "results.json").read_text())
    assert result["config"]["ratios"] == [0.5] and result["config"]["limit"] == 2
    assert result["tasks"] == ["boolq", "winogrande"]
    rows = {(r["method"], r["target_ratio"]): r for r in result["rows"]}
    assert set(rows) == {("dense", 0.0), ("token-filter", 0.5), ("random", 0.5), ("shortgpt", 0.5),
                         ("shortgpt-calib2", 0.5)}
    for row in rows.values():
        assert set(row["accuracy"]) == {"boolq", "winogrande"}
        assert 0 <= row["avg_accuracy"] <= 1
        assert row["perplexity"]["wikitext2"] > 0  # the --ppl-file text, under its standard name
        assert row["total_flops_skipped"] is not None and row["kv_saved_fraction"] is not None
    assert rows[("dense", 0.0)]["realized_ratio"] == 0.0
    assert 0.35 < rows[("token-filter", 0.5)]["realized_ratio"] <= 0.52  # per-layer rounding, within SPEC tolerance
    assert rows[("token-filter", 0.5)]["config"]["ratio"] == 0.5
    assert rows[("random", 0.5)]["config"]["score"] == "random"
    for name in ("shortgpt", "shortgpt-calib2"):
        assert len(rows[(name, 0.5)]["removed_layers"]) >= 1
        assert len(rows[(name, 0.5)]["block_influence"]) == 4

    text = md.read_text()
    assert text == (out / "results.md").read_text()
    assert "| token-filter | 0.50 |" in text and "shortgpt" in text
    assert "![average accuracy vs ratio per method](accuracy_vs_ratio.png)" in text
    for folder in (out, md.parent):  # the plot is written beside every copy of the report
        png = (folder / "accuracy_vs_ratio.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
