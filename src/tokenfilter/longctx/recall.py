"""A long greedy answer with a checkable result: the model writes back, from memory, a list it read far back.

The prompt holds ``records`` lines ``<word>: <number>`` (distinct words from WikiText-2, 7-digit random numbers;
fixed by the seed), then asks for the list again and gives its first line. The model continues greedily for as many
tokens as the list takes, plus a margin. Score: RULER's ``string_match_all`` over the records after the given first
one (the fraction whose whole line appears in the answer). Each line is copied from about the list's length back, so
a cache holding fewer entries than that scores only through the entries it chose to keep; a cache that keeps only
the latest tokens (StreamingLLM) cannot see the line it must copy.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tokenfilter.config import TokenFilter
from tokenfilter.longctx.longgen import stats_fields, twin_group
from tokenfilter.longctx.ruler import string_match_all, wikitext_words

HEAD = "Here is a numbered list of records, one per line: a word, a colon, then its number.\n\n"
ASK = "\n\nThat is the whole list. Now write the same list again, line by line, in the same order.\n\n"
MARGIN = 16  # new tokens beyond the list's own length


@dataclass(frozen=True)
class RecallSample:
    """One prompt: ``ids`` ``[1, P]`` (ending with the first record's line), the records the answer must hold (all
    but the first), and ``max_new`` greedy tokens."""

    ids: torch.Tensor
    references: tuple[str, ...]
    max_new: int


def recall_samples(tokenizer, records: int, samples: int, seed: int = 0) -> list[RecallSample]:
    """``samples`` prompts of ``records`` lines each (``records`` >= 2); the same seed gives the same prompts."""
    if records < 2:
        raise ValueError(f"A recall list needs at least 2 records, got {records}.")
    words = wikitext_words()
    rng = random.Random(seed)
    out = []
    for _ in range(samples):
        keys = rng.sample(words, records)
        lines = [f"{i}. {k}: {rng.randint(10**6, 10**7 - 1)}" for i, k in enumerate(keys, 1)]
        body = "\n".join(lines)
        ids = tokenizer(HEAD + body + ASK + lines[0] + "\n", return_tensors="pt").input_ids
        list_tokens = len(tokenizer(body).input_ids)
        out.append(RecallSample(ids, tuple(lines[1:]), list_tokens + MARGIN))
    return out


@dataclass
class RecallResult:
    row: str
    sample: int
    score: float
    tokens: int  # prompt + generated
    realized: float  # the filter's realized ratio over the prompt and the answer (0 for dense)
    kv_held: float
    peak_held: int | None
    seconds: float
    config: dict | None = None


def greedy_answer(
    model: torch.nn.Module, sample: RecallSample, cfg: TokenFilter | None,
) -> tuple[torch.Tensor, object | None]:
    """The greedy continuation's token ids ``[max_new]`` under ``cfg`` (None: dense) and the filter's stats."""
    device = next(model.parameters()).device
    with (cfg or TokenFilter(ratio=0.0)).apply(model) as run, torch.no_grad():
        out = model.generate(sample.ids.to(device), attention_mask=torch.ones_like(sample.ids).to(device),
                             max_new_tokens=sample.max_new, min_new_tokens=sample.max_new, do_sample=False,
                             pad_token_id=0)
        stats = run.stats if cfg is not None else None
    return out[0, sample.ids.shape[1]:], stats


def run_recall(model: torch.nn.Module, tokenizer, samples: Sequence[RecallSample], rows: Sequence,
               done: dict[tuple[str, int], dict] | None = None, save=None) -> list[RecallResult]:
    """Every row (``longgen.Row``; kvpress rows are skipped) on every sample; ``done`` maps (row, sample) to a saved
    result kept when its config is the same; ``save(results)`` after each."""
    results: list[RecallResult] = []
    todo = [r for r in rows if r.peer is None]
    with tqdm(total=len(todo) * len(samples), desc="recall", unit="answer") as bar:
        for row in todo:
            cfg = row.filter.as_record() if row.filter is not None else None
            for i, sample in enumerate(samples):
                old = (done or {}).get((row.name, i))
                if old is not None and old.get("config") == cfg:
                    results.append(RecallResult(**old))
                    bar.update()
                    continue
                bar.set_postfix_str(row.name)
                t0 = time.perf_counter()
                new, stats = greedy_answer(model, sample, row.filter)
                text = tokenizer.decode(new, skip_special_tokens=True)
                results.append(RecallResult(
                    row=row.name, sample=i, score=string_match_all(text, sample.references),
                    tokens=sample.ids.shape[1] + new.shape[0], **stats_fields(stats),
                    seconds=time.perf_counter() - t0, config=cfg,
                ))
                bar.update()
                if save is not None:
                    save(results)
    return results


def recall_rows(rows: Sequence) -> list:
    """The rows the recall task runs: longgen's, without kvpress's (its decoding press runs in another venv, with no
    generation here) and with each random twin at its first seed only (a greedy answer takes a minute)."""
    out, seen = [], set()
    for row in rows:
        if row.peer is not None:
            continue
        if "-seed" in row.name:
            if twin_group(row.name) in seen:
                continue
            seen.add(twin_group(row.name))
        out.append(row)
    return out


def run_recall_file(model: torch.nn.Module, tokenizer, rows: Sequence, records: int, samples: int, path: Path,
                    meta: dict, resume: bool = False, seed: int = 0) -> list[RecallResult]:
    """``run_recall`` on ``recall_samples(tokenizer, records, samples, seed)``, saved to ``path`` after each answer;
    ``resume`` keeps the answers a saved file has for the same model, records and seed."""
    meta = {**meta, "records": records, "seed": seed}
    done = {}
    if resume and path.exists():
        old = json.loads(path.read_text())
        if all(old["meta"].get(k) == meta.get(k) for k in ("model", "records", "seed")):
            done = {(r["row"], r["sample"]): r for r in old["results"]}

    def save(results: Sequence[RecallResult]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"meta": meta, "results": [r.__dict__ for r in results]}, indent=1))

    results = run_recall(model, tokenizer, recall_samples(tokenizer, records, samples, seed), rows, done, save)
    save(results)
    return results


def render_recall(results: Sequence[RecallResult], rows: Sequence) -> str:
    """Per row: mean score over samples (± one standard error; random twins as the range of their seeds' means),
    KV held and peak entries per filtered layer."""
    by: dict[str, list[RecallResult]] = {}
    for r in results:
        by.setdefault(r.row, []).append(r)
    lines = ["| method | records recalled (mean ± s.e.) | realized ratio | KV held | peak held |",
             "|---|---|---|---|---|"]
    groups: dict[str, list[str]] = {}
    for row in rows:
        if row.name in by:
            groups.setdefault(twin_group(row.name), []).append(row.name)
    for key, names in groups.items():
        means = []
        for name in names:
            scores = [r.score for r in by[name]]
            means.append((sum(scores) / len(scores), _stderr(scores)))
        got = [r for n in names for r in by[n]]
        held = sum(r.kv_held for r in got) / len(got)
        realized = sum(r.realized for r in got) / len(got)
        peaks = [r.peak_held for r in got if r.peak_held is not None]
        if len(names) == 1:
            cell = f"{means[0][0]:.3f} ± {means[0][1]:.3f}"
        else:
            cell = f"{min(m for m, _ in means):.3f}-{max(m for m, _ in means):.3f}"
            key += f" ({len(names)} seeds)"
        lines.append(f"| {key} | {cell} | {realized:.3f} | {held:.3f} | {max(peaks) if peaks else '-'} |")
    return "\n".join(lines) + "\n"


def _stderr(xs: Sequence[float]) -> float:
    n = len(xs)
    if n < 2:
        return 0.0
    m = sum(xs) / n
    return (sum((x - m) ** 2 for x in xs) / (n - 1) / n) ** 0.5
