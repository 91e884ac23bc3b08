"""The timing benchmark's allocator setting (``--malloc``): glibc keeps freed memory, so that reusing it costs no page
fault; the setting is recorded in the JSON and the report; the memory benchmark never applies it."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

import tiny_lm
from tokenfilter.bench import cli as bench_cli
from tokenfilter.bench import malloc

GLIBC = malloc._glibc() is not None and hasattr(malloc._glibc(), "mallinfo2")

_ONE_PASS = """
import ctypes, sys, torch
class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                                 "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
if sys.argv[1] == "keep":
    from tokenfilter.bench.malloc import keep_freed_memory
    assert keep_freed_memory() is None
tensors = [torch.ones(2 * 2**20) for _ in range(10)]  # 10 x 8 MiB
del tensors
print(libc.mallinfo2().fordblks)
"""


def _free_in_heap_after_one_pass(setting: str) -> int:
    """Bytes free in the heap, kept for the next allocation, after a child allocated and freed 80 MiB."""
    out = subprocess.run([sys.executable, "-c", _ONE_PASS, setting], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc (2.33 or later) only")
def test_kept_memory_stays_in_the_heap_for_the_next_tensor():
    """glibc by default serves blocks of 8 MiB by mmap and gives them back when freed (the next one faults its pages in
    again); with the memory kept, the 80 MiB stay in the heap."""
    assert _free_in_heap_after_one_pass("system") < 8 * 2**20
    assert _free_in_heap_after_one_pass("keep") >= 80 * 2**20


def test_the_setting_names_what_the_allocator_does(monkeypatch):
    calls = []
    monkeypatch.setattr(malloc, "keep_freed_memory", lambda: calls.append(1))
    assert malloc.apply_setting("system") == malloc.SYSTEM and not calls
    assert malloc.apply_setting("keep") == malloc.KEPT and calls == [1]
    monkeypatch.setattr(malloc, "keep_freed_memory", lambda: "the C library is not glibc")
    assert malloc.apply_setting("keep") == f"{malloc.SYSTEM}: the C library is not glibc"
    with pytest.raises(ValueError, match="keep or system"):
        malloc.apply_setting("jemalloc")


@pytest.mark.parametrize("setting", ["keep", "system"])
def test_the_bench_records_its_allocator(setting, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(malloc, "keep_freed_memory", lambda: calls.append(1))  # the test process keeps its own
    model = tiny_lm.tiny_llama(128, max_position_embeddings=256)
    monkeypatch.setattr(bench_cli, "load", lambda spec, dtype: (model, None, "tiny"))
    parser = argparse.ArgumentParser()
    bench_cli.add_arguments(parser)
    flags = [] if setting == "keep" else ["--malloc", "system"]  # keep is the default
    args = parser.parse_args(
        ["--quick", "--lengths", "12", "--new-tokens", "2", "--repeats", "1", "--warmup", "0", "--no-progress",
         "--no-gc", "--no-overhead", "--threads", "1", "--output", str(tmp_path / "out"), "--write-docs",
         str(tmp_path / "perf.md"), *flags]
    )
    assert bench_cli.run(args) == 0
    expected = malloc.KEPT if setting == "keep" else malloc.SYSTEM
    assert calls == ([1] if setting == "keep" else [])
    assert json.loads((tmp_path / "out" / "results.json").read_text())["config"]["allocator"] == expected
    assert f"- Allocator: {expected}." in (tmp_path / "perf.md").read_text()


def test_the_memory_benchmark_leaves_the_allocator_alone(tmp_path, monkeypatch):
    from tokenfilter.bench import memory

    monkeypatch.setattr(malloc, "keep_freed_memory", lambda: pytest.fail("--memory changed the allocator"))
    monkeypatch.setattr(memory, "run", lambda args, command, threads: 0)
    parser = argparse.ArgumentParser()
    bench_cli.add_arguments(parser)
    assert bench_cli.run(parser.parse_args(["--memory", "--threads", "1", "--output", str(tmp_path)])) == 0
