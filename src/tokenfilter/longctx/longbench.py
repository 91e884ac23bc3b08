"""MiniLongBench (LongBench v1 samples): loading, LongBench's middle truncation, prompts and scoring.

Files: ``MiniLongBench_<task>.json``, each ``{id: {"origin_prompt", "gold", "prediction", "time"}}``;
``gold`` is a list of answers, or ``{"all_classes": [...], "answers": [...]}`` for classification.
The ``prediction`` field (another model's output) is ignored.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tokenfilter.longctx.metrics import score_sample

REPO = Path(__file__).resolve().parents[3]
MINILONGBENCH_DIR = REPO.parent / "shared" / "data" / "minilongbench"


@dataclass(frozen=True)
class TaskSpec:
    """A LongBench task: its metric, LongBench's max new tokens, and whether the prompt is wrapped in the
    chat template (LongBench leaves the few-shot and code-completion tasks raw)."""

    metric: str
    max_new_tokens: int
    chat: bool = True
    first_line: bool = False  # LongBench keeps only the first line of the answer (few-shot tasks)


# The 16 English tasks of LongBench v1 (the Chinese ones: dureader, multifieldqa_zh, vcsum, lsht,
# passage_retrieval_zh are left out).
ENGLISH_TASKS: dict[str, TaskSpec] = {
    "narrativeqa": TaskSpec("qa_f1", 128),
    "qasper": TaskSpec("qa_f1", 128),
    "multifieldqa_en": TaskSpec("qa_f1", 64),
    "hotpotqa": TaskSpec("qa_f1", 32),
    "2wikimqa": TaskSpec("qa_f1", 32),
    "musique": TaskSpec("qa_f1", 32),
    "gov_report": TaskSpec("rouge_l", 512),
    "qmsum": TaskSpec("rouge_l", 512),
    "multi_news": TaskSpec("rouge_l", 512),
    "trec": TaskSpec("classification", 64, chat=False, first_line=True),
    "triviaqa": TaskSpec("qa_f1", 32, chat=False, first_line=True),
    "samsum": TaskSpec("rouge_l", 128, chat=False, first_line=True),
    "passage_count": TaskSpec("count", 32),
    "passage_retrieval_en": TaskSpec("retrieval", 32),
    "lcc": TaskSpec("code_sim", 64, chat=False),
    "repobench-p": TaskSpec("code_sim", 64, chat=False),
}


class LongBenchDataError(ValueError):
    """MiniLongBench files are missing or malformed; the message says what to pass."""


@dataclass(frozen=True)
class Sample:
    task: str
    id: str
    prompt: str
    answers: tuple[str, ...]
    all_classes: tuple[str, ...] = field(default=())


def _sort_key(key: str) -> tuple[int, int | str]:
    return (0, int(key)) if key.isdigit() else (1, key)


def load_task(task: str, data_dir: str | Path | None = None, limit: int | None = None) -> list[Sample]:
    """The first ``limit`` samples (by id) of one task."""
    if task not in ENGLISH_TASKS:
        raise LongBenchDataError(f"Unknown or non-English task {task!r}; choose from {', '.join(ENGLISH_TASKS)}.")
    path = Path(data_dir or MINILONGBENCH_DIR) / f"MiniLongBench_{task}.json"
    if not path.exists():
        raise LongBenchDataError(
            f"{path} does not exist; pass the MiniLongBench folder (MiniLongBench_<task>.json files, "
            "from MilkThink-Lab/MiniLongBench)."
        )
    raw = json.loads(path.read_text(encoding="utf-8"))
    samples = []
    for key in sorted(raw, key=_sort_key)[: limit if limit is not None else None]:
        item = raw[key]
        gold = item["gold"]
        if isinstance(gold, dict):
            answers, classes = gold["answers"], gold.get("all_classes") or ()
        else:
            answers, classes = gold, ()
        if isinstance(answers, str):
            answers = [answers]
        samples.append(Sample(task, key, item["origin_prompt"], tuple(answers), tuple(classes)))
    return samples


def load_tasks(
    tasks: Sequence[str] | None = None, data_dir: str | Path | None = None, limit: int | None = None
) -> dict[str, list[Sample]]:
    return {t: load_task(t, data_dir, limit) for t in (tasks or ENGLISH_TASKS)}


def truncate_middle(ids: Sequence[int], max_length: int) -> list[int]:
    """LongBench's truncation: a sequence longer than ``max_length`` keeps its first ``max_length // 2``
    and its last ``max_length - max_length // 2`` tokens (the question sits at both ends of the prompt)."""
    ids = list(ids)
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}.")
    if len(ids) <= max_length:
        return ids
    head = max_length // 2
    return ids[:head] + ids[len(ids) - (max_length - head) :]


def truncate_prompt(tokenizer: object, prompt: str, max_length: int) -> str:
    """Tokenize, truncate in the middle, decode (special tokens dropped), as LongBench's ``pred.py``."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_length:
        return prompt
    cut = truncate_middle(ids, max_length)
    head = max_length // 2
    return tokenizer.decode(cut[:head], skip_special_tokens=True) + tokenizer.decode(
        cut[head:], skip_special_tokens=True
    )


def has_chat_template(tokenizer: object) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode_prompt(tokenizer: object, text: str, chat: bool, answer_prefix: str = "") -> list[int]:
    """Token ids of ``text``: as the user turn of the chat template when asked for and the tokenizer has
    one (then ``answer_prefix`` starts the assistant turn), else the raw text with the tokenizer's
    special tokens (``answer_prefix`` appended)."""
    if chat and has_chat_template(tokenizer):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        return list(tokenizer(rendered + answer_prefix, add_special_tokens=False)["input_ids"])
    return list(tokenizer(text + answer_prefix)["input_ids"])


def build_input(tokenizer: object, sample: Sample, max_length: int) -> list[int]:
    """The model input of a sample: prompt truncated in the middle to ``max_length`` tokens, then
    wrapped in the chat template for the tasks LongBench wraps."""
    spec = ENGLISH_TASKS[sample.task]
    return encode_prompt(tokenizer, truncate_prompt(tokenizer, sample.prompt, max_length), spec.chat)


def postprocess(task: str, output: str) -> str:
    """LongBench's post-processing: the few-shot tasks keep the first line of the answer."""
    if ENGLISH_TASKS[task].first_line:
        return output.lstrip("\n").split("\n")[0]
    return output


def score(sample: Sample, output: str) -> float:
    """The sample's score in [0, 1] (best over its answers)."""
    spec = ENGLISH_TASKS[sample.task]
    return score_sample(spec.metric, postprocess(sample.task, output), sample.answers, sample.all_classes)
