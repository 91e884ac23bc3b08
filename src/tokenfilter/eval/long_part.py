"""The main job's long-input part: RULER's synthetic tasks (:mod:`tokenfilter.longctx.ruler`) at one length, a few
samples per task, answered by dense and by the default at the run's highest ratio, with the KV held beside the scores
(in a run whose methods include the default, ``token-filter``).

Why the main job has it: the zero-shot prompts are shorter than the recent window (64 tokens, always held and read),
so there the default keeps nearly every entry and skips almost nothing; a long input is where the method holds less
KV and skips attention. The part is kept in ``OUTPUT/long`` (``ruler.json``) so that ``--resume`` reuses what it
finished; ``tokenfilter eval --tasks ruler`` runs the full RULER comparison on its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenfilter.eval.resume import LONG_DIR

# one task of each kind: a needle in an essay, among other needles, with several values, several asked at once,
# variable tracking and common words (RULER's 10 tasks take ~2 minutes more per method on 2 CPU cores)
DEFAULT_TASKS = ("niah_single_2", "niah_multikey_2", "niah_multivalue", "niah_multiquery", "vt", "cwe")
DEFAULT_LENGTH = 4096


@dataclass(frozen=True)
class LongPart:
    """What the long-input part runs: ``samples`` per task (0: no long part), prompts of at most ``length`` tokens
    (clipped to the model's positions minus the answer's room), ``tasks`` (RULER names or prefixes; None: the
    default six)."""

    samples: int = 1
    length: int = DEFAULT_LENGTH
    tasks: tuple[str, ...] | None = None


def includes_default(methods: Iterable[str]) -> bool:
    """Whether a run's methods include the default (``token-filter``), the method the long part is for."""
    return "token-filter" in set(methods)


def long_methods(ratios: list[float]) -> dict[str, object | None]:
    """Dense and the default at the highest of the run's ratios (the others would double the part's time)."""
    from tokenfilter.eval.methods import filter_for

    ratio = max(ratios)
    return {"dense": None, f"token-filter-{ratio}": filter_for("token-filter", ratio)}


def method_key(method: str, ratio: float) -> str:
    """The long part's name of an evaluation row (``dense``, ``token-filter-0.5``)."""
    return "dense" if method == "dense" else f"{method}-{ratio}"


def run_long_part(model: object, tok: object, part: LongPart, ratios: list[float], fingerprint: dict,
                  output: Path | None, existing: str, progress: bool = True) -> dict | None:
    """The part's result (``run_ruler``'s: per method the scores, KV held, realized ratio and seconds), or None when
    ``part.samples`` is 0. ``existing == "resume"``: the methods an earlier run in ``output`` finished on the same
    prompts, model and settings (``fingerprint``) are kept."""
    if not part.samples:
        return None
    from tokenfilter.longctx import ruler
    from tokenfilter.longctx.ruler_runner import build_samples, run_ruler, saved_result
    from tokenfilter.longctx.runner import max_positions

    tasks = ruler.resolve_tasks(list(part.tasks or DEFAULT_TASKS))
    samples, chat = build_samples(tok, tasks, [part.length], part.samples, max_positions(model), ruler.DEFAULT_SEED,
                                  progress)
    out_dir = output / LONG_DIR if output is not None else None
    previous = saved_result(out_dir) if existing == "resume" else None
    return run_ruler(model, tok, long_methods(ratios), samples, out_dir, progress, seed=ruler.DEFAULT_SEED,
                     chat=chat, previous=previous, run_key=fingerprint)


def summary_rows(long: dict) -> list[list[str]]:
    """One row per method: name, average score ± one standard error, KV held (% of dense), realized ratio, seconds."""
    length = str(long["config"]["lengths"][0])
    rows = []
    for name, m in long["methods"].items():
        s = m["lengths"][length]
        rows.append([name, f"{s['average']:.1f} ± {s['se']:.1f}", f"{100 * s['kv_held']:.1f}%", f"{s['ratio']:.3f}",
                     f"{s['seconds']:.0f}"])
    return rows


SUMMARY_HEAD = ["method", "RULER avg ± se", "KV held", "realized", "seconds"]


def describe(long: dict) -> str:
    """One sentence: what the part ran."""
    cfg = long["config"]
    return (f"Long inputs: RULER's {', '.join(cfg['tasks'])} at {cfg['lengths'][0]} tokens, "
            f"{cfg['samples_per_task']} sample(s) each (score x100: the share of the answers found; KV held: at the "
            "end of each answer, a share of dense's over all layers).")
