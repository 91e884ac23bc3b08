"""The evaluation job: every method x ratio on the zero-shot suite (+ MMLU) and perplexity."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from tokenfilter.eval.harness_tasks import resolve_tasks, task_config
from tokenfilter.eval.harness_tasks import task_manager as task_manager_for_our_tasks
from tokenfilter.eval.methods import FILTER_VARIANTS, LAYER_REMOVAL, filter_for, resolve_methods
from tokenfilter.eval.ppl import lambada_text, perplexity, wikitext_text, windows
from tokenfilter.eval.shortgpt import block_influence, layers_to_remove, removed_layers
from tokenfilter.loading import DEFAULT_NAME, load_model
from tokenfilter.stats import layer_flop_fraction

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


def _metrics(results: dict) -> dict[str, dict[str, float]]:
    out = {}
    for task, values in results["results"].items():
        name = task.removeprefix("tf_")
        out[name] = {k.split(",")[0]: float(v) for k, v in values.items()
                     if isinstance(v, int | float) and "stderr" not in k and k != "alias"}
    return out


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


def run_eval(cfg: EvalConfig, progress: bool = True) -> dict:
    """Run the comparison; returns a JSON-able dict with the configuration and one row per method x ratio."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import lm_eval

    from tokenfilter.eval.harness_model import TokenFilterLM

    methods = resolve_methods(cfg.methods)
    task_names = resolve_tasks(cfg.tasks)
    task_configs = [task_config(t) for t in task_names]  # fails early on missing data
    ppl_text = wikitext_text(cfg.ppl_file)
    t0 = time.time()
    model, tok = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    lm = TokenFilterLM(pretrained=model, tokenizer=tok, batch_size=cfg.batch_size, device=cfg.device)
    ppl_sets = {"wikitext2": windows(tok, ppl_text, cfg.ppl_window, cfg.ppl_windows)}
    if cfg.lambada:
        ppl_sets["lambada"] = windows(tok, lambada_text(), cfg.ppl_window, cfg.ppl_windows)
    task_manager = task_manager_for_our_tasks()

    plan = [(m, 0.0) for m in methods if m == "dense"]
    plan += [(m, r) for m in methods if m in FILTER_VARIANTS for r in cfg.ratios]
    plan += [(m, r) for m in methods if m in LAYER_REMOVAL for r in cfg.ratios]
    flops_saved_by_ratio: dict[float, float] = {}
    influence: dict[str, list[float]] = {}
    rows = []
    for method, ratio in tqdm(plan, desc="methods", disable=not progress):
        torch.manual_seed(cfg.seed)
        row: dict = {"method": method, "target_ratio": ratio}
        if method in LAYER_REMOVAL:
            if ratio not in flops_saved_by_ratio:
                _, st = perplexity(model, ppl_sets["wikitext2"], filter_for("token-filter", ratio), progress, "match")
                flops_saved_by_ratio[ratio] = st.total_flops_skipped
            if not influence:
                calib = _calibration_sets(tok, cfg)
                influence = {"shortgpt": block_influence(model, calib[0]),
                             "shortgpt-calib2": block_influence(model, calib[1])}
            per_layer = layer_flop_fraction(model.config, cfg.ppl_window)
            n_remove = max(1, round(flops_saved_by_ratio[ratio] / per_layer))
            remove = layers_to_remove(influence[method], n_remove)
            lm.token_filter = None
            with removed_layers(model, remove):
                row["accuracy"] = _metrics(lm_eval.simple_evaluate(
                    model=lm, tasks=task_configs, limit=cfg.limit, task_manager=task_manager, log_samples=False))
                row["perplexity"] = {k: perplexity(model, ids, None, progress, k)[0] for k, ids in ppl_sets.items()}
            row.update(removed_layers=remove, realized_ratio=None, total_flops_skipped=n_remove * per_layer,
                       attention_flops_skipped=n_remove / model.config.num_hidden_layers,
                       kv_saved_fraction=n_remove / model.config.num_hidden_layers,
                       block_influence=influence[method])
        else:
            tf = None if method == "dense" else filter_for(method, ratio)
            lm.token_filter = tf if tf is not None else filter_for("token-filter", 0.0)
            lm.reset_filter_stats()
            row["accuracy"] = _metrics(lm_eval.simple_evaluate(
                model=lm, tasks=task_configs, limit=cfg.limit, task_manager=task_manager, log_samples=False))
            stats = lm.filter_stats
            row["perplexity"] = {}
            for name, ids in ppl_sets.items():
                row["perplexity"][name], ppl_stats = perplexity(model, ids, tf, progress, name)
                if name == "wikitext2" and method == "token-filter":
                    flops_saved_by_ratio[ratio] = ppl_stats.total_flops_skipped
            row.update(realized_ratio=stats.ratio, total_flops_skipped=stats.total_flops_skipped,
                       attention_flops_skipped=stats.attention_flops_skipped,
                       kv_saved_fraction=stats.kv_saved_fraction, tokens=stats.tokens,
                       config=asdict(tf) if tf else None)
        row["avg_accuracy"] = sum(m["acc"] for m in row["accuracy"].values()) / len(row["accuracy"])
        rows.append(row)
    return {
        "model": cfg.model or DEFAULT_NAME,
        "config": asdict(cfg),
        "tasks": task_names,
        "rows": rows,
        "seconds": time.time() - t0,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
