"""``run_study``: the stages of the quality study, each returning plain JSON-able data.

1. ``layers``: filter one layer at a time (similarity vs random) and measure the perplexity cost.
2. ``select``: every candidate (and the random floor of each schedule) at every ratio on the *selection* half
   of the perplexity windows (even-numbered WikiText-2 test windows); the default is the candidate with the
   lowest perplexity at matched FLOPs saved (interpolated at the FLOPs the paper default saves).
3. ``heldout``: dense, the paper default, the chosen default, its random twin over several seeds, and
   layer removal (ShortGPT) removing 1..n layers, on the *held-out* windows (odd-numbered WikiText-2 test
   windows, and LAMBADA text, never used for the choice).
4. ``accuracy``: the same methods on held-out examples of the lm-eval suite (odd-numbered documents of every
   task), per-document correctness kept for paired bootstrap intervals.
5. ``second``: the same comparison on a second real model (stories260K) on text sampled from that model.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from tokenfilter.cli_args import STAGES
from tokenfilter.config import TokenFilter
from tokenfilter.eval.harness_tasks import ALL_TASKS, task_config
from tokenfilter.eval.ppl import lambada_text, perplexity, wikitext_text, windows
from tokenfilter.eval.shortgpt import block_influence, layers_to_remove, removed_layers
from tokenfilter.loading import display_name, load_model
from tokenfilter.stats import layer_flop_fraction
from tokenfilter.study import variants
from tokenfilter.study.bootstrap import paired_interval
from tokenfilter.study.curves import matched_log_ppl

STORIES = Path(__file__).resolve().parents[3].parent / "shared" / "models" / "stories260K"


@dataclass
class StudyConfig:
    model: str | None = None
    ratios: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.5])
    candidates: list[str] | None = None  # None: every candidate of ``variants.CANDIDATES``
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    ppl_window: int = 1024
    ppl_windows: int = 12  # the first n WikiText-2 test windows: even -> selection, odd -> held-out
    lambada_windows: int = 4  # held-out only
    layer_ratio: float = 0.5  # the single-layer probe
    probe_windows: int = 2  # selection windows the single-layer probe uses
    tasks: list[str] = field(default_factory=lambda: list(ALL_TASKS))
    acc_docs: int = 30  # held-out documents per task (odd-numbered)
    batch_size: int = 8  # lm-eval requests per forward (padding is masked: same results as 1)
    seeds: int = 3  # random-floor seeds on the held-out data
    calib_windows: int = 8
    second_model: str | None = str(STORIES)
    second_samples: int = 24
    second_length: int = 256
    seed: int = 0


def _point(model, ids: torch.Tensor, tf: TokenFilter | None, desc: str) -> dict:
    ppl, st = perplexity(model, ids, tf, progress=False, desc=desc)
    return {"ppl": ppl, "realized_ratio": st.ratio, "flops_saved": st.total_flops_skipped,
            "attention_flops_saved": st.attention_flops_skipped, "kv_saved": st.kv_saved_fraction}


def choose(select: dict, ratios: list[float]) -> dict:
    """The candidate with the lowest mean log-PPL at the FLOPs the paper default saves (random twins excluded)."""
    dense = select["dense"]["ppl"]
    paper = select["runs"][variants.PAPER]
    levels = [paper[str(r)]["flops_saved"] for r in ratios]
    scores = {}
    for name, runs in select["runs"].items():
        if name.startswith("random@"):
            continue
        logs = matched_log_ppl([runs[str(r)] for r in ratios], dense, levels)
        scores[name] = sum(logs) / len(logs)
    best = min(scores, key=scores.get)
    return {"chosen": best, "levels": levels, "score": scores, "rule": "lowest mean log-PPL at the paper's FLOPs"}


def _layer_probe(model, ids: torch.Tensor, cfg: StudyConfig, progress: bool) -> dict:
    n = model.config.num_hidden_layers
    dense = _point(model, ids, None, "dense")["ppl"]
    rows = []
    for layer in tqdm(range(n), desc="single-layer probe", disable=not progress):
        sim = _point(model, ids, variants.single_layer(n, layer, cfg.layer_ratio), "sim")
        rnd = _point(model, ids, variants.single_layer(n, layer, cfg.layer_ratio, random=True, seed=cfg.seed), "rnd")
        rows.append({"layer": layer, "similarity_ppl": sim["ppl"], "random_ppl": rnd["ppl"],
                     "similarity_dlogppl": math.log(sim["ppl"] / dense),
                     "random_dlogppl": math.log(rnd["ppl"] / dense)})
    return {"dense_ppl": dense, "ratio": cfg.layer_ratio, "rows": rows}


def _select(model, ids: torch.Tensor, cfg: StudyConfig, progress: bool) -> dict:
    names = cfg.candidates or list(variants.CANDIDATES)
    if variants.PAPER not in names:
        names = [variants.PAPER, *names]
    names += [variants.random_name(n) for n in variants.RANDOM_OF if n in names]
    out = {"dense": _point(model, ids, None, "dense"), "runs": {}}
    plan = [(n, r) for n in names for r in cfg.ratios]
    for name, ratio in tqdm(plan, desc="selection half", disable=not progress):
        tf = variants.filter_of(name, ratio, seed=cfg.seed)
        out["runs"].setdefault(name, {})[str(ratio)] = _point(model, ids, tf, name)
    out["choice"] = choose(out, cfg.ratios)
    return out


def _shortgpt_curve(model, sets: dict[str, torch.Tensor], influence: list[float], max_flops: float,
                    seq_len: int, progress: bool) -> list[dict]:
    per_layer = layer_flop_fraction(model.config, seq_len)
    n_max = min(model.config.num_hidden_layers - 1, max(1, math.ceil(max_flops / per_layer) + 1))
    rows = []
    for n in tqdm(range(1, n_max + 1), desc="layer removal", disable=not progress):
        remove = layers_to_remove(influence, n)
        with removed_layers(model, remove):
            ppl = {k: perplexity(model, ids, None, progress=False)[0] for k, ids in sets.items()}
        rows.append({"layers_removed": n, "removed": remove, "flops_saved": n * per_layer, "ppl": ppl})
    return rows


def _heldout(model, sets: dict[str, torch.Tensor], chosen: str, influence: list[float], cfg: StudyConfig,
             progress: bool) -> dict:
    methods = _filter_methods(chosen, cfg.seeds)
    out: dict = {"dense": {k: _point(model, ids, None, "dense")["ppl"] for k, ids in sets.items()}, "runs": {}}
    plan = [(m, r) for m in methods for r in cfg.ratios]
    for (label, name, seed), ratio in tqdm(plan, desc="held-out perplexity", disable=not progress):
        tf = variants.filter_of(name, ratio, seed=seed)
        pts = {k: _point(model, ids, tf, label) for k, ids in sets.items()}
        first = next(iter(pts.values()))
        out["runs"].setdefault(label, {})[str(ratio)] = {
            "ppl": {k: p["ppl"] for k, p in pts.items()}, **{k: v for k, v in first.items() if k != "ppl"}}
    max_flops = max(r["flops_saved"] for runs in out["runs"].values() for r in runs.values())
    out["shortgpt"] = _shortgpt_curve(model, sets, influence, max_flops, cfg.ppl_window, progress)
    return out


def _filter_methods(chosen: str, seeds: int) -> list[tuple[str, str, int]]:
    """(label, candidate, seed) for the held-out comparisons."""
    methods = [(variants.PAPER, variants.PAPER, 0)]
    if chosen != variants.PAPER:
        methods.append((chosen, chosen, 0))
    twin = variants.random_name(chosen)
    methods += [(f"{twin}#s{s}", twin, s) for s in range(seeds)]
    if chosen != variants.PAPER:
        methods.append((variants.random_name(variants.PAPER), variants.random_name(variants.PAPER), 0))
    return methods


def _accuracy(model, tok, chosen: str, influence: list[float], cfg: StudyConfig, progress: bool) -> dict:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import lm_eval

    from tokenfilter.eval.harness_model import TokenFilterLM
    from tokenfilter.eval.harness_tasks import task_manager

    tm = task_manager()
    configs = [task_config(t) for t in cfg.tasks]
    samples = {f"tf_{t}": list(range(1, 2 * cfg.acc_docs, 2)) for t in cfg.tasks}
    lm = TokenFilterLM(pretrained=model, tokenizer=tok, batch_size=cfg.batch_size)

    def evaluate() -> dict[str, dict[int, float]]:
        res = lm_eval.simple_evaluate(model=lm, tasks=configs, samples=samples, task_manager=tm, log_samples=True,
                                      verbosity="ERROR")
        per_doc: dict[str, dict[int, float]] = {}
        for task, rows in res["samples"].items():
            per_doc[task.removeprefix("tf_")] = {int(r["doc_id"]): float(r["acc"]) for r in rows}
        return per_doc

    out: dict = {"docs_per_task": cfg.acc_docs, "tasks": cfg.tasks, "runs": {}}
    lm.token_filter = TokenFilter(ratio=0.0)
    lm.reset_filter_stats()
    out["dense"] = {"per_doc": evaluate()}
    methods = [m for m in _filter_methods(chosen, cfg.seeds) if m[0] != variants.random_name(variants.PAPER)]
    plan = [(m, r) for m in methods for r in cfg.ratios] + [(("shortgpt", "shortgpt", 0), r) for r in cfg.ratios]
    per_layer = layer_flop_fraction(model.config, 128)
    for (label, name, seed), ratio in tqdm(plan, desc="held-out accuracy", disable=not progress):
        row: dict = {}
        if name == "shortgpt":
            saved = out["runs"][chosen][str(ratio)]["flops_saved"]
            n = max(1, round(saved / per_layer))
            lm.token_filter = None
            with removed_layers(model, layers_to_remove(influence, n)):
                row["per_doc"] = evaluate()
            row.update(layers_removed=n, flops_saved=n * per_layer, realized_ratio=None)
        else:
            lm.token_filter = variants.filter_of(name, ratio, seed=seed)
            lm.reset_filter_stats()
            row["per_doc"] = evaluate()
            st = lm.filter_stats
            row.update(flops_saved=st.total_flops_skipped, realized_ratio=st.ratio, kv_saved=st.kv_saved_fraction)
        out["runs"].setdefault(label, {})[str(ratio)] = row
    _summarise_accuracy(out, chosen, cfg)
    return out


def _avg(per_doc: dict[str, dict[int, float]]) -> float:
    return float(np.mean([np.mean(list(d.values())) for d in per_doc.values()]))


def _summarise_accuracy(out: dict, chosen: str, cfg: StudyConfig) -> None:
    """Average accuracy per run, the random floor's seed spread, and paired bootstrap intervals."""
    out["dense"]["avg"] = _avg(out["dense"]["per_doc"])
    for runs in out["runs"].values():
        for row in runs.values():
            row["avg"] = _avg(row["per_doc"])
    twin = variants.random_name(chosen)
    seeds = [lbl for lbl in out["runs"] if lbl.startswith(f"{twin}#s")]
    summary = {}
    for r in map(str, cfg.ratios):
        seed_accs = [out["runs"][s][r]["avg"] for s in seeds]
        mine = out["runs"][chosen][r]
        summary[r] = {
            "chosen": mine["avg"],
            "random_mean": float(np.mean(seed_accs)) if seed_accs else None,
            "random_spread": float(np.max(seed_accs) - np.min(seed_accs)) if len(seed_accs) > 1 else None,
            "shortgpt": out["runs"]["shortgpt"][r]["avg"],
            "vs_random": [paired_interval(mine["per_doc"], out["runs"][s][r]["per_doc"]) for s in seeds],
            "vs_shortgpt": paired_interval(mine["per_doc"], out["runs"]["shortgpt"][r]["per_doc"]),
        }
    out["summary"] = summary


def _second_model(cfg: StudyConfig, chosen: str, progress: bool) -> dict:
    """stories260K (real TinyStories weights, no HF tokenizer): perplexity on text sampled from the dense model."""
    from transformers import AutoModelForCausalLM

    path = Path(cfg.second_model)
    if not (path / "config.json").exists():
        return {"skipped": f"{path} not found"}
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    bos = model.config.bos_token_id if model.config.bos_token_id is not None else 1
    eos = model.config.eos_token_id if model.config.eos_token_id is not None else bos

    def sample(n: int, seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        start = torch.full((n, 1), bos, dtype=torch.long)
        with torch.no_grad():
            ids = model.generate(start, do_sample=True, max_new_tokens=cfg.second_length - 1,
                                 min_new_tokens=cfg.second_length - 1, top_k=0, pad_token_id=eos)
        return ids

    text = sample(cfg.second_samples, 1234)
    calib = sample(8, 4321)
    influence = block_influence(model, calib)
    sets = {"stories": text}
    methods = _filter_methods(chosen, cfg.seeds)
    out: dict = {"model": str(path), "samples": cfg.second_samples, "length": cfg.second_length,
                 "dense": {"stories": _point(model, text, None, "dense")["ppl"]}, "runs": {}}
    for (label, name, seed), ratio in tqdm([(m, r) for m in methods for r in cfg.ratios], desc="second model",
                                           disable=not progress):
        p = _point(model, text, variants.filter_of(name, ratio, seed=seed), label)
        out["runs"].setdefault(label, {})[str(ratio)] = {**p, "ppl": {"stories": p["ppl"]}}
    max_flops = max(r["flops_saved"] for runs in out["runs"].values() for r in runs.values())
    out["shortgpt"] = _shortgpt_curve(model, sets, influence, max_flops, cfg.second_length, progress)
    return out


def run_study(cfg: StudyConfig, progress: bool = True, previous: dict | None = None) -> dict:
    """Run the asked stages. ``previous``: an earlier result whose stages are reused (and kept) when not re-run."""
    for s in cfg.stages:
        if s not in STAGES:
            raise ValueError(f"Unknown study stage {s!r}; choose from {', '.join(STAGES)}.")
    for name in cfg.candidates or []:
        variants.kwargs_of(name)
    for r in cfg.ratios:
        if not 0 < r < 1:
            raise ValueError(f"Every study ratio must be in (0, 1), got {r}.")
    result = dict(previous or {})
    t0 = time.time()
    model, tok = load_model(cfg.model)
    ids = windows(tok, wikitext_text(), cfg.ppl_window, cfg.ppl_windows)
    select_ids, held_ids = ids[0::2], ids[1::2]
    held_sets = {"wikitext2": held_ids}
    if cfg.lambada_windows:
        held_sets["lambada"] = windows(tok, lambada_text(), cfg.ppl_window, cfg.lambada_windows)
    result["config"] = asdict(cfg)
    result["model"] = display_name(cfg.model)
    if "layers" in cfg.stages:
        result["layers"] = _layer_probe(model, select_ids[: cfg.probe_windows], cfg, progress)
    if "select" in cfg.stages:
        result["select"] = _select(model, select_ids, cfg, progress)
    chosen = result.get("select", {}).get("choice", {}).get("chosen", variants.PAPER)
    result["chosen"] = chosen
    influence = None
    if {"heldout", "accuracy"} & set(cfg.stages):
        from tokenfilter.eval.suite import EvalConfig, _calibration_sets

        calib = _calibration_sets(tok, EvalConfig(calib_windows=cfg.calib_windows))[0]
        influence = block_influence(model, calib)
        result["block_influence"] = influence
    if "heldout" in cfg.stages:
        result["heldout"] = _heldout(model, held_sets, chosen, influence, cfg, progress)
    if "accuracy" in cfg.stages:
        result["accuracy"] = _accuracy(model, tok, chosen, influence, cfg, progress)
    if "second" in cfg.stages and cfg.second_model:
        result["second"] = _second_model(cfg, chosen, progress)
    result["seconds"] = result.get("seconds", 0) + time.time() - t0
    result["torch"] = torch.__version__
    result["threads"] = torch.get_num_threads()
    return result
