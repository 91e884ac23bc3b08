"""Regenerable sections of docs/results.md: each command rewrites only its own section."""

from __future__ import annotations

from tokenfilter.eval.sections import sections, write_keeping_sections, write_section
from tokenfilter.longctx.report import needle_by_length, section_markdown


def test_write_section_appends_then_replaces_in_place(tmp_path):
    path = tmp_path / "results.md"
    write_section(path, "longctx", "## Long context\nfirst")
    write_section(path, "study", "## Study\none")
    write_section(path, "longctx", "## Long context\nsecond")
    text = path.read_text()
    assert "first" not in text and "second" in text and "one" in text
    assert list(sections(text)) == ["longctx", "study"]  # the order is kept


def test_main_report_keeps_other_commands_sections(tmp_path):
    path = tmp_path / "results.md"
    write_keeping_sections(path, "# Results\nv1")
    write_section(path, "longctx", "## Long context\nneedle")
    write_keeping_sections(path, "# Results\nv2")
    text = path.read_text()
    assert text.startswith("# Results\nv2") and "v1" not in text
    assert "## Long context\nneedle" in text and text.count("section:longctx -->") == 2


def _longctx_result() -> dict:
    cells = {"dense": {"1024": {"0": 1.0, "50": 1.0}, "2048": {"0": 1.0, "50": 0.0}},
             "token-filter-0.3": {"1024": {"0": 0.0, "50": 1.0}, "2048": {"0": 0.0, "50": 0.0}}}
    methods = {name: {"needle": {"mean": sum(sum(g.values()) for g in grid.values()) / 4, "grid": grid},
                      "stats": None, "seconds": 1.0} for name, grid in cells.items()}
    cfg = {"needle_lengths": [1024, 2048], "needle_depths": [0.0, 50.0], "limit": 1, "max_length": 2048,
           "max_new_tokens_cap": 64, "tasks": []}
    return {"config": cfg, "methods": methods, "files": []}


def test_needle_by_length_averages_over_depths():
    table = needle_by_length(_longctx_result())
    assert "| dense | 1.00 | 0.50 |" in table
    assert "| token-filter-0.3 | 0.50 | 0.00 |" in table


def test_longctx_section_names_the_command_and_images():
    text = section_markdown(_longctx_result(), "tokenfilter eval --tasks longctx", ["longctx/needle_dense.png"])
    assert text.startswith("## Long context") and "`tokenfilter eval --tasks longctx`" in text
    assert "![needle_dense](longctx/needle_dense.png)" in text
    assert "- `token-filter-0.3` finds the needle in 25% of the cells (dense 75%)." in text


def test_eval_findings_name_losses_and_ablations():
    from tokenfilter.eval.report import findings

    def row(method, ratio, acc, ppl):
        return {"method": method, "target_ratio": ratio, "avg_accuracy": acc, "perplexity": {"wikitext2": ppl}}

    result = {
        "config": {"ratios": [0.3], "limit": 40},
        "tasks": ["piqa", "boolq"],
        "rows": [row("dense", 0.0, 0.5, 20.0), row("token-filter", 0.3, 0.45, 100.0), row("random", 0.3, 0.47, 90.0),
                 row("shortgpt", 0.3, 0.40, 50.0), row("kv-keep", 0.3, 0.46, 80.0), row("paper", 0.3, 0.20, 400.0)],
    }
    text = findings(result)
    assert "it loses to random on accuracy (0.470) and loses to it on PPL (90.0)" in text[0]
    assert "it beats shortgpt on accuracy (0.400) and loses to it on PPL (50.0)" in text[0]
    assert "lower for kv-keep (80.0); higher for paper (400.0)" in text[1]
    # 80 examples at p = 0.5: two standard errors = 0.112; paper is 0.25 below the default
    assert "at most 0.250, beyond two standard errors of an average over 80 examples (±0.112)" in text[1]
