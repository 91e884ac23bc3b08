"""The bench's targets (each says which side is better, and is evaluated from that) and its grid (which methods run
on which contexts). Synthetic cells only: nothing is timed here."""

from __future__ import annotations

import pytest

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
    assert len(TARGETS) == 7
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
def test_methods_listed_for_the_default_options():
    methods = BenchConfig(ratios=[0.3, 0.5]).methods()
    assert [(m.name, m.ratio) for m in methods] == [("dense", None), ("overhead", None), ("filter", 0.3),
                                                    ("filter", 0.5)]
    dense, overhead, filt, _ = methods
    assert dense.tf is None
    assert overhead.tf.threshold == 2.0 and overhead.tf.ratio is None and overhead.tf.skip == "attention"
    assert filt.tf.ratio == 0.3 and filt.tf.kv == "drop" and filt.tf.schedule == "uniform"
    name, ratio, tf = filt  # still a tuple
    assert (name, ratio, tf) == ("filter", 0.3, filt.tf)


def test_methods_listed_for_every_mode_and_option():
    cfg = BenchConfig(ratios=[0.5], kv_ratios=[0.2, 0.4], overhead=False, recent=8,
                      modes=["query", "kv", "sliding-window"], schedule="tail-linear")
    methods = cfg.methods()
    assert [(m.name, m.ratio) for m in methods] == [("dense", None), ("filter", 0.5), ("kv", 0.2), ("kv", 0.4),
                                                    ("window", None)]
    assert [method_label(m.name, m.ratio, cfg) for m in methods] == [
        "dense", "ratio 0.5", "KV side 0.2 (R=8)", "KV side 0.4 (R=8)", "sliding window (R=8)"]
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
        {"length": 300, "reason": "300+4 new tokens > max_position_embeddings=256"},
        {"batch": 2, "length": 16, "reason": "2 x 16 tokens > max_batch_tokens=16"},
    ]
    assert grid.tokens_needed == 16
    assert [grid.warmup_rounds(b, t, cfg) for b, t in grid.contexts] == [2, 0, 2]
    assert grid.trials(cfg, methods=4) == (3 * 3 + 2 * 2) * 4
    assert grid.profile_length(cfg) == 16
    assert plan_grid(BenchConfig(lengths=[2048, 4096]), None).profile_length(BenchConfig()) == 2048
    assert plan_grid(cfg, max_positions=None).lengths == [8, 16, 300]


def test_the_runner_still_exports_the_names_it_always_had():
    from tokenfilter.bench import runner

    for name in ("BenchConfig", "run_bench", "Clock", "PeakMemory", "Trial", "run_trial", "ideal_ratio", "byte_ideal",
                 "evaluate_targets", "method_label", "model_info", "read_weight_bytes", "MODES", "SCHEMA"):
        assert hasattr(runner, name), name
