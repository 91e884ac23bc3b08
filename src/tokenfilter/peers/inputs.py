"""The shared inputs: every prompt split into the context a press compresses and the question it does not.

kvpress's pipeline prefills a *context*, compresses its KV, then feeds the *question* (question, end of the chat
turn, answer prefix) and decodes. Our harness builds one token sequence per prompt. So that both sides see the
same tokens, the split is made on our ids: ``context_ids + question_ids == input_ids`` exactly, and the peer
script hands kvpress these ids (never re-tokenized text).

* Needle cells: the context ends where the filler (with the needle) ends; the question part is
  ``"\\n\\nQuestion: ..."``, the chat template's end of turn and the answer prefix.
* MiniLongBench: the context ends before the task's final instruction (the last occurrence of the task's marker
  in the truncated prompt, e.g. ``"\\n\\nAnswer the question based on"``); without the marker, before the last
  paragraph.
* RULER (``longctx.ruler``): the context ends where the haystack ends (the instruction, and for ``cwe`` the worked
  example, are in it); the question part is ``"\n\nQuestion: ..."``, the end of the user turn and the start of the
  answer.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tokenfilter.longctx import longbench
from tokenfilter.longctx.longbench import ENGLISH_TASKS, Sample
from tokenfilter.longctx.needle import Needle, NeedleBuilder, NeedlePrompt
from tokenfilter.longctx.ruler import DEFAULT_SEED, RulerSample, resolve_tasks, string_match_all
from tokenfilter.longctx.ruler_runner import build_samples
from tokenfilter.longctx.runner import NEEDLE_MAX_NEW_TOKENS, TEMPLATE_MARGIN

# Where each LongBench task's final instruction starts (its last occurrence in the truncated prompt).
QUESTION_MARKERS: dict[str, tuple[str, ...]] = {
    "narrativeqa": ("\n\nNow, answer the question",),
    "qasper": ("\n\nAnswer the question based on", "\n\n Answer the question based on"),
    "multifieldqa_en": ("\n\nNow, answer the following question",),
    "hotpotqa": ("\n\nAnswer the question based on",),
    "2wikimqa": ("\n\nAnswer the question based on",),
    "musique": ("\n\nAnswer the question based on",),
    "gov_report": ("\n\nNow, write a one-page summary",),
    "qmsum": ("\n\nNow, answer the query",),
    "multi_news": ("\n\nNow, write a one-page summary",),
    "trec": ("\nQuestion:",),
    "triviaqa": ("\n\nPassage:", "Passage:"),
    "samsum": ("\n\n\nDialogue:", "\n\nDialogue:"),
    "passage_count": ("\n\nPlease enter the final count",),
    "passage_retrieval_en": ("\n\nPlease enter the number of the paragraph",),
    "lcc": ("Next line of code:",),
    "repobench-p": ("Next line of code:",),
}


@dataclass
class SplitPrompt:
    """One prompt of either family, split for the pipeline. ``context_ids + question_ids`` is the full input."""

    id: str
    family: str  # "needle", "longbench" or "ruler"
    task: str  # "needle", the LongBench task or the RULER task
    context_ids: list[int]
    question_ids: list[int]
    context: str  # decoded, for reading only (the ids are what runs)
    question: str
    max_new_tokens: int
    answers: list[str]
    all_classes: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)  # needle: length, depth, actual_depth, needle; ruler: length, index

    @property
    def input_ids(self) -> list[int]:
        return self.context_ids + self.question_ids

    @property
    def tokens(self) -> int:
        return len(self.context_ids) + len(self.question_ids)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two id sequences."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def split_at_text(tokenizer: object, ids: Sequence[int], text: str, cut: int, special: bool) -> int:
    """The token index that splits ``ids`` (the encoding of ``text``) closest to character ``cut``, from below:
    the tokens that the encoding of ``text[:cut]`` shares with ``ids`` (a token merging across the cut stays in
    the question)."""
    prefix = list(tokenizer(text[:cut], add_special_tokens=special)["input_ids"])
    return common_prefix(ids, prefix)


def _decode(tokenizer: object, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False)


def needle_prompt(tokenizer: object, prompt: NeedlePrompt, fact: Needle, max_new_tokens: int) -> SplitPrompt:
    """A needle cell split after its filler (``prompt.context_end``, checked against the text's encoding)."""
    ids = list(prompt.input_ids)
    k = min(prompt.context_end, len(ids))
    return SplitPrompt(
        id=f"needle/{prompt.length}/{prompt.depth:g}/{fact.answer}",
        family="needle",
        task="needle",
        context_ids=ids[:k],
        question_ids=ids[k:],
        context=_decode(tokenizer, ids[:k]),
        question=_decode(tokenizer, ids[k:]),
        max_new_tokens=max_new_tokens,
        answers=[fact.answer],
        meta={
            "length": prompt.length,
            "depth": prompt.depth,
            "actual_depth": round(prompt.actual_depth, 2),
            "needle": fact.answer,
        },
    )


def needle_prompts(
    tokenizer: object,
    lengths: Sequence[int],
    depths: Sequence[float],
    facts: Sequence[Needle],
    haystack: str | None = None,
    max_new_tokens: int = NEEDLE_MAX_NEW_TOKENS,
) -> list[SplitPrompt]:
    """Every (fact, length, depth) cell, built by the harness's ``NeedleBuilder`` and split."""
    from tokenfilter.longctx.needle import load_haystack_text

    builder = NeedleBuilder(tokenizer, haystack if haystack is not None else load_haystack_text(), needle=facts[0])
    out = []
    grid = [float(d) for d in depths]
    for fact in facts:
        out += [needle_prompt(tokenizer, p, fact, max_new_tokens) for p in builder.for_needle(fact).grid(lengths, grid)]
    return out


def longbench_prompt(tokenizer: object, sample: Sample, max_length: int) -> SplitPrompt:
    """A MiniLongBench sample as the harness builds it (``longbench.build_input``), split before its final
    instruction."""
    spec = ENGLISH_TASKS[sample.task]
    text = longbench.truncate_prompt(tokenizer, sample.prompt, max_length)
    ids = longbench.build_input(tokenizer, sample, max_length)
    chat = spec.chat and longbench.has_chat_template(tokenizer)
    if chat:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        offset, special = rendered.index(text), False
    else:
        rendered, offset, special = text, 0, True
    marks = [text.rfind(m) for m in QUESTION_MARKERS.get(sample.task, ())]
    cut = max(marks) if marks and max(marks) > 0 else text.rstrip().rfind("\n\n")
    k = split_at_text(tokenizer, ids, rendered, offset + max(cut, 0), special) if cut > 0 else len(ids)
    return SplitPrompt(
        id=f"longbench/{sample.task}/{sample.id}",
        family="longbench",
        task=sample.task,
        context_ids=ids[:k],
        question_ids=ids[k:],
        context=_decode(tokenizer, ids[:k]),
        question=_decode(tokenizer, ids[k:]),
        max_new_tokens=spec.max_new_tokens,
        answers=list(sample.answers),
        all_classes=list(sample.all_classes),
    )


def longbench_prompts(
    tokenizer: object,
    tasks: Sequence[str] | None,
    limit: int | None,
    max_length: int,
    positions: int | None = None,
    data_dir: str | Path | None = None,
    max_new_tokens_cap: int | None = None,
) -> list[SplitPrompt]:
    """The first ``limit`` samples of each task, truncated as ``runner.longbench_inputs`` does."""
    out = []
    for task, samples in longbench.load_tasks(tasks, data_dir, limit).items():
        new = ENGLISH_TASKS[task].max_new_tokens
        cap = max_length if positions is None else min(max_length, positions - new - TEMPLATE_MARGIN)
        for s in samples:
            p = longbench_prompt(tokenizer, s, cap)
            if max_new_tokens_cap:
                p.max_new_tokens = min(p.max_new_tokens, max_new_tokens_cap)
            out.append(p)
    return out


def ruler_prompt(tokenizer: object, sample: RulerSample) -> SplitPrompt:
    """A RULER sample as ``eval --tasks ruler`` runs it, split after its haystack (``sample.context_end``)."""
    ids, k = list(sample.input_ids), sample.context_end
    return SplitPrompt(
        id=sample.id,
        family="ruler",
        task=sample.task,
        context_ids=ids[:k],
        question_ids=ids[k:],
        context=_decode(tokenizer, ids[:k]),
        question=_decode(tokenizer, ids[k:]),
        max_new_tokens=sample.max_new_tokens,
        answers=list(sample.answers),
        meta={"length": sample.length, "index": sample.index},
    )


def ruler_prompts(
    tokenizer: object,
    tasks: Sequence[str] | None,
    lengths: Sequence[int],
    samples: int,
    positions: int | None = None,
    seed: int = DEFAULT_SEED,
    haystack: str | None = None,
    words: Sequence[str] | None = None,
) -> list[SplitPrompt]:
    """``samples`` prompts of each RULER task (None: all) at each length, the lengths clipped so that the input and
    the longest answer fit the model's positions, as ``eval --tasks ruler`` builds them."""
    built, _ = build_samples(tokenizer, resolve_tasks(tasks), lengths, samples, positions, seed, haystack=haystack,
                             words=words)
    return [ruler_prompt(tokenizer, s) for s in built]


def score(prompt: SplitPrompt, output: str) -> float:
    """The prompt's score in [0, 1], with the harness's own metric (needle: contains; LongBench: its metric; RULER:
    its string match over all the answers)."""
    if prompt.family == "needle":
        return Needle(answer=prompt.answers[0]).score(output)
    if prompt.family == "ruler":
        return string_match_all(output, prompt.answers)
    sample = Sample(prompt.task, prompt.id, "", tuple(prompt.answers), tuple(prompt.all_classes))
    return longbench.score(sample, output)


def write(path: Path, prompts: Sequence[SplitPrompt], model: dict, extra: dict | None = None) -> Path:
    """The JSON the peer script reads: ``{"model": {...}, "prompts": [...], **extra}``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"model": model, "prompts": [dataclasses.asdict(p) for p in prompts], **(extra or {})}
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def read(path: Path) -> list[SplitPrompt]:
    return [SplitPrompt(**p) for p in json.loads(Path(path).read_text(encoding="utf-8"))["prompts"]]
