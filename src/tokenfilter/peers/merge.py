"""One schema for both sides: per-prompt rows, then per (family, method, budget) summaries with standard errors.

A row: ``method`` (ours: the configuration name; a press: its kvpress class), ``side`` (``ours`` / ``kvpress``),
``config`` (the Token Filtering row whose KV budget it matches; ``dense`` for the dense runs; our sliding window:
the row it is sized to), ``ratio`` (ours: its ratio, None for the sliding window; a press: the matched
``compression_ratio``), ``recent`` (ours: the recent window, if any), ``family``, ``task``, ``prompt``,
``score`` (in [0, 1]), ``kv_entries`` and ``kv_bytes`` held after the prompt (all layers), ``kv_share`` (of dense),
prefill and decode attention FLOPs, ``seconds`` (wall time of the whole answer), ``error`` (one line, or None).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

from tokenfilter.longctx.longbench import ENGLISH_TASKS, postprocess
from tokenfilter.peers import budget as bud
from tokenfilter.peers.inputs import SplitPrompt, score

PRESSES: tuple[str, ...] = (
    "StreamingLLMPress",
    "KnormPress",
    "RandomPress",
    "SnapKVPress",
    "KeyDiffPress",
    "ExpectedAttentionPress",
    "TOVAPress",
    "PyramidKVPress",
    "DecodingPress",
)

# What the table says beside a press whose budget is not (only) a ratio.
PRESS_NOTES: dict[str, str] = {
    "StreamingLLMPress": "the ratio sets the window: 4 sinks + the most recent context tokens",
    "PyramidKVPress": "the ratio's total, spread unevenly over layers",
    "DecodingPress": (
        "no ratio while decoding: PrefillDecodingPress, Knorm at the matched ratio on the prefill, then a "
        "DecodingPress(Knorm) holding target_size = the matched budget per layer, compressing every 4 steps"
    ),
}


DECODING_INTERVAL = 4  # equal to peer_script.DECODING_INTERVAL (a test checks it: the two cannot import each other)
PEER_DENSE = {"dense": "kvpress dense", "generate": "dense generate (peer venv)"}


def job_key(press: str, config: str, prompt: str) -> str:
    return f"{press}|{config}|{prompt}"


def jobs(budgets: Iterable[bud.Budget], presses: Sequence[str], prompts: Mapping[str, SplitPrompt]) -> list[dict]:
    """The peer script's jobs: per prompt a dense pipeline run and a plain ``generate`` (the parity check), then
    every press at every matched budget."""
    out = []
    for pid in prompts:
        for press in ("dense", "generate"):
            out.append({"key": job_key(press, "dense", pid), "prompt": pid, "press": press, "ratio": None})
    for b in budgets:
        q = len(prompts[b.prompt].question_ids)
        for press in presses:
            job = {"key": job_key(press, b.config, b.prompt), "prompt": b.prompt, "press": press, "ratio": b.ratio}
            if press == "DecodingPress":
                job["target_size"] = b.kept + q
            out.append(job)
    return out


def _base(p: SplitPrompt) -> dict:
    return {"family": p.family, "task": p.task, "prompt": p.id, "tokens": p.tokens, "depth": p.meta.get("depth"),
            "length": p.meta.get("length")}


def _kv(entries: float | None, dense: int, shape: bud.ModelShape) -> dict:
    if entries is None:
        return {"kv_entries": None, "kv_bytes": None, "kv_share": None}
    return {"kv_entries": entries, "kv_bytes": entries * shape.entry_bytes, "kv_share": entries / dense}


def merge(
    prompts: Sequence[SplitPrompt],
    ours: Mapping,
    peer: Mapping | None,
    budgets: Iterable[bud.Budget],
    shape: bud.ModelShape,
) -> list[dict]:
    """Per-prompt rows of both sides. ``ours``: ``run_ours``'s JSON; ``peer``: the peer script's (None: not run)."""
    by_id = {p.id: p for p in prompts}
    L = shape.layers
    rows = []
    held_of = {(r["method"], r["prompt"]): r["kv_held_share"] for r in ours["rows"]}
    for r in ours["rows"]:
        p = by_id[r["prompt"]]
        dense = L * p.tokens
        config = r.get("budget_of") or r["method"]
        # a row sized to another's budget (the sliding window): its KV held minus that row's on the same prompt
        ref = held_of.get((config, r["prompt"]), r["kv_held_share"])
        pre, dec = r.get("prefill_pairs"), r.get("decode_pairs")
        if pre is None or dec is None:  # dense: the unmodified model's pairs
            pre, dec = bud.dense_pairs(p.tokens, L, r["new_tokens"])
        rows.append(
            {
                **_base(p),
                "method": r["method"],
                "side": "ours",
                "config": config,
                "ratio": r.get("ratio"),
                "recent": r.get("recent"),
                "score": r["score"],
                **_kv(r["kv_held_share"] * dense, dense, shape),
                "prefill_flops": pre * shape.pair_flops,
                "decode_flops": dec * shape.pair_flops,
                "seconds": r["seconds"],
                "answer": r["answer"],
                "mismatch_share": r["kv_held_share"] - ref,
                "capped": False,
                "error": None,
            }
        )
    budget_of = {(b.config, b.prompt): b for b in budgets}
    for r in (peer or {}).get("results", []):
        p = by_id[r["prompt"]]
        press, config, _ = r["key"].split("|", 2)
        dense = L * p.tokens
        row = {
            **_base(p),
            "method": PEER_DENSE.get(press, press),
            "side": "kvpress",
            "config": config,
            "ratio": r.get("ratio"),
            "error": r.get("error"),
            "answer": r.get("answer"),
        }
        b = budget_of.get((config, p.id))
        row["capped"] = bool(b and b.capped)
        if r.get("error"):
            row.update(score=None, **_kv(None, dense, shape), prefill_flops=None, decode_flops=None, seconds=None)
            row["mismatch_share"] = None
        else:
            kept = sum(r["context_held"])
            held = kept + L * len(p.question_ids)
            pre, dec = bud.press_pairs(len(p.context_ids), len(p.question_ids), kept, L, r["new_tokens"])
            if press == "DecodingPress" and r.get("target_size"):
                dec = bud.decoding_press_decode_pairs(r["target_size"], L, r["new_tokens"], DECODING_INTERVAL)
            row.update(
                score=score(p, r["answer"]),
                **_kv(held, dense, shape),
                prefill_flops=pre * shape.pair_flops,
                decode_flops=dec * shape.pair_flops,
                seconds=r["seconds"],
                mismatch_share=(held - b.ours_entries) / dense if b else 0.0,
            )
        rows.append(row)
    return rows


SCALED = ("longbench", "ruler")  # the families scored 0-100, as a mean over their tasks


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _se(xs: Sequence[float]) -> float:
    """Standard error of the mean (sample standard deviation / sqrt(n)); 0 for one value."""
    n = len(xs)
    if n < 2:
        return 0.0
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)


def summarize(rows: Iterable[dict]) -> list[dict]:
    """Per (family, method, config): mean score and its standard error, mean KV held, FLOPs, seconds, mismatch.

    Needle: the mean over its prompts (0-1). LongBench and RULER: per task the mean (0-100), the family score the mean
    over the tasks, its standard error ``sqrt(sum se_t^2) / n_tasks`` (with a single sample in some task: the
    standard error of the task means). Errors: the rows that failed, with their first message (the summary keeps the
    row, scored over what ran)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["family"], r["method"], r["config"]), []).append(r)
    out = []
    for (family, method, config), rs in groups.items():
        ok = [r for r in rs if not r.get("error")]
        errors = sorted({r["error"] for r in rs if r.get("error")})
        scale = 100.0 if family in SCALED else 1.0
        tasks: dict[str, dict] = {}
        for task in dict.fromkeys(r["task"] for r in ok):
            xs = [scale * r["score"] for r in ok if r["task"] == task]
            tasks[task] = {"score": _mean(xs), "se": _se(xs), "n": len(xs)}
        if family in SCALED and tasks:
            means = [t["score"] for t in tasks.values()]
            score_ = _mean(means)
            if all(t["n"] >= 2 for t in tasks.values()):
                se = math.sqrt(sum(t["se"] ** 2 for t in tasks.values())) / len(tasks)
            else:  # one sample in some task: no within-task spread, so the spread over the tasks stands in
                se = _se(means)
        else:
            xs = [scale * r["score"] for r in ok]
            score_, se = _mean(xs), _se(xs)
        depths: dict[float, list[float]] = {}
        lengths: dict[int, list[float]] = {}
        for r in ok:
            if r.get("depth") is not None:
                depths.setdefault(r["depth"], []).append(scale * r["score"])
            if r.get("length") is not None:
                lengths.setdefault(r["length"], []).append(scale * r["score"])
        ratios = [r["ratio"] for r in ok if r.get("ratio") is not None]
        windows = [r["recent"] for r in ok if r.get("recent") is not None]
        out.append(
            {
                "family": family,
                "method": method,
                "side": rs[0]["side"],
                "config": config,
                "n": len(ok),
                "n_failed": len(rs) - len(ok),
                "errors": errors,
                "score": score_,
                "se": se,
                "tasks": tasks,
                "by_depth": {d: _mean(xs) for d, xs in sorted(depths.items())},
                "by_length": {n: {"score": _mean(x), "se": _se(x), "n": len(x)} for n, x in sorted(lengths.items())},
                "ratio": _mean(ratios) if ratios else None,
                "recent": [min(windows), max(windows)] if windows else None,
                "kv_bytes": _mean([r["kv_bytes"] for r in ok]),
                "kv_share": _mean([r["kv_share"] for r in ok]),
                "mismatch_share": _mean([r["mismatch_share"] for r in ok]),
                "capped": sum(bool(r.get("capped")) for r in rs),
                "prefill_flops": _mean([r["prefill_flops"] for r in ok]),
                "decode_flops": _mean([r["decode_flops"] for r in ok]),
                "seconds": _mean([r["seconds"] for r in ok]),
            }
        )
    return out


def _scored_text(row: dict | None) -> str | None:
    """The answer as it is scored (first line for the few-shot LongBench tasks), stripped; None if it failed."""
    if row is None or row.get("error") or row.get("answer") is None:
        return None
    a = row["answer"]
    if row["family"] == "longbench" and ENGLISH_TASKS[row["task"]].first_line:
        a = postprocess(row["task"], a)
    return a.strip()


def parity(rows: Iterable[dict], dense: str = "dense") -> list[dict]:
    """Dense three ways, per prompt: ours (our transformers, ``generate`` on the whole prompt), the peer venv's
    ``generate`` on the whole prompt, and kvpress's pipeline without a press (context prefilled, then the question
    on its cache). ``same``: ours equals the pipeline; ``why`` names where a difference comes from. The few-shot
    LongBench tasks compare first lines, as LongBench scores them (kvpress's decode has no first-line stop)."""
    rs = list(rows)

    def answers(method: str, side: str) -> dict[str, dict]:
        return {r["prompt"]: r for r in rs if r["method"] == method and r["side"] == side}

    ours, gen = answers(dense, "ours"), answers(PEER_DENSE["generate"], "kvpress")
    pipe = answers(PEER_DENSE["dense"], "kvpress")
    out = []
    for pid, r in pipe.items():
        if pid not in ours:
            continue
        a, g, b = _scored_text(ours[pid]), _scored_text(gen.get(pid)), _scored_text(r)
        same = b is not None and a == b
        if r.get("error"):
            why = r["error"]
        elif same:
            why = ""
        elif g is not None and g == a:
            why = "the pipeline's split prefill (context, then the question on its cache) changes float rounding"
        elif g is not None:
            why = "transformers versions: the peer venv's own generate differs from ours on the same ids"
        else:
            why = "different tokens"
        if not same and b is not None and (a.startswith(b) or b.startswith(a)):
            why += " (same start, one answer longer)"
        out.append({"prompt": pid, "ours": a, "generate": g, "kvpress": b, "same": same, "why": why})
    return out
