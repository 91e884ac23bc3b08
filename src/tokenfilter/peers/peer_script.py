"""Runs kvpress presses on the shared inputs; executed INSIDE the peer venv: ``python peer_script.py IN.json OUT.json``.

It imports only the standard library, torch, transformers and kvpress (tokenfilter needs a newer transformers),
and calls kvpress's own classes and its ``kv-press-text-generation`` pipeline. The pipeline is given our token
ids (``context_ids``, ``question_ids``) through its ``forward`` step, so no text is re-tokenized.

IN.json: ``{"model": {"path", "gguf_file", "dtype", "threads"}, "prompts": [{"id", "context_ids",
"question_ids", "max_new_tokens", ...}], "jobs": [{"key", "prompt", "press", "ratio", "target_size"}]}``;
``press`` is a kvpress class name, ``"dense"`` (the pipeline, no press), ``"generate"`` (plain greedy
``generate`` on the whole prompt, for the parity check) or ``"DecodingPress"`` (a ``PrefillDecodingPress``
with Knorm at ``ratio`` on the prefill and a ``DecodingPress`` holding ``target_size`` entries per layer while
decoding). OUT.json: ``{"versions", "load_seconds", "results": [{"key", "prompt", "press", "ratio", "answer",
"new_tokens", "seconds", "context_held", "error"}]}``; ``context_held``: context entries left per layer.

Long generation (``tokenfilter longgen``): IN.json's ``"sequences": [{"id", "ids", "prompt_len"}]`` and jobs
``{"key", "sequence", "base", "target_size"}``: the sequence's continuation scored token by token (teacher forcing)
under a ``DecodingPress`` over the scorer press ``base`` holding ``target_size`` entries per layer; the results carry
``nll``, ``tokens``, ``peak_held`` (the most entries a layer held after a step) and ``kv_held`` (the entries held
after the last step, as a share of dense's, all layers).
"""

from __future__ import annotations

import importlib.metadata
import json
import sys
import time
import traceback
from pathlib import Path

DECODING_INTERVAL = 4  # decoding steps between two compressions of the decoding press


def _version(package: str) -> str:
    return importlib.metadata.version(package)


def load(model_spec: dict):
    """(model, tokenizer) from a folder or a GGUF file in it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    dtype = getattr(torch, model_spec.get("dtype", "float32"))
    kwargs = {"gguf_file": model_spec["gguf_file"]} if model_spec.get("gguf_file") else {}
    tok = AutoTokenizer.from_pretrained(model_spec["path"], **kwargs)
    model = AutoModelForCausalLM.from_pretrained(model_spec["path"], dtype=dtype, **kwargs)
    return model.eval(), tok


def make_press(name: str, ratio: float | None, target_size: int | None):
    """The kvpress press of a job (None for ``"dense"``)."""
    import kvpress

    if name == "dense":
        return None
    if name == "DecodingPress":
        prefill = kvpress.KnormPress(compression_ratio=ratio or 0.0)
        decode = kvpress.DecodingPress(
            base_press=kvpress.KnormPress(), compression_interval=DECODING_INTERVAL, target_size=int(target_size)
        )
        return kvpress.PrefillDecodingPress(prefilling_press=prefill, decoding_press=decode)
    cls = getattr(kvpress, name, None)
    if cls is None:
        raise ValueError(f"kvpress {_version('kvpress')} has no press {name}")
    return cls(compression_ratio=ratio) if ratio is not None else cls()


def run_generate(pipe, model, prompt: dict) -> dict:
    """Greedy ``model.generate`` over the whole prompt in this venv (no split, no kvpress): tells a transformers
    version difference from a difference made by the pipeline's split prefill."""
    import torch

    ids = torch.tensor([prompt["context_ids"] + prompt["question_ids"]], dtype=torch.long)  # [1, T]
    eos = model.generation_config.eos_token_id
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=prompt["max_new_tokens"], do_sample=False,
            num_beams=1, eos_token_id=eos, pad_token_id=pipe.tokenizer.pad_token_id or eos,
        )
    seconds = time.perf_counter() - t0
    new = out[0, ids.shape[1] :]
    answer = pipe.tokenizer.decode(new, skip_special_tokens=True)
    held = [ids.shape[1] - len(prompt["question_ids"])] * model.config.num_hidden_layers
    return {"answer": answer, "seconds": round(seconds, 3), "context_held": held, "new_tokens": int(new.shape[0])}


def run_job(pipe, model, prompt: dict, job: dict) -> dict:
    import torch
    from transformers import DynamicCache

    if job["press"] == "generate":
        return run_generate(pipe, model, prompt)
    press = make_press(job["press"], job.get("ratio"), job.get("target_size"))
    cache = DynamicCache()
    inputs = {
        "context_ids": torch.tensor([prompt["context_ids"]], dtype=torch.long),
        "questions_ids": [torch.tensor([prompt["question_ids"]], dtype=torch.long)],
    }
    t0 = time.perf_counter()
    answers = pipe.forward(inputs, press=press, max_new_tokens=prompt["max_new_tokens"], cache=cache)
    seconds = time.perf_counter() - t0
    answer = answers[0]
    held = [int(cache.get_seq_length(i)) for i in range(model.config.num_hidden_layers)]
    # The pipeline returns text only: count its tokens again, plus the end-of-sequence token when it stopped early.
    new_tokens = len(pipe.tokenizer(answer, add_special_tokens=False)["input_ids"])
    new_tokens = min(new_tokens + 1, prompt["max_new_tokens"]) if new_tokens < prompt["max_new_tokens"] else new_tokens
    return {"answer": answer, "seconds": round(seconds, 3), "context_held": held, "new_tokens": new_tokens}


def run_continuation(model, seq: dict, job: dict) -> dict:
    """Teacher-forced negative log-likelihood of ``seq["ids"][prompt_len:]``, the prompt in one call, then one token
    per call through the cache, positions given as kvpress's pipeline gives them (the cache shrinks)."""
    import kvpress
    import torch
    import torch.nn.functional as F
    from transformers import DynamicCache

    press = kvpress.DecodingPress(
        base_press=getattr(kvpress, job["base"])(), compression_interval=DECODING_INTERVAL,
        target_size=int(job["target_size"]),
    )
    ids = torch.tensor([seq["ids"]], dtype=torch.long)
    p, n, layers = seq["prompt_len"], ids.shape[1], model.config.num_hidden_layers
    cache, nll, peak = DynamicCache(), 0.0, 0
    t0 = time.perf_counter()
    with torch.inference_mode(), press(model):
        last = model(input_ids=ids[:, :p], past_key_values=cache).logits[0, -1].float()
        for t in range(p, n):
            nll += F.cross_entropy(last[None], ids[0, t : t + 1], reduction="sum").item()
            if t == n - 1:
                break
            out = model(input_ids=ids[:, t : t + 1], past_key_values=cache, position_ids=torch.tensor([[t]]))
            last = out.logits[0, -1].float()
            peak = max(peak, max(int(cache.get_seq_length(i)) for i in range(layers)))
    held = sum(int(cache.get_seq_length(i)) for i in range(layers)) / (layers * (n - 1))  # share of dense's entries
    seconds = round(time.perf_counter() - t0, 3)
    return {"nll": nll, "tokens": n - p, "peak_held": peak, "kv_held": held, "seconds": seconds}


def run_continuations(model, spec: dict, out: dict, out_path: Path) -> None:
    seqs = {s["id"]: s for s in spec["sequences"]}
    for i, job in enumerate(spec["jobs"]):
        row = {k: job.get(k) for k in ("key", "sequence", "base", "target_size")}
        try:
            row.update(run_continuation(model, seqs[job["sequence"]], job), error=None)
        except Exception as exc:  # a press that fails is reported in one line, the run goes on
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            row.update(error=f"{type(exc).__name__}: {first}", trace=traceback.format_exc(limit=3))
        out["results"].append(row)
        status = row["error"] or f"nll/token {row['nll'] / row['tokens']:.4f}, peak {row['peak_held']}"
        print(f"[{i + 1}/{len(spec['jobs'])}] {job['base']} {job['target_size']} {job['sequence']}: {status}",
              file=sys.stderr)
        out_path.write_text(json.dumps(out), encoding="utf-8")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python peer_script.py IN.json OUT.json", file=sys.stderr)
        return 2
    import kvpress  # noqa: F401  (registers the kv-press-text-generation pipeline)
    import torch
    from transformers import pipeline

    spec = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    torch.set_num_threads(int(spec["model"].get("threads") or 1))
    t0 = time.perf_counter()
    model, tok = load(spec["model"])
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tok, device="cpu")
    out = {
        "versions": {name: _version(name) for name in ("kvpress", "transformers", "torch")},
        "load_seconds": round(time.perf_counter() - t0, 2),
        "results": [],
    }
    if "sequences" in spec:
        run_continuations(model, spec, out, Path(argv[1]))
        return 0
    prompts = {p["id"]: p for p in spec["prompts"]}
    jobs = spec["jobs"]
    for i, job in enumerate(jobs):
        row = {k: job.get(k) for k in ("key", "prompt", "press", "ratio", "target_size")}
        try:
            row.update(run_job(pipe, model, prompts[job["prompt"]], job), error=None)
        except Exception as exc:  # a press that fails is reported in one line, the run goes on
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            row.update(error=f"{type(exc).__name__}: {first}", trace=traceback.format_exc(limit=3))
        out["results"].append(row)
        status = row["error"] or repr(row["answer"][:40])
        print(f"[{i + 1}/{len(jobs)}] {job['press']} r={job.get('ratio')} {job['prompt']}: {status}", file=sys.stderr)
        Path(argv[1]).write_text(json.dumps(out), encoding="utf-8")  # partial results survive a kill
    Path(argv[1]).write_text(json.dumps(out), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
