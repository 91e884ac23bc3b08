"""A description of the machine a benchmark ran on (CPU model, cores, load, library versions, threads)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

STAMP = "%Y-%m-%dT%H:%M:%S%z"  # how a run writes its times (``started``, ``created``)


def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo`` (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def describe(device: torch.device | str | None = None) -> dict:
    """The machine; ``device``: the one the benchmark runs on (its name, memory and CUDA version when a GPU)."""
    import transformers

    gpu = gpu_name = None
    device = torch.device(device) if device is not None else torch.device("cpu")
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu_name = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
    return {
        "device": str(device),
        "device_name": gpu_name or "CPU",
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "load_average_1_5_15min": load_average(),
        "memory_gib": _memory_gib(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "gpu": gpu,
    }


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def summary_line(machine: dict) -> str:
    load = machine.get("load_average_1_5_15min")
    load_txt = f", load average at start {load[0]}" if load else ""
    if machine.get("device", "cpu").startswith("cuda"):
        return (
            f"GPU {machine.get('device_name')} (host: {machine['cpu']}, {machine['usable_cores']} cores); "
            f"torch {machine['torch']}, transformers {machine['transformers']}"
        )
    return (
        f"{machine['cpu']}, {machine['usable_cores']} usable cores ({machine['logical_cores']} logical){load_txt}; "
        f"torch {machine['torch']} with {machine['torch_threads']} threads, transformers {machine['transformers']}"
    )
