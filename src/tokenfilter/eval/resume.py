"""Finished parts of an evaluation, kept in its output folder so that an interrupted run continues.

One JSON file per (method, ratio) row under ``OUTPUT/rows``, rewritten atomically (a temporary file, then
``os.replace``) each time one of its tasks, or its perplexity, finishes. Each file carries the fingerprint
of the configuration that produced it; a run with another configuration refuses to reuse it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

ROWS_DIR = "rows"
LONG_DIR = "long"  # the long-input part's folder (tokenfilter.eval.long_part)
# the settings a kept result depends on; methods and ratios may change between runs (new rows are computed)
FINGERPRINT_FIELDS = ("model", "tasks", "limit", "dtype", "ppl_file", "ppl_window", "ppl_windows", "lambada",
                      "calib_file", "calib_windows", "seed")
CALIBRATION_FIELDS = ("calib_file", "calib_windows")  # only the layer-removal rows depend on these
LAYER_REMOVAL_PREFIX = "shortgpt"


class ResumeMismatchError(ValueError):
    """The output folder holds results of another configuration."""


def write_json_atomic(path: Path, data: object) -> None:
    """Write ``data`` as JSON so that ``path`` holds either its old or its new content, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def has_results(folder: Path) -> bool:
    """Whether ``folder`` holds the results (final or partial) of an earlier evaluation."""
    return (folder / "results.json").exists() or any((folder / ROWS_DIR).glob("*.json"))


def clear(folder: Path) -> None:
    """Forget an earlier run (``--force``): its kept parts (the rows and the long part) and its results.json (the
    report and plot are overwritten at the end)."""
    shutil.rmtree(folder / ROWS_DIR, ignore_errors=True)
    shutil.rmtree(folder / LONG_DIR, ignore_errors=True)
    (folder / "results.json").unlink(missing_ok=True)


def kept_rows(folder: Path) -> int:
    """How many rows have kept parts in ``folder``."""
    return len(list((folder / ROWS_DIR).glob("*.json")))


def _describe(key: str, value: object) -> str:
    return f"{key} {value!r}" if isinstance(value, str) else f"{key} {value}"


class RowStore:
    """The kept rows of one output folder (or none, with ``folder=None``: nothing is kept)."""

    def __init__(self, folder: Path | None, fingerprint: dict) -> None:
        self.folder = None if folder is None else Path(folder) / ROWS_DIR
        self.fingerprint = fingerprint

    def fingerprint_of(self, method: str, ratio: float | None = None) -> dict:
        """The settings one row depends on (the calibration text matters to layer removal only), with the filter
        the method means today: a kept row of a method whose configuration changed since (e.g. a new library
        default) no longer matches, so it is computed again."""
        if method.startswith(LAYER_REMOVAL_PREFIX):
            return self.fingerprint
        out = {k: v for k, v in self.fingerprint.items() if k not in CALIBRATION_FIELDS}
        if method != "dense" and ratio is not None:
            from tokenfilter.eval.methods import filter_for

            out["filter"] = repr(filter_for(method, ratio))
        return out

    def path(self, method: str, ratio: float) -> Path:
        assert self.folder is not None
        return self.folder / f"{method}@{ratio:g}.json"

    def check(self, plan: list[tuple[str, float]]) -> None:
        """Raise ``ResumeMismatchError`` (one sentence) when a kept row of ``plan`` came from another
        configuration (kept rows outside the plan are left alone)."""
        if self.folder is None:
            return
        for method, ratio in plan:
            path = self.path(method, ratio)
            if not path.exists():
                continue
            kept = json.loads(path.read_text(encoding="utf-8")).get("fingerprint", {})
            now = self.fingerprint_of(method, ratio)
            diffs = [k for k in FINGERPRINT_FIELDS if kept.get(k) != now.get(k)]
            if diffs:
                there = ", ".join(_describe(k, kept.get(k)) for k in diffs)
                here = ", ".join(_describe(k, now.get(k)) for k in diffs)
                raise ResumeMismatchError(
                    f"Cannot resume: {self.folder.parent} holds results of another configuration ({there} there, "
                    f"{here} now); rerun with the same settings, or pass --force to start over."
                )

    def load(self, method: str, ratio: float) -> dict:
        """The kept record of one row (``{}`` when none): finished ``tasks``, ``perplexity``, final ``row``."""
        if self.folder is None or not self.path(method, ratio).exists():
            return {}
        record = json.loads(self.path(method, ratio).read_text(encoding="utf-8"))
        return record if record.get("fingerprint") == self.fingerprint_of(method, ratio) else {}

    def save(self, method: str, ratio: float, record: dict) -> None:
        if self.folder is not None:
            fingerprint = self.fingerprint_of(method, ratio)
            kept = {**record, "method": method, "target_ratio": ratio, "fingerprint": fingerprint}
            write_json_atomic(self.path(method, ratio), kept)
