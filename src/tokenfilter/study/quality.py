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

from tokenfilter import presets
from tokenfilter.config import TokenFilter
from tokenfilter.eval.ppl import wikitext_text, windows
from tokenfilter.integration.families import layer_windows
from tokenfilter.loading import display_name, load_model

# name -> TokenFilter fields (without ratio): a view of tokenfilter.presets; every candidate fits the budget at
# ratio 0.5 (window <= 64)
CANDIDATES: dict[str, dict] = {name: presets.fields(name) for name in presets.KV_STUDY}
PPL_TARGET = {0.3: 1.03, 0.5: 1.08, 0.7: 1.20}  # x dense, SmolLM2-135M (issue 15)
PPL_TARGET_BY_MODEL = {"qwen2.5-coder-1.5b": {0.5: 1.03}}  # other models' targets (issue 15)


def ppl_target(model: str | None, ratio: float, default: float | None = PPL_TARGET[0.5]) -> float | None:
    """The perplexity target (x dense) for ``model`` (a short name or a display name; None: SmolLM2-135M's) at
    ``ratio``, or ``default`` where none is written for that ratio."""
    table = next((t for key, t in PPL_TARGET_BY_MODEL.items() if key in (model or "").lower()), PPL_TARGET)
    return table.get(ratio, default)


def is_candidate(name: str) -> bool:
    """A KV-side candidate, or a candidate's random twin (``<name>-random``, seed 0: the selection's chance floor)."""
    return name in CANDIDATES or name.removesuffix(presets.RANDOM_SUFFIX) in CANDIDATES


def candidate_fields(name: str) -> dict:
    """A candidate's ``TokenFilter`` fields (its random twin's: seed 0); one sentence naming the choices if unknown."""
    if not is_candidate(name):
        raise ValueError(f"Unknown KV-side candidate {name!r}; choose from {', '.join(CANDIDATES)} "
                         "(or <name>-random, its random twin).")
    return presets.fields(name)


def random_twin(kwargs: dict, seed: int) -> dict:
    return presets.random_twin(kwargs, seed)


@dataclass
class QualityConfig:
    model: str | None = None
    candidates: list[str] = field(default_factory=lambda: list(CANDIDATES))
    budget_ratio: float = 0.5  # selection runs every candidate at this ratio
    ratios: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.7])  # held-out report
    ppl_window: int = 1024
    ppl_windows: int = 16  # the first n WikiText-2 windows: even -> selection, odd -> held-out
    needle_lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096])
    # at the held-out ratios other than budget_ratio the needle runs for the chosen configuration and its random
    # twins only (the target there is the random twin), at these lengths
    twin_needle_lengths: list[int] = field(default_factory=lambda: [1024])
    select_depths: list[float] = field(default_factory=lambda: [10.0, 45.0, 80.0])
    select_lengths: list[int] = field(default_factory=lambda: [1024, 2048])
    heldout_depths: list[float] = field(default_factory=lambda: [0.0, 25.0, 50.0, 75.0, 100.0])
    seeds: int = 3
    stages: list[str] = field(default_factory=lambda: ["select", "heldout"])
    chosen: str | None = None  # skip the choice (e.g. a reduced run on a second model)
    overrides: dict = field(default_factory=dict)  # TokenFilter fields set on every run (e.g. path="reference")
    dtype: str = "float32"  # the model's weights and activations (bfloat16 is several times faster on AMX CPUs)


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
    """Needle hits per length (``make(length)`` gives the filter for inputs of that length), with the KV held and
    the attention pairs there."""
    from tokenfilter.longctx.runner import run_longctx

    by_length: dict = {}
    for length in lengths:
        res = run_longctx(model, tok, {"m": make(length)}, needle_lengths=[length], needle_depths=depths,
                          needle=facts, benchmarks=("needle",), progress=False)
        entry = res["methods"]["m"]
        cells = [c["score"] for c in entry["needle"]["cells"]]
        stats = entry["stats"]
        by_length[str(length)] = {"found": sum(cells) / len(cells), "cells": len(cells),
                                  "tokens": res["config"]["needle_lengths"][0],  # clipped to the model's positions
                                  "kv_held": stats["kv_held_fraction"] if stats else 1.0,
                                  "pairs": stats["pairs_fraction"] if stats else 1.0,
                                  "filter": entry["filter"]}
        if progress:
            print(f"  needle {length}: {sum(cells)}/{len(cells)}", flush=True)
    return needle_summary(by_length)


def needle_summary(by_length: dict) -> dict:
    """One method's needle over the lengths it has: hits over all its prompts, and the lengths."""
    cells = sum(v.get("cells", 1) for v in by_length.values())  # entries of early runs lack "cells": one each
    return {"by_length": by_length, "cells": cells, "lengths": [int(n) for n in by_length],
            "found": sum(v["found"] * v.get("cells", 1) for v in by_length.values()) / cells if cells else 0.0}


def needle_forced(model, tok, tf: TokenFilter | None, lengths: list[int], depths: list[float], facts: tuple) -> dict:
    """The needle answered teacher-forced: one forward over prompt + answer per prompt (no generation).

    Per prompt: ``hit`` (every answer token is the argmax: what greedy decoding would write), ``logp`` (the
    answer's log-probability), ``needle_kept`` (share of the needle's (token, layer) entries kept, over the
    layers that filtered anything) and the KV held."""
    from tokenfilter.bench.model import supports_logits_to_keep
    from tokenfilter.longctx.needle import NeedleBuilder

    base = NeedleBuilder(tok)
    cfg = (tf or TokenFilter(ratio=0.0)).replace(record_decisions=True)
    cells = []
    for fact in facts:
        builder = base.for_needle(fact)
        answer = tok(" " + fact.answer, add_special_tokens=False)["input_ids"]
        # the LM head on the answer's positions only (a large vocabulary's head costs more than the model's body)
        head = {"logits_to_keep": len(answer) + 1} if supports_logits_to_keep(model) else {}
        for length in lengths:
            for depth in depths:
                p = builder.build(length, depth)
                with torch.no_grad(), cfg.apply(model) as run:
                    logits = model(torch.tensor([p.input_ids + answer]), use_cache=False, **head).logits[0].float()
                n = logits.shape[0] - len(answer)  # the prompt's last kept position + 1 (the head kept the tail only)
                lp = torch.log_softmax(logits[n - 1:n - 1 + len(answer)], -1)
                target = torch.tensor(answer)
                kept = [float((~d[0, ..., p.needle_start:p.needle_end]).float().mean()) for d in run.decisions
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
            out["runs"][name] = measure(TokenFilter(ratio=r, **candidate_fields(name), **cfg.overrides))
            keep(out)
        if progress:
            row = out["runs"][name]
            print(f"  {name}: PPL x{row['ppl'] / out['dense']['ppl']:.3f}, needle {row['needle']['found']:.2f} "
                  f"(logp {row['needle']['logp']:.2f})", flush=True)
    # over every candidate measured on this half, an earlier run's too: a run that adds candidates (``--resume
    # --candidates new``) chooses among all of them, not among the new ones alone
    out["choice"] = choose(out, r, [n for n in out["runs"] if n in CANDIDATES], cfg.model)
    return out


def choose(sel: dict, ratio: float, names: list[str] | None = None, model: str | None = None) -> dict:
    """Most needle hits among the candidates within the perplexity target at ``ratio`` (``model``'s own, where it
    has one); ties by the answer's log-probability (when measured), then by perplexity."""
    dense = sel["dense"]["ppl"]
    target = ppl_target(model, ratio)
    runs = {n: sel["runs"][n] for n in (names or sel["runs"])}
    ok = {n: r for n, r in runs.items() if r["ppl"] <= target * dense}
    pool = ok or runs
    best = max(pool, key=lambda n: (pool[n]["needle"]["found"], pool[n]["needle"].get("logp", 0.0), -pool[n]["ppl"]))
    return {"chosen": best, "within_target": sorted(ok), "target": target,
            "rule": f"most selection-needle hits among candidates within {target}x dense PPL at ratio {ratio}; "
                    "ties by the answer's log-probability, then PPL"
                    + ("" if ok else " (no candidate met the target: best of all)")}


def heldout(model, tok, ids: torch.Tensor, chosen: str, cfg: QualityConfig, progress: bool,
            needle: bool = True, save: Callable[[dict], None] | None = None, previous: dict | None = None) -> dict:
    """Held-out comparison; ``save(partial)`` is called after every measurement (long runs keep what they did),
    and the measurements of ``previous`` (same candidate and settings) are kept, not re-run: a stopped run goes on,
    and a run with more needle lengths measures only the new ones."""
    import copy

    from tokenfilter.longctx.needle import NEEDLES

    kwargs = {**CANDIDATES[chosen], **cfg.overrides}
    facts = NEEDLES["heldout"]
    settings = {"windows": int(ids.shape[0]), "window": int(ids.shape[1]), "depths": cfg.heldout_depths,
                "seeds": cfg.seeds, "overrides": cfg.overrides, "dtype": cfg.dtype}
    reuse = previous if previous and previous.get("chosen") == chosen and previous.get("settings") == settings else {}
    out: dict = copy.deepcopy(reuse) or {"chosen": chosen, "settings": settings, "runs": {}}
    done = save or (lambda _out: None)
    n = int(ids.shape[1])

    def once(into: dict, key: str, measure: Callable[[], dict]) -> dict:
        if key not in into:
            into[key] = measure()
            done(out)
        return into[key]

    def needle_once(run: dict, make: Callable[[int], TokenFilter | None], lengths: list[int],
                    require: str = "cells") -> None:
        """The needle of ``run`` at every length of ``lengths``, saved after each; a length already measured
        (with ``require`` recorded) is kept."""
        for length in lengths:
            have = dict(run.get("needle", {}).get("by_length", {}))
            if require in have.get(str(length), {}):
                continue
            have.update(needle_point(model, tok, make, [length], cfg.heldout_depths, facts, progress)["by_length"])
            run["needle"] = needle_summary({str(k): have[str(k)] for k in sorted(map(int, have))})
            done(out)

    once(out, "dense", lambda: ppl_point(model, ids, None))
    wins = layer_windows(model)  # the windows at equal KV and pairs are sized against what this model holds
    for ratio in tqdm(cfg.ratios, desc="held-out", disable=not progress):
        runs: dict = out["runs"].setdefault(str(ratio), {})
        tf = TokenFilter(ratio=ratio, **kwargs)
        twins = [TokenFilter(ratio=ratio, **random_twin(kwargs, s)) for s in range(cfg.seeds)]
        chosen_run = once(runs, "chosen", lambda tf=tf: ppl_point(model, ids, tf))
        once(runs, "sliding_window", lambda c=chosen_run: ppl_point(
            model, ids, TokenFilter.sliding_window_holding(c["kv_held"], n, windows=wins, **cfg.overrides)))
        once(runs, "sliding_window_pairs", lambda c=chosen_run: ppl_point(
            model, ids, TokenFilter.sliding_window_pairing(c["pairs"], n, windows=wins, **cfg.overrides)))
        randoms = runs.setdefault("random", [])
        for twin in twins[len(randoms):]:
            randoms.append(ppl_point(model, ids, twin))
            done(out)
        once(runs, "paper", lambda ratio=ratio: ppl_point(model, ids, TokenFilter.paper(ratio=ratio)))
        if not needle:
            continue
        windows = ratio == cfg.budget_ratio  # elsewhere the needle meets the random twin only (its target there)
        lengths = cfg.needle_lengths if windows else cfg.twin_needle_lengths
        needle_once(out["dense"], lambda _n: None, lengths=lengths)
        needle_once(chosen_run, lambda _n, tf=tf: tf, require="pairs", lengths=lengths)  # pairs size a window
        by_length = chosen_run["needle"]["by_length"]
        if windows:
            needle_once(runs["sliding_window"], lambda k, b=by_length: TokenFilter.sliding_window_holding(
                b[str(k)]["kv_held"], b[str(k)].get("tokens", k), windows=wins, **cfg.overrides), lengths)
        for run, twin in zip(randoms, twins, strict=True):  # the floor every target is judged against
            needle_once(run, lambda _n, t=twin: t, lengths=lengths)
        if windows:
            needle_once(runs["sliding_window_pairs"], lambda k, b=by_length: TokenFilter.sliding_window_pairing(
                b[str(k)]["pairs"], b[str(k)].get("tokens", k), windows=wins, **cfg.overrides), lengths)
    return out


def run_quality(cfg: QualityConfig, progress: bool = True, previous: dict | None = None,
                save: Callable[[dict], None] | None = None) -> dict:
    """Run the asked stages on one model; ``save(partial result)`` after every measurement of the long stages."""
    result = dict(previous or {})
    keep = save or (lambda _r: None)
    t0 = time.time()
    model, tok = load_model(cfg.model, dtype=cfg.dtype)
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
                                    save_heldout, result.get("heldout"))
        # a resumed run asked for some ratios; the config says every ratio the held-out half holds
        result["config"]["ratios"] = sorted({*cfg.ratios, *map(float, result["heldout"]["runs"])})
        dense_needle = result["heldout"]["dense"].get("needle", {}).get("by_length", {})
        if cfg.needle_lengths:
            result["config"]["needle_lengths"] = sorted({*cfg.needle_lengths, *map(int, dense_needle)})
    result["config"]["stages"] = [s for s in STAGE_KEYS if s in result]  # a resumed run may have asked for fewer
    result["seconds"] = result.get("seconds", 0) + time.time() - t0
    result["torch"] = torch.__version__
    result["threads"] = torch.get_num_threads()
    return result


STAGE_KEYS = ("select", "heldout")


def choose_ladder(selects: dict[str, dict], ratio: float) -> dict:
    """The rule over a ladder of models (model name -> its selection half, ``select``'s output): among the
    candidates every model measured, those within each model's perplexity target at ``ratio`` on every model; of
    them the most needle hits on the model where it finds the fewest (the worst case), ties by the mean answer
    log-probability, then by the worst perplexity ratio. When no candidate meets every model's target the rule says
    so and names the one closest to it (the smallest worst-case ratio of its perplexity to the model's target)."""
    names = [n for n in CANDIDATES if all(n in sel["runs"] for sel in selects.values())]
    if len(selects) < 2 or not names:
        raise ValueError("The ladder rule needs the selection half of two or more models with candidates in common.")

    def cell(model: str, name: str) -> dict | None:
        sel = selects[model]
        if name not in sel["runs"]:
            return None
        row, dense = sel["runs"][name], sel["dense"]["ppl"]
        target = ppl_target(model, ratio)
        return {"x_dense": row["ppl"] / dense, "target": target, "ok": row["ppl"] <= target * dense,
                "found": row["needle"]["found"], "logp": row["needle"].get("logp", 0.0)}

    # every candidate two or more models measured (None where one did not); the rule reads those all measured
    shown = [n for n in CANDIDATES if sum(n in sel["runs"] for sel in selects.values()) >= 2]
    table = {n: {m: cell(m, n) for m in selects} for n in shown}
    within = [n for n in names if all(m["ok"] for m in table[n].values())]
    if within:
        best = max(within, key=lambda n: (min(m["found"] for m in table[n].values()),
                                          sum(m["logp"] for m in table[n].values()) / len(selects),
                                          -max(m["x_dense"] for m in table[n].values())))
    else:
        best = min(names, key=lambda n: max(m["x_dense"] / m["target"] for m in table[n].values()))
    rule = ("among the candidates within every model's perplexity target at ratio "
            f"{ratio}, the most needle hits on the model where it finds the fewest; ties by the mean answer "
            "log-probability, then the worst perplexity ratio")
    if not within:
        rule += ("; no candidate meets every model's target, so none is chosen: the closest (smallest worst-case "
                 "perplexity over target) is named")
    return {"chosen": best if within else None, "closest": best, "within_target": within, "table": table,
            "ruled": names, "models": list(selects), "rule": rule}


def merge_results(parts: dict[str, dict], notes: list[str] | None = None) -> dict:
    """One study from several runs' ``kv-study.json`` (name -> its content), e.g. the selection and the held-out
    half of a model run apart, or two models: each model's stages come from the run that measured them, the
    commands are kept in order. Two runs holding the same stage of the same model are refused."""
    out: dict = {"models": {}, "commands": [], "seconds": 0.0}
    source: dict[tuple[str, str], str] = {}
    configured: set[str] = set()
    for name, part in parts.items():
        for model, res in part.get("models", {}).items():
            into = out["models"].setdefault(model, {})
            for stage in STAGE_KEYS:
                if stage not in res:
                    continue
                if (model, stage) in source:
                    raise ValueError(f"Both {source[model, stage]} and {name} hold the {stage} stage of {model}; "
                                     "merge only one of them.")
                source[model, stage] = name
                into[stage] = res[stage]
            # the configuration the report reads (ratios, needle lengths) is the held-out run's; a model
            # without a held-out run takes its first run's
            if "heldout" in res or model not in configured:
                into.update({k: v for k, v in res.items() if k not in STAGE_KEYS + ("seconds",)})
                configured.add(model)
        out["commands"] += [c for c in part.get("commands", []) if c not in out["commands"]]
        out["torch"], out["threads"] = part.get("torch"), part.get("threads")
    for model, res in out["models"].items():  # the time of every run that measured a stage of it, once
        runs = dict.fromkeys(source[model, st] for st in STAGE_KEYS if (model, st) in source)
        res["seconds"] = sum(parts[r]["models"][model].get("seconds", 0) for r in runs)
    out["seconds"] = sum(res["seconds"] for res in out["models"].values())
    if notes:
        out["notes"] = list(notes)
    return out
