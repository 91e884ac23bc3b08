"""The benchmark end to end on a tiny random-weight Llama: valid JSON, a PNG, the report, exact KV accounting."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from transformers import DynamicCache, LlamaForCausalLM

import tiny_lm
from tiny_lm import one_thread
from tokenfilter import TokenFilter
from tokenfilter.bench import BenchConfig, run_bench
from tokenfilter.bench import cli as bench_cli
from tokenfilter.bench import grid as bench_grid
from tokenfilter.bench.kv import measure_cache
from tokenfilter.bench.report import main as report_main
from tokenfilter.bench.report import render
from tokenfilter.bench.runner import ideal_ratio
from tokenfilter.stats import FlopModel

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    return tiny_lm.tiny_llama(128, seed=seed, max_position_embeddings=256, pad_token_id=None, eos_token_id=2)


TINY_CFG = dict(
    lengths=[16, 40],
    ratios=[0.3, 0.5],
    batch_sizes=[1, 2],
    new_tokens=4,
    repeats=2,
    warmup=1,
    progress=False,
    profile=True,
    profile_steps=2,
    collect_garbage=False,
    paired_steps=4,
    paired_prefills=2,
    modes=["query"],  # the query side, as these tests have always measured it (the default mode: see below)
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls on a shared machine: one thread avoids waiting on descheduled OpenMP workers."""
    with one_thread():
        yield


@pytest.fixture(scope="module")
def result() -> dict:
    return run_bench(tiny_llama(), None, BenchConfig(**TINY_CFG), model_name="tiny-llama")


def test_results_are_valid_json_with_every_cell(result):
    again = json.loads(json.dumps(result))
    assert again["schema"] == "tokenfilter-bench/1"
    assert again["config"]["inputs"] == "random-ids"
    cells = again["cells"]
    # (dense, overhead, 2 ratios) x 2 lengths x 2 batch sizes
    assert len(cells) == 4 * 2 * 2
    for c in cells:
        for phase in ("prefill", "decode"):
            p = c[phase]
            assert len(p["times_s"]) == TINY_CFG["repeats"]
            assert p["median_s"] > 0 and p["speedup"] > 0 and p["ideal"] >= 1.0
            assert p["efficiency"] == pytest.approx(p["speedup"] / p["ideal"])
        assert c["decode"]["tokens_per_s"] == pytest.approx(c["batch"] * 4 / c["decode"]["median_s"])
        if c["method"] == "dense":
            assert all(s == 1.0 for s in c["prefill"]["speedups"])
            assert c["stats_prefill"] is None
        if c["method"] == "overhead":
            paired = c["paired"]  # the step-by-step interleaved measurement
            assert paired["decode"]["n"] == 4 and paired["prefill"]["n"] == 2 and paired["decode"]["cpu"]["n"] == 4
            assert paired["decode"]["q25"] <= paired["decode"]["extra"] <= paired["decode"]["q75"]
            assert c["stats_prefill"]["ratio"] == 0.0
            assert c["prefill"]["ideal"] == pytest.approx(1.0)
            assert c["same_first_token_as_dense"]
        if c["method"] == "filter":
            assert ("paired" in c) == (c["ratio"] == 0.5)  # the highest ratio is paired with dense too
            if c["ratio"] == 0.5:
                assert c["decode"]["paired_efficiency"] == pytest.approx(
                    1 / (1 + c["paired"]["decode"]["extra"]) / c["decode"]["ideal"])
            assert c["stats_prefill"]["ratio"] > 0
            assert c["prefill"]["ideal"] > 1.0
            assert c["kv_bytes"]["peak_used"] < next(
                d["kv_bytes"]["peak_used"]
                for d in cells
                if d["method"] == "dense" and d["batch"] == c["batch"] and d["length"] == c["length"]
            )
    assert {t["target"] for t in again["targets"]} >= {"KV bytes saved == dropped entries x entry bytes, exactly"}
    assert all(t["better"] in ("lower", "higher") for t in again["targets"])
    assert again["machine"]["cpu"] and again["machine"]["torch_threads"] >= 1


def test_kv_bytes_saved_equal_the_dropped_entries_exactly(result):
    checks = result["kv_checks"]
    assert len(checks) == 2 * 2 * 2  # ratios x lengths x batch sizes
    for k in checks:
        assert k["exact"], k
        assert k["dense_entries"] == k["dense_entries_measured"]
        assert k["dense_entries"] - k["stored_entries"] == k["dropped_entries_reported"] > 0
        saved = k["dropped_entries_reported"] * k["entry_bytes"]
        assert k["saved_bytes_measured"] == k["saved_bytes_reported"] == saved


def test_measured_cache_matches_the_run_statistics_directly():
    """Independently of the grid: at ratio 0.5 on the query side with kv=drop, the cache holds dense minus dropped."""
    model = tiny_llama(1)
    fm = FlopModel.from_config(model.config)
    entry = fm.kv_entry_bytes(4)
    ids = torch.randint(3, 128, (2, 48), generator=torch.Generator().manual_seed(0))
    with TokenFilter(ratio=0.5, skip="attention", kv="drop").apply(model) as run, torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, use_cache=True)
        stats = run.stats
    m = measure_cache(cache, entry)
    dense_entries = 2 * 48 * fm.layers
    dropped = sum(c.kv_dropped for c in stats.layers)
    assert dropped > 0
    assert m.stored_entries == dense_entries - dropped
    assert stats.kv_bytes_dense - m.used_bytes == stats.kv_bytes_saved == dropped * entry
    # the filtered layers' buffers really hold fewer rows than a dense layer
    assert m.filtered_layers_stored_entries < len(run.filtered_layers) * 2 * 48


def test_ideal_ratio_charges_the_lm_head_on_computed_rows_only(result):
    fm = FlopModel.from_config(tiny_llama().config)
    c = next(c for c in result["cells"] if c["method"] == "filter")
    s = c["stats_prefill"]

    class S:
        tokens, flops_dense, flops_actual = s["tokens"], s["flops_dense"], s["flops_actual"]

    every_row = ideal_ratio(S, fm)
    last_row = ideal_ratio(S, fm, head_rows=c["batch"])
    assert every_row == pytest.approx(s["flops_dense"] / s["flops_actual"])
    assert last_row > every_row  # the LM head is not skippable: charging it on fewer rows raises the ideal
    assert c["prefill"]["ideal"] == pytest.approx(last_row)


def test_lengths_beyond_the_model_are_skipped():
    """A context longer than max_position_embeddings (256) is skipped; one that fits is measured even when its decode
    steps run past the positions (RoPE computes them like any other; SmolLM2-135M's 8192 under --full)."""
    cfg = BenchConfig(lengths=[16, 254, 300], ratios=[0.5], new_tokens=4, repeats=1, warmup=0, progress=False,
                      profile=False, overhead=False, collect_garbage=False, modes=["query"])
    res = run_bench(tiny_llama(), None, cfg)
    assert {c["length"] for c in res["cells"]} == {16, 254}
    assert [s["length"] for s in res["skipped"]] == [300]
    assert [p["length"] for p in res["past_positions"]] == [254]
    assert all(c["decode"]["median_s"] > 0 for c in res["cells"])
    assert "- Length 254: the last 2 of 4 decode steps run at positions past max_position_embeddings=256" in render(res)


def test_the_default_run_measures_the_library_default_and_names_each_mode():
    """No modes given: the KV side, TokenFilter(ratio=r), is what runs; the nothing-filtered run, the paired
    measurement, the profiled cell, the KV checks and the targets all follow it, and every row says its mode."""
    cfg = BenchConfig(lengths=[96], ratios=[0.5], new_tokens=3, repeats=1, warmup=0, progress=False,
                      profile=True, profile_steps=2, collect_garbage=False, paired_steps=2, paired_prefills=2)
    res = json.loads(json.dumps(run_bench(tiny_llama(), None, cfg, model_name="tiny-llama")))
    assert res["config"]["modes"] == ["kv"] and res["config"]["lead_mode"] == "kv" and res["config"]["window"] == 64
    cells = {c["method"]: c for c in res["cells"]}
    assert list(cells) == ["dense", "overhead", "kv"]
    assert cells["kv"]["label"] == "KV side 0.5 (R=64) — the default"
    assert cells["overhead"]["label"] == "nothing filtered (scoring only, KV side)"
    assert cells["overhead"]["stats_prefill"]["ratio"] == 0.0 and cells["kv"]["stats_prefill"]["ratio"] > 0
    assert "paired" in cells["overhead"] and "paired" in cells["kv"]  # the lead mode's top ratio, not the query side
    prof = res["profile"]
    assert (prof["mode"], prof["label"], prof["ratio"]) == ("kv", "KV side 0.5 (R=64) — the default", 0.5)
    (check,) = res["kv_checks"]
    assert check["exact"] and check["kv"] == "drop" and check["dropped_entries_reported"] > 0
    assert check["label"] == cells["kv"]["label"]
    reads = {t["target"]: t.get("reads") for t in res["targets"]}
    assert reads["efficiency (measured / ideal) at 2048+ tokens, decode"] == "kv"
    text = render(res)
    assert "| 96 | KV side 0.5 (R=64) — the default |" in text
    assert "`TokenFilter(ratio=r)`, the library default" in text and "Overhead run: the KV side's configuration" in text
    assert "## Where the time goes (B=1, context 96, KV side 0.5 (R=64) — the default)" in text
    assert "(the KV side's cells (the measured default))" in text


def test_cells_over_the_token_budget_are_skipped_and_reported():
    cfg = BenchConfig(lengths=[8, 16], ratios=[0.5], batch_sizes=[1, 2], max_batch_tokens=16, new_tokens=2,
                      repeats=1, warmup=1, progress=False, profile=False, overhead=False, collect_garbage=False)
    res = run_bench(tiny_llama(), None, cfg)
    assert {(c["batch"], c["length"]) for c in res["cells"]} == {(1, 8), (1, 16), (2, 8)}
    assert res["skipped"] == [{"batch": 2, "length": 16, "reason": "2 x 16 tokens > max_batch_tokens=16"}]
    assert "- Skipped batch 2, length 16: 2 x 16 tokens > max_batch_tokens=16." in render(res)


def test_report_and_plot_from_json(result, tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(result))
    md = tmp_path / "docs" / "performance.md"
    assert report_main([str(path), str(md)]) == 0
    text = md.read_text()
    assert "## Machine" in text and result["machine"]["cpu"] in text
    assert "## Results" in text and "### Batch size 2" in text
    assert "nothing filtered (scoring only, query side)" in text and "## Targets" in text
    assert "## Where the time goes (B=1, context 40, query side 0.5)" in text
    assert "## Paired measurement (`--paired-steps`)" in text
    assert "![speed ratio vs context length](performance.png)" in text
    assert (tmp_path / "docs" / "performance.png").read_bytes()[:8] == PNG_MAGIC
    # re-rendering evaluates the targets as they stand now from the cells, not the list the JSON kept
    path.write_text(json.dumps({**result, "targets": []}))
    assert report_main([str(path), str(md)]) == 0
    assert "| prefill at 512 tokens (ratio >= 0.3) (" in md.read_text()
    quiet = {**result, "machine": {**result["machine"], "load_average_at_end": [1.0, 1.0, 1.0], "torch_threads": 1}}
    busy = {**result, "machine": {**result["machine"], "load_average_at_end": [3.2, 3.0, 3.0], "torch_threads": 1}}
    assert "little else ran" in render(quiet) and "The machine is shared" not in render(quiet)
    assert "The machine is shared" in render(busy)
    assert "Other jobs shared the cores" in render(busy) and "Other jobs shared the cores" not in render(quiet)
    text = render(result)
    # one row per batch size in the wall-clock, CPU-time, KV and paired tables
    assert text.count("| 40 | query side 0.5 |") == 8 and "## The same ratios from process CPU time" in text


def test_the_report_says_when_the_run_started(result):
    """A run stamps its start; a result from before that stamped only when its measurements ended (``created``), so
    its start is read as that less the time it took."""
    assert result["started"] <= result["created"]
    assert f"started {result['started']}." in render(result)
    old = {k: v for k, v in result.items() if k != "started"}
    old.update(created="2026-12-07T23:16:31+0000", elapsed_s=21.3 * 60)
    assert "Run took 21.3 min, started 2026-12-07T22:55:13+0000." in render(old)


def test_cli_end_to_end_writes_json_png_and_docs(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_cli, "load", lambda spec, dtype: (tiny_llama(), None, "tiny"))
    parser = argparse.ArgumentParser()
    bench_cli.add_arguments(parser)
    args = parser.parse_args(
        ["--quick", "--lengths", "12,24", "--new-tokens", "3", "--repeats", "1", "--no-progress", "--no-gc",
         "--threads", "1", "--output", str(tmp_path / "out"), "--write-docs", str(tmp_path / "perf.md")]
    )
    assert bench_cli.run(args) == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {c["length"] for c in res["cells"]} == {12, 24}
    assert res["config"]["ratios"] == [0.5] and res["config"]["new_tokens"] == 3
    assert (tmp_path / "out" / "speedup.png").read_bytes()[:8] == PNG_MAGIC
    assert (tmp_path / "perf.png").read_bytes()[:8] == PNG_MAGIC
    assert "Performance" in (tmp_path / "perf.md").read_text()


def test_cli_rejects_bad_grid_values():
    parser = argparse.ArgumentParser()
    bench_cli.add_arguments(parser)
    for bad in (["--ratios", "1.5"], ["--lengths", "0"], ["--lengths", "a,b"], ["--repeats", "0"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_defaults_and_flags_compose():
    parser = argparse.ArgumentParser()
    bench_cli.add_arguments(parser)
    d = bench_cli.config_from_args(parser.parse_args([]))
    assert (d.lengths, d.ratios, d.batch_sizes, d.new_tokens) == ([512, 1024, 2048], [0.3, 0.5, 0.7], [1], 32)
    f = bench_cli.config_from_args(parser.parse_args(["--full", "--repeats", "2", "--max-batch-tokens", "8192"]))
    assert f.lengths[-1] == 8192 and f.batch_sizes == [1, 4] and f.new_tokens == 128 and f.repeats == 2
    assert f.max_batch_tokens == 8192 and d.max_batch_tokens is None
    q = bench_cli.config_from_args(parser.parse_args(["--quick", "--ratios", "0.3,0.7"]))
    assert q.ratios == [0.3, 0.7] and not q.profile
    # the default mode is the library default (the KV side); --modes query still measures the query side
    assert d.modes == ["kv"] and d.recent is None and d.lead_mode == "kv"
    assert [m.tf for m in d.methods()[2:]] == [TokenFilter(ratio=r) for r in (0.3, 0.5, 0.7)]
    assert d.methods()[1].tf == TokenFilter(threshold=2.0)
    query = bench_cli.config_from_args(parser.parse_args(["--modes", "query"]))
    assert query.modes == ["query"] and [m.name for m in query.methods()] == ["dense", "overhead"] + ["filter"] * 3
    assert all(m.tf.skip == "attention" for m in query.methods()[1:])
    assert bench_cli.DEFAULT_MODES == bench_grid.DEFAULT_MODES and bench_cli.MODE_NAMES == bench_grid.MODES


# -- issue 12: named shapes, devices, modes, byte ideal, the GPU section ------------------------------------
def test_named_shapes_have_the_real_fields_without_allocating():
    from tokenfilter.bench import shapes
    from tokenfilter.bench.cli import SHAPE_NAMES

    assert set(SHAPE_NAMES) == set(shapes.SHAPES)
    c = shapes.config("llama-3-8b")
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (32, 4096, 32, 8)
    assert (c.intermediate_size, c.vocab_size, c.head_dim) == (14336, 128256, 128)
    assert c.max_position_embeddings >= 32768 + 128  # the GPU grid's longest context fits
    c = shapes.config("llama-2-7b")
    assert (c.num_attention_heads, c.num_key_value_heads, c.intermediate_size, c.vocab_size) == (32, 32, 11008, 32000)
    c = shapes.config("smollm2-135m", layers=3)
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (3, 576, 9, 3)
    assert c.tie_word_embeddings and c._attn_implementation == "sdpa"
    # the FLOP model of the 8B shape: 2 * parameters per token, roughly (what the ideal is built on)
    fm = FlopModel.from_config(shapes.config("llama-3-8b"))
    per_token = fm.layers * (fm.qo_proj + fm.kv_proj + fm.mlp) + fm.lm_head
    assert 2 * 7.4e9 < per_token < 2 * 8.1e9
    with pytest.raises(ValueError, match="Unknown shape"):
        shapes.config("llama-4")


def test_cli_shape_with_every_mode_end_to_end(tmp_path):
    parser = argparse.ArgumentParser()
    bench_cli.add_arguments(parser)
    args = parser.parse_args(
        ["--shape", "smollm2-135m", "--layers", "3", "--device", "cpu", "--lengths", "12,24", "--ratios", "0.5",
         "--modes", "query,kv,sliding-window", "--recent", "4", "--new-tokens", "3", "--repeats", "1", "--warmup",
         "0", "--no-progress", "--no-gc", "--no-profile", "--threads", "1", "--output", str(tmp_path / "out"),
         "--write-docs", str(tmp_path / "perf.md")]
    )
    assert bench_cli.run(args) == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["model"]["layers"] == 3 and res["model"]["hidden"] == 576 and res["model"]["device"] == "cpu"
    assert "random-weight smollm2-135m" in res["model"]["name"] and res["config"]["inputs"] == "random-ids"
    labels = {c["label"] for c in res["cells"]}
    assert labels == {"dense", "nothing filtered (scoring only, query side)", "query side 0.5", "KV side 0.5 (R=4)",
                      "sliding window (R=4)"}
    assert len(res["kv_checks"]) == 2 * 3 and all(k["exact"] for k in res["kv_checks"])  # KV side included
    for c in res["cells"]:
        assert c["peak_memory_bytes"] is None or c["peak_memory_bytes"] > 0
        if c["method"] == "dense":
            assert c["decode"]["byte_ideal"] == 1.0
        elif c["method"] in ("filter", "kv", "window"):
            assert c["decode"]["byte_ideal"] >= 1.0
    window = [c for c in res["cells"] if c["method"] == "window" and c["length"] == 24][0]
    assert window["kv_bytes"]["peak_used"] < window["kv_bytes"]["dense_peak_allocated"]
    text = (tmp_path / "perf.md").read_text()
    assert "## GPU" in text and "No GPU run exists yet" in text and bench_cli.GPU_COMMAND in text


def test_byte_ideal_counts_the_weights_and_the_kv_reads():
    from tokenfilter.bench.runner import byte_ideal
    from tokenfilter.stats import FilterStats, LayerCounts

    fm = FlopModel(hidden=8, q_heads=2, kv_heads=1, head_dim=4, intermediate=16, vocab=10, layers=2)
    dense_layer = LayerCounts(tokens=4, pairs=40, pairs_dense=40)
    same = FilterStats.from_counts(fm, [dense_layer, dense_layer], 4)
    assert byte_ideal(same, fm, weight_bytes=1000, element_size=4, batch=1, steps=4) == 1.0
    half = LayerCounts(tokens=4, filtered=2, pairs=20, pairs_dense=40, qo_skipped=2)
    stats = FilterStats.from_counts(fm, [dense_layer, half], 4)
    entry, qo = fm.kv_entry_bytes(4), 2 * 8 * 2 * 4 * 4
    want = (4 * 1000 + 80 * entry) / (4 * 1000 - 2 * qo + 60 * entry)
    assert byte_ideal(stats, fm, 1000, 4, 1, 4) == pytest.approx(want)
    assert byte_ideal(stats, fm, 1000, 4, 2, 4) < want  # at batch 2 half the Q/O reads are assumed saved
    assert byte_ideal(None, fm, 1000, 4, 1, 4) is None


def test_device_option_resolves_or_fails_in_one_sentence():
    assert bench_cli.resolve_device("cpu") == "cpu"
    assert bench_cli.resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="--device must be"):
        bench_cli.resolve_device("gpu-please")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no GPU"):
            bench_cli.resolve_device("cuda")


def test_clock_and_peak_memory_on_the_cpu():
    from tokenfilter.bench.runner import Clock, PeakMemory

    clock, peak = Clock(torch.device("cpu")), PeakMemory(torch.device("cpu"))
    peak.reset()
    clock.mark()
    x = torch.ones(256, 256) @ torch.ones(256, 256)
    clock.mark()
    (wall,), (cpu,) = clock.spans()
    assert wall > 0 and cpu >= 0 and float(x[0, 0]) == 256
    assert peak.read() is None or peak.read() > 0


def test_gpu_section_from_a_gpu_run(result):
    gpu = json.loads(json.dumps(result))
    gpu["machine"].update(device="cuda:0", device_name="Fake GPU, 80 GiB, CUDA 12.8")
    gpu["command"] = "tokenfilter bench --device cuda"
    text = render(result, gpu=gpu)
    section = text.split("## GPU", 1)[1]
    assert "Fake GPU, 80 GiB" in section and "#### Batch size 2" in section and "No GPU run" not in section
    assert "## GPU" not in render(gpu)  # a GPU run's own page is all GPU


def test_merging_runs_keeps_every_cell_once_and_reevaluates_the_targets(result, tmp_path):
    from tokenfilter.bench.merge import main as merge_main
    from tokenfilter.bench.merge import merge

    short = json.loads(json.dumps(result))
    short["cells"] = [c for c in short["cells"] if c["length"] == 16]
    short["kv_checks"] = [k for k in short["kv_checks"] if k["length"] == 16]
    short["skipped"] = [{"batch": 1, "length": 40, "reason": "later"}, {"batch": 9, "length": 40, "reason": "never"}]
    long = json.loads(json.dumps(result))
    long["cells"] = [c for c in long["cells"] if c["length"] == 40]
    long["kv_checks"] = [k for k in long["kv_checks"] if k["length"] == 40]
    merged = merge([short, long])
    assert len(merged["cells"]) == len(result["cells"]) and len(merged["kv_checks"]) == len(result["kv_checks"])
    assert merged["skipped"] == [{"batch": 9, "length": 40, "reason": "never"}]
    assert [t["met"] for t in merged["targets"]] == [t["met"] for t in result["targets"]]
    assert len(merged["invocations"]) == 2 and merged["config"]["lengths"] == [16, 40]
    other = json.loads(json.dumps(long))
    other["model"]["name"] = "another"
    with pytest.raises(ValueError, match="different models"):
        merge([short, other])
    paths = []
    for i, r in enumerate((short, long)):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps(r))
    assert merge_main([*map(str, paths), "-o", str(tmp_path / "m.json")]) == 0
    assert "## Results" in render(json.loads((tmp_path / "m.json").read_text()))


def test_paired_prefill_pairs_halve_per_doubling_beyond_1024_tokens():
    from tokenfilter.bench.cells import prefill_pairs

    assert [prefill_pairs(8, t) for t in (128, 512, 1024, 2048, 4096, 8192, 16384)] == [8, 8, 8, 4, 2, 2, 2]
    assert [prefill_pairs(6, t) for t in (512, 2048, 4096)] == [6, 3, 2]
    assert prefill_pairs(1, 512) == 2  # never fewer than two pairs: a median needs them
