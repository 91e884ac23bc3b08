"""Run RULER's synthetic tasks (:mod:`tokenfilter.longctx.ruler`) for dense and filtered models; the tables.

Every method answers every sample greedily within its task's answer budget. A filter (a ``TokenFilter``, or a
``SlidingWindowShare`` sized on each prompt) is applied around each answer on its own, so that its statistics, the
realized ratio and the KV held at the end of the answer (a share of dense's, all layers), are per prompt.

Example: ``run_ruler(model, tok, {"dense": None, "token-filter-0.5": TokenFilter(ratio=0.5)},
RulerBuilder(tok).samples(["niah_single_1", "vt"], [1024], 2), output_dir=Path("results/eval/ruler"))`` returns the
scores and writes ``ruler.json`` and ``ruler.md``.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tokenfilter.longctx.ruler import DEFAULT_SEED, TASKS, RulerBuilder, RulerSample
from tokenfilter.longctx.runner import PerInput, _answerer, _config_dict, clip_lengths, max_positions

JSON_NAME, MD_NAME = "ruler.json", "ruler.md"
# settings that change what a method's scores mean; a resumed run keeps a method only where they are all equal
_SAME_RUN_KEYS = ("tasks", "lengths", "samples_per_task", "seed", "chat", "prompts_sha256", "max_new_tokens", "run")


def build_samples(
    tokenizer: object,
    tasks: Sequence[str],
    lengths: Sequence[int],
    n: int,
    positions: int | None = None,
    seed: int = DEFAULT_SEED,
    progress: bool = False,
    haystack: str | None = None,
    words: Sequence[str] | None = None,
) -> tuple[list[RulerSample], bool]:
    """``n`` samples of every task at every length (length-major, then task, then index), the lengths clipped so that
    a prompt and the longest answer fit ``positions`` (None: unclipped); and whether they use the chat template."""
    room = max(TASKS[t].max_new_tokens for t in tasks)
    lengths = clip_lengths(lengths, positions - room if positions else None)
    builder = RulerBuilder(tokenizer, haystack, words, seed=seed)
    plan = [(t, length, i) for length in lengths for t in tasks for i in range(n)]
    samples = [builder.build(t, length, i)
               for t, length, i in tqdm(plan, desc="ruler prompts", leave=False, disable=not progress)]
    return samples, builder.chat


def saved_result(out_dir: Path | None) -> dict | None:
    """The ``ruler.json`` an earlier run wrote in ``out_dir`` (for ``previous``), or None."""
    import json

    path = None if out_dir is None else Path(out_dir) / JSON_NAME
    return json.loads(path.read_text(encoding="utf-8")) if path is not None and path.exists() else None


def mean_se(xs: Sequence[float]) -> tuple[float, float]:
    """The mean and its standard error (sample standard deviation / sqrt(n); 0 for one value, nan for none)."""
    n = len(xs)
    if not n:
        return float("nan"), float("nan")
    m = sum(xs) / n
    if n < 2:
        return m, 0.0
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)


def summarize(rows: Sequence[Mapping]) -> dict[str, dict]:
    """Per length (a string key, as JSON keeps it): per task the mean score (x100), its standard error and ``n``;
    ``average``: the mean over the tasks, ``se`` its standard error, ``sqrt(sum se_t^2) / n_tasks`` (with a single
    sample in some task, the standard error of the task means); the mean KV held (share of dense) and realized
    ratio over the samples."""
    out: dict[str, dict] = {}
    for length in dict.fromkeys(r["length"] for r in rows):
        here = [r for r in rows if r["length"] == length]
        tasks: dict[str, dict] = {}
        for task in dict.fromkeys(r["task"] for r in here):
            score, se = mean_se([100.0 * r["score"] for r in here if r["task"] == task])
            tasks[task] = {"score": score, "se": se, "n": sum(r["task"] == task for r in here)}
        means = [t["score"] for t in tasks.values()]
        average, spread = mean_se(means)
        if all(t["n"] >= 2 for t in tasks.values()):
            spread = math.sqrt(sum(t["se"] ** 2 for t in tasks.values())) / len(tasks)
        out[str(length)] = {
            "tasks": tasks,
            "average": average,
            "se": spread,
            "n": len(here),
            "kv_held": mean_se([r["kv_held"] for r in here])[0],
            "ratio": mean_se([r["ratio"] for r in here])[0],
            "seconds": sum(r["seconds"] for r in here),
        }
    return out


def prompts_sha256(samples: Sequence[RulerSample]) -> str:
    """A fingerprint of the prompts (their ids and token ids): a resumed run reuses only results on the same ones."""
    h = hashlib.sha256()
    for s in samples:
        h.update(f"{s.id}:{','.join(map(str, s.input_ids))};".encode())
    return h.hexdigest()


def run_method(
    model: object, tokenizer: object, method: object | None, samples: Sequence[RulerSample], progress: bool, desc: str
) -> dict:
    """One method's answers: per sample its output, score, seconds, KV held and realized ratio; then the summary."""
    t0 = time.perf_counter()
    sized = PerInput(model, method) if method is not None else None
    answer = _answerer(model, sized)
    rows = []
    for s in tqdm(samples, desc=desc, disable=not progress, leave=False):
        t1 = time.perf_counter()
        output = answer(tokenizer, s.input_ids, s.max_new_tokens)
        stats = sized.stats[-1] if sized is not None else None
        rows.append(
            {
                "task": s.task,
                "length": s.length,
                "index": s.index,
                "tokens": s.tokens,
                "answers": list(s.answers),
                "output": output,
                "score": s.score(output),
                "seconds": round(time.perf_counter() - t1, 2),
                "kv_held": float(stats["kv_held_fraction"]) if stats else 1.0,
                "ratio": float(stats["ratio"]) if stats else 0.0,
            }
        )
    return {
        "filter": _config_dict(method),
        "lengths": summarize(rows),
        "samples": rows,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def run_ruler(
    model: object,
    tokenizer: object,
    methods: Mapping[str, object | None],
    samples: Sequence[RulerSample],
    output_dir: Path | str | None = None,
    progress: bool = True,
    *,
    seed: int | None = None,
    chat: bool | None = None,
    previous: Mapping | None = None,
    command: str | None = None,
    run_key: Mapping | None = None,
) -> dict:
    """Every method (``None``: the dense model) on every sample. ``seed`` / ``chat``: how the samples were built
    (recorded); ``previous``: an earlier result (its ``ruler.json``): a method it holds with the same filter on the
    same prompts and settings (and the same ``run_key``: what else the caller's results depend on, e.g. the model and
dtype) is kept instead of run again. With ``output_dir``, writes ``ruler.json`` after every
    method (an interrupted run keeps what it finished) and ``ruler.md`` at the end."""
    if not samples:
        raise ValueError("No RULER samples to run.")
    tasks = list(dict.fromkeys(s.task for s in samples))
    lengths = list(dict.fromkeys(s.length for s in samples))
    per_task = {t: sum(s.task == t for s in samples) // len(lengths) for t in tasks}
    result: dict = {
        "config": {
            "tasks": tasks,
            "lengths": lengths,
            "samples_per_task": max(per_task.values()),
            "seed": seed,
            "chat": chat,
            "max_new_tokens": {t: TASKS[t].max_new_tokens for t in tasks},
            "tokens": {s.id: s.tokens for s in samples},
            "prompts_sha256": prompts_sha256(samples),
            "max_position_embeddings": max_positions(model),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            **({"run": dict(run_key)} if run_key is not None else {}),
        },
        "methods": {},
        "files": [],
    }
    if command:
        result["command"] = command
    out_dir = Path(output_dir) if output_dir is not None else None
    kept = reusable_methods(previous, result["config"])
    bar = tqdm(methods.items(), desc="methods", disable=not progress or len(methods) < 2)
    for name, method in bar:
        if name in kept and kept[name].get("filter") == _config_dict(method):
            result["methods"][name] = kept[name]
            result.setdefault("reused", []).append(name)
        else:
            result["methods"][name] = run_method(model, tokenizer, method, samples, progress, f"ruler [{name}]")
        if out_dir is not None:
            _save(result, out_dir)
    if out_dir is not None:
        result["files"] = [str(out_dir / JSON_NAME), str(out_dir / MD_NAME)]
        _save(result, out_dir)
        (out_dir / MD_NAME).write_text(markdown(result), encoding="utf-8")
    return result


def reusable_methods(previous: Mapping | None, config: Mapping) -> dict:
    """The methods of ``previous`` (an earlier ``run_ruler`` result) measured on the prompts ``config`` describes."""
    if not previous:
        return {}
    old = previous.get("config", {})
    if any(old.get(k) != config.get(k) for k in _SAME_RUN_KEYS):
        return {}
    return dict(previous.get("methods", {}))


def _save(result: Mapping, out_dir: Path) -> None:
    import json

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / JSON_NAME).write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")


def table(result: Mapping, length: int | str) -> str:
    """Markdown: one row per method, the score of every task (x100), the average ± one standard error, the KV held
    at the end of the answer (% of dense, all layers), the realized ratio and the seconds, at one length."""
    tasks = list(result["config"]["tasks"])
    head = ["method", *tasks, "average ± se", "KV held (% dense)", "realized ratio", "seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in result["methods"].items():
        s = m["lengths"].get(str(length))
        if s is None:
            continue
        cells = [f"{s['tasks'][t]['score']:.1f}" if t in s["tasks"] else "-" for t in tasks]
        lines.append("| " + " | ".join([name, *cells, f"{s['average']:.1f} ± {s['se']:.1f}",
                                         f"{100 * s['kv_held']:.1f}", f"{s['ratio']:.3f}", f"{s['seconds']:.0f}"])
                     + " |")
    return "\n".join(lines)


def markdown(result: Mapping, heading: str = "#") -> str:
    """The report: what ran, then one table per length (``heading``: the title's level; ``"##"`` for a section of a
    results file)."""
    cfg = result["config"]
    budgets = ", ".join(f"{t} {n}" for t, n in cfg["max_new_tokens"].items())
    lines = [
        f"{heading} RULER (synthetic tasks)",
        "",
        *([f"Generated by `{result['command']}`.", ""] if result.get("command") else []),
        f"{cfg['samples_per_task']} sample(s) per task and length, seed {cfg['seed']}, "
        f"{'chat template' if cfg['chat'] else 'raw prompts'}; each prompt at most the length in tokens, greedy "
        f"answers (new tokens: {budgets}). Score: RULER's string match, the share of the reference strings the answer "
        "contains (x100), per task the mean over its samples; average: the mean over the tasks, ± one standard error. "
        "KV held: at the end of the answer, a share of dense's over all layers, mean over the prompts (a filter is "
        "applied to each prompt on its own).",
        "",
    ]
    for length in cfg["lengths"]:
        lines += [f"{heading}# {length} tokens", "", table(result, length), ""]
    return "\n".join(lines)
