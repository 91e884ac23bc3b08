"""The bench's targets (each says which side is better, and is evaluated from that) and its grid (which methods run
on which contexts). Synthetic cells only: nothing is timed here."""

from __future__ import annotations

import pytest

from tokenfilter import TokenFilter
from tokenfilter.bench.grid import BenchConfig, method_label, plan_grid
from tokenfilter.bench.targets import KV_EXACT, TARGETS, ExactKVTarget, Target, evaluate_targets, meets


def cell(method: str, length: int = 2048, ratio: float | None = 0.5, **phase: float) -> dict:
    """A cell with the same speed ratio and efficiency in both phases and on both clocks."""
    p = {"speedup": phase.get("speedup", 1.0), "efficiency": phase.get("efficiency", 1.0), "ideal": 1.5}
    p.update({"cpu_speedup": p["speedup"], "cpu_efficiency": p["efficiency"]})
    return {"batch": 1, "length": length, "method": method, "ratio": ratio, "label": f"{method} {ratio}",
            "prefill": dict(p), "decode": dict(p)}


def by_name(result: dict) -> dict[str, dict]:
    return {t["target"]: t for t in evaluate_targets(result)}


def test_every_target_states_which_side_is_better():
    assert len(TARGETS) == 10
    for target in TARGETS:
        assert target.better in ("lower", "higher")
    for entry in evaluate_targets({"cells": [], "kv_checks": []}):
        assert entry["better"] in ("lower", "higher")
        assert entry["met"] is None  # nothing measured: neither met nor missed
    overhead = [t for t in TARGETS if t.name.startswith("overhead")]
    assert {t.better for t in overhead} == {"lower"}
    assert {t.better for t in TARGETS if t not in overhead} == {"higher"}
    # the goal text is written from the fields (the report formats "fraction" goals as percentages)
    assert overhead[0].goal == "<= 0.03 (fraction of dense time)"
    assert [t.goal for t in TARGETS if t.name.startswith("efficiency")] == [">= 0.8", ">= 0.8"]


def test_overhead_lower_is_better_a_value_above_the_bound_misses():
    # speed ratio 1/1.05: 5 % slower than dense, above the 3 % bound
    res = by_name({"cells": [cell("overhead", 512, None, speedup=1 / 1.05), cell("overhead", 1024, None)]})
    t = res["overhead with nothing filtered, decode"]
    assert t["better"] == "lower" and t["met"] is False and t["met_cpu"] is False
    assert t["worst"] == pytest.approx(0.05) and t["where"] == "B=1 T=512 overhead None"  # the highest is the worst
    assert [m["value"] for m in t["misses"]] == [pytest.approx(0.05)]
    # 1 % faster than dense: below the bound, met; the worst is the larger of the two values
    res = by_name({"cells": [cell("overhead", 512, None, speedup=1.01), cell("overhead", 1024, None)]})
    t = res["overhead with nothing filtered, prefill"]
    assert t["met"] is True and t["misses"] == [] and t["worst"] == pytest.approx(0.0)


def test_overhead_reads_the_paired_measurement_where_there_is_one():
    c = cell("overhead", 512, None, speedup=1.0)
    c["paired"] = {ph: {"extra": 0.04, "cpu": {"extra": 0.01}} for ph in ("prefill", "decode")}
    t = by_name({"cells": [c]})["overhead with nothing filtered, decode"]
    assert (t["met"], t["met_cpu"]) == (False, True)


def test_higher_is_better_targets_miss_below_their_bound():
    cells = [cell("filter", 2048, 0.5, speedup=0.95, efficiency=0.7), cell("filter", 4096, 0.5, efficiency=0.9)]
    res = by_name({"cells": cells})
    eff = res["efficiency (measured / ideal) at 2048+ tokens, prefill"]
    assert eff["better"] == "higher" and eff["met"] is False
    assert eff["worst"] == pytest.approx(0.7) and eff["where"] == "B=1 T=2048 filter 0.5"  # the lowest is the worst
    slow = res["not slower than dense (ratio >= 0.3, context >= 1024), decode"]
    assert slow["met"] is False and slow["worst"] == pytest.approx(0.95)
    res = by_name({"cells": [cell("filter", 2048, 0.5, speedup=1.2, efficiency=0.85)]})
    assert res["efficiency (measured / ideal) at 2048+ tokens, decode"]["met"] is True
    assert res["not slower than dense (ratio >= 0.3, context >= 1024), prefill"]["met"] is True


def test_targets_read_only_their_cells():
    # short contexts and low ratios are outside the efficiency and not-slower targets
    cells = [cell("filter", 512, 0.5, speedup=0.5, efficiency=0.1), cell("filter", 2048, 0.1, speedup=0.5)]
    res = by_name({"cells": cells})
    assert res["not slower than dense (ratio >= 0.3, context >= 1024), decode"]["met"] is None
    assert res["efficiency (measured / ideal) at 2048+ tokens, decode"]["met"] is True  # the 2048 cell: 1.0


def test_filter_targets_read_the_measured_default_when_it_ran():
    """With KV-side cells (the library default) the efficiency and not-slower targets read those, not the query
    side's; without them (a --modes query run, older results) they read the query side's. Each entry says which."""
    slow_query = cell("filter", 2048, 0.5, speedup=0.5, efficiency=0.1)
    fast_kv = cell("kv", 2048, 0.5, speedup=1.2, efficiency=0.9)
    window = cell("window", 2048, None, speedup=0.1, efficiency=0.1)
    res = by_name({"cells": [slow_query, fast_kv, window]})
    for name in ("efficiency (measured / ideal) at 2048+ tokens, decode",
                 "not slower than dense (ratio >= 0.3, context >= 1024), prefill"):
        assert res[name]["reads"] == "kv" and res[name]["met"] is True
        assert [v["where"] for v in res[name]["values"]] == ["B=1 T=2048 kv 0.5"]
    res = by_name({"cells": [slow_query, window]})
    t = res["not slower than dense (ratio >= 0.3, context >= 1024), decode"]
    assert t["reads"] == "filter" and t["met"] is False and t["where"] == "B=1 T=2048 filter 0.5"
    assert "reads" not in res["overhead with nothing filtered, decode"]


def test_issue_29_targets_read_paired_speed_flop_and_byte_ideals():
    """The default at 512 tokens (>= 0.97 of dense's prefill speed), its prefill FLOP efficiency and its decode byte
    efficiency at 4096+ tokens (>= 0.9): paired ratios where the cell has them, the rounds' otherwise."""
    short = cell("kv", 512, 0.5, speedup=1.2)
    short["paired"] = {ph: {"extra": 0.05, "cpu": {"extra": 0.01}} for ph in ("prefill", "decode")}  # 1/1.05
    long = cell("kv", 4096, 0.5, speedup=1.1, efficiency=0.95)
    long["decode"]["byte_ideal"] = 1.25  # 1.1 / 1.25 = 0.88
    res = by_name({"cells": [short, long, cell("kv", 4096, 0.1, efficiency=0.1)]})
    at_512 = res["prefill at 512 tokens (ratio >= 0.3)"]
    assert (at_512["met"], at_512["met_cpu"]) == (False, True) and at_512["worst"] == pytest.approx(1 / 1.05)
    flop = res["prefill FLOP efficiency at 4096+ tokens (ratio >= 0.3)"]
    assert flop["met"] is True and flop["worst"] == pytest.approx(0.95)  # the ratio-0.1 cell is not read
    byte = res["decode byte efficiency at 4096+ tokens (ratio >= 0.3)"]
    assert byte["met"] is False and byte["worst"] == pytest.approx(1.1 / 1.25) and byte["reads"] == "kv"


def test_the_same_value_meets_one_side_and_misses_the_other():
    cells = [cell("filter", speedup=0.9), cell("filter", speedup=1.2)]
    value = lambda c, clock: c["decode"][f"{clock}speedup"]
    every = lambda c: True
    low = Target("t", "lower", 1.0, every, value).evaluate({"cells": cells})
    high = Target("t", "higher", 1.0, every, value).evaluate({"cells": cells})
    assert low["goal"] == "<= 1.0" and high["goal"] == ">= 1.0"
    assert low["met"] is False and [m["value"] for m in low["misses"]] == [1.2] and low["worst"] == 1.2
    assert high["met"] is False and [m["value"] for m in high["misses"]] == [0.9] and high["worst"] == 0.9
    assert meets(1.0, "lower", 1.0) and meets(1.0, "higher", 1.0)  # the bound itself is met either way
    assert not meets(1.01, "lower", 1.0) and not meets(0.99, "higher", 1.0)


def test_a_target_without_a_valid_side_is_refused():
    with pytest.raises(ValueError, match="better must be one of"):
        Target("t", "smaller", 1.0, lambda c: True, lambda c, clock: 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="better must be one of"):
        meets(1.0, "up", 0.0)  # type: ignore[arg-type]


def test_the_kv_target_is_met_only_when_every_check_is_exact():
    def check(exact: bool) -> dict:
        return {"batch": 1, "length": 16, "label": "ratio 0.5", "ratio": 0.5, "exact": exact,
                "saved_bytes_measured": 64}

    target = ExactKVTarget()
    assert target.name == KV_EXACT and target.better == "higher" and target.goal == "exact"
    assert target.evaluate({"kv_checks": [check(True), check(True)]})["met"] is True
    missed = target.evaluate({"kv_checks": [check(True), check(False)]})
    assert missed["met"] is False and missed["misses"] == [{"where": "B=1 T=16 ratio 0.5", "value": 64}]
    assert target.evaluate({"kv_checks": []})["met"] is None


# -- the grid ----------------------------------------------------------------------------------------------
def test_the_default_mode_is_the_library_default_tokenfilter():
    """Out of the box the bench measures what TokenFilter(ratio=r) ships: the KV side, at every ratio, and its
    nothing-filtered run, profiled cell and paired cells are the same configuration."""
    cfg = BenchConfig(ratios=[0.3, 0.5])
    assert cfg.modes == ["kv"] and cfg.lead_mode == "kv"
    methods = cfg.methods()
    assert [(m.name, m.ratio) for m in methods] == [("dense", None), ("overhead", None), ("kv", 0.3), ("kv", 0.5)]
    dense, overhead, kv3, kv5 = methods
    assert dense.tf is None
    assert kv3.tf == TokenFilter(ratio=0.3) and kv5.tf == TokenFilter(ratio=0.5)  # exactly the library default
    assert kv5.tf.skip == "none" and kv5.tf.window == 64 and kv5.tf.score == "two-horizon"
    assert overhead.tf == TokenFilter(threshold=2.0)  # the same configuration, nothing filtered
    assert cfg.profile_filter() == TokenFilter(ratio=0.5)
    assert [method_label(m.name, m.ratio, cfg) for m in methods] == [
        "dense", "nothing filtered (scoring only, KV side)", "KV side 0.3 (R=64) — the default",
        "KV side 0.5 (R=64) — the default"]
    name, ratio, tf = kv3  # still a tuple
    assert (name, ratio, tf) == ("kv", 0.3, kv3.tf)
    # --recent / --schedule given: applied to the library default, and the row no longer says "the default"
    changed = BenchConfig(ratios=[0.5], recent=16, schedule="tail-linear")
    kv = changed.methods()[-1]
    assert kv.tf == TokenFilter(ratio=0.5, recent=16, schedule="tail-linear", start_layer=None)
    assert changed.overhead_filter() == TokenFilter(threshold=2.0, recent=16, schedule="tail-linear", start_layer=None)
    assert method_label(kv.name, kv.ratio, changed) == "KV side 0.5 (R=16)"


def test_the_overhead_bound_is_above_every_cosine_score():
    """threshold 2.0 filters nothing: the default score (two-horizon, key fusion) and the SPEC's (variance fusion) are
    cosines averaged over heads, <= 1."""
    import torch

    from tokenfilter.algorithm.scores import fuse_stacked, head_cosine

    g = torch.Generator().manual_seed(0)
    x, a = torch.randn(64, 2, 3, 8, generator=g), torch.randn(64, 2, 3, 8, generator=g)
    cos = torch.cat([head_cosine(x, a), head_cosine(x, x)])  # x with itself: 1 up to rounding
    for fusion in ("key", "variance", "mean", "min"):
        assert fuse_stacked(cos, fusion, 1.0).max() < 2.0


def test_query_mode_rows_are_as_before():
    """--modes query: the paper's query side at every ratio, its overhead run as it always was; only the labels
    now name the mode."""
    cfg = BenchConfig(ratios=[0.3, 0.5], modes=["query"])
    methods = cfg.methods()
    assert cfg.lead_mode == "query"
    assert [(m.name, m.ratio) for m in methods] == [("dense", None), ("overhead", None), ("filter", 0.3),
                                                    ("filter", 0.5)]
    _, overhead, filt, _ = methods
    assert overhead.tf == TokenFilter(threshold=2.0, kv="drop", skip="attention", start_layer=2)
    assert filt.tf == TokenFilter(ratio=0.3, schedule="uniform", kv="drop", skip="attention", start_layer=2)
    assert cfg.profile_filter() == TokenFilter(ratio=0.5, kv="drop", skip="attention", start_layer=2)
    assert [method_label(m.name, m.ratio, cfg) for m in methods] == [
        "dense", "nothing filtered (scoring only, query side)", "query side 0.3", "query side 0.5"]
    # the first of query / kv leads; a sliding window alone leaves the lead to the library default
    assert BenchConfig(modes=["kv", "query"]).lead_mode == "kv"
    assert BenchConfig(modes=["sliding-window", "query"]).lead_mode == "query"
    assert BenchConfig(modes=["sliding-window"]).overhead_filter() == TokenFilter(threshold=2.0)


def test_methods_listed_for_every_mode_and_option():
    cfg = BenchConfig(ratios=[0.5], kv_ratios=[0.2, 0.4], overhead=False, recent=8,
                      modes=["query", "kv", "sliding-window"], schedule="tail-linear")
    methods = cfg.methods()
    assert [(m.name, m.ratio) for m in methods] == [("dense", None), ("filter", 0.5), ("kv", 0.2), ("kv", 0.4),
                                                    ("window", None)]
    assert [method_label(m.name, m.ratio, cfg) for m in methods] == [
        "dense", "query side 0.5", "KV side 0.2 (R=8)", "KV side 0.4 (R=8)", "sliding window (R=8)"]
    kv = methods[2].tf
    assert kv.skip == "none" and kv.recent == 8 and kv.start_layer is None  # tail-linear: its own start
    assert methods[-1].tf.recent == 8
    assert [m.name for m in BenchConfig(ratios=[0.5], modes=["kv"], overhead=False).methods()] == ["dense", "kv"]
    with pytest.raises(ValueError, match="Unknown bench mode 'decode'"):
        BenchConfig(modes=["query", "decode"]).methods()


def test_grid_contexts_skip_what_does_not_fit_and_warm_up_once_per_batch_size():
    cfg = BenchConfig(lengths=[8, 16, 300], batch_sizes=[1, 2], max_batch_tokens=16, new_tokens=4, warmup=2,
                      repeats=3)
    grid = plan_grid(cfg, max_positions=256)
    assert grid.lengths == [8, 16]
    assert grid.contexts == [(1, 8), (1, 16), (2, 8)]
    assert grid.skipped == [
        {"length": 300, "reason": "300 tokens > max_position_embeddings=256"},
        {"batch": 2, "length": 16, "reason": "2 x 16 tokens > max_batch_tokens=16"},
    ]
    assert grid.tokens_needed == 16
    assert [grid.warmup_rounds(b, t, cfg) for b, t in grid.contexts] == [2, 0, 2]
    assert grid.trials(cfg, methods=4) == (3 * 3 + 2 * 2) * 4
    assert grid.profile_length(cfg) == 16
    assert plan_grid(BenchConfig(lengths=[2048, 4096]), None).profile_length(BenchConfig()) == 2048
    assert plan_grid(cfg, max_positions=None).lengths == [8, 16, 300]


def test_full_reaches_8192_on_smollm2_and_a_shape_plans_16384():
    """SmolLM2-135M holds 8192 positions: --full's 8192-token context is measured (its decode steps run past the
    positions, noted), 8193 is not. Every --shape holds 131072: 16384 is planned (nothing run here)."""
    import argparse

    from tokenfilter.bench import cli as bench_cli
    from tokenfilter.bench import shapes

    parser = argparse.ArgumentParser()
    bench_cli.add_arguments(parser)
    full = bench_cli.config_from_args(parser.parse_args(["--full"]))
    assert full.lengths == [512, 1024, 2048, 4096, 8192] and full.modes == ["kv"]
    grid = plan_grid(full, max_positions=8192)  # SmolLM2-135M's max_position_embeddings
    assert grid.lengths == full.lengths and grid.skipped == []
    assert (1, 8192) in grid.contexts and (4, 8192) in grid.contexts
    assert grid.past_positions == [{"length": 8192, "note": "the last 128 of 128 decode steps run at positions past "
                                    "max_position_embeddings=8192 (RoPE: the same work per step)"}]
    beyond = plan_grid(BenchConfig(lengths=[8192, 8193], new_tokens=4), max_positions=8192)
    assert beyond.lengths == [8192] and beyond.skipped[0]["length"] == 8193

    args = parser.parse_args(["--shape", "smollm2-135m", "--layers", "2", "--lengths", "4096,8192,16384",
                              "--batch-sizes", "1,4", "--new-tokens", "128"])
    cfg = bench_cli.config_from_args(args)
    for name in shapes.SHAPES:
        grid = plan_grid(cfg, shapes.config(name, layers=args.layers).max_position_embeddings)
        assert grid.lengths == [4096, 8192, 16384] and grid.skipped == [] and grid.past_positions == []
        assert (1, 16384) in grid.contexts and (4, 16384) in grid.contexts
    assert shapes.config("smollm2-135m", layers=2).num_hidden_layers == 2


def test_the_runner_still_exports_the_names_it_always_had():
    from tokenfilter.bench import runner

    for name in ("BenchConfig", "run_bench", "Clock", "PeakMemory", "Trial", "run_trial", "ideal_ratio", "byte_ideal",
                 "evaluate_targets", "method_label", "model_info", "read_weight_bytes", "MODES", "SCHEMA"):
        assert hasattr(runner, name), name
