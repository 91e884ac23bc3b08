"""The evaluation job: every method x ratio on the zero-shot suite (+ MMLU) and perplexity."""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from tokenfilter.config import SlidingWindowShare, TokenFilter, for_input
from tokenfilter.eval.console import quiet_libraries
from tokenfilter.eval.harness_tasks import resolve_tasks, task_config
from tokenfilter.eval.harness_tasks import task_manager as task_manager_for_our_tasks
from tokenfilter.eval.long_part import LongPart, includes_default, run_long_part
from tokenfilter.eval.methods import FILTER_VARIANTS, LAYER_REMOVAL, SIZED_PER_INPUT, filter_for, resolve_methods
from tokenfilter.eval.ppl import lambada_text, perplexity, wikitext_text, windows
from tokenfilter.eval.resume import FINGERPRINT_FIELDS, RowStore, clear, has_results
from tokenfilter.eval.shortgpt import block_influence, layers_to_remove, removed_layers
from tokenfilter.loading import display_name, load_model
from tokenfilter.stats import FilterStats, FlopModel, LayerCounts, layer_flop_fraction

CALIB_DIR = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "needle-haystack"


@dataclass
class EvalConfig:
    model: str | None = None
    methods: list[str] = field(default_factory=lambda: ["dense", "token-filter"])
    ratios: list[float] = field(default_factory=lambda: [0.3, 0.5])
    tasks: list[str] = field(default_factory=lambda: ["zeroshot", "mmlu"])
    limit: int | None = 40
    batch_size: int = 8
    dtype: str = "float32"
    device: str = "cpu"
    ppl_file: str | None = None
    ppl_window: int = 1024
    ppl_windows: int = 4
    lambada: bool = True
    calib_file: str | None = None
    calib_windows: int = 8
    seed: int = 0
    long: LongPart = field(default_factory=LongPart)  # the long-input part (RULER at 4096 tokens); samples=0: none


def _metrics(results: dict) -> dict[str, dict[str, float]]:
    """lm-eval's numbers per task (``acc``, ``acc_stderr``, ``acc_norm``, ...), without the ``tf_`` prefix."""
    out = {}
    for task, values in results["results"].items():
        name = task.removeprefix("tf_")
        out[name] = {k.split(",")[0]: float(v) for k, v in values.items()
                     if isinstance(v, int | float) and k != "alias"}
    return out


def average_stderr(accuracy: dict[str, dict[str, float]]) -> float | None:
    """Standard error of the average accuracy over tasks: sqrt(sum of per-task stderr^2) / n_tasks
    (tasks are independent samples); None when a task has no ``acc_stderr``."""
    errors = [m.get("acc_stderr") for m in accuracy.values()]
    if not errors or any(e is None or math.isnan(e) for e in errors):
        return None
    return math.sqrt(sum(e * e for e in errors)) / len(errors)


def _model_key(cfg: EvalConfig) -> str:
    """The model as kept results name it: a local path resolved, else the display name."""
    if cfg.model and Path(cfg.model).expanduser().exists():
        return str(Path(cfg.model).expanduser().resolve())
    return display_name(cfg.model)


def fingerprint(cfg: EvalConfig, task_names: list[str]) -> dict:
    """The settings a kept result depends on (see ``tokenfilter.eval.resume``)."""
    return {**{k: getattr(cfg, k) for k in FINGERPRINT_FIELDS if k not in ("model", "tasks")},
            "model": _model_key(cfg), "tasks": list(task_names)}


def _calibration_sets(tok, cfg: EvalConfig) -> list[torch.Tensor]:
    """Two disjoint calibration sets (for ShortGPT's sensitivity to its calibration data)."""
    if cfg.calib_file:
        text = Path(cfg.calib_file).read_text(encoding="utf-8")
        ids = windows(tok, text, 512, 2 * cfg.calib_windows)
        return [ids[0::2], ids[1::2]]
    files = sorted(CALIB_DIR.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"No calibration text in {CALIB_DIR}; pass --calib-file.")
    half = len(files) // 2
    sets = []
    for group in (files[:half], files[half:]):
        text = "\n\n".join(f.read_text(encoding="utf-8") for f in group)
        sets.append(windows(tok, text, 512, cfg.calib_windows))
    return sets


@dataclass
class _Run:
    """What every row of one evaluation shares."""

    cfg: EvalConfig
    lm_eval: Any
    model: Any
    tok: Any
    lm: Any
    task_names: list[str]
    task_configs: list[dict]
    task_manager: Any
    ppl_sets: dict[str, torch.Tensor]
    store: RowStore
    bar: Any
    flops_saved_by_ratio: dict[float, float] = field(default_factory=dict)
    influence: dict[str, list[float]] = field(default_factory=dict)
    kept_seconds: float = 0.0  # what the reused parts took in earlier runs


def plan_of(cfg: EvalConfig) -> list[tuple[str, float]]:
    """The (method, ratio) rows in the order they run (layer removal last: it matches Token Filtering's FLOPs)."""
    methods = resolve_methods(cfg.methods)
    plan = [(m, 0.0) for m in methods if m == "dense"]
    plan += [(m, r) for m in methods if m in FILTER_VARIANTS or m in SIZED_PER_INPUT for r in cfg.ratios]
    plan += [(m, r) for m in methods if m in LAYER_REMOVAL for r in cfg.ratios]
    return plan


def run_eval(cfg: EvalConfig, progress: bool = True, output: Path | None = None, existing: str = "refuse") -> dict:
    """Run the comparison; returns a JSON-able dict with the configuration and one row per method x ratio.

    With ``output``, each finished task and perplexity of a row is kept in ``output/rows`` as it finishes.
    ``existing`` says what to do with the results an earlier run left there: ``"refuse"`` (raise
    ``OutputExistsError``), ``"resume"`` (reuse them; a different configuration raises ``ResumeMismatchError``)
    or ``"force"`` (discard them)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import lm_eval

    from tokenfilter.eval.harness_model import TokenFilterLM

    plan = plan_of(cfg)
    task_names = resolve_tasks(cfg.tasks)
    task_configs = [task_config(t) for t in task_names]  # fails early on missing data
    ppl_text = wikitext_text(cfg.ppl_file)
    store = _store(cfg, task_names, output, existing)
    store.check(plan)
    t0 = time.time()
    long_part = cfg.long if includes_default(m for m, _ in plan) else LongPart(samples=0)
    steps = len(plan) * (len(task_names) + 1) + bool(long_part.samples)
    with quiet_libraries(), tqdm(total=steps, desc="eval", unit="step", disable=not progress, leave=True,
                                 dynamic_ncols=True) as bar:
        bar.set_postfix_str("loading the model", refresh=True)
        model, tok = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
        lm = TokenFilterLM(pretrained=model, tokenizer=tok, batch_size=cfg.batch_size, device=cfg.device)
        ppl_sets = {"wikitext2": windows(tok, ppl_text, cfg.ppl_window, cfg.ppl_windows)}
        if cfg.lambada:
            ppl_sets["lambada"] = windows(tok, lambada_text(), cfg.ppl_window, cfg.ppl_windows)
        run = _Run(cfg, lm_eval, model, tok, lm, task_names, task_configs, task_manager_for_our_tasks(),
                   ppl_sets, store, bar)
        rows = [_row(run, method, ratio) for method, ratio in plan]
        bar.set_postfix_str("long inputs (RULER)", refresh=True)
        long = run_long_part(model, tok, long_part, cfg.ratios, _long_key(cfg), output, existing, progress)
        bar.update(bool(long))
    kept = sum(long["methods"][name]["seconds"] for name in long.get("reused", [])) if long else 0.0
    return {
        "model": display_name(cfg.model),
        "config": asdict(cfg),
        "tasks": task_names,
        "rows": rows,
        "long": long,
        "seconds": time.time() - t0 + run.kept_seconds + kept,  # a resumed run counts its reused parts' time too
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def _long_key(cfg: EvalConfig) -> dict:
    """What the long part's kept answers depend on besides their prompts: the model, its dtype and device."""
    return {"model": _model_key(cfg), "dtype": cfg.dtype, "device": cfg.device}


class OutputExistsError(ValueError):
    """The output folder already holds results, and neither resuming nor overwriting them was asked for."""


def _store(cfg: EvalConfig, task_names: list[str], output: Path | None, existing: str) -> RowStore:
    if existing not in ("refuse", "resume", "force"):
        raise ValueError(f"existing must be refuse, resume or force, not {existing!r}.")
    if output is not None:
        output = Path(output)
        if existing == "force":
            clear(output)
        elif existing == "refuse" and has_results(output):
            raise OutputExistsError(f"{output} already holds results; pass --resume to continue that run, "
                                    "or --force to overwrite it.")
    return RowStore(output, fingerprint(cfg, task_names))


def _row(run: _Run, method: str, ratio: float) -> dict:
    record = run.store.load(method, ratio)
    run.kept_seconds += record.get("seconds", 0.0)
    if record.get("row"):  # finished in an earlier run
        run.bar.update(len(run.task_names) + 1)
        if method == "token-filter":
            run.flops_saved_by_ratio[ratio] = record["ppl_flops_skipped"]
        return {**record["row"], "seconds": record.get("seconds")}
    record.setdefault("tasks", {})
    compute = _removal_row if method in LAYER_REMOVAL else _filter_row
    row = compute(run, method, ratio, record)
    row["avg_accuracy"] = sum(m["acc"] for m in row["accuracy"].values()) / len(row["accuracy"])
    row["avg_accuracy_stderr"] = average_stderr(row["accuracy"])
    record["row"] = row
    run.store.save(method, ratio, record)
    return {**row, "seconds": record.get("seconds")}  # the compute time of its tasks and perplexities


def _tasks(run: _Run, method: str, ratio: float, record: dict, counting: bool) -> dict[str, dict[str, float]]:
    """Every task's metrics of one row, reusing the kept ones; each new one is kept as it finishes."""
    for task, task_cfg in zip(run.task_names, run.task_configs, strict=True):
        if task not in record["tasks"]:
            run.bar.set_postfix_str(f"{method} {ratio:g}: {task}", refresh=True)
            torch.manual_seed(run.cfg.seed)
            run.lm.reset_filter_stats()
            t0 = time.time()
            results = run.lm_eval.simple_evaluate(model=run.lm, tasks=[task_cfg], limit=run.cfg.limit,
                                                  task_manager=run.task_manager, log_samples=False)
            counts = [asdict(c) for c in run.lm._counts] if counting else None
            record["tasks"][task] = {"metrics": _metrics(results)[task], "counts": counts}
            record["seconds"] = record.get("seconds", 0.0) + time.time() - t0
            run.store.save(method, ratio, record)
        run.bar.update(1)
    return {task: record["tasks"][task]["metrics"] for task in run.task_names}


def _perplexities(run: _Run, method: str, ratio: float, record: dict,
                  tf: TokenFilter | SlidingWindowShare | None) -> dict[str, float]:
    if record.get("perplexity") is None:
        run.bar.set_postfix_str(f"{method} {ratio:g}: perplexity", refresh=True)
        ppl, t0 = {}, time.time()
        for name, ids in run.ppl_sets.items():
            torch.manual_seed(run.cfg.seed)
            ppl[name], stats = perplexity(run.model, ids, tf and for_input(tf, ids.shape[1], run.model), False, name)
            if name == "wikitext2":
                record["ppl_flops_skipped"] = stats.total_flops_skipped
        record["perplexity"] = ppl
        record["seconds"] = record.get("seconds", 0.0) + time.time() - t0
        run.store.save(method, ratio, record)
    run.bar.update(1)
    return record["perplexity"]


def _task_stats(run: _Run, record: dict) -> FilterStats:
    """The filter's statistics summed over every task's forwards (kept per task, so resumed rows add up too)."""
    total = [LayerCounts() for _ in range(run.model.config.num_hidden_layers)]
    for part in record["tasks"].values():
        for layer, counts in zip(total, part["counts"], strict=True):
            layer.add(counts)
    elem = next(run.model.parameters()).element_size()
    return FilterStats.from_counts(FlopModel.from_config(run.model.config), total, elem)


def _filter_row(run: _Run, method: str, ratio: float, record: dict) -> dict:
    tf = None if method == "dense" else filter_for(method, ratio)
    run.lm.token_filter = tf if tf is not None else filter_for("token-filter", 0.0)
    row: dict = {"method": method, "target_ratio": ratio}
    row["accuracy"] = _tasks(run, method, ratio, record, counting=True)
    row["perplexity"] = _perplexities(run, method, ratio, record, tf)
    if method == "token-filter":
        run.flops_saved_by_ratio[ratio] = record["ppl_flops_skipped"]
    stats = _task_stats(run, record)
    row.update(realized_ratio=stats.ratio, total_flops_skipped=stats.total_flops_skipped,
               attention_flops_skipped=stats.attention_flops_skipped,
               kv_saved_fraction=stats.kv_saved_fraction, tokens=stats.tokens,
               config=asdict(tf) if tf else None)
    return row


def _removal_row(run: _Run, method: str, ratio: float, record: dict) -> dict:
    model, cfg = run.model, run.cfg
    if ratio not in run.flops_saved_by_ratio:
        _, st = perplexity(model, run.ppl_sets["wikitext2"], filter_for("token-filter", ratio), False, "match")
        run.flops_saved_by_ratio[ratio] = st.total_flops_skipped
    if not run.influence:
        calib = _calibration_sets(run.tok, cfg)
        run.influence.update({"shortgpt": block_influence(model, calib[0]),
                              "shortgpt-calib2": block_influence(model, calib[1])})
    per_layer = layer_flop_fraction(model.config, cfg.ppl_window)
    n_remove = max(1, round(run.flops_saved_by_ratio[ratio] / per_layer))
    remove = layers_to_remove(run.influence[method], n_remove)
    if record.get("removed_layers", remove) != remove:  # kept parts scored another model: redo them
        record.clear()
        record["tasks"] = {}
    record["removed_layers"] = remove
    row: dict = {"method": method, "target_ratio": ratio}
    run.lm.token_filter = None
    with removed_layers(model, remove):
        row["accuracy"] = _tasks(run, method, ratio, record, counting=False)
        row["perplexity"] = _perplexities(run, method, ratio, record, None)
    row.update(removed_layers=remove, realized_ratio=None, total_flops_skipped=n_remove * per_layer,
               attention_flops_skipped=n_remove / model.config.num_hidden_layers,
               kv_saved_fraction=n_remove / model.config.num_hidden_layers,
               block_influence=run.influence[method])
    return row
