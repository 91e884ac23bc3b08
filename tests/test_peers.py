"""Peers (kvpress side by side): budget matching, merge, report and the input split, without kvpress; one slow
test runs a press through the peer venv when that venv already exists."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest

from test_longctx_needle import filler, make_tokenizer
from tokenfilter.eval.sections import sections, write_section
from tokenfilter.longctx import longbench
from tokenfilter.longctx.longbench import Sample
from tokenfilter.longctx.needle import Needle, NeedleBuilder
from tokenfilter.peers import budget as bud
from tokenfilter.peers import env, inputs, merge, report
from tokenfilter.peers.inputs import SplitPrompt

SHAPE = bud.ModelShape(layers=30, q_heads=9, kv_heads=3, head_dim=64, element_size=4)


# ---- budget matching ------------------------------------------------------------------------------
def test_match_exact_budget() -> None:
    # 1000 context + 24 question tokens, ours holds half of dense: 512 per layer, 488 of them context
    b = bud.match("tf-0.5", "p", context=1000, question=24, layers=30, ours_share=0.5)
    assert b.kept == 488
    assert bud.press_kept(1000, b.ratio) == 488
    assert b.press_entries == 30 * (488 + 24) == b.ours_entries
    assert b.mismatch_entries == 0 and not b.capped
    assert 0.51 < b.ratio < 0.52


def test_match_rounds_to_whole_tokens_and_reports_the_rest() -> None:
    share = (487.3 + 24) / 1024  # 487.3 context tokens per layer
    b = bud.match("tf", "p", 1000, 24, 30, share)
    assert b.kept == 487
    assert b.mismatch_entries == pytest.approx(30 * (487 - 487.3))
    assert b.mismatch_share == pytest.approx(b.mismatch_entries / (30 * 1024))


def test_match_no_compression_and_capped_budget() -> None:
    full = bud.match("tf", "p", 500, 20, 4, 1.0)
    assert full.ratio == 0.0 and full.kept == 500 and full.mismatch_entries == 0
    low = bud.match("tf", "p", 500, 20, 4, 0.01)  # 5.2 entries per layer: below the 20 question tokens
    assert low.capped and low.kept == 1 and low.mismatch_entries > 0


@pytest.mark.parametrize("context", [1, 7, 100, 999, 4096])
def test_ratio_for_kept_inverts_kvpress_rounding(context: int) -> None:
    for kept in range(1, context + 1, max(1, context // 37)):
        assert bud.press_kept(context, bud.ratio_for_kept(context, kept)) == kept


def test_match_errors() -> None:
    with pytest.raises(ValueError, match="share of dense"):
        bud.match("tf", "p", 10, 2, 2, 1.5)
    with pytest.raises(KeyError, match="No KV held"):
        bud.match_all({"tf": {}}, [{"id": "p", "context_ids": [1], "question_ids": [2]}], 2)


def test_pairs_dense_press_equals_dense() -> None:
    assert bud.dense_pairs(4, 1, 1) == (10, 0)
    assert bud.dense_pairs(4, 1, 3) == (10, 5 + 6)
    c, q, layers, new = 50, 7, 3, 5
    assert bud.press_pairs(c, q, layers * c, layers, new) == bud.dense_pairs(c + q, layers, new)
    pre, dec = bud.press_pairs(c, q, layers * 10, layers, new)
    assert pre == layers * (c * (c + 1) // 2 + q * (q + 1) // 2) + q * layers * 10  # the prefill stays dense
    assert dec < bud.dense_pairs(c + q, layers, new)[1]


def test_decoding_press_pairs_follow_its_compression_steps() -> None:
    # target 10, one layer, interval 4: the question is step 1; tokens 2, 3, 4 attend 11, 12, 13, then back to 10
    assert bud.decoding_press_decode_pairs(10, 1, 4, 4) == 11 + 12 + 13
    assert bud.decoding_press_decode_pairs(10, 1, 6, 4) == 11 + 12 + 13 + 11 + 12
    assert bud.decoding_press_decode_pairs(10, 2, 1, 4) == 0


def test_decoding_interval_matches_the_peer_script() -> None:
    text = Path(inputs.__file__).with_name("peer_script.py").read_text(encoding="utf-8")
    assert f"DECODING_INTERVAL = {merge.DECODING_INTERVAL}" in text


# ---- merge ------------------------------------------------------------------------------------------
def _prompts() -> list[SplitPrompt]:
    return [
        SplitPrompt("needle/a", "needle", "needle", [1] * 90, [2] * 10, "", "", 8, ["42"]),
        SplitPrompt("needle/b", "needle", "needle", [1] * 90, [2] * 10, "", "", 8, ["42"]),
        SplitPrompt("longbench/hotpotqa/0", "longbench", "hotpotqa", [1] * 190, [2] * 10, "", "", 8, ["Paris"]),
        SplitPrompt("longbench/trec/0", "longbench", "trec", [1] * 95, [2] * 5, "", "", 8, ["Date"], ["Date", "Other"]),
    ]


def _ours() -> dict:
    rows = []
    answers = {"needle/a": " 42.", "needle/b": " 7.", "longbench/hotpotqa/0": "Paris", "longbench/trec/0": "Date\nx"}
    for pid, ans in answers.items():
        rows.append({"method": "dense", "ratio": None, "prompt": pid, "answer": ans, "new_tokens": 2,
                     "score": 0.0, "seconds": 1.0, "kv_held_share": 1.0, "prefill_pairs": None, "decode_pairs": None})
        rows.append({"method": "token-filter-0.5", "ratio": 0.5, "prompt": pid, "answer": ans, "new_tokens": 2,
                     "score": 1.0, "seconds": 2.0, "kv_held_share": 0.5, "prefill_pairs": 1000, "decode_pairs": 100})
    return {"rows": rows}


def _budgets(prompts: list[SplitPrompt]) -> list[bud.Budget]:
    held = {"token-filter-0.5": {p.id: 0.5 for p in prompts}}
    return bud.match_all(held, [{"id": p.id, "context_ids": p.context_ids, "question_ids": p.question_ids}
                                for p in prompts], SHAPE.layers)


def _peer(prompts: list[SplitPrompt], budgets: list[bud.Budget]) -> dict:
    results = []
    by_id = {p.id: p for p in prompts}
    for job in merge.jobs(budgets, ["KnormPress", "TOVAPress"], by_id):
        p = by_id[job["prompt"]]
        if job["press"] == "TOVAPress":
            results.append({**job, "error": "RuntimeError: no attention weights"})
            continue
        kept = len(p.context_ids) if job["ratio"] is None else bud.press_kept(len(p.context_ids), job["ratio"])
        answer = {"needle/a": " 42.", "needle/b": " 42", "longbench/hotpotqa/0": "Paris",
                  "longbench/trec/0": "Date\nmore"}[p.id]
        results.append({**job, "answer": answer, "new_tokens": 2, "seconds": 1.5,
                        "context_held": [kept] * SHAPE.layers, "error": None})
    return {"versions": {"kvpress": "0.5.5"}, "results": results}


def test_jobs_dense_per_prompt_and_decoding_target() -> None:
    prompts = _prompts()
    budgets = _budgets(prompts)
    js = merge.jobs(budgets, ["KnormPress", "DecodingPress"], {p.id: p for p in prompts})
    assert sum(j["press"] == "dense" for j in js) == sum(j["press"] == "generate" for j in js) == len(prompts)
    dec = [j for j in js if j["press"] == "DecodingPress"]
    assert len(dec) == len(prompts)
    b0 = budgets[0]
    assert dec[0]["target_size"] == b0.kept + 10 and dec[0]["ratio"] == b0.ratio
    assert len({j["key"] for j in js}) == len(js)


def test_merge_rows_and_summaries() -> None:
    prompts = _prompts()
    budgets = _budgets(prompts)
    rows = merge.merge(prompts, _ours(), _peer(prompts, budgets), budgets, SHAPE)
    knorm = [r for r in rows if r["method"] == "KnormPress" and r["prompt"] == "needle/a"][0]
    # 100 tokens, half held by ours: 45 context + 5... the press keeps round(50 - 10) = 40 context + 10 question
    assert knorm["kv_entries"] == 30 * 50 and knorm["kv_share"] == pytest.approx(0.5)
    assert knorm["kv_bytes"] == 30 * 50 * SHAPE.entry_bytes
    assert knorm["mismatch_share"] == pytest.approx(0.0)
    assert knorm["config"] == "token-filter-0.5" and knorm["score"] == 1.0
    pre, dec = bud.press_pairs(90, 10, 30 * 40, 30, 2)
    assert knorm["prefill_flops"] == pre * SHAPE.pair_flops and knorm["decode_flops"] == dec * SHAPE.pair_flops
    ours_dense = [r for r in rows if r["method"] == "dense" and r["prompt"] == "needle/a"][0]
    assert ours_dense["prefill_flops"] == bud.dense_pairs(100, 30, 2)[0] * SHAPE.pair_flops
    assert ours_dense["prefill_flops"] == [r for r in rows if r["method"] == "kvpress dense"][0]["prefill_flops"]
    tova = [r for r in rows if r["method"] == "TOVAPress"]
    assert tova and all(r["error"] and r["score"] is None for r in tova)
    gen = [r for r in rows if r["method"] == "dense generate (peer venv)"]
    assert len(gen) == len(prompts) and gen[0]["kv_share"] == pytest.approx(1.0)

    summ = {(s["family"], s["method"]): s for s in merge.summarize(rows)}
    needle = summ[("needle", "KnormPress")]
    assert needle["n"] == 2 and needle["score"] == 1.0 and needle["se"] == 0.0
    assert summ[("needle", "token-filter-0.5")]["score"] == 1.0
    lb = summ[("longbench", "KnormPress")]
    assert set(lb["tasks"]) == {"hotpotqa", "trec"}
    assert lb["score"] == pytest.approx(100.0)  # Paris is exact; trec keeps the first line "Date"
    t = summ[("needle", "TOVAPress")]
    assert t["n"] == 0 and t["n_failed"] == 2 and t["errors"] == ["RuntimeError: no attention weights"]


def test_summary_standard_error_and_longbench_average() -> None:
    rows = [
        {"family": "needle", "task": "needle", "method": "m", "side": "ours", "config": "m", "score": s,
         "kv_bytes": 1.0, "kv_share": 0.5, "mismatch_share": 0.0, "prefill_flops": 1.0, "decode_flops": 1.0,
         "seconds": 1.0, "ratio": 0.5}
        for s in (1, 0, 1, 1)
    ]
    s = merge.summarize(rows)[0]
    assert s["score"] == 0.75
    assert s["se"] == pytest.approx(math.sqrt(0.25 / 4))
    lb = [{**r, "family": "longbench", "task": t, "score": v} for r, (t, v) in
          zip(rows, [("a", 1.0), ("a", 0.0), ("b", 0.5), ("b", 0.5)], strict=True)]
    s = merge.summarize(lb)[0]
    assert s["score"] == pytest.approx(50.0)  # mean over the tasks of 50 and 50
    assert s["se"] == pytest.approx(math.sqrt(50.0**2 + 0.0) / 2)
    one = [{**lb[0], "task": "a", "score": 1.0}, {**lb[0], "task": "b", "score": 0.5}]  # one sample per task
    s = merge.summarize(one)[0]
    assert s["score"] == pytest.approx(75.0) and s["se"] == pytest.approx(25.0)


def test_parity_finds_the_differing_prompt() -> None:
    prompts = _prompts()
    budgets = _budgets(prompts)
    rows = merge.merge(prompts, _ours(), _peer(prompts, budgets), budgets, SHAPE)
    checks = {c["prompt"]: c for c in merge.parity(rows)}
    assert checks["needle/a"]["same"]
    assert not checks["needle/b"]["same"]  # ours " 7.", the peer venv " 42" both ways
    assert checks["needle/b"]["why"].startswith("transformers versions")
    assert checks["longbench/trec/0"]["same"]  # first lines agree
    lines = report.parity_lines(list(checks.values()))
    assert lines[0].startswith("- Dense parity: 3/4") and "needle/b" in lines[1]


# ---- report -----------------------------------------------------------------------------------------
def test_report_tables_errors_and_section(tmp_path: Path) -> None:
    prompts = _prompts()
    budgets = _budgets(prompts)
    ours = _ours()
    peer = _peer(prompts, budgets)
    peer["results"].append({**merge.jobs(budgets[:1], ["DecodingPress"], {p.id: p for p in prompts})[-1],
                            "answer": " 42", "new_tokens": 2, "seconds": 1.0,
                            "context_held": [40] * SHAPE.layers, "error": None})
    rows = merge.merge(prompts, ours, peer, budgets, SHAPE)
    summ = merge.summarize(rows)
    table = report.family_table(summ, "needle")
    assert "failed on 2/2: RuntimeError: no attention weights" in table
    assert "n/a (target size)" in table and "KnormPress" in table and "1.00 ± 0.00" in table
    assert table.splitlines()[2].startswith("| dense |")  # dense rows first
    knorm = [line for line in table.splitlines() if line.startswith("| KnormPress |")][0]
    assert "+0.00 ± 0.00" in knorm  # the press minus ours at the same budget
    assert any("at least as good as KnormPress" in f for f in report.findings(summ))
    md = tmp_path / "results.md"
    write_section(md, "longctx", "## Long context\nkept")
    files = report.write_results_section(summ, merge.parity(rows), {"command": "tokenfilter peers"}, md)
    text = md.read_text(encoding="utf-8")
    assert set(sections(text)) == {"longctx", "peers"} and "kept" in text
    assert "### Needle in a haystack" in text and "### MiniLongBench" in text and "Per task:" in text
    assert (tmp_path / "peers" / "peers_needle.png").exists() and len(files) == 3
    assert report.line_name({"side": "ours", "method": "token-filter-0.5"}) == "token-filter"


# ---- inputs: the split round-trips to the harness's ids ---------------------------------------------
@pytest.mark.parametrize("chat", [False, True])
def test_needle_split_round_trips(chat: bool) -> None:
    tok = make_tokenizer(chat=chat)
    facts = [Needle()]
    prompts = inputs.needle_prompts(tok, [300], [0, 50, 100], facts, haystack=filler())
    builder = NeedleBuilder(tok, filler(), needle=facts[0])
    for depth, p in zip([0, 50, 100], prompts, strict=True):
        full = builder.build(300, depth)
        assert p.context_ids + p.question_ids == full.input_ids
        assert len(p.context_ids) == full.context_end
        assert tok.decode(p.question_ids).lstrip().startswith("Question:")
        assert facts[0].answer_prefix in tok.decode(p.question_ids)
        assert facts[0].sentence.rstrip(".") in tok.decode(p.context_ids)
        assert p.meta["depth"] == depth and p.answers == [facts[0].answer]


@pytest.mark.parametrize(("task", "chat"), [("hotpotqa", True), ("trec", False)])
def test_longbench_split_round_trips(task: str, chat: bool) -> None:
    tok = make_tokenizer(chat=chat)
    body = filler(60)
    if task == "hotpotqa":
        prompt = (f"Answer the question based on the given passages.\n\n{body}\n\nAnswer the question based on "
                  "the given passages. Only give me the answer.\n\nQuestion: what is it?\nAnswer:")
        tail = "Answer the question based on"
    else:
        prompt = f"Please determine the type.\n\n{body}\nQuestion: what is it ?\nType:"
        tail = "Question: what is it"
    sample = Sample(task, "0", prompt, ("x",))
    for max_length in (100_000, 200):  # whole, and truncated in the middle
        p = inputs.longbench_prompt(tok, sample, max_length)
        assert p.context_ids + p.question_ids == longbench.build_input(tok, sample, max_length)
        assert tok.decode(p.question_ids).lstrip().startswith(tail)
        assert len(p.context_ids) > len(p.question_ids)


def test_inputs_json_round_trip(tmp_path: Path) -> None:
    prompts = _prompts()
    path = inputs.write(tmp_path / "in.json", prompts, {"path": "m"}, {"jobs": []})
    assert inputs.read(path) == prompts
    assert json.loads(path.read_text())["model"] == {"path": "m"}


# ---- env -----------------------------------------------------------------------------------------------
def test_env_missing_or_stale_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENFILTER_CACHE", str(tmp_path))
    assert env.venv_dir() == tmp_path / "peers-venv"
    with pytest.raises(env.PeerEnvError, match=r"missing or unfinished: run `.*--setup`"):
        env.check()
    root = env.venv_dir()
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "python").write_text("")
    (root / "tokenfilter-peers.json").write_text(json.dumps({"pins": {**env.PINS, "kvpress": "0.1"}, "seconds": 1}))
    with pytest.raises(env.PeerEnvError, match="other pinned versions"):
        env.check()
    assert "torch==2.13.0" in env.requirements() and "kvpress==0.5.5" in env.requirements()


def test_env_broken_venv_names_the_fix(tmp_path: Path) -> None:
    root = tmp_path / "peers-venv"
    (root / "bin").mkdir(parents=True)
    python = root / "bin" / "python"
    python.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'kvpress'\" >&2\nexit 1\n")
    python.chmod(0o755)
    (root / "tokenfilter-peers.json").write_text(json.dumps({"pins": env.PINS, "seconds": 12.5}))
    assert env.check(root).python == python  # the stamp alone passes
    assert env.setup_seconds(root) == 12.5
    with pytest.raises(env.PeerEnvError, match=r"cannot import kvpress \(ModuleNotFoundError.*run `.*--setup`"):
        env.check(root, import_check=True)


def test_peer_script_imports_only_stdlib_torch_transformers_kvpress() -> None:
    import ast
    import sys

    tree = ast.parse(Path(inputs.__file__).with_name("peer_script.py").read_text(encoding="utf-8"))
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert names - set(sys.stdlib_module_names) == {"torch", "transformers", "kvpress"}


# ---- slow: one press on one short needle cell through the peer venv -------------------------------------
@pytest.mark.slow
def test_one_press_through_the_peer_venv(tmp_path: Path) -> None:
    if env.installed_pins() != env.PINS:
        pytest.skip(f"The peer venv is not built (building takes minutes): run `{env.SETUP_COMMAND}` first.")
    from transformers import AutoTokenizer

    from tokenfilter.loading import ModelLoadError, default_model_file
    from tokenfilter.longctx.needle import HAYSTACK_DIR

    if not HAYSTACK_DIR.exists():
        pytest.skip(f"{HAYSTACK_DIR} is absent")
    try:
        gguf = default_model_file()
    except ModelLoadError as exc:
        pytest.skip(str(exc))
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    [p] = inputs.needle_prompts(tok, [256], [50], [Needle()], max_new_tokens=4)
    b = bud.match("tf-0.5", p.id, len(p.context_ids), len(p.question_ids), 30, 0.5)
    jobs = [{"key": merge.job_key("KnormPress", "tf-0.5", p.id), "prompt": p.id, "press": "KnormPress",
             "ratio": b.ratio}]
    spec = {"path": str(gguf.parent), "gguf_file": gguf.name, "threads": 1}
    in_json = inputs.write(tmp_path / "in.json", [p], spec, {"jobs": jobs})
    out_json = tmp_path / "out.json"
    script = Path(inputs.__file__).with_name("peer_script.py")
    subprocess.run([str(env.check().python), str(script), str(in_json), str(out_json)], check=True)
    [r] = json.loads(out_json.read_text())["results"]
    assert r["error"] is None, r.get("trace")
    assert r["context_held"] == [b.kept] * 30
    assert isinstance(r["answer"], str)


def test_reuse_runs_only_the_missing_press_jobs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from tokenfilter.peers import cli

    prompts = _prompts()[:1]
    jobs = [{"key": merge.job_key(p, "tf", prompts[0].id), "prompt": prompts[0].id, "press": p, "ratio": 0.5}
            for p in ("KnormPress", "SnapKVPress", "TOVAPress")]
    old = {"model": "m", "versions": {"kvpress": "0.5.5"}, "results": [
        {**jobs[0], "answer": "old", "error": None},
        {**jobs[2], "error": "RuntimeError: boom"},  # failed before: kept, unless --retry-failed
    ]}
    (tmp_path / "peer_out.json").write_text(json.dumps(old))
    ran: list[str] = []

    def fake(peer: object, in_json: Path, out_json: Path) -> dict:
        todo = json.loads(in_json.read_text())["jobs"]
        ran.extend(j["press"] for j in todo)
        return {"versions": {"kvpress": "0.5.5"}, "results": [{**j, "answer": "new", "error": None} for j in todo]}

    monkeypatch.setattr(cli, "run_peer_script", fake)
    args = argparse.Namespace(reuse=True, threads=1, dtype="float32", retry_failed=False)
    out = cli._run_presses(args, None, tmp_path, Path("/x/m.gguf"), "m", prompts, jobs)
    assert ran == ["SnapKVPress"]
    assert [r.get("answer") for r in out["results"]] == ["old", "new", None]
    assert out["results"][2]["error"] == "RuntimeError: boom"
    (tmp_path / "peer_out.json").write_text(json.dumps(old))
    args.retry_failed = True
    ran.clear()
    out = cli._run_presses(args, None, tmp_path, Path("/x/m.gguf"), "m", prompts, jobs)
    assert ran == ["SnapKVPress", "TOVAPress"]
    assert [r["answer"] for r in out["results"]] == ["old", "new", "new"]
    args.reuse = False
    ran.clear()
    cli._run_presses(args, None, tmp_path, Path("/x/m.gguf"), "m", prompts, jobs)
    assert len(ran) == 3


def test_reuse_keeps_what_a_killed_peer_script_wrote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from tokenfilter.peers import cli

    prompts = _prompts()[:1]
    jobs = [{"key": merge.job_key(p, "tf", prompts[0].id), "prompt": prompts[0].id, "press": p, "ratio": 0.5}
            for p in ("KnormPress", "SnapKVPress")]
    # killed after its first job: peer_in.json for this model, a partial peer_new.json, no peer_out.json
    inputs.write(tmp_path / "peer_in.json", prompts, {"path": "/x", "gguf_file": "m.gguf"}, {"jobs": jobs})
    (tmp_path / "peer_new.json").write_text(json.dumps({"results": [{**jobs[0], "answer": "kept", "error": None}]}))
    ran: list[str] = []

    def fake(peer: object, in_json: Path, out_json: Path) -> dict:
        todo = json.loads(in_json.read_text())["jobs"]
        ran.extend(j["press"] for j in todo)
        return {"versions": {}, "results": [{**j, "answer": "new", "error": None} for j in todo]}

    monkeypatch.setattr(cli, "run_peer_script", fake)
    args = argparse.Namespace(reuse=True, threads=1, dtype="float32", retry_failed=False)
    out = cli._run_presses(args, None, tmp_path, Path("/x/m.gguf"), "m", prompts, jobs)
    assert ran == ["SnapKVPress"] and [r["answer"] for r in out["results"]] == ["kept", "new"]
    # held in peer_out.json now: the killed run's scratch files are gone
    assert not (tmp_path / "peer_in.json").exists() and not (tmp_path / "peer_new.json").exists()
    # another model's partial results are not taken
    (tmp_path / "peer_out.json").unlink()
    inputs.write(tmp_path / "peer_in.json", prompts, {"path": "/y", "gguf_file": "m.gguf"}, {"jobs": jobs})
    (tmp_path / "peer_new.json").write_text(json.dumps({"results": [{**jobs[0], "answer": "other", "error": None}]}))
    ran.clear()
    cli._run_presses(args, None, tmp_path, Path("/x/m.gguf"), "m", prompts, jobs)
    assert ran == ["KnormPress", "SnapKVPress"]


def test_cli_arguments() -> None:
    import argparse

    from tokenfilter.config import TokenFilter
    from tokenfilter.peers import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--presses", "KnormPress,SnapKVPress", "--ratios", "0.3,0.5", "--needle-lengths", "1024",
                              "--tasks", "needle,trec", "--limit", "2", "--output", "o", "--results-md", "r.md"])
    assert args.presses == ["KnormPress", "SnapKVPress"] and args.ratios == [0.3, 0.5]
    assert args.needle_lengths == [1024] and args.limit == 2 and not args.setup
    assert cli._longbench_tasks(args.tasks) == ["trec"]
    assert cli._longbench_tasks(["needle", "longbench"]) == []
    assert cli._longbench_tasks(["needle"]) is None
    with pytest.raises(ValueError, match="Unknown task"):
        cli._longbench_tasks(["nope"])
    assert args.ours == list(cli.OURS_DEFAULT) and args.press_budgets is None and args.note == []
    methods = cli.our_methods([0.5])
    assert list(methods) == ["dense", "token-filter-0.5", "token-filter-random-0.5", "sliding-window-0.5"]
    assert methods["token-filter-0.5"] == TokenFilter(ratio=0.5)
    assert methods["token-filter-random-0.5"] == TokenFilter(ratio=0.5).replace(score="random", seed=0)
    assert methods["sliding-window-0.5"].reference == "token-filter-0.5"  # the default is KV-side
    previous = cli.our_methods([0.5], ["kv-window", "kv-window-random", "sliding-window"])
    assert previous["kv-window-0.5"].skip == "none" and previous["kv-window-0.5"].recent == 64
    assert previous["kv-window-random-0.5"].score == "random"
    assert previous["sliding-window-0.5"].reference == "kv-window-0.5"


# ---- our rows: selection, the sliding window at another row's KV held ------------------------------
def test_our_methods_selection_and_candidates() -> None:
    from tokenfilter.config import TokenFilter
    from tokenfilter.peers import cli
    from tokenfilter.peers.ours import Matched
    from tokenfilter.study.quality import CANDIDATES

    m = cli.our_methods([0.3, 0.5], ["sliding-window", "kv-w64-g0.99", "kv-w64-g0.99-random", "paper"])
    assert list(m) == ["dense", "kv-w64-g0.99-0.3", "kv-w64-g0.99-random-0.3", "paper-0.3", "kv-w64-g0.99-0.5",
                       "kv-w64-g0.99-random-0.5", "paper-0.5", "sliding-window-0.3", "sliding-window-0.5"]
    assert m["kv-w64-g0.99-0.5"] == TokenFilter(ratio=0.5, **CANDIDATES["kv-w64-g0.99"])
    assert m["kv-w64-g0.99-random-0.5"].score == "random" and m["kv-w64-g0.99-random-0.5"].gamma == 0.99
    assert m["paper-0.3"] == TokenFilter.paper(ratio=0.3)
    assert m["sliding-window-0.3"] == Matched(reference="kv-w64-g0.99-0.3")  # the first KV-side row, not a twin
    assert cli.our_methods([0.5], ["default"]) == {"dense": None, "token-filter-0.5": TokenFilter(ratio=0.5)}
    with pytest.raises(ValueError, match="Unknown --ours"):
        cli.our_methods([0.5], ["kv-nope"])
    with pytest.raises(ValueError, match="needs a KV-side row"):
        cli.our_methods([0.5], ["paper", "sliding-window", "kv-window-random"])


def test_press_budget_rows() -> None:
    from tokenfilter.peers import cli

    names = list(cli.OURS_DEFAULT)
    assert cli.press_budget_rows([0.5], names, None) == ["token-filter-0.5", "token-filter-random-0.5"]
    assert cli.press_budget_rows([0.3, 0.5], names, ["default"]) == ["token-filter-0.3", "token-filter-0.5"]
    with pytest.raises(ValueError, match="--press-budgets"):
        cli.press_budget_rows([0.5], names, ["sliding-window"])
    with pytest.raises(ValueError, match="--press-budgets"):
        cli.press_budget_rows([0.5], ["default"], ["kv-window"])


def test_matched_sliding_window_holds_the_reference_kv() -> None:
    from tokenfilter.config import TokenFilter
    from tokenfilter.peers.ours import Matched

    p = _prompts()[0]  # 100 tokens
    m = Matched(reference="kv-window-0.5", held={p.id: 0.5})
    tf = m(p)
    assert tf == TokenFilter.sliding_window_holding(0.5, 100) == TokenFilter.sliding_window(recent=47)
    assert tf.warmup + tf.recent - 1 == 50  # the engine holds warmup + recent - 1 entries per layer: half of 100
    with pytest.raises(KeyError, match="run it before"):
        m(_prompts()[1])


def test_run_ours_sliding_row_on_a_tiny_model() -> None:
    from tokenfilter.peers.ours import Matched, run_ours

    from conftest import make_tiny

    class Tok:  # the little of a tokenizer that greedy_ids and decode need
        eos_token_id, pad_token_id = None, 0

        def decode(self, ids: object, skip_special_tokens: bool = True) -> str:
            return " ".join(str(int(i)) for i in ids)

    model = make_tiny("llama")
    p = SplitPrompt("needle/t", "needle", "needle", list(range(3, 83)), [5, 6, 7, 8], "", "", 2, ["42"])
    m = Matched(reference="kv", held={p.id: 0.5})
    [row] = run_ours(model, Tok(), {"sw": m}, [p], progress=lambda _m: None)["rows"]
    assert row["budget_of"] == "kv" and row["recent"] == m(p).recent and row["ratio"] is None
    assert row["filter"] == repr(m(p))  # what --reuse compares, so that a changed default runs again
    assert row["kv_held_share"] == pytest.approx(0.5, abs=1.0 / p.tokens)
    assert row["new_tokens"] == 2 and row["prefill_pairs"] > 0


def test_merge_and_report_a_row_sized_to_another() -> None:
    prompts = _prompts()
    budgets = _budgets(prompts)
    ours = _ours()
    for pid in [p.id for p in prompts]:
        ours["rows"].append({"method": "sliding-window-0.5", "ratio": None, "budget_of": "token-filter-0.5",
                             "recent": 41 if pid == "needle/a" else 43, "prompt": pid, "answer": " 42.",
                             "new_tokens": 2, "score": 1.0, "seconds": 1.0, "kv_held_share": 0.49,
                             "prefill_pairs": 900, "decode_pairs": 90})
    rows = merge.merge(prompts, ours, _peer(prompts, budgets), budgets, SHAPE)
    sw = [r for r in rows if r["method"] == "sliding-window-0.5"]
    assert all(r["config"] == "token-filter-0.5" and r["mismatch_share"] == pytest.approx(-0.01) for r in sw)
    tf = [r for r in rows if r["method"] == "token-filter-0.5"]
    assert all(r["mismatch_share"] == 0.0 and r["config"] == "token-filter-0.5" for r in tf)
    summ = merge.summarize(rows)
    s = [x for x in summ if x["method"] == "sliding-window-0.5" and x["family"] == "needle"][0]
    assert s["recent"] == [41, 43] and s["ratio"] is None and s["mismatch_share"] == pytest.approx(-0.01)
    table = report.family_table(summ, "needle").splitlines()
    i = next(k for k, line in enumerate(table) if line.startswith("| sliding-window-0.5 |"))
    assert "R = 41-43" in table[i] and "sized per prompt to the KV held of token-filter-0.5" in table[i]
    assert table[i - 1].startswith("| token-filter-0.5 | ours |")  # beside the row it matches, before the presses
    assert any("`sliding-window-0.5`" in f and "at least as good as KnormPress" in f for f in report.findings(summ))


def test_findings_use_the_nearest_press_budget() -> None:
    def s(method: str, side: str, config: str, score: float, share: float) -> dict:
        return {"family": "needle", "method": method, "side": side, "config": config, "n": 10, "score": score,
                "se": 0.05, "kv_share": share}

    summ = [s("kv-0.5", "ours", "kv-0.5", 0.4, 0.53), s("tf-0.5", "ours", "tf-0.5", 0.1, 0.50),
            s("tf-0.3", "ours", "tf-0.3", 0.2, 0.70), s("KnormPress", "kvpress", "kv-0.5", 0.3, 0.53),
            s("KnormPress", "kvpress", "tf-0.3", 0.6, 0.70)]
    lines = report.findings(summ)
    assert len(lines) == 4 and lines[3] == report.WHY_BEHIND  # a press is ahead somewhere: the notes say why
    assert "`kv-0.5`" in lines[0] and "not matched" not in lines[0] and "at least as good as KnormPress" in lines[0]
    assert "budget of `kv-0.5` (53.0% KV held; not matched to this row)" in lines[1]  # 0.50 is nearest to 0.53
    assert "behind KnormPress by 0.20" in lines[1]
    assert "`tf-0.3`" in lines[2] and "behind KnormPress by 0.40" in lines[2]
    summ.append({**s("PyramidKVPress", "kvpress", "kv-0.5", 0.9, 0.53), "n": 2, "n_failed": 13})
    first = report.findings(summ)[0]
    assert "PyramidKVPress failed on some prompts: not compared" in first and "behind" not in first


def test_needle_per_depth() -> None:
    prompts = [SplitPrompt(f"needle/100/{d:g}/42", "needle", "needle", [1] * 90, [2] * 10, "", "", 8, ["42"],
                           meta={"depth": d}) for d in (0.0, 50.0, 50.0)]
    rows = [{"method": "dense", "ratio": None, "prompt": p.id, "answer": a, "new_tokens": 2, "score": sc,
             "seconds": 1.0, "kv_held_share": 1.0, "prefill_pairs": None, "decode_pairs": None}
            for p, a, sc in zip(prompts, ["42", "42", "no"], [1.0, 1.0, 0.0], strict=True)]
    rows[2]["prompt"] = prompts[2].id = "needle/100/50/43"
    summ = merge.summarize(merge.merge(prompts, {"rows": rows}, None, [], SHAPE))
    assert summ[0]["by_depth"] == {0.0: 1.0, 50.0: 0.5}
    table = report.depth_table(summ)
    assert "| depth 0 | depth 50 |" in table and "| dense | dense | 1.00 | 0.50 |" in table


def test_needle_per_length() -> None:
    lengths, scores = (100, 100, 200, 200), [1.0, 0.0, 1.0, 1.0]
    prompts = [SplitPrompt(f"needle/{n}/0/{i}", "needle", "needle", [1] * (n - 10), [2] * 10, "", "", 8, ["42"],
                           meta={"depth": 0.0, "length": n}) for i, n in enumerate(lengths)]
    rows = [{"method": "dense", "ratio": None, "prompt": p.id, "answer": "42" if sc else "no", "new_tokens": 2,
             "score": sc, "seconds": 1.0, "kv_held_share": 1.0, "prefill_pairs": None, "decode_pairs": None}
            for p, sc in zip(prompts, scores, strict=True)]
    summ = merge.summarize(merge.merge(prompts, {"rows": rows}, None, [], SHAPE))
    assert summ[0]["by_length"] == {100: {"score": 0.5, "se": pytest.approx(0.5), "n": 2},
                                    200: {"score": 1.0, "se": 0.0, "n": 2}}
    table = report.length_table(summ)
    assert "| 100 tokens | 200 tokens |" in table and "| dense | dense | 0.50 ± 0.50 | 1.00 ± 0.00 |" in table
    text = report.section_markdown(summ, [], {}, [])
    assert "Per context length:" in text and text.index("Per context length:") < text.index("Per depth")
    one = merge.summarize(merge.merge(prompts[:2], {"rows": rows[:2]}, None, [], SHAPE))
    assert "Per context length:" not in report.section_markdown(one, [], {}, [])  # one length: the table says it


def test_ran_lines_say_what_did_not_run() -> None:
    from tokenfilter.peers import cli

    meta = {"full_grid": cli.full_grid(), "invocations": [600.0, 1200.0], "notes": ["8k was not run: time."],
            "ran": {"needle_lengths": [1024], "needle_depths": [0, 50], "needle_facts": 3, "needle_prompts": 6,
                    "longbench_tasks": ["trec"], "longbench_prompts": 1, "longbench_limit": 1,
                    "longbench_max_length": 1024, "ratios": [0.5], "ours": ["kv-window"],
                    "presses": ["KnormPress"], "press_budgets": ["kv-window-0.5"]}}
    text = "\n".join(report.ran_lines(meta))
    assert "1024 tokens x 2 depths x 3 held-out facts = 6 prompts" in text
    assert "Not run: 2048, 4096, 8192 tokens" in text
    assert "Tasks not run: narrativeqa" in text and "truncated to 1024 tokens" in text
    assert "matched to the KV held of `kv-window-0.5`" in text
    assert "30 min over 2 invocation(s)" in text and "- 8k was not run: time." in text
    assert "- Needle: not run." in report.ran_lines({"ran": {}})
    fail = {"family": "needle", "method": "PyramidKVPress", "side": "kvpress", "n": 0, "n_failed": 15,
            "errors": ["RuntimeError: The size of tensor a (929) must match"]}
    [line] = report.failure_lines([fail, {**fail, "family": "longbench", "n_failed": 1, "n": 1}])
    assert line.startswith("- PyramidKVPress failed on 16/17 prompts: `RuntimeError: The size of tensor a (929)")
    assert "kvpress / transformers incompatibility" in line
    assert report.failure_lines([fail])[0] in report.ran_lines({"ran": {}}, [fail])


def test_findings_say_who_wins_and_by_how_much() -> None:
    def s(method: str, side: str, score: float, se: float) -> dict:
        return {"family": "needle", "method": method, "side": side, "config": "tf-0.5", "n": 10, "score": score,
                "se": se, "kv_share": 0.5}

    summ = [s("tf-0.5", "ours", 0.6, 0.1), s("KnormPress", "kvpress", 0.65, 0.1)]
    summ.append(s("SnapKVPress", "kvpress", 0.9, 0.05))
    line, why = report.findings(summ)
    assert why == report.WHY_BEHIND
    assert "at least as good as KnormPress" in line and "behind SnapKVPress by 0.30" in line


def test_ours_json_keeps_earlier_rows_outside_the_run(tmp_path: Path) -> None:
    from tokenfilter.peers import cli

    earlier = {(m, p): {"method": m, "prompt": p, "answer": "old"} for m in ("dense", "tf") for p in ("a", "b")}
    now = {"model": "m", "element_size": 4, "rows": [{"method": "dense", "prompt": "a", "answer": "new"}]}
    cli._save_ours(tmp_path, now, earlier)
    saved = json.loads((tmp_path / "ours.json").read_text())
    assert saved["model"] == "m" and len(saved["rows"]) == 4
    assert {(r["method"], r["prompt"]): r["answer"] for r in saved["rows"]}[("dense", "a")] == "new"


def test_dtype_reaches_both_sides_and_reuse_keeps_dtypes_apart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from tokenfilter.peers import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    assert parser.parse_args([]).dtype == "float32"
    assert parser.parse_args(["--dtype", "bfloat16"]).dtype == "bfloat16"
    with pytest.raises(SystemExit):
        parser.parse_args(["--dtype", "float16"])
    # the JSON's model name: unchanged in float32 (earlier runs still match), marked otherwise
    assert cli.run_name("m") == "m" and cli.run_name("m", "bfloat16") == "m (bfloat16)"

    prompts = _prompts()[:1]
    jobs = [{"key": merge.job_key("KnormPress", "tf", prompts[0].id), "prompt": prompts[0].id, "press": "KnormPress",
             "ratio": 0.5}]
    specs: list[dict] = []

    def fake(peer: object, in_json: Path, out_json: Path) -> dict:
        data = json.loads(in_json.read_text())
        specs.append(data["model"])
        return {"versions": {}, "results": [{**j, "answer": "new", "error": None} for j in data["jobs"]]}

    monkeypatch.setattr(cli, "run_peer_script", fake)
    # a float32 run killed after its first job: a bfloat16 run does not take its results
    inputs.write(tmp_path / "peer_in.json", prompts, {"path": "/x", "gguf_file": "m.gguf"}, {"jobs": jobs})
    (tmp_path / "peer_new.json").write_text(json.dumps({"results": [{**jobs[0], "answer": "fp32", "error": None}]}))
    args = argparse.Namespace(reuse=True, threads=1, dtype="bfloat16", retry_failed=False)
    out = cli._run_presses(args, None, tmp_path, Path("/x/m.gguf"), cli.run_name("m", "bfloat16"), prompts, jobs)
    assert [r["answer"] for r in out["results"]] == ["new"] and specs[-1]["dtype"] == "bfloat16"
    # nor does a float32 run reuse the bfloat16 results now in peer_out.json
    args.dtype = "float32"
    out = cli._run_presses(args, None, tmp_path, Path("/x/m.gguf"), cli.run_name("m"), prompts, jobs)
    assert len(specs) == 2 and specs[-1]["dtype"] == "float32"
    # a killed bfloat16 run is resumed by a bfloat16 one
    inputs.write(tmp_path / "peer_in.json", prompts, {"path": "/x", "gguf_file": "m.gguf", "dtype": "bfloat16"},
                 {"jobs": jobs})
    (tmp_path / "peer_new.json").write_text(json.dumps({"results": [{**jobs[0], "answer": "bf16", "error": None}]}))
    (tmp_path / "peer_out.json").unlink()
    args.dtype = "bfloat16"
    out = cli._run_presses(args, None, tmp_path, Path("/x/m.gguf"), cli.run_name("m", "bfloat16"), prompts, jobs)
    assert len(specs) == 2 and [r["answer"] for r in out["results"]] == ["bf16"]
