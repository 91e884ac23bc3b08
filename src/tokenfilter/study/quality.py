"""The KV-side quality study (Quality II): which KV-side configuration keeps the model *and* its rare facts.

Budget: no candidate may hold more KV after a 1024-token prompt than ratio 0.5 with ``recent=64`` (the SPEC's
"KV held", over all layers). Objective: the most needle hits among the candidates whose perplexity stays within
the target, ties broken by perplexity. Selection and report never share data:

* selection: even-numbered WikiText-2 windows, the ``NEEDLES["select"]`` facts at ``select_depths``; the needle
  answer is scored teacher-forced (``needle_forced``): a hit is every answer token being the model's argmax, and
  the answer's log-probability (continuous, so 18 prompts still rank candidates) breaks ties;
* held-out: odd-numbered windows, the ``NEEDLES["heldout"]`` facts at ``heldout_depths``.

On the held-out half the chosen candidate is compared with its random twin (several seeds), with the sliding
window (``TokenFilter.sliding_window``) holding the same KV as it on the same input, and with dense.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

from tokenfilter.config import SPEC_SCORE, TokenFilter
from tokenfilter.eval.ppl import wikitext_text, windows
from tokenfilter.loading import display_name, load_model

KV_SIDE = {"skip": "none", "kv": "drop", **SPEC_SCORE}  # candidates change the SPEC's score, not the default's
TWO_HORIZON_KEY = {**KV_SIDE, "recent": 64, "score": "two-horizon", "fusion": "key"}  # the second study's family
# name -> TokenFilter fields (without ratio); every candidate fits the budget at ratio 0.5 (window <= 64)
CANDIDATES: dict[str, dict] = {
    "kv-w64": {**KV_SIDE, "recent": 64},
    "kv-w64-g0.99": {**KV_SIDE, "recent": 64, "gamma": 0.99},
    "kv-w64-cummean": {**KV_SIDE, "recent": 64, "score": "cumulative-mean"},
    "kv-w64-cummean-min": {**KV_SIDE, "recent": 64, "score": "cumulative-mean", "fusion": "min"},
    "kv-w64-cummean-key": {**KV_SIDE, "recent": 64, "score": "cumulative-mean", "fusion": "key"},
    "kv-w64-cummean-keymin": {**KV_SIDE, "recent": 64, "score": "cumulative-mean", "fusion": "key-min"},
    "kv-w64-2h-key": TWO_HORIZON_KEY,
    "kv-w64-2h-key-g0.8": {**TWO_HORIZON_KEY, "gamma": 0.8},
    "kv-w64-2h-key-g0.95": {**TWO_HORIZON_KEY, "gamma": 0.95},
    "kv-w64-2h-key-wu16": {**TWO_HORIZON_KEY, "warmup": 16},
    "kv-w64-2h-key-g0.95-wu16": {**TWO_HORIZON_KEY, "gamma": 0.95, "warmup": 16},
    "kv-w64-2h-key-from3": {**TWO_HORIZON_KEY, "start_layer": 3},
    "kv-w64-2h-key-g0.95-from3": {**TWO_HORIZON_KEY, "gamma": 0.95, "start_layer": 3},
    "kv-w64-2h-mean": {**KV_SIDE, "recent": 64, "score": "two-horizon", "fusion": "mean"},
    "kv-w64-key": {**KV_SIDE, "recent": 64, "fusion": "key"},
    "kv-w64-cummean-post": {**KV_SIDE, "recent": 64, "score": "cumulative-mean", "pre_rope": False},
    "kv-w64-2h": {**KV_SIDE, "recent": 64, "score": "two-horizon"},
    "kv-w64-2h-g0.99": {**KV_SIDE, "recent": 64, "score": "two-horizon", "gamma": 0.99},
    "kv-w64-min": {**KV_SIDE, "recent": 64, "fusion": "min"},
    "kv-w64-keynorm": {**KV_SIDE, "recent": 64, "score": "key-norm"},
    "kv-w64-valnorm": {**KV_SIDE, "recent": 64, "score": "value-norm"},
    "kv-w32": {**KV_SIDE, "recent": 32},
    "kv-w64-from0": {**KV_SIDE, "recent": 64, "start_layer": 0},
}
PPL_TARGET = {0.3: 1.03, 0.5: 1.08, 0.7: 1.20}  # x dense, SmolLM2-135M (issue 15)
PPL_TARGET_BY_MODEL = {"qwen2.5-coder-1.5b": {0.5: 1.03}}  # other models' targets (issue 15)


def ppl_target(model: str, ratio: float) -> float | None:
    """The perplexity target (x dense) for ``model`` (a short name or a display name) at ``ratio``, if any."""
    name = model.lower()
    for key, table in PPL_TARGET_BY_MODEL.items():
        if key in name:
            return table.get(ratio)
    return PPL_TARGET.get(ratio)


def random_twin(kwargs: dict, seed: int) -> dict:
    return {**kwargs, "score": "random", "seed": seed}


@dataclass
class QualityConfig:
    model: str | None = None
    candidates: list[str] = field(default_factory=lambda: list(CANDIDATES))
    budget_ratio: float = 0.5  # selection runs every candidate at this ratio
    ratios: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.7])  # held-out report
    ppl_window: int = 1024
    ppl_windows: int = 16  # the first n WikiText-2 windows: even -> selection, odd -> held-out
    needle_lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096])
    select_depths: list[float] = field(default_factory=lambda: [10.0, 45.0, 80.0])
    select_lengths: list[int] = field(default_factory=lambda: [1024, 2048])
    heldout_depths: list[float] = field(default_factory=lambda: [0.0, 25.0, 50.0, 75.0, 100.0])
    seeds: int = 3
    stages: list[str] = field(default_factory=lambda: ["select", "heldout"])
    chosen: str | None = None  # skip the choice (e.g. a reduced run on a second model)
    overrides: dict = field(default_factory=dict)  # TokenFilter fields set on every run (e.g. path="reference")


# ---- measurements -----------------------------------------------------------------------------------------
def ppl_point(model, ids: torch.Tensor, tf: TokenFilter | None) -> dict:
    """Perplexity over windows ``[n, T]`` (one prefill each) with the share of KV held after each window."""
    cfg = tf or TokenFilter(ratio=0.0)
    nll, count, per_window = 0.0, 0, []
    with torch.no_grad():
        for row in ids:
            with cfg.apply(model) as run:  # one run per window: KV held is a snapshot after one prompt
                x = row[None]
                logits = model(x, use_cache=False).logits[0, :-1].float()
                nll += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
                count += x.shape[1] - 1
            st = run.stats
            per_window.append((st.kv_held_fraction, st.ratio, st.pairs_fraction))
    held, ratio, pairs = (sum(v) / len(v) for v in zip(*per_window, strict=True))
    return {"ppl": math.exp(nll / count), "kv_held": held, "realized_ratio": ratio, "pairs": pairs}


def needle_point(model, tok, make: Callable[[int], TokenFilter | None], lengths: list[int], depths: list[float],
                 facts: tuple, progress: bool) -> dict:
    """Needle hits per length (``make(length)`` gives the filter for inputs of that length) and the KV held."""
    from tokenfilter.longctx.runner import run_longctx

    out: dict = {"by_length": {}}
    hits = []
    for length in lengths:
        tf = make(length)
        res = run_longctx(model, tok, {"m": tf}, needle_lengths=[length], needle_depths=depths, needle=facts,
                          benchmarks=("needle",), progress=False)
        entry = res["methods"]["m"]
        cells = [c["score"] for c in entry["needle"]["cells"]]
        hits += cells
        stats = entry["stats"]
        out["by_length"][str(length)] = {"found": sum(cells) / len(cells),
                                         "kv_held": stats["kv_held_fraction"] if stats else 1.0,
                                         "filter": entry["filter"]}
        if progress:
            print(f"  needle {length}: {sum(cells)}/{len(cells)}", flush=True)
    out["found"] = sum(hits) / len(hits)
    out["cells"] = len(hits)
    return out


def needle_forced(model, tok, tf: TokenFilter | None, lengths: list[int], depths: list[float], facts: tuple) -> dict:
    """The needle answered teacher-forced: one forward over prompt + answer per prompt (no generation).

    Per prompt: ``hit`` (every answer token is the argmax: what greedy decoding would write), ``logp`` (the
    answer's log-probability), ``needle_kept`` (share of the needle's (token, layer) entries kept, over the
    layers that filtered anything) and the KV held."""
    from tokenfilter.longctx.needle import NeedleBuilder

    base = NeedleBuilder(tok)
    cfg = (tf or TokenFilter(ratio=0.0)).replace(record_decisions=True)
    cells = []
    for fact in facts:
        builder = base.for_needle(fact)
        answer = tok(" " + fact.answer, add_special_tokens=False)["input_ids"]
        for length in lengths:
            for depth in depths:
                p = builder.build(length, depth)
                with torch.no_grad(), cfg.apply(model) as run:
                    logits = model(torch.tensor([p.input_ids + answer]), use_cache=False).logits[0].float()
                n = len(p.input_ids)
                lp = torch.log_softmax(logits[n - 1:n - 1 + len(answer)], -1)
                target = torch.tensor(answer)
                kept = [float((~d[0, p.needle_start:p.needle_end]).float().mean()) for d in run.decisions
                        if d[0].any()]
                cells.append({"length": length, "depth": depth, "needle": fact.answer,
                              "hit": bool((lp.argmax(-1) == target).all()),
                              "logp": float(lp.gather(-1, target[:, None]).sum()),
                              "needle_kept": sum(kept) / len(kept) if kept else 1.0,
                              "kv_held": run.stats.kv_held_fraction})
    mean = lambda key: sum(float(c[key]) for c in cells) / len(cells)  # noqa: E731
    return {"found": mean("hit"), "logp": mean("logp"), "needle_kept": mean("needle_kept"),
            "kv_held": mean("kv_held"), "cells": cells, "scoring": "teacher-forced"}


# ---- stages -----------------------------------------------------------------------------------------------
def select(model, tok, ids: torch.Tensor, cfg: QualityConfig, progress: bool,
           save: Callable[[dict], None] | None = None, previous: dict | None = None) -> dict:
    """Every candidate at ``budget_ratio`` on the selection half; candidates already in ``previous`` (same
    measurement settings) are kept, not re-run."""
    from tokenfilter.longctx.needle import NEEDLES

    keep = save or (lambda _out: None)
    r = cfg.budget_ratio
    settings = {"lengths": cfg.select_lengths, "depths": cfg.select_depths, "windows": int(ids.shape[0]),
                "window": int(ids.shape[1]), "ratio": r}
    reuse = previous if previous and previous.get("settings") == settings else {}
    out: dict = {"settings": settings, "runs": dict(reuse.get("runs", {}))}

    def measure(tf: TokenFilter | None) -> dict:
        row = ppl_point(model, ids, tf)
        row["needle"] = needle_forced(model, tok, tf, cfg.select_lengths, cfg.select_depths, NEEDLES["select"])
        return row

    out["dense"] = reuse.get("dense") or measure(None)
    keep(out)
    for name in tqdm(cfg.candidates, desc="selection", disable=not progress):
        if name not in out["runs"]:
            out["runs"][name] = measure(TokenFilter(ratio=r, **CANDIDATES[name], **cfg.overrides))
            keep(out)
        if progress:
            row = out["runs"][name]
            print(f"  {name}: PPL x{row['ppl'] / out['dense']['ppl']:.3f}, needle {row['needle']['found']:.2f} "
                  f"(logp {row['needle']['logp']:.2f})", flush=True)
    out["choice"] = choose(out, r, [n for n in cfg.candidates if n in out["runs"]])
    return out


def choose(sel: dict, ratio: float, names: list[str] | None = None) -> dict:
    """Most needle hits among the candidates within the perplexity target at ``ratio``; ties by the answer's
    log-probability (when measured), then by perplexity."""
    dense = sel["dense"]["ppl"]
    target = PPL_TARGET.get(ratio, 1.08)
    runs = {n: sel["runs"][n] for n in (names or sel["runs"])}
    ok = {n: r for n, r in runs.items() if r["ppl"] <= target * dense}
    pool = ok or runs
    best = max(pool, key=lambda n: (pool[n]["needle"]["found"], pool[n]["needle"].get("logp", 0.0), -pool[n]["ppl"]))
    return {"chosen": best, "within_target": sorted(ok), "target": target,
            "rule": f"most selection-needle hits among candidates within {target}x dense PPL at ratio {ratio}; "
                    "ties by the answer's log-probability, then PPL"
                    + ("" if ok else " (no candidate met the target: best of all)")}


def heldout(model, tok, ids: torch.Tensor, chosen: str, cfg: QualityConfig, progress: bool,
            needle: bool = True, save: Callable[[dict], None] | None = None) -> dict:
    """Held-out comparison; ``save(partial)`` is called after every measurement (long runs keep what they did)."""
    from tokenfilter.longctx.needle import NEEDLES

    kwargs = {**CANDIDATES[chosen], **cfg.overrides}
    facts = NEEDLES["heldout"]
    out: dict = {"chosen": chosen, "dense": ppl_point(model, ids, None), "runs": {}}
    done = save or (lambda _out: None)

    def needle_of(make: Callable[[int], TokenFilter | None]) -> dict:
        return needle_point(model, tok, make, cfg.needle_lengths, cfg.heldout_depths, facts, progress)

    for ratio in tqdm(cfg.ratios, desc="held-out", disable=not progress):
        runs: dict = out["runs"].setdefault(str(ratio), {})
        tf = TokenFilter(ratio=ratio, **kwargs)
        twins = [TokenFilter(ratio=ratio, **random_twin(kwargs, s)) for s in range(cfg.seeds)]
        runs["chosen"] = ppl_point(model, ids, tf)
        window = TokenFilter.sliding_window_holding(runs["chosen"]["kv_held"], ids.shape[1], **cfg.overrides)
        runs["sliding_window"] = ppl_point(model, ids, window)
        runs["random"] = [ppl_point(model, ids, twin) for twin in twins]
        runs["paper"] = ppl_point(model, ids, TokenFilter.paper(ratio=ratio))
        done(out)
        if not needle or ratio != cfg.budget_ratio:
            continue
        if "needle" not in out["dense"]:
            out["dense"]["needle"] = needle_of(lambda _n: None)
        runs["chosen"]["needle"] = needle_of(lambda _n, tf=tf: tf)
        done(out)
        held = {int(n): v["kv_held"] for n, v in runs["chosen"]["needle"]["by_length"].items()}
        runs["sliding_window"]["needle"] = needle_of(
            lambda n, held=held: TokenFilter.sliding_window_holding(held[n], n, **cfg.overrides))
        done(out)
        for s, twin in enumerate(twins):
            runs["random"][s]["needle"] = needle_of(lambda _n, t=twin: t)
            done(out)
    return out


def run_quality(cfg: QualityConfig, progress: bool = True, previous: dict | None = None,
                save: Callable[[dict], None] | None = None) -> dict:
    """Run the asked stages on one model; ``save(partial result)`` after every measurement of the long stages."""
    result = dict(previous or {})
    keep = save or (lambda _r: None)
    t0 = time.time()
    model, tok = load_model(cfg.model)
    ids = windows(tok, wikitext_text(), cfg.ppl_window, cfg.ppl_windows)
    result["config"] = asdict(cfg)
    result["model"] = display_name(cfg.model)
    if "select" in cfg.stages:
        def save_select(part: dict) -> None:
            result["select"] = part
            keep(result)

        result["select"] = select(model, tok, ids[0::2], cfg, progress, save_select, result.get("select"))
    chosen = cfg.chosen or result.get("select", {}).get("choice", {}).get("chosen")
    if chosen is None:
        raise ValueError("No chosen candidate: run the select stage first, or name one with chosen=.")
    if "heldout" in cfg.stages:
        def save_heldout(part: dict) -> None:
            result["heldout"] = part
            keep(result)

        result["heldout"] = heldout(model, tok, ids[1::2], chosen, cfg, progress, bool(cfg.needle_lengths),
                                    save_heldout)
    result["seconds"] = result.get("seconds", 0) + time.time() - t0
    result["torch"] = torch.__version__
    result["threads"] = torch.get_num_threads()
    return result
