"""Inputs for the benchmark: WikiText-2 test text, tokenized and cut into contexts (random ids as fallback)."""

from __future__ import annotations

from pathlib import Path

import torch

WIKITEXT_RELATIVE = Path("..") / "shared" / "data" / "wikitext-2" / "wiki.test.raw.txt"


def default_text_file() -> Path | None:
    """WikiText-2's test file next to the repository (``../shared/data/...``), from the cwd or from this source tree."""
    candidates = [Path.cwd() / WIKITEXT_RELATIVE, Path(__file__).resolve().parents[3] / WIKITEXT_RELATIVE]
    for path in candidates:
        if path.is_file():
            return path.resolve()
    return None


class TokenSource:
    """Token ids to cut contexts from. ``kind`` says where they came from (reported in the results)."""

    def __init__(self, ids: torch.Tensor, kind: str) -> None:
        self.ids, self.kind = ids, kind

    @classmethod
    def build(
        cls,
        tokenizer: object | None,
        needed: int,
        vocab_size: int,
        text_file: str | Path | None = None,
        seed: int = 0,
    ) -> TokenSource:
        """At least ``needed`` ids: the text file tokenized if there is a tokenizer and a file, else random ids."""
        path = Path(text_file) if text_file else default_text_file()
        if tokenizer is not None and path is not None and path.is_file():
            ids = _tokenize_prefix(tokenizer, path, needed)
            if ids.numel() >= needed:
                return cls(ids, f"text:{path.name}")
            reps = -(-needed // max(1, ids.numel()))
            return cls(ids.repeat(reps), f"text:{path.name} (repeated)")
        g = torch.Generator().manual_seed(seed)
        low = 3 if vocab_size > 8 else 0
        return cls(torch.randint(low, vocab_size, (needed,), generator=g), "random-ids")

    def contexts(self, batch: int, length: int) -> torch.Tensor:
        """``[batch, length]``: consecutive, non-overlapping windows (wrapping around the source)."""
        n = self.ids.numel()
        rows = []
        for b in range(batch):
            start = (b * length) % n
            idx = (torch.arange(length) + start) % n
            rows.append(self.ids[idx])
        return torch.stack(rows)


def _tokenize_prefix(tokenizer: object, path: Path, needed: int) -> torch.Tensor:
    """Tokenize growing prefixes of the file until ``needed`` ids exist (or the file is exhausted)."""
    text = path.read_text(encoding="utf-8", errors="replace")
    chars = min(len(text), max(4096, needed * 6))
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        if len(ids) >= needed or chars >= len(text):
            return torch.tensor(ids, dtype=torch.long)
        chars = min(len(text), chars * 2)
