"""The timing benchmark's OpenMP setting (``--omp-wait``): idle OpenMP threads sleep at once, set before torch loads
(OpenMP reads it only then); a policy the environment names is left; the setting is recorded in the JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tokenfilter.bench import openmp

_BENCH = ["--shape", "smollm2-135m", "--layers", "4", "--quick", "--lengths", "16", "--new-tokens", "2", "--repeats",
          "1", "--warmup", "0", "--no-progress", "--no-overhead", "--threads", "2"]


def _bench_child(tmp_path, *flags: str) -> tuple[str, str]:
    """Run ``tokenfilter bench`` in a child that asks GNU OpenMP to print its settings when it loads; returns (the
    child's stderr, the JSON's record of the setting)."""
    env = {k: v for k, v in os.environ.items() if k != openmp.VARIABLE}
    env["OMP_DISPLAY_ENV"] = "VERBOSE"
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "tokenfilter.cli", "bench", *_BENCH, "--output", str(out), *flags],
                          capture_output=True, text=True, env=env, check=True)
    return proc.stderr, json.loads((out / "results.json").read_text())["config"]["omp_wait"]


def test_passive_reaches_openmp_before_torch_loads_it(tmp_path):
    """The default sets the policy before anything loads torch: GNU OpenMP then spins 0 times before it sleeps
    (``GOMP_SPINCOUNT``); with ``--omp-wait system`` it keeps its default spin count."""
    err, record = _bench_child(tmp_path)
    if "GOMP_SPINCOUNT" not in err:
        pytest.skip("torch's OpenMP here is not GNU OpenMP, which is what prints GOMP_SPINCOUNT")
    assert "GOMP_SPINCOUNT = '0'" in err and record == openmp.PASSIVE
    err, record = _bench_child(tmp_path, "--omp-wait", "system")
    assert "GOMP_SPINCOUNT = '0'" not in err and "GOMP_SPINCOUNT" in err and record == openmp.SYSTEM


def test_the_setting_leaves_a_named_policy_and_says_when_it_came_too_late(monkeypatch):
    monkeypatch.delenv(openmp.VARIABLE, raising=False)
    assert "torch" in sys.modules  # the test process loaded torch: too late to set
    assert openmp.apply_setting("passive").endswith("OpenMP reads it only when it loads")
    assert openmp.VARIABLE not in os.environ
    assert openmp.apply_setting("system") == openmp.SYSTEM and openmp.VARIABLE not in os.environ
    monkeypatch.delitem(sys.modules, "torch")  # as in a fresh `tokenfilter bench` process
    assert openmp.apply_setting("passive") == openmp.PASSIVE and os.environ[openmp.VARIABLE] == "PASSIVE"
    monkeypatch.setenv(openmp.VARIABLE, "ACTIVE")
    named = "OpenMP's wait policy as the environment names it (OMP_WAIT_POLICY=ACTIVE)"
    assert openmp.apply_setting("passive") == openmp.apply_setting("system") == named
    assert os.environ[openmp.VARIABLE] == "ACTIVE"
    with pytest.raises(ValueError, match="passive or system"):
        openmp.apply_setting("spin")
