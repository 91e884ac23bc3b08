"""Records the reference logits that tests/test_reference_logits.py holds the engine to.

Run once, before a change to the engine that must not change behaviour, and commit the JSON:

    .venv/bin/python scripts/record_reference_logits.py            # writes tests/data/reference_logits.json

Inputs: a batch of two WikiText-2 passages (the second shorter, left-padded) prefilled in one call, then 16 tokens
of each passage fed one by one through the cache (the decode path). For every real position it records the
log-sum-exp of the logits and the logit of the next true token, for dense, the default at ratio 0.5, the paper's
reading at ratio 0.5 and the sliding window of 64 tokens, on SmolLM2-135M and on stories260K (random ids).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
OUT = ROOT / "tests" / "data" / "reference_logits.json"
PREFILL, DECODE = (320, 240), 16


def methods():
    from tokenfilter import TokenFilter

    return {
        "dense": None,
        "default": TokenFilter(ratio=0.5),
        "paper": TokenFilter.paper(ratio=0.5),
        "sliding-window": TokenFilter.sliding_window(recent=64),
    }


def passages(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``ids``: one long 1-D id tensor -> left-padded prefill ``(ids [2, P], mask [2, P])`` and the next tokens
    ``[2, DECODE + 1]`` (the decode inputs and, shifted by one, their targets)."""
    long, short = PREFILL
    rows = [ids[: long + DECODE + 1], ids[2000 : 2000 + short + DECODE + 1]]
    pre = torch.zeros(2, long, dtype=torch.long)
    mask = torch.zeros(2, long, dtype=torch.long)
    nxt = torch.zeros(2, DECODE + 1, dtype=torch.long)
    for i, (row, n) in enumerate(zip(rows, PREFILL, strict=True)):
        pre[i, long - n :], mask[i, long - n :] = row[:n], 1
        nxt[i] = row[n : n + DECODE + 1]
    return pre, mask, nxt


@torch.no_grad()
def measure(model, pre: torch.Tensor, mask: torch.Tensor, nxt: torch.Tensor, tf) -> dict:
    """Per row: ``lse`` and ``target`` (the next true token's logit) at every real position of the prefill and
    of the decode steps, as lists of floats."""
    from transformers import DynamicCache

    def run() -> list[torch.Tensor]:
        cache = DynamicCache(config=model.config)
        out = model(input_ids=pre, attention_mask=mask, use_cache=True, past_key_values=cache)
        logits, am = [out.logits], mask
        for s in range(DECODE):
            am = torch.cat([am, torch.ones(2, 1, dtype=am.dtype)], dim=1)
            out = model(input_ids=nxt[:, s : s + 1], attention_mask=am, use_cache=True, past_key_values=cache)
            logits.append(out.logits)
        return logits

    if tf is None:
        logits = run()
    else:
        with tf.apply(model):
            logits = run()
    full = torch.cat(logits, dim=1).float()  # [2, P + DECODE, V]
    targets = torch.cat([pre[:, 1:], nxt], dim=1)  # [2, P + DECODE]
    real = torch.cat([mask.bool(), torch.ones(2, DECODE, dtype=torch.bool)], dim=1)
    lse = full.logsumexp(-1)
    tgt = full.gather(-1, targets[..., None])[..., 0]
    return {"lse": [lse[i][real[i]].tolist() for i in range(2)], "target": [tgt[i][real[i]].tolist() for i in range(2)]}


def smollm2():
    from tokenfilter.loading import load_model

    model, tok = load_model()
    text = (SHARED / "data" / "wikitext-2" / "wiki.test.raw.txt").read_text()[:40000]
    return model.eval(), tok(text, return_tensors="pt").input_ids[0]


def stories():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(SHARED / "models" / "stories260K", dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(7)
    return model, torch.randint(3, model.config.vocab_size, (4000,), generator=g)


MODELS = {"stories260K": stories, "smollm2-135m": smollm2}


def record(names: list[str]) -> dict:
    import tokenfilter

    out = {"command": "python scripts/record_reference_logits.py", "torch": torch.__version__,
           "tokenfilter_commit": _commit(), "models": {}}
    for name in names:
        model, ids = MODELS[name]()
        pre, mask, nxt = passages(ids)
        out["models"][name] = {m: measure(model, pre, mask, nxt, tf) for m, tf in methods().items()}
        print(f"{name}: recorded {', '.join(methods())}", file=sys.stderr)
    del tokenfilter
    return out


def _commit() -> str:
    import subprocess

    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(record(list(MODELS)), indent=None) + "\n")
    print(f"wrote {OUT}", file=sys.stderr)
