"""Long generation under a bounded cache: teacher-forced perplexity of a long continuation, read through the cache as
generation reads it.

Each text gives one sequence: ``prompt`` tokens, then ``continuation`` tokens whose log-likelihood is scored. A method
reads the prompt in one call and the continuation as generation would:

* dense, a KV budget and the sliding window in chunks of ``chunk`` tokens through the cache: under a budget a call
  reads what a token-by-token decode reads (``TokenFilter(budget=...)``; tests/test_budget.py), the threshold rule of
  the sliding window decides per token (SPEC: prefill == decode), and dense attention is dense either way;
* a ratio token by token, since a ratio decides differently in one call (top of the call) and in decode (the running
  quantile and its controller).

Rows (``plan_rows``): dense; the default at each ratio, with its random twin at the middle one (one seed: token by
token is slow); ``budget`` at each size with its random twin (``score="random"``, several seeds: their range is the
noise floor) and StreamingLLM at the same budget (the budget with a constant score, i.e. sinks + the latest tokens;
equal to our sliding window).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tokenfilter.config import TokenFilter

JSON_NAME, MD_NAME = "longgen.json", "longgen.md"


@dataclass(frozen=True)
class Row:
    """One method: ``name`` (its label), ``family``, ``filter`` (None: dense), ``stepwise`` (the continuation token by
    token); a kvpress row names its scorer press (``peer``: a ``DecodingPress`` over it) and ``budget`` instead."""

    name: str
    family: str
    filter: TokenFilter | None
    stepwise: bool = False
    peer: str | None = None
    budget: int | None = None


def plan_rows(
    ratios: Sequence[float], budgets: Sequence[int], seeds: Sequence[int], presses: Sequence[str] = (),
    press_budgets: Sequence[int] | None = None, recent_shares: Sequence[float] = (), **common: object,
) -> list[Row]:
    """The rows, in table order; ``presses``: kvpress scorer presses run as a ``DecodingPress`` at each of
    ``press_budgets`` (default: every budget); ``recent_shares``: each budget again with a recent window of these
    shares of it (to choose the window); ``common``: fields every ``TokenFilter`` gets (e.g. ``recent``)."""

    def tf(**kw: object) -> TokenFilter:
        return TokenFilter(**{**common, **kw})

    rows = [Row("dense", "dense", None)]
    for r in ratios:
        rows.append(Row(f"token-filter-{r:g}", "ratio", tf(ratio=r), stepwise=True))
    if ratios and seeds:  # token by token is slow: the middle ratio's twin, at the first seed
        mid, s = sorted(ratios)[len(ratios) // 2], seeds[0]
        rows.append(Row(f"random-{mid:g}-seed{s}", "ratio-random", tf(ratio=mid, score="random", seed=s), True))
    for n in budgets:
        rows.append(Row(f"budget-{n}", "budget", tf(budget=n)))
        rows.append(Row(f"streamingllm-{n}", "streamingllm", tf(budget=n, score="constant")))
        for share in recent_shares:
            r = max(1, round(share * n))
            rows.append(Row(f"budget-{n}-recent{r}", "budget-window", tf(budget=n, recent=r)))
        for s in seeds:
            twin = tf(budget=n, score="random", seed=s)
            rows.append(Row(f"budget-{n}-random-seed{s}", "budget-random", twin))
        if n in (budgets if press_budgets is None else press_budgets):
            for press in presses:
                rows.append(Row(f"kvpress-{press}-{n}", "kvpress", None, True, peer=press, budget=n))
    return rows


@dataclass
class Result:
    text: str
    row: str
    ppl: float
    nll: float
    tokens: int
    realized: float
    kv_held: float
    peak_held: int | None
    seconds: float
    config: dict | None = field(default=None)


def twin_group(name: str) -> str:
    """A row's name without its seed (``budget-512-random-seed1`` -> ``budget-512-random``): the rows one table line
    gathers."""
    return name.rsplit("-seed", 1)[0]


def stats_fields(stats: object | None) -> dict:
    """What a result keeps from a run's ``FilterStats`` (None: dense): realized ratio, KV held, the most entries one
    filtered layer held (None without a budget)."""
    if stats is None:
        return {"realized": 0.0, "kv_held": 1.0, "peak_held": None}
    peaks = [p for p in stats.peak_held_per_layer if p is not None]
    return {"realized": stats.ratio, "kv_held": stats.kv_held_fraction, "peak_held": max(peaks) if peaks else None}


def setup_meta(meta: dict | None, prompt: int, seqs: dict[str, torch.Tensor]) -> dict:
    """``meta`` with what saved rows must match to be kept (``SETUP``): the prompt and each text's length."""
    return {**(meta or {}), "prompt": prompt, "lengths": {k: int(v.shape[1]) for k, v in seqs.items()}}


def continuation_nll(
    model: torch.nn.Module, ids: torch.Tensor, prompt: int, row: Row, chunk: int = 512,
    progress: Callable[[int], None] | None = None,
) -> tuple[float, int, object | None]:
    """Summed negative log-likelihood of ``ids[prompt:]`` given everything before (``ids`` ``[1, N]``), the tokens
    scored, and the filter's stats (None for dense)."""
    device = next(model.parameters()).device
    ids = ids.to(device)
    n = ids.shape[1]
    step = 1 if row.stepwise else chunk
    bounds = [(0, prompt)] + [(s, min(n, s + step)) for s in range(prompt, n, step)]
    cfg = row.filter or TokenFilter(ratio=0.0)
    nll, count = 0.0, 0
    with cfg.apply(model) as run, torch.no_grad():
        cache = None
        prev_last = None  # the logits of the token before a call's first
        for s, e in bounds:
            out = model(ids[:, s:e], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits = out.logits[0].float()
            if prev_last is not None:  # predicts ids[s .. e-1]: the previous call's last row, then this call's
                preds = torch.cat([prev_last[None], logits[:-1]])
                nll += torch.nn.functional.cross_entropy(preds, ids[0, s:e], reduction="sum").item()
                count += e - s
            prev_last = logits[-1]
            if progress is not None:
                progress(e - s)
        stats = run.stats if row.filter is not None else None
    return nll, count, stats


def sequences(tokenizer, texts: dict[str, str], length: int) -> dict[str, torch.Tensor]:
    """Per text, its first ``length`` tokens ``[1, length]``; an error names the text that is too short."""
    out = {}
    for name, text in texts.items():
        ids = tokenizer(text, return_tensors="pt").input_ids[:, :length]
        if ids.shape[1] < length:
            raise ValueError(f"The {name} text has {ids.shape[1]} tokens, fewer than the {length} asked; shorten it.")
        out[name] = ids
    return out


def run_longgen(
    model: torch.nn.Module, seqs: dict[str, torch.Tensor], prompt: int, rows: Sequence[Row], output_dir: Path,
    chunk: int = 512, meta: dict | None = None, resume: bool = False,
) -> list[Result]:
    """Every row on every sequence; writes ``longgen.json`` after each (``resume`` keeps the rows already there with
    the same settings) and returns the results."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / JSON_NAME
    meta = setup_meta(meta, prompt, seqs)
    done: dict[tuple[str, str], dict] = {}
    if resume and path.exists():
        old = json.loads(path.read_text())
        if not same_setup(old["meta"], meta):
            raise ValueError(f"{path} holds rows measured on other texts, lengths or model than asked; give another "
                             "--output, or remove that file to measure again.")
        done = {(r["text"], r["row"]): r for r in old["results"]}
    results: list[Result] = []
    total = sum(v.shape[1] for v in seqs.values()) * sum(r.peer is None for r in rows)
    with tqdm(total=total, desc="longgen", unit="tok") as bar:
        for text, ids in seqs.items():
            for row in rows:
                if row.peer is not None:  # kvpress runs in its own venv (``longgen_cli.run_presses``)
                    continue
                cfg = row.filter.as_record() if row.filter is not None else None
                old_r = done.get((text, row.name))
                if old_r is not None and old_r.get("config") == cfg:
                    results.append(Result(**old_r))
                    bar.update(ids.shape[1])
                    continue
                bar.set_postfix_str(f"{text} {row.name}")
                t0 = time.perf_counter()
                nll, count, stats = continuation_nll(model, ids, prompt, row, chunk, bar.update)
                results.append(Result(
                    text=text, row=row.name, ppl=math.exp(nll / count), nll=nll, tokens=count, **stats_fields(stats),
                    seconds=time.perf_counter() - t0, config=cfg,
                ))
                save(path, meta, results)
    return results


SETUP = ("prompt", "lengths", "model")  # what must match for saved rows to be kept


def same_setup(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in SETUP)


def save(path: Path, meta: dict, results: Sequence[Result]) -> None:
    """Write ``results`` into ``path``, keeping the rows already there that they do not replace when the file was
    measured the same way (``SETUP``), so that processes measuring different rows into one folder add up; a file
    measured another way is replaced. A lock file beside it keeps two writers from interleaving."""
    import fcntl

    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        kept = []
        if path.exists():
            old = json.loads(path.read_text())
            if same_setup(old["meta"], meta):
                mine = {(r.text, r.row) for r in results}
                kept = [r for r in old["results"] if (r["text"], r["row"]) not in mine]
        rows = kept + [r.__dict__ for r in results]
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
        tmp.replace(path)


def render_markdown(results: Sequence[Result], rows: Sequence[Row], meta: dict) -> str:
    """The table: per row and text, continuation perplexity (x dense), realized ratio (the share of (token, layer)
    entries filtered), KV held, peak entries per filtered layer; random twins as the range over seeds."""
    texts = list(dict.fromkeys(r.text for r in results))
    by = {(r.text, r.row): r for r in results}
    lines = [
        "| method | " + " | ".join(f"{t}: ppl (x dense) | realized | KV held | peak held" for t in texts) + " |",
        "|---|" + "---|---|---|---|" * len(texts),
    ]
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(twin_group(row.name), []).append(row)
    for key, members in groups.items():
        cells = []
        for t in texts:
            got = [by[(t, m.name)] for m in members if (t, m.name) in by]
            if not got:
                cells.append("- | - | - | -")
                continue
            dense = by.get((t, "dense"))
            ppls = [g.ppl for g in got]
            lo, hi = min(ppls), max(ppls)
            ppl = f"{lo:.3f}" if len(got) == 1 else f"{lo:.3f}-{hi:.3f}"
            if dense is not None:
                rel = f"{lo / dense.ppl:.3f}" + ("" if len(got) == 1 else f"-{hi / dense.ppl:.3f}")
                ppl += f" (x{rel})"
            held = sum(g.kv_held for g in got) / len(got)
            realized = "-" if members[0].peer else f"{sum(g.realized for g in got) / len(got):.3f}"  # kvpress: none
            peaks = [g.peak_held for g in got if g.peak_held is not None]
            cells.append(f"{ppl} | {realized} | {held:.3f} | {max(peaks) if peaks else '-'}")
        label = key + (f" ({len(members)} seeds)" if len(members) > 1 else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
