"""RULER's synthetic tasks: the same seed gives the same prompts; every task's prompt hits its length on a real
tokenizer (SmolLM2's); the answers are in the prompt (needles), follow from it (variable tracking: the chain leads to
the value; common words: the answers are strictly the most frequent); RULER's string match; the CLI end to end on a
tiny model."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from tiny_lm import one_thread
from tokenfilter.longctx import ruler
from tokenfilter.longctx.ruler import TASKS, RulerBuilder, string_match_all
from tokenfilter.longctx.ruler_runner import summarize

NEEDLE = re.compile(r"One special magic (?:number|UUID) for (\S+) is (\S+)\.")
ASSIGN = re.compile(r"VAR ([A-Z]+) = (?:VAR ([A-Z]+)|(\d+))\.")
# Haystack units are whole: sentences, essay words, list entries (a few tokens); a needle haystack's unit is a needle
# (a number one ~20 tokens, a UUID one ~70): the gap below the length is less than one unit.
FINE_GAP = 8


def _material_or_skip() -> None:
    from tokenfilter.longctx.needle import HAYSTACK_DIR

    for path in (HAYSTACK_DIR, ruler.WIKITEXT):
        if not path.exists():
            pytest.skip(f"{path} is absent: the RULER prompts need ../shared/data")


@pytest.fixture(scope="module")
def smollm2_tok():
    """SmolLM2-135M-Instruct's tokenizer (from its GGUF; no weights), or skip when the package is absent."""
    from transformers import AutoTokenizer

    from tokenfilter.loading import ModelLoadError, default_model_file

    _material_or_skip()
    try:
        gguf = default_model_file()
    except ModelLoadError as exc:
        pytest.skip(str(exc))
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


@pytest.fixture(scope="module")
def builder(smollm2_tok) -> RulerBuilder:
    return RulerBuilder(smollm2_tok)


def _context(s: ruler.RulerSample, tok) -> str:
    return tok.decode(s.input_ids[: s.context_end])


def _question(s: ruler.RulerSample, tok) -> str:
    return tok.decode(s.input_ids[s.context_end :])


# ---- scoring ---------------------------------------------------------------------------------------
def test_string_match_all_full_partial_none() -> None:
    refs = ["7481263", "Marigold", "3e2a4b48-7f34-4a78-b81c-f6736405277a"]
    assert string_match_all("7481263, MARIGOLD and 3E2A4B48-7F34-4A78-B81C-F6736405277A.", refs) == 1.0
    assert string_match_all("The numbers are 7481263 and marigold.", refs) == pytest.approx(2 / 3)
    assert string_match_all("  I do not know.\n", refs) == 0.0
    assert string_match_all("748\x001263", ["7481263"]) == 0.0  # a control character breaks the match, as in RULER
    assert string_match_all(" 7481263\t", ["7481263"]) == 1.0  # one reference: 0 or 1
    with pytest.raises(ValueError):
        string_match_all("x", [])


def test_summary_averages_tasks_with_one_standard_error() -> None:
    def row(task: str, score: float, length: int = 512) -> dict:
        return {"task": task, "length": length, "score": score, "kv_held": 0.5, "ratio": 0.4, "seconds": 1.0}

    two = summarize([row("a", 1), row("a", 0), row("b", 1), row("b", 1)])["512"]
    assert two["tasks"]["a"] == {"score": 50.0, "se": 50.0, "n": 2} and two["tasks"]["b"]["score"] == 100.0
    assert two["average"] == 75.0 and two["se"] == pytest.approx((50.0**2 + 0.0) ** 0.5 / 2)  # within tasks
    one = summarize([row("a", 1), row("b", 0), row("c", 0.5, 1024)])
    assert one["512"]["average"] == 50.0 and one["512"]["se"] == pytest.approx(50.0)  # over the task means
    assert one["1024"]["se"] == 0.0 and one["512"]["kv_held"] == 0.5 and one["512"]["n"] == 2


def test_resolve_tasks() -> None:
    assert ruler.resolve_tasks(None) == list(TASKS) == ruler.resolve_tasks(["all"])
    assert ruler.resolve_tasks(["cwe", "niah_multikey"]) == ["niah_multikey_1", "niah_multikey_2", "niah_multikey_3",
                                                            "cwe"]
    assert ruler.resolve_tasks(["niah"]) == [t for t in TASKS if t.startswith("niah")]
    with pytest.raises(ValueError, match="Unknown RULER task 'qa_1'"):
        ruler.resolve_tasks(["qa_1"])


# ---- generation on SmolLM2's tokenizer -----------------------------------------------------------------
def test_same_seed_same_prompts(smollm2_tok, builder) -> None:
    again = RulerBuilder(smollm2_tok)  # a fresh builder: nothing cached is shared
    other = RulerBuilder(smollm2_tok, seed=7)
    for task in TASKS:
        a, b = builder.build(task, 512, 0), again.build(task, 512, 0)
        assert (a.input_ids, a.answers, a.context_end, a.text) == (b.input_ids, b.answers, b.context_end, b.text)
        assert builder.build(task, 512, 1).input_ids != a.input_ids  # another sample
        assert other.build(task, 512, 0).answers != a.answers  # another seed
    assert [s.id for s in builder.samples(["vt", "cwe"], [512, 600], 2)] == [
        "ruler/vt/512/0", "ruler/vt/512/1", "ruler/cwe/512/0", "ruler/cwe/512/1",
        "ruler/vt/600/0", "ruler/vt/600/1", "ruler/cwe/600/0", "ruler/cwe/600/1"]


@pytest.mark.parametrize("length", [512, 1500, 4096])
def test_every_task_hits_its_length(smollm2_tok, builder, length: int) -> None:
    for task in TASKS:
        for index in range(2):
            s = builder.build(task, length, index)
            assert s.tokens <= length < s.meta["next_tokens"], (task, index, s.tokens, s.meta["next_tokens"])
            if TASKS[task].haystack != "needle":
                assert length - s.tokens <= FINE_GAP, (task, index, s.tokens)
            assert s.input_ids == smollm2_tok(s.text, add_special_tokens=False)["input_ids"]
            assert s.text.startswith("<|im_start|>") and "<|im_start|>assistant\n" in s.text  # the chat template
            question = _question(s, smollm2_tok)
            assert question.lstrip().startswith("Question:") and s.text.endswith(question)
            assert s.max_new_tokens == TASKS[task].max_new_tokens


def test_needles_are_in_the_context(smollm2_tok, builder) -> None:
    for task, spec in TASKS.items():
        if spec.family != "niah":
            continue
        for length in (512, 2048):
            s = builder.build(task, length, 3)
            context, question = _context(s, smollm2_tok), _question(s, smollm2_tok)
            found: dict[str, list[str]] = {}
            for key, value in NEEDLE.findall(context):
                found.setdefault(key, []).append(value)
            asked = s.meta["asked"]
            assert len(asked) == spec.queries and all(k in question for k in asked)
            assert sorted(v for k in asked for v in found[k]) == sorted(s.answers)
            assert len(s.answers) == spec.queries * spec.values
            # every needle with a key of its own: 1 (single), 4 (multikey_1, multiquery), a haystack of them (2, 3)
            assert len(found) >= spec.keys and all(len(v) == spec.values for k, v in found.items() if k in asked)
            if spec.haystack == "needle":
                assert len(found) == s.meta["units"] + 1
            if spec.value == "uuid":
                assert all(re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", a)
                           for a in s.answers)
            else:
                assert all(re.fullmatch(r"\d{7}", a) for a in s.answers)
            if spec.haystack == "noise":
                assert "The river keeps flowing." in context
            if spec.haystack == "essay":  # the needle sits at a sentence start of the essays, or after them
                for needle in s.meta["needles"]:
                    at = context.index(needle)
                    before, after = context[:at].rstrip(), NEEDLE.sub("", context[at:]).strip()
                    assert before.endswith((".", "!", "?", '"', "'", ")", "]", "follows the text.")) or not after


def _resolve(assigned: dict[str, tuple[str, str]], var: str) -> str | None:
    """The number a variable holds through its chain of ``VAR a = VAR b`` (None: a cycle or an unknown name)."""
    seen = set()
    while var in assigned and var not in seen:
        seen.add(var)
        ref, number = assigned[var]
        if number:
            return number
        var = ref
    return None


def test_variable_tracking_chain_leads_to_the_value(smollm2_tok, builder) -> None:
    for length in (512, 4096):
        for index in range(3):
            s = builder.build("vt", length, index)
            context, question = _context(s, smollm2_tok), _question(s, smollm2_tok)
            value = re.search(r"holding the value (\d+)", question).group(1)
            assigned = {var: (ref, number) for var, ref, number in ASSIGN.findall(context)}
            assert len(assigned) == TASKS["vt"].hops + 1
            assert sorted(v for v in assigned if _resolve(assigned, v) == value) == sorted(s.answers)
            order = [context.index(f"VAR {v} =") for v in s.answers]  # each assignment after the one it reads
            assert order == sorted(order)


def test_common_words_are_strictly_the_most_frequent(smollm2_tok, builder) -> None:
    for length, frequencies in ((1024, [6, 1]), (4096, [30, 3])):
        s = builder.build("cwe", length, 0)
        assert s.meta["frequencies"] == frequencies and s.meta["example"]
        context = _context(s, smollm2_tok)
        listing = context[context.rindex("remember which ones.") :]  # the list asked about (after the example)
        entries = re.findall(r"^(\d+)\. (\w+)$", listing, flags=re.M)
        assert [int(i) for i, _ in entries] == list(range(1, len(entries) + 1))
        counts = Counter(w for _, w in entries)
        assert len(s.answers) == 10 and all(counts[a] == frequencies[0] for a in s.answers)
        assert max(n for w, n in counts.items() if w not in s.answers) <= frequencies[1] < frequencies[0]
        assert len(counts) > 20  # many words occur rarely
    short = builder.build("cwe", 300, 0)  # too short for 6 against 1 (and the example): lower frequencies
    assert short.meta["frequencies"][0] < 6 and not short.meta["example"]


def test_raw_prompts_and_errors(smollm2_tok) -> None:
    raw = RulerBuilder(smollm2_tok, chat=False)
    s = raw.build("niah_single_2", 700, 0)
    assert not raw.chat and "<|im_start|>" not in s.text and s.tokens <= 700
    assert s.text.endswith("\nThe special magic number given for " + s.meta["asked"][0] + " is")
    with pytest.raises(ValueError, match="too short"):
        raw.build("niah_multiquery", 64, 0)
    with pytest.raises(ValueError, match="Unknown RULER task"):
        raw.build("qa_2", 512, 0)


def test_wikitext_words() -> None:
    _material_or_skip()
    words = ruler.wikitext_words()
    assert list(words) == sorted(set(words)) and len(words) > 1000
    assert all(w.isalpha() and w.islower() and 4 <= len(w) <= 10 for w in words)


# ---- the command line --------------------------------------------------------------------------------
def test_cli_ruler_end_to_end(tiny_dir, tmp_path, capsys) -> None:
    from tokenfilter.cli import main

    _material_or_skip()
    out = tmp_path / "eval"
    argv = ["eval", "--model", str(tiny_dir), "--tasks", "ruler", "--ruler-lengths", "512", "--ruler-samples", "1",
            "--methods", "dense,token-filter,random,sliding-window", "--ratios", "0.5", "--output", str(out),
            "--threads", "1"]
    results_md = tmp_path / "docs" / "results.md"
    results_md.parent.mkdir()
    results_md.write_text("<!-- section:longctx -->\nkept\n<!-- /section:longctx -->\n")
    with one_thread():
        assert main([*argv, "--results-md", str(results_md)]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "ruler" / "ruler.json").read_text())
    names = ["dense", "token-filter-0.5", "random-0.5", "sliding-window-0.5"]
    assert list(result["methods"]) == names
    assert result["config"]["tasks"] == list(TASKS) and result["config"]["lengths"] == [512]
    assert result["config"]["samples_per_task"] == 1 and result["config"]["seed"] == 42
    assert all(n <= 512 for n in result["config"]["tokens"].values())
    for name in names:
        m = result["methods"][name]
        summary = m["lengths"]["512"]
        assert set(summary["tasks"]) == set(TASKS) and summary["n"] == len(TASKS)
        assert len(m["samples"]) == len(TASKS) and all(0 <= r["score"] <= 1 for r in m["samples"])
        assert all(r["tokens"] <= 512 and r["answers"] for r in m["samples"])
        assert 0 <= summary["average"] <= 100 and summary["se"] >= 0
        assert (summary["kv_held"] == 1.0) == (name == "dense")
    assert result["methods"]["token-filter-0.5"]["filter"]["ratio"] == 0.5
    assert result["methods"]["random-0.5"]["filter"]["score"] == "random"
    assert 0.3 < result["methods"]["sliding-window-0.5"]["lengths"]["512"]["kv_held"] < 0.7
    md = (out / "ruler" / "ruler.md").read_text()
    assert "## 512 tokens" in md and "| method | niah_single_1 |" in md and "average ± se" in md
    assert all(f"| {name} |" in md and f"| {name} |" in printed for name in names)
    section = results_md.read_text()
    assert "kept" in section and "<!-- section:ruler -->\n## RULER (synthetic tasks)" in section
    assert "### 512 tokens" in section and "| token-filter-0.5 |" in section
    # --resume keeps every method measured on the same prompts
    with one_thread():
        assert main([*argv, "--resume"]) == 0
    assert "reused from" in capsys.readouterr().out
    again = json.loads((out / "ruler" / "ruler.json").read_text())
    assert again["reused"] == names and again["methods"] == result["methods"]


def test_cli_ruler_must_run_alone(capsys) -> None:
    from tokenfilter.cli import main

    assert main(["eval", "--tasks", "ruler,boolq"]) == 2
    assert "Run --tasks ruler on its own" in capsys.readouterr().err


# ---- peers: the RULER prompts as an input kind ------------------------------------------------------------
def _toy_material() -> tuple[object, str, list[str]]:
    """A tokenizer trained here, its filler text as the essays, and a word list (no shared data needed)."""
    from test_longctx_needle import WORDS, filler, make_tokenizer

    return make_tokenizer, filler(), [a + b for a in WORDS for b in WORDS]


@pytest.mark.parametrize("chat", [False, True])
def test_peers_ruler_split_round_trips(chat: bool) -> None:
    from tokenfilter.peers import inputs

    make_tokenizer, essays, words = _toy_material()
    tok = make_tokenizer(chat=chat)
    tasks = ["niah_single_2", "niah_multikey_3", "niah_multivalue", "vt", "cwe"]
    prompts = inputs.ruler_prompts(tok, tasks, [700, 5000], 1, positions=800, haystack=essays, words=words)
    assert [p.id for p in prompts] == [f"ruler/{t}/{n}/0" for n in (700, 704) for t in tasks]  # 800 - cwe's 96
    builder = RulerBuilder(tok, essays, words)
    for p in prompts:
        full = builder.build(p.task, p.meta["length"], 0)
        assert p.family == "ruler" and p.context_ids + p.question_ids == full.input_ids
        assert len(p.context_ids) == full.context_end and p.tokens <= p.meta["length"]
        assert tok.decode(p.question_ids).lstrip().startswith("Question:")
        assert p.answers == full.answers and p.max_new_tokens == TASKS[p.task].max_new_tokens
        assert inputs.score(p, " ".join(a.upper() for a in p.answers)) == 1.0
        assert inputs.score(p, p.answers[0]) == pytest.approx(1 / len(p.answers))
        assert inputs.score(p, "no idea") == 0.0


def test_peers_ruler_summary_and_section() -> None:
    from tokenfilter.peers import cli, merge, report

    base = {"family": "ruler", "side": "ours", "config": "dense", "method": "dense", "kv_bytes": 1.0, "kv_share": 1.0,
            "mismatch_share": 0.0, "prefill_flops": 1.0, "decode_flops": 1.0, "seconds": 1.0, "ratio": None}
    rows = [{**base, "task": t, "score": v, "length": n, "prompt": f"ruler/{t}/{n}/0"}
            for t, v, n in (("vt", 1.0, 1024), ("cwe", 0.4, 1024), ("vt", 0.0, 2048), ("cwe", 0.2, 2048))]
    [s] = merge.summarize(rows)
    assert s["score"] == pytest.approx(40.0) and set(s["tasks"]) == {"vt", "cwe"}  # 0-100, mean of the task means
    assert s["tasks"]["vt"]["score"] == 50.0 and s["by_length"][1024]["score"] == pytest.approx(70.0)
    table = report.family_table([s], "ruler")
    assert "| dense | ours | dense |" in table and "40.0 ±" in table
    ran = {"ruler_tasks": ["vt", "cwe"], "ruler_lengths": [1024, 2048], "ruler_samples": 1, "ruler_prompts": 4}
    meta = {"command": "tokenfilter peers --tasks ruler", "ran": ran, "full_grid": cli.full_grid()}
    text = report.section_markdown([s], [], meta, [])
    assert "### RULER (synthetic tasks)" in text and "Per task:" in text and "Per context length:" in text
    assert "- RULER: 2 synthetic tasks x 1024, 2048 tokens x 1 sample(s) = 4 prompts. Tasks not run: niah_" in text


def test_peers_cli_builds_ruler_prompts(smollm2_tok) -> None:
    import argparse

    from tokenfilter.peers import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--tasks", "ruler", "--ruler-lengths", "600", "--ruler-samples", "2",
                              "--ruler-tasks", "niah_single_1,vt"])
    assert cli._longbench_tasks(args.tasks) is None and args.ruler_lengths == [600]
    prompts = cli.build_prompts(args, smollm2_tok, 8192)
    assert [p.id for p in prompts] == ["ruler/niah_single_1/600/0", "ruler/niah_single_1/600/1", "ruler/vt/600/0",
                                       "ruler/vt/600/1"]
    ran = cli.ran_dict(args, prompts, [])
    assert ran["ruler_tasks"] == ["niah_single_1", "vt"] and ran["ruler_prompts"] == 4 and ran["needle_prompts"] == 0
    default = parser.parse_args([])
    assert default.tasks == ["needle", "longbench"] and default.ruler_lengths == [4096]


def test_peers_run_ours_on_ruler_prompts() -> None:
    from test_longctx_needle import _tiny_llama
    from tokenfilter.config import TokenFilter
    from tokenfilter.peers import inputs
    from tokenfilter.peers.ours import run_ours

    make_tokenizer, essays, words = _toy_material()
    tok = make_tokenizer(chat=True)
    prompts = inputs.ruler_prompts(tok, ["niah_single_1", "vt"], [300], 1, haystack=essays, words=words)
    for p in prompts:
        p.max_new_tokens = 3
    with one_thread():
        rows = run_ours(_tiny_llama(len(tok)), tok, {"dense": None, "tf": TokenFilter(ratio=0.5)}, prompts,
                        progress=lambda _m: None)["rows"]
    assert [(r["method"], r["prompt"]) for r in rows] == [(m, p.id) for m in ("dense", "tf") for p in prompts]
    assert all(0 <= r["score"] <= 1 and r["new_tokens"] <= 3 for r in rows)
    assert all((r["kv_held_share"] < 1) == (r["method"] == "tf") for r in rows)


def test_reuse_needs_the_same_run_key() -> None:
    from tokenfilter.longctx.ruler_runner import reusable_methods

    config = {"tasks": ["vt"], "lengths": [512], "prompts_sha256": "x", "run": {"model": "a", "dtype": "float32"}}
    previous = {"config": dict(config), "methods": {"dense": {"seconds": 1.0}}}
    assert list(reusable_methods(previous, config)) == ["dense"]
    assert reusable_methods(previous, {**config, "run": {"model": "a", "dtype": "bfloat16"}}) == {}
    assert reusable_methods(previous, {k: v for k, v in config.items() if k != "run"}) == {}
