"""RULER's synthetic tasks (Hsieh et al., 2024, "RULER: What's the Real Context Size of Your Long-Context Language
Models?"), generated offline and scored with RULER's string match.

Tasks (:data:`TASKS`, RULER's names; its QA and frequent-words tasks are left out):

* ``niah_single_1`` / ``_2`` / ``_3``: one needle ``One special magic number for <key> is <value>.``; the haystack is
  a repeated noise text (1), the essays (2), the essays with a UUID as the value (3).
* ``niah_multikey_1``: four needles with different keys in the essays, one asked about (the other three distract);
  ``niah_multikey_2``: the haystack is made of needles with other keys (numbers); ``niah_multikey_3``: the same with
  UUID keys and values.
* ``niah_multivalue``: four needles for one key, all four values must be returned.
* ``niah_multiquery``: four needles with different keys, all four keys are asked about.
* ``vt`` (variable tracking): a chain ``VAR A = 12345``, ``VAR B = VAR A``, ... (4 hops) hidden in the noise text;
  every variable that holds the value must be returned.
* ``cwe`` (common words extraction): a numbered list of words where 10 words occur far more often than the others
  (30 times against 3 from 4096 tokens on, 6 against 1 below); the 10 must be returned.

Material: the essays (``../shared/data/needle-haystack``, concatenated in file-name order, as the needle builder
reads them), and words taken from WikiText-2 (``../shared/data/wikitext-2/wiki.test.raw.txt``: the lower-case words
of 4 to 10 letters that occur at least 3 times). Keys are two such words joined by a hyphen, numbers have 7 digits,
UUIDs are version-4 UUIDs from the sample's random generator. Every sample draws from ``random.Random`` seeded with
``"<seed>/<task>/<length>/<index>"``: the same seed gives the same prompts on every run and machine.

Sizing: the whole model input (chat template, instruction, haystack, question, start of the answer) is at most the
asked length in tokens of the model's tokenizer, and as long as the haystack's unit allows: the largest number of
haystack units (essay words, noise sentences, distractor needles, list entries) that fits, as RULER sizes its
prompts (RULER also leaves room for the answer inside the length; here the answer comes on top, as for the needle
prompts). Needles and assignments sit at sentence boundaries, at depths drawn from 41 evenly spaced ones.

Chat: the prompt is the user turn of the tokenizer's chat template when it has one (as the needle prompts) and the
start of the answer opens the assistant turn; without a template, the raw text, a line break and the start of the
answer, with the tokenizer's special tokens.

Scoring (:func:`string_match_all`): the fraction of the reference strings that occur, case-insensitively, in the
prediction (RULER's ``string_match_all``; a single-answer task scores 0 or 1); a task's score is the mean over its
samples, reported x100.
"""

from __future__ import annotations

import bisect
import functools
import random
import re
import string
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tokenfilter.longctx.longbench import has_chat_template
from tokenfilter.longctx.needle import HaystackError, load_haystack_text

REPO = Path(__file__).resolve().parents[3]
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2" / "wiki.test.raw.txt"
DEFAULT_SEED = 42
DEFAULT_LENGTHS = (4096,)
DEPTHS = tuple(i / 40 for i in range(41))  # where needles may go: 0, 2.5%, ..., 100% of the haystack

# The noise haystack: these five sentences over and over.
NOISE = ("The hills are quiet.", "The river keeps flowing.", "The clouds drift by.", "Morning comes again.",
         "Nothing here has changed.")
_SENTENCE_END = re.compile(r"""[.!?]['")\]]*$""")


@dataclass(frozen=True)
class RulerTask:
    """One RULER task: its family (``niah``, ``vt``, ``cwe``), its answer budget (greedy new tokens) and its
    settings."""

    family: str
    max_new_tokens: int
    haystack: str = "essay"  # niah: "noise", "essay" or "needle" (needles with other keys); vt: "noise"
    key: str = "word"  # niah: "word" (two words joined by a hyphen) or "uuid"
    value: str = "number"  # niah: "number" (7 digits) or "uuid"
    keys: int = 1  # niah: needles with distinct keys (those not asked about distract)
    values: int = 1  # niah: values per key (every one must be returned)
    queries: int = 1  # niah: keys asked about (all their values must be returned)
    chains: int = 1  # vt: chains of assignments (the first is asked about; the others distract)
    hops: int = 4  # vt: assignments after the first in a chain
    common: int = 10  # cwe: the words to return


TASKS: dict[str, RulerTask] = {
    "niah_single_1": RulerTask("niah", 32, haystack="noise"),
    "niah_single_2": RulerTask("niah", 32),
    "niah_single_3": RulerTask("niah", 64, value="uuid"),
    "niah_multikey_1": RulerTask("niah", 32, keys=4),
    "niah_multikey_2": RulerTask("niah", 32, haystack="needle"),
    "niah_multikey_3": RulerTask("niah", 64, haystack="needle", key="uuid", value="uuid"),
    "niah_multivalue": RulerTask("niah", 64, values=4),
    "niah_multiquery": RulerTask("niah", 64, keys=4, queries=4),
    "vt": RulerTask("vt", 32, haystack="noise"),
    "cwe": RulerTask("cwe", 96),
}


def resolve_tasks(names: Sequence[str] | None) -> list[str]:
    """Task names in the order of :data:`TASKS` (``None``, empty or ``all``: every task); a prefix such as ``niah``
    or ``niah_multikey`` names every task it starts."""
    if not names or "all" in names:
        return list(TASKS)
    chosen = []
    for name in names:
        hits = [t for t in TASKS if t == name or t.startswith(f"{name}_") or (name == "niah" and t.startswith(name))]
        if not hits:
            raise ValueError(f"Unknown RULER task {name!r}; choose from {', '.join(TASKS)} (or all, niah).")
        chosen += [t for t in hits if t not in chosen]
    return [t for t in TASKS if t in chosen]


# ---- scoring ---------------------------------------------------------------------------------------
_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess(prediction: str) -> str:
    """RULER's clean-up of a prediction: stripped, control characters made line breaks."""
    return _CONTROL.sub("\n", prediction.strip()).strip()


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """The fraction of ``references`` that occur in ``prediction``, ignoring case (RULER's ``string_match_all`` for
    one sample, in [0, 1])."""
    if not references:
        raise ValueError("string_match_all needs at least one reference.")
    text = postprocess(prediction).lower()
    return sum(r.lower() in text for r in references) / len(references)


# ---- material --------------------------------------------------------------------------------------
class WordsError(ValueError):
    """The word list for keys and the common-words task is missing; the message says what to pass."""


@functools.cache
def wikitext_words(path: str | None = None, min_count: int = 3) -> tuple[str, ...]:
    """The sorted lower-case words of 4 to 10 letters that occur at least ``min_count`` times in ``path`` (default:
    WikiText-2 test), the vocabulary of keys and of the common-words task."""
    p = Path(path) if path else WIKITEXT
    if not p.is_file():
        raise WordsError(f"{p} does not exist; pass a text file to draw words from (../shared/data/wikitext-2).")
    counts: dict[str, int] = {}
    for w in p.read_text(encoding="utf-8").split():
        if 4 <= len(w) <= 10 and w.isascii() and w.isalpha() and w.islower():
            counts[w] = counts.get(w, 0) + 1
    words = tuple(sorted(w for w, n in counts.items() if n >= min_count))
    if len(words) < 100:
        raise WordsError(f"{p} gives {len(words)} words; give a longer text (at least 100 distinct words).")
    return words


class _Essay:
    """The essays as a stream of words (repeated when a prompt needs more), with the word indices where a sentence
    starts."""

    def __init__(self, text: str) -> None:
        self.base = text.split()
        if not self.base:
            raise HaystackError("The essay haystack is empty; pass a folder of .txt essays.")
        self.words: list[str] = []
        self.starts: list[int] = []

    def take(self, n: int) -> list[str]:
        while len(self.words) < n:
            for w in self.base:
                if not self.words or _SENTENCE_END.search(self.words[-1]):
                    self.starts.append(len(self.words))
                self.words.append(w)
        return self.words[:n]

    def boundary(self, target: float, n: int) -> int:
        """The sentence start in ``[0, n]`` (``n``: after the last word) nearest to word index ``target``."""
        i = bisect.bisect_left(self.starts, target)
        candidates = [s for s in self.starts[max(0, i - 1) : i + 1] if s <= n] + [n]
        return min(candidates, key=lambda i: (abs(i - target), i))


def _weave(units: Sequence[str], inserts: Sequence[tuple[int, str]], sep: str) -> str:
    """``units`` joined by ``sep`` with each ``(position, text)`` placed before unit ``position`` (the order of
    ``inserts`` kept among equal positions; ``len(units)``: at the end)."""
    ordered = sorted(enumerate(inserts), key=lambda x: (x[1][0], x[0]))
    out: list[str] = []
    j = 0
    for i, unit in enumerate(units):
        while j < len(ordered) and ordered[j][1][0] <= i:
            out.append(ordered[j][1][1])
            j += 1
        out.append(unit)
    out += [text for _, (_, text) in ordered[j:]]
    return sep.join(out)


def _join_names(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + f" and {names[-1]}"


# ---- drafts: a sample's content, drawn once, laid out for any haystack size -------------------------
@dataclass
class _Parts:
    before: str  # instruction (and, for cwe, the worked example), up to the haystack
    context: str  # the haystack with what is hidden in it
    after: str  # the question
    prefix: str  # the start of the answer

    @property
    def user(self) -> str:
        return self.before + self.context + self.after


@dataclass
class _Draft:
    """``parts(n)``: the prompt with ``n`` haystack units, for ``min_units <= n <= max_units`` (None: no bound)."""

    parts: Callable[[int], _Parts]
    answers: list[str]
    meta: dict
    min_units: int = 0
    max_units: int | None = None


def _number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


class RulerBuilder:
    """Builds RULER samples for one tokenizer: ``build(task, length, index)``, ``samples(tasks, lengths, n)``."""

    def __init__(
        self,
        tokenizer: object,
        haystack: str | None = None,
        words: Sequence[str] | None = None,
        *,
        chat: bool = True,
        seed: int = DEFAULT_SEED,
    ) -> None:
        """``haystack``: the essay text (default: the essays folder, read on first need); ``words``: the vocabulary
        of keys and list words (default :func:`wikitext_words`)."""
        self.tokenizer = tokenizer
        self.chat = chat and has_chat_template(tokenizer)
        self.seed = seed
        self._haystack = haystack
        self._essay: _Essay | None = None
        self.words = tuple(words) if words is not None else wikitext_words()

    @property
    def essay(self) -> _Essay:
        if self._essay is None:
            self._essay = _Essay(self._haystack if self._haystack is not None else load_haystack_text())
        return self._essay

    # ---- rendering ------------------------------------------------------------------------------
    def render(self, user: str, prefix: str) -> str:
        """The whole model input as text: ``user`` as the user turn and ``prefix`` opening the answer."""
        if self.chat:
            rendered = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False
            )
            return f"{rendered}{prefix}"
        return f"{user}\n{prefix}"

    def encode(self, text: str) -> list[int]:
        # The chat template writes its own special tokens; raw text gets the tokenizer's (e.g. BOS).
        return list(self.tokenizer(text, add_special_tokens=not self.chat)["input_ids"])

    def _count(self, parts: _Parts) -> int:
        return len(self.encode(self.render(parts.user, parts.prefix)))

    # ---- building -------------------------------------------------------------------------------
    def build(self, task: str, length: int, index: int = 0) -> RulerSample:
        """Sample ``index`` of ``task`` at ``length`` tokens (at most; as close as the haystack's unit allows)."""
        if task not in TASKS:
            raise ValueError(f"Unknown RULER task {task!r}; choose from {', '.join(TASKS)}.")
        spec = TASKS[task]
        seed = f"{self.seed}/{task}/{length}/{index}"
        drafts = {"niah": self._niah, "vt": self._vt, "cwe": self._cwe}[spec.family](spec, seed, length)
        shortest = None
        for draft in drafts:  # the first whose smallest prompt fits (cwe: lower word frequencies on short prompts)
            smallest = self._count(draft.parts(draft.min_units))
            shortest = smallest if shortest is None else min(shortest, smallest)
            if smallest <= length:
                break
        else:
            raise ValueError(f"RULER {task}: {length} tokens is too short, its smallest prompt takes {shortest}.")
        n, next_tokens = self._fit(draft, length)
        parts = draft.parts(n)
        text = self.render(parts.user, parts.prefix)
        ids = self.encode(text)
        at = text.find(parts.user)
        if at < 0:
            raise ValueError("The chat template changes the user text; build with chat=False.")
        end = at + len(parts.before) + len(parts.context)
        context_end = _common_prefix(ids, self.encode(text[:end]))
        # units: the haystack's size; next_tokens: the input's length with one unit more (above ``length``)
        meta = {**draft.meta, "units": n, "next_tokens": next_tokens}
        return RulerSample(task, index, length, ids, list(draft.answers), spec.max_new_tokens, context_end, text, meta)

    def samples(self, tasks: Sequence[str], lengths: Sequence[int], n: int) -> list[RulerSample]:
        """``n`` samples of every task at every length (length-major, then task, then index)."""
        return [self.build(t, length, i) for length in lengths for t in tasks for i in range(n)]

    def _fit(self, draft: _Draft, length: int) -> tuple[int, int | None]:
        """The largest haystack size whose prompt is at most ``length`` tokens, and the prompt's count with one unit
        more (None at the end of the material). The count grows with the size but not strictly: a binary search, then
        a look a few units further."""
        counts: dict[int, int] = {}

        def count(k: int) -> int:
            if k not in counts:
                counts[k] = self._count(draft.parts(k))
            return counts[k]

        lo, cap = draft.min_units, draft.max_units
        step = 16 if cap is None else max(1, min(16, cap - lo))
        per_unit = max((count(lo + step) - count(lo)) / step, 0.25) if cap is None or cap > lo else 1.0
        hi = lo + int((length - count(lo)) / per_unit * 1.1) + 2
        while True:
            if cap is not None and hi >= cap:
                if count(cap) <= length:
                    raise ValueError(f"Not enough material for {length} tokens: the haystack has {cap} units at most.")
                hi = cap
                break
            if count(hi) > length:
                break
            lo, hi = hi, 2 * hi
        while hi - lo > 1:  # count(lo) <= length < count(hi)
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if count(mid) <= length else (lo, mid)
        k = lo + 1
        while k <= lo + 3 and (cap is None or k <= cap):  # no size within 3 units above the result fits
            if count(k) <= length:
                lo = k
            k += 1
        return lo, (count(lo + 1) if cap is None or lo < cap else None)

    # ---- needle in a haystack ---------------------------------------------------------------------
    def _key(self, rng: random.Random, kind: str) -> str:
        return _uuid(rng) if kind == "uuid" else f"{rng.choice(self.words)}-{rng.choice(self.words)}"

    def _value(self, rng: random.Random, kind: str) -> str:
        return _uuid(rng) if kind == "uuid" else _number(rng)

    def _niah(self, spec: RulerTask, seed: str, length: int) -> list[_Draft]:
        rng = random.Random(seed)
        taken: set[str] = set()

        def fresh(make: Callable[[], str]) -> str:
            while True:
                x = make()
                if x not in taken:
                    taken.add(x)
                    return x

        keys = [fresh(lambda: self._key(rng, spec.key)) for _ in range(max(spec.keys, spec.queries))]
        values = [[fresh(lambda: self._value(rng, spec.value)) for _ in range(spec.values)] for _ in keys]
        kind = "UUID" if spec.value == "uuid" else "number"
        needles = [f"One special magic {kind} for {k} is {v}." for k, vs in zip(keys, values, strict=True) for v in vs]
        rng.shuffle(needles)
        depths = sorted(rng.sample(DEPTHS, len(needles)))
        asked = rng.sample(range(len(keys)), spec.queries)
        answers = [v for i in asked for v in values[i]]
        query = _join_names([keys[i] for i in asked])
        distractors = _Distractors(rng.getrandbits(64), lambda r: (self._key(r, spec.key), self._value(r, spec.value)),
                                   taken, f"One special magic {kind} for {{}} is {{}}.")
        if len(answers) == 1:
            head = (f"Somewhere in the text below hides a special magic {kind}. Keep it in mind: a question about it "
                    "follows the text.")
            question = f"Question: which special magic {kind} does the text above give for {query}?"
            prefix = f"The special magic {kind} given for {query} is"
        else:
            head = (f"Somewhere in the text below hide several special magic {kind}s. Keep them in mind: a question "
                    "about them follows the text.")
            question = f"Question: which special magic {kind}s does the text above give for {query}? Name every one."
            prefix = f"The special magic {kind}s given for {query} are"

        def parts(n: int) -> _Parts:
            if spec.haystack == "essay":
                units, sep = self.essay.take(n), " "
                where = [self.essay.boundary(d * n, n) for d in depths]
            else:
                units = [NOISE[i % len(NOISE)] for i in range(n)] if spec.haystack == "noise" else distractors.take(n)
                sep = " " if spec.haystack == "noise" else "\n"
                where = [round(d * n) for d in depths]
            context = _weave(units, list(zip(where, needles, strict=True)), sep)
            return _Parts(f"{head}\n\n", context, f"\n\n{question}", prefix)

        meta = {"keys": keys, "asked": [keys[i] for i in asked], "depths": depths, "needles": needles}
        return [_Draft(parts, answers, meta)]

    # ---- variable tracking ------------------------------------------------------------------------
    def _vt(self, spec: RulerTask, seed: str, length: int) -> list[_Draft]:
        rng = random.Random(seed)
        names: list[str] = []
        while len(names) < spec.chains * (spec.hops + 1):
            name = "".join(rng.choices(string.ascii_uppercase, k=5))
            if name not in names:
                names.append(name)
        values: list[str] = []
        while len(values) < spec.chains:
            v = _number(rng, 5)
            if v not in values:
                values.append(v)
        inserts: list[tuple[float, str]] = []
        chains = []
        for c in range(spec.chains):
            chain = names[c * (spec.hops + 1) : (c + 1) * (spec.hops + 1)]
            chains.append(chain)
            lines = [f"VAR {chain[0]} = {values[c]}."]
            lines += [f"VAR {chain[j + 1]} = VAR {chain[j]}." for j in range(spec.hops)]
            inserts += list(zip(sorted(rng.sample(DEPTHS, len(lines))), lines, strict=True))
        head = "Follow the chains of variable assignments hidden in the text below."
        question = f"Question: which variables end up holding the value {values[0]} in the text above? Name every one."
        prefix = (f"Answer: Following the assignments in the text above, {spec.hops + 1} variables hold the value "
                  f"{values[0]}. They are:")

        def parts(n: int) -> _Parts:
            units = [NOISE[i % len(NOISE)] for i in range(n)]
            context = _weave(units, [(round(d * n), line) for d, line in inserts], " ")
            return _Parts(f"{head}\n\n", context, f"\n\n{question}", prefix)

        return [_Draft(parts, list(chains[0]), {"chains": chains, "values": values})]

    # ---- common words extraction ------------------------------------------------------------------
    def _cwe(self, spec: RulerTask, seed: str, length: int) -> list[_Draft]:
        """RULER's frequencies (30 against 3 from 4096 tokens, else 6 against 1); a prompt too short for them takes
        lower ones (down to 2 against 1). From 1024 tokens on, a worked example (3 against 1) comes first, where it
        fits."""
        start = (30, 3) if length >= 4096 else (6, 1)
        plans = list(dict.fromkeys([start, *((f, 1) for f in range(6, 1, -1))]))
        examples = (True, False) if length >= 1024 else (False,)
        return [self._cwe_draft(spec, seed, f_common, f_rare, ex) for f_common, f_rare in plans for ex in examples]

    def _cwe_draft(self, spec: RulerTask, seed: str, f_common: int, f_rare: int, example: bool) -> _Draft:
        k = spec.common
        rng = random.Random(seed)
        pool = rng.sample(self.words, len(self.words))
        common, shown, rare = pool[:k], pool[k : 3 * k], pool[3 * k :]
        head = ("Below is a numbered list of words. A few of them occur far more often than the rest: remember "
                "which ones.")
        question = f"Question: which {k} words occur most often in the list above?"
        prefix = f"Answer: The {k} words that occur most often in the list above are:"

        def listing(entries: list[str]) -> str:
            return "\n".join(f"{i + 1}. {w}" for i, w in enumerate(entries))

        shot = ""
        if example:  # a small worked example: its common words 3 times, its others once
            entries = shown[:k] * 3 + shown[k:]
            random.Random(f"{seed}/example").shuffle(entries)
            shot = f"{head}\n{listing(entries)}\n{question}\n{prefix} {', '.join(shown[:k])}.\n\n"

        def parts(n: int) -> _Parts:
            entries = common * f_common + [rare[i // f_rare] for i in range(n - k * f_common)]
            random.Random(f"{seed}/{n}").shuffle(entries)
            return _Parts(f"{shot}{head}\n", listing(entries), f"\n{question}", prefix)

        meta = {"frequencies": [f_common, f_rare], "example": example}
        return _Draft(parts, list(common), meta, min_units=k * (f_common + f_rare), max_units=k * f_common +
                      len(rare) * f_rare)


class _Distractors:
    """Needles with other keys and values (the ``needle`` haystack), drawn from their own generator as far as a
    prompt needs them (the first ``n`` are the same whatever ``n``)."""

    def __init__(self, seed: int, make: Callable[[random.Random], tuple[str, str]], taken: set[str], form: str):
        self.rng, self.make, self.taken, self.form = random.Random(seed), make, taken, form
        self.lines: list[str] = []

    def take(self, n: int) -> list[str]:
        while len(self.lines) < n:
            key, value = self.make(self.rng)
            if key not in self.taken and value not in self.taken:
                self.lines.append(self.form.format(key, value))
        return self.lines[:n]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@dataclass
class RulerSample:
    """A built prompt: ``input_ids`` (the whole model input, ``text`` decoded as built), the ``answers`` (all must
    be returned), the task's answer budget, and ``context_end``: ``input_ids[:context_end]`` is the instruction and
    the haystack, the rest the question, the end of the user turn and the start of the answer."""

    task: str
    index: int
    length: int  # asked length (the input has at most this many tokens)
    input_ids: list[int]
    answers: list[str]
    max_new_tokens: int
    context_end: int
    text: str = field(repr=False)
    meta: dict = field(default_factory=dict, repr=False)

    @property
    def id(self) -> str:
        return f"ruler/{self.task}/{self.length}/{self.index}"

    @property
    def tokens(self) -> int:
        return len(self.input_ids)

    def score(self, prediction: str) -> float:
        """RULER's string match (all answers), in [0, 1]."""
        return string_match_all(prediction, self.answers)
