"""The benchmark's targets: measured and reported, never asserted.

Each target states which side is better (``better``: ``"lower"`` or ``"higher"``) and its bound; it is met when
every value it reads lies on the better side of the bound (the bound included), and its worst value is the one
farthest to the other side. The goal text is written from these two fields, never read back. Each target is
evaluated on wall-clock ratios (``met``, ``worst``) and, as a check against a busy machine, on process CPU-time
ratios (``met_cpu``, ``worst_cpu``).

The efficiency and not-slower targets read the measured default's cells (``Target.of_default``): the KV side's
(method ``kv``, ``TokenFilter(ratio=r)``, the library default) whenever the run measured that mode, else the query
side's (method ``filter``: a ``--modes query`` run, or results from before the KV side became the default). Their
entry says which, under ``reads``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

Better = Literal["lower", "higher"]
BETTER: tuple[Better, ...] = ("lower", "higher")
CLOCKS = (("", ""), ("cpu_", "_cpu"))  # (key prefix in a cell: wall clock, process CPU time; suffix in a target)
KV_EXACT = "KV bytes saved == dropped entries x entry bytes, exactly"


def _check_better(better: str) -> None:
    if better not in BETTER:
        raise ValueError(f"better must be one of {BETTER}, not {better!r}")


def meets(value: float, better: Better, bound: float) -> bool:
    """Is ``value`` on the better side of ``bound`` (or on it)?"""
    _check_better(better)
    return value <= bound if better == "lower" else value >= bound


def _where(c: dict) -> str:
    return f"B={c['batch']} T={c['length']} {c['label']}"


@dataclass(frozen=True)
class Target:
    """A bound on one value of a set of cells."""

    name: str
    better: Better
    bound: float
    select: Callable[[dict], bool]  # the cells it reads
    value: Callable[[dict, str], float | None]  # a cell's value on a clock ("": wall, "cpu_": CPU time); None: none
    note: str = ""  # what the value is, in the goal text
    of_default: bool = False  # read only the measured default's cells (``default_method``), named under "reads"

    def __post_init__(self) -> None:
        _check_better(self.better)

    @property
    def goal(self) -> str:
        op = "<=" if self.better == "lower" else ">="
        return f"{op} {self.bound}" + (f" ({self.note})" if self.note else "")

    def worst(self, values: list[tuple[str, float]]) -> tuple[str, float]:
        """The ``(where, value)`` farthest to the worse side."""
        pick = max if self.better == "lower" else min
        return pick(values, key=lambda wv: wv[1])

    def evaluate(self, result: dict) -> dict:
        entry: dict = {"target": self.name, "goal": self.goal, "better": self.better}
        chosen = [c for c in result["cells"] if self.select(c)]
        if self.of_default:
            entry["reads"] = default_method(result)
            chosen = [c for c in chosen if c["method"] == entry["reads"]]
        for clock, suffix in CLOCKS:
            vals = [(_where(c), self.value(c, clock)) for c in chosen]
            vals = [(w, v) for w, v in vals if v is not None]
            if not vals:
                entry.update({f"met{suffix}": None, f"worst{suffix}": None, f"where{suffix}": None})
                entry.setdefault("misses", [])  # (as the results have always had it: no "misses_cpu" here)
                continue
            misses = [(w, v) for w, v in vals if not meets(v, self.better, self.bound)]
            where, worst = self.worst(vals)
            entry.update({f"met{suffix}": not misses, f"worst{suffix}": worst, f"where{suffix}": where})
            entry[f"misses{suffix}"] = [{"where": w, "value": v} for w, v in misses]
            entry[f"values{suffix}"] = [{"where": w, "value": v} for w, v in vals]
        return entry


@dataclass(frozen=True)
class ExactKVTarget:
    """Every KV check exact: the value is the share of exact checks, higher is better, and all of them must be."""

    name: str = KV_EXACT
    better: Better = "higher"
    bound: float = 1.0
    goal: str = "exact"

    def __post_init__(self) -> None:
        _check_better(self.better)

    def evaluate(self, result: dict) -> dict:
        checks = result.get("kv_checks", [])
        share = sum(bool(k["exact"]) for k in checks) / len(checks) if checks else None
        return {
            "target": self.name,
            "goal": self.goal,
            "better": self.better,
            "met": meets(share, self.better, self.bound) if share is not None else None,
            "worst": None,
            "where": None,
            "misses": [
                {"where": f"B={k['batch']} T={k['length']} {k.get('label') or k['ratio']}",
                 "value": k["saved_bytes_measured"]}
                for k in checks
                if not k["exact"]
            ],
            "values": [],
        }


def default_method(result: dict) -> str:
    """The method whose cells stand for "the filter" in the targets: ``kv`` (the KV side, the library default) when
    the run measured it, else ``filter`` (the query side)."""
    return "kv" if any(c["method"] == "kv" for c in result["cells"]) else "filter"


# -- the values the targets read --------------------------------------------------------------------------
def overhead(phase: str) -> Callable[[dict, str], float | None]:
    """Extra time over dense, as a fraction of dense time: from the paired measurement where the cell has one (the
    finer one), else from the speed ratio."""

    def value(c: dict, clock: str) -> float | None:
        paired = c.get("paired")
        if paired is not None:
            p = paired[phase] if clock == "" else paired[phase]["cpu"]
            return p["extra"]
        s = c[phase].get(f"{clock}speedup")
        return 1 / s - 1 if s else None

    return value


def efficiency(phase: str) -> Callable[[dict, str], float | None]:
    """measured / ideal, from the paired measurement where the cell has one (it resolves what 3 rounds cannot)."""

    def value(c: dict, clock: str) -> float | None:
        paired = c.get("paired")
        ideal = c[phase].get("ideal")
        if paired is not None and ideal:
            p = paired[phase] if clock == "" else paired[phase]["cpu"]
            return 1 / (1 + p["extra"]) / ideal if p["extra"] is not None else None
        return c[phase].get(f"{clock}efficiency")

    return value


def speedup(phase: str) -> Callable[[dict, str], float | None]:
    """The speed ratio against dense (dense time / method time)."""
    return lambda c, clock: c[phase].get(f"{clock}speedup")


def paired_speedup(phase: str) -> Callable[[dict, str], float | None]:
    """The speed ratio against dense from the paired measurement where the cell has one, else from the rounds."""

    def value(c: dict, clock: str) -> float | None:
        paired = c.get("paired")
        if paired is not None:
            extra = (paired[phase] if clock == "" else paired[phase]["cpu"])["extra"]
            return None if extra is None else 1 / (1 + extra)
        return c[phase].get(f"{clock}speedup")

    return value


def byte_efficiency(c: dict, clock: str) -> float | None:
    """Decode's speed ratio (paired where measured) / its byte ideal (the bytes a step reads, dense over filtered)."""
    ideal, speed = c["decode"].get("byte_ideal"), paired_speedup("decode")(c, clock)
    return speed / ideal if ideal and speed is not None else None


def _targets() -> tuple[Target | ExactKVTarget, ...]:
    phases = ("prefill", "decode")
    is_overhead = lambda c: c["method"] == "overhead"
    # (of_default: these two read the measured default's cells only, the KV side's when it ran: default_method)
    long_filtered = lambda c: c["length"] >= 2048
    filtered = lambda c: c["length"] >= 1024 and (c["ratio"] or 0) >= 0.3
    short = lambda c: c["length"] == 512 and (c["ratio"] or 0) >= 0.3
    longest = lambda c: c["length"] >= 4096 and (c["ratio"] or 0) >= 0.3
    return (
        *(Target(f"overhead with nothing filtered, {p}", "lower", 0.03, is_overhead, overhead(p),
                 "fraction of dense time") for p in phases),
        *(Target(f"efficiency (measured / ideal) at 2048+ tokens, {p}", "higher", 0.8, long_filtered, efficiency(p),
                 of_default=True) for p in phases),
        *(Target(f"not slower than dense (ratio >= 0.3, context >= 1024), {p}", "higher", 1.0, filtered, speedup(p),
                 "speed ratio", of_default=True) for p in phases),
        Target("prefill at 512 tokens (ratio >= 0.3)", "higher", 0.97, short, paired_speedup("prefill"),
               "speed ratio", of_default=True),
        Target("prefill FLOP efficiency at 4096+ tokens (ratio >= 0.3)", "higher", 0.9, longest,
               efficiency("prefill"), "measured / FLOP ideal", of_default=True),
        Target("decode byte efficiency at 4096+ tokens (ratio >= 0.3)", "higher", 0.9, longest, byte_efficiency,
               "measured / byte ideal", of_default=True),
        ExactKVTarget(),
    )


TARGETS = _targets()


def evaluate_targets(result: dict, targets: tuple[Target | ExactKVTarget, ...] = TARGETS) -> list[dict]:
    """Every target on the cells and KV checks of ``result``, in order."""
    return [t.evaluate(result) for t in targets]
