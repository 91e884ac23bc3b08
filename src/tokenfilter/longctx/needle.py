"""Needle in a haystack: a fact planted at a given depth of a filler text of a given length.

The filler is the Paul Graham essays (``../shared/data/needle-haystack/*.txt``, any folder of ``.txt``
files works), concatenated in file-name order. For a target length ``L`` (tokens of the whole model
input: chat template, instruction, question and answer prefix included) and a depth ``d`` (percent),
the builder takes a window of ``n`` filler tokens made of whole sentences (the earliest window of
exactly ``n`` tokens from a sentence start to a sentence end), inserts the needle sentence at the
sentence boundary nearest to ``d% · n`` and adjusts ``n`` until the whole input is ``L`` tokens within
``tolerance``. Depth 0 puts the needle first, depth 100 last.
"""

from __future__ import annotations

import bisect
import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenfilter.longctx.longbench import has_chat_template
from tokenfilter.longctx.metrics import contains_answer

REPO = Path(__file__).resolve().parents[3]
HAYSTACK_DIR = REPO.parent / "shared" / "data" / "needle-haystack"

_SENTENCE_END = re.compile(r"""[.!?]['")\]]*$""")


class HaystackError(ValueError):
    """The filler text is missing or too short; the message says what to pass."""


@dataclass(frozen=True)
class Needle:
    """The planted fact, the question about it, the string a right answer contains, and the start of
    the answer written for the model (so that a small model answers in place)."""

    sentence: str = "The special magic number for Montevideo is 7481263."
    question: str = "What is the special magic number for Montevideo mentioned in the text above?"
    answer: str = "7481263"
    answer_prefix: str = "The special magic number for Montevideo is"
    instruction: str = "Read the text below and answer the question about it."

    def score(self, output: str) -> float:
        """1 if the normalized answer is contained in the normalized output, else 0."""
        return contains_answer(output, self.answer)


DEFAULT_NEEDLE = Needle()


def _magic(city: str, number: str) -> Needle:
    return Needle(
        sentence=f"The special magic number for {city} is {number}.",
        question=f"What is the special magic number for {city} mentioned in the text above?",
        answer=number,
        answer_prefix=f"The special magic number for {city} is",
    )


def _secret(holder: str, word: str) -> Needle:
    return Needle(
        sentence=f"The secret word of {holder} is {word}.",
        question=f"What is the secret word of {holder} mentioned in the text above?",
        answer=word,
        answer_prefix=f"The secret word of {holder} is",
    )


# Three facts per half: a configuration is chosen on the selection facts and reported on the held-out ones, so
# the choice cannot fit the particular tokens of one needle.
NEEDLES: dict[str, tuple[Needle, ...]] = {
    "select": (DEFAULT_NEEDLE, _magic("Kyoto", "3920581"), _secret("the lighthouse keeper", "marigold")),
    "heldout": (_magic("Reykjavik", "6150947"), _secret("the old librarian", "juniper"), _magic("Nairobi", "2837164")),
}


@dataclass
class NeedlePrompt:
    """A built input: ``input_ids`` (the full model input), where the needle sits, and what was asked."""

    input_ids: list[int]
    length: int  # asked total length
    depth: float  # asked depth, percent
    context_start: int  # token index where the filler starts in input_ids
    context_end: int  # token index where the filler ends (exclusive)
    needle_start: int  # token index of the needle's first token in input_ids
    needle_end: int  # exclusive

    @property
    def actual_depth(self) -> float:
        """Where the needle sits, percent of the filler tokens before it (0 = first, 100 = last)."""
        filler = (self.context_end - self.context_start) - (self.needle_end - self.needle_start)
        return 100.0 * (self.needle_start - self.context_start) / max(filler, 1)


def load_haystack_text(path: str | Path | None = None) -> str:
    """The filler: every ``*.txt`` in ``path`` (a folder) in name order, or one file."""
    p = Path(path) if path else HAYSTACK_DIR
    if p.is_dir():
        files = sorted(p.glob("*.txt"))
        if not files:
            raise HaystackError(f"{p} has no .txt files; pass a folder of filler essays (e.g. Paul Graham's).")
        return "\n\n".join(f.read_text(encoding="utf-8").strip() for f in files)
    if p.is_file():
        return p.read_text(encoding="utf-8")
    raise HaystackError(f"Haystack {p} does not exist; pass a folder of .txt files (../shared/data/needle-haystack).")


def _sentence_starts_from_offsets(text: str, offsets: Sequence[tuple[int, int]]) -> list[bool]:
    """``b[i]``: does a sentence start at token ``i``? (White space between it and a sentence end, or a blank
    line: a single newline is not enough, the essays wrap their lines.)"""
    starts = [True]
    for i in range(1, len(offsets)):
        m = offsets[i][0]
        while m < len(text) and text[m].isspace():
            m += 1
        k = m
        while k > 0 and text[k - 1].isspace():
            k -= 1
        gap = text[k:m]
        ok = k < m and offsets[i - 1][1] <= m and ("\n\n" in gap or bool(_SENTENCE_END.search(text[max(0, k - 4) : k])))
        starts.append(ok)
    return starts


class NeedleBuilder:
    """Builds needle prompts for one tokenizer over one filler text (tokenized once)."""

    def __init__(
        self,
        tokenizer: object,
        haystack: str | None = None,
        needle: Needle = DEFAULT_NEEDLE,
        chat: bool = True,
        tolerance: int = 2,
    ) -> None:
        self.tokenizer = tokenizer
        self.needle = needle
        self.chat = chat and has_chat_template(tokenizer)
        self.tolerance = tolerance
        text = haystack if haystack is not None else load_haystack_text()
        try:
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            offsets = enc.get("offset_mapping")
        except (TypeError, ValueError, NotImplementedError):
            enc, offsets = tokenizer(text, add_special_tokens=False), None
        self.filler_ids: list[int] = list(enc["input_ids"])
        starts = _sentence_starts_from_offsets(text, offsets) if offsets else self._starts_by_decoding()
        # token indices where a sentence starts (the needle may go there), and the end of the filler
        self.sentence_starts: list[int] = [i for i, ok in enumerate(starts) if ok] + [len(self.filler_ids)]

    def for_needle(self, needle: Needle) -> NeedleBuilder:
        """The same builder (filler tokenized once) planting another fact."""
        other = copy.copy(self)
        other.needle = needle
        return other

    def _starts_by_decoding(self) -> list[bool]:
        """Sentence starts without offsets: decode token by token (slow tokenizers, fakes)."""
        texts = [self._decode([i]) for i in self.filler_ids]
        starts = [True]
        for prev, nxt in zip(texts, texts[1:], strict=False):
            ends = bool(_SENTENCE_END.search(prev.rstrip())) and (prev[-1:].isspace() or nxt[:1].isspace())
            starts.append("\n\n" in prev or ends)
        return starts

    # ---- prompt rendering -------------------------------------------------------------------
    def _user_text(self, context: str) -> str:
        n = self.needle
        return f"{n.instruction}\n\n{context}\n\nQuestion: {n.question}"

    def render(self, context: str) -> str:
        """The whole model input as text, around ``context``."""
        n = self.needle
        if self.chat:
            rendered = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": self._user_text(context)}], add_generation_prompt=True, tokenize=False
            )
            return f"{rendered}{n.answer_prefix}"
        return f"{self._user_text(context)}\nAnswer: {n.answer_prefix}"

    def encode(self, text: str) -> list[int]:
        # The chat template writes its own special tokens; raw text gets the tokenizer's (e.g. BOS).
        return list(self.tokenizer(text, add_special_tokens=not self.chat)["input_ids"])

    # ---- sentence boundaries ----------------------------------------------------------------
    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def window(self, n: int) -> tuple[int, int]:
        """``(start, end)`` filler token indices, both sentence boundaries, ``end - start`` closest to
        ``n`` (the earliest such window; exact whenever the first sentences allow it)."""
        starts = self.sentence_starts
        if n > starts[-1]:
            raise HaystackError(f"The haystack has {starts[-1]} tokens, fewer than the {n} needed; give a longer one.")
        best = (n + 1, 0, starts[-1])
        for k, a in enumerate(starts):
            if a + n > starts[-1] + best[0] or k > 5000:
                break
            j = bisect.bisect_left(starts, a + n)
            for e in starts[max(j - 1, k) : j + 1]:
                if abs(e - a - n) < best[0]:
                    best = (abs(e - a - n), a, e)
            if best[0] == 0:
                break
        return best[1], best[2]

    def insertion_point(self, start: int, end: int, depth: float) -> int:
        """The sentence boundary in ``[start, end]`` nearest to ``depth`` percent of the way."""
        target = start + depth / 100.0 * (end - start)
        lo, hi = bisect.bisect_left(self.sentence_starts, start), bisect.bisect_right(self.sentence_starts, end)
        return min(self.sentence_starts[lo:hi], key=lambda i: (abs(i - target), i))

    # ---- building ---------------------------------------------------------------------------
    def _context(self, n: int, depth: float) -> tuple[str, str, str]:
        """(text before the needle, needle, text after it) for a window of ``n`` filler tokens."""
        start, end = self.window(n)
        cut = self.insertion_point(start, end, depth)
        before = self._decode(self.filler_ids[start:cut]).strip()
        after = self._decode(self.filler_ids[cut:end]).strip()
        return before, self.needle.sentence, after

    @staticmethod
    def _join(before: str, needle: str, after: str) -> str:
        return " ".join(part for part in (before, needle, after) if part)

    def build(self, length: int, depth: float) -> NeedlePrompt:
        """The input of ``length`` tokens (within ``tolerance``) with the needle at ``depth`` percent."""
        if not 0 <= depth <= 100:
            raise ValueError(f"depth must be in [0, 100], got {depth}.")
        overhead = len(self.encode(self.render(self.needle.sentence)))
        if length - overhead < 1:
            raise ValueError(f"length {length} is too short: the template, question and needle take {overhead} tokens.")
        # Decoding a window and writing it around the needle does not keep its token count exactly, so
        # the input length is not monotone in n: step by the error, then scan around for the best n.
        tried: dict[int, int] = {}

        def error(k: int) -> int:
            if k not in tried:
                tried[k] = len(self.encode(self.render(self._join(*self._context(k, depth))))) - length
            return tried[k]

        n = length - overhead
        for _ in range(6):
            if abs(error(n)) <= self.tolerance or max(1, n - tried[n]) in tried:
                break
            n = max(1, n - tried[n])
        if abs(error(n)) > self.tolerance:
            for step in range(1, 33):
                for k in (n - step, n + step):
                    if k >= 1 and abs(error(k)) <= self.tolerance:
                        break
                else:
                    continue
                break
            n = min(tried, key=lambda k: (abs(tried[k]), abs(k - n)))
        before, needle, after = self._context(n, depth)
        text = self.render(self._join(before, needle, after))
        ids = self.encode(text)
        return self._locate(ids, text, before, needle, after, length, depth)

    def _locate(
        self, ids: list[int], text: str, before: str, needle: str, after: str, length: int, depth: float
    ) -> NeedlePrompt:
        """Token spans of the filler and the needle in ``ids`` (by tokenizing text prefixes)."""
        context = self._join(before, needle, after)
        c0 = text.index(context)
        n0 = c0 + len(before)  # the needle's first token carries the space before it
        n1 = n0 + (1 if before else 0) + len(needle)
        spans = []
        for end in (c0, n0, n1, c0 + len(context)):
            spans.append(len(self.encode(text[:end])) if end > 0 else 0)
        # A prefix may end inside a token that merges across the cut: clamp into the input.
        spans = [min(s, len(ids)) for s in spans]
        return NeedlePrompt(ids, length, depth, spans[0], spans[3], spans[1], spans[2])

    def grid(self, lengths: Sequence[int], depths: Sequence[float]) -> list[NeedlePrompt]:
        return [self.build(length, depth) for length in lengths for depth in depths]
