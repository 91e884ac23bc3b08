"""``docs/performance.md`` from a benchmark's JSON (and the PNG next to it).

    python -m tokenfilter.bench.report results/bench/results.json docs/performance.md [--notes notes.md]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timedelta
from pathlib import Path

from tokenfilter.bench.grid import SIDE
from tokenfilter.bench.machine import STAMP, summary_line

READS = {"kv": "the KV side's cells (the measured default)", "filter": "the query side's cells"}


def _f(x: float | None, spec: str = ".3f", none: str = "–") -> str:
    return none if x is None else format(x, spec)


def _mib(x: int | None) -> str:
    return "–" if x is None else f"{x / 2**20:.1f}"


def _pct(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f}%"


def gpu_section(result: dict, gpu: dict | None) -> list[str]:
    """``## GPU``: a GPU run's tables when one is given (or when ``result`` is one), else a plain statement that
    none exists yet and the command that produces it."""
    from tokenfilter.bench.cli import GPU_COMMAND

    if str(result["machine"].get("device", "cpu")).startswith("cuda"):
        return []  # this page is the GPU run itself
    out = ["## GPU", ""]
    if gpu is None:
        out += [
            "No GPU run exists yet: nothing on this page was measured on a GPU, and no GPU speedup is claimed. "
            "The filtered paths run on CUDA through the same code (tested on the CPU; the engine's guarantee tests "
            "take `TOKENFILTER_TEST_DEVICE=cuda`), but their speed there is unmeasured. The command that produces "
            "this section (issue 12's grid: Llama-3-8B shapes, 4k-32k tokens, batch 1 and 8, 128 decode steps, every "
            "mode, CUDA-event timing, `torch.cuda.max_memory_allocated`):",
            "",
            "```",
            GPU_COMMAND,
            "python -m tokenfilter.bench.report results/bench/results.json docs/performance.md "
            "--gpu results/bench-gpu/results.json",
            "```",
            "",
        ]
        return out
    gm, model = gpu["machine"], gpu["model"]
    out += [
        f"- {summary_line(gm)}; model {model['name']} ({model['layers']} layers, hidden {model['hidden']}, "
        f"{model['q_heads']}/{model['kv_heads']} heads), {model['dtype']}, started {started_at(gpu)}.",
        f"- Command: `{gpu.get('command')}`." if gpu.get("command") else "",
        "",
    ]
    body = render(gpu).split("## Results", 1)[1].split("## Reproduce", 1)[0]
    out += ["### Results" + body.replace("\n## ", "\n### ").replace("\n### Batch", "\n#### Batch")]
    return out


def started_at(result: dict) -> str | None:
    """When the run began: its ``started`` stamp; a result from before it had one was stamped (``created``) when its
    measurements ended, so its start is that less ``elapsed_s``."""
    if result.get("started"):
        return result["started"]
    created = result.get("created")
    try:
        end = datetime.strptime(created, STAMP)
    except (TypeError, ValueError):
        return created
    return (end - timedelta(seconds=result.get("elapsed_s", 0))).strftime(STAMP)


def _shared(machine: dict) -> bool:
    """Other jobs ran during the run: the load average at its end exceeds the benchmark's own threads by 0.5."""
    load_end = machine.get("load_average_at_end")
    return bool(load_end) and load_end[0] > (machine.get("torch_threads") or 1) + 0.5


def render(
    result: dict,
    png_name: str | None = None,
    notes: str | None = None,
    command: str | None = None,
    gpu: dict | None = None,
) -> str:
    m, model, cfg = result["machine"], result["model"], result["config"]
    cells = result["cells"]
    lines: list[str] = []
    add = lines.append
    add("# Performance: Token Filtering vs dense")
    add("")
    add(
        "Generated from the benchmark's JSON by `python -m tokenfilter.bench.report` "
        "(or `tokenfilter bench --write-docs`); do not edit by hand, rerun instead."
    )
    if len(result.get("invocations") or []) > 1:
        add("Commands (one grid in several invocations, merged by `python -m tokenfilter.bench.merge`): "
            + "; ".join(f"`{r['command']}`" for r in result["invocations"]) + ".")
    elif command:
        add(f"Command: `{command}`.")
    add("")
    add("## Machine")
    add("")
    add(f"- {summary_line(m)}.")
    load_end = m.get("load_average_at_end")
    if load_end:
        own = m.get("torch_threads") or 1
        busy = (
            "The machine is shared: other jobs ran on the same cores during the run, so single timings are noisy"
            if _shared(m)
            else f"About the benchmark's own {own} thread(s): little else ran"
        )
        add(
            f"- Load average at the end {load_end[0]} (1 min). {busy}; every number below is a median over "
            "interleaved repeats, and ratios are taken per repeat against the dense run of the same repeat."
        )
    th = cfg.get("threads")
    if th:
        add(f"- torch threads: {th['threads']} ({th['why']}).")
    if cfg.get("allocator"):
        add(f"- Allocator: {cfg['allocator']}.")
    if cfg.get("omp_wait"):
        add(f"- OpenMP: {cfg['omp_wait']}.")
    add(f"- Memory {m.get('memory_gib')} GiB; {m.get('os')}; Python {m.get('python')}; GPU: {m.get('gpu') or 'none'}.")
    add(f"- Run took {result.get('elapsed_s', 0) / 60:.1f} min, started {started_at(result)}.")
    add("")
    add("## Setup")
    add("")
    add(
        f"- Model: {model['name']} ({model['family']}, {model['parameters'] / 1e6:.0f}M parameters, {model['layers']} "
        f"layers, hidden {model['hidden']}, {model['q_heads']} query / {model['kv_heads']} KV heads of "
        f"{model['head_dim']}, "
        f"MLP {model['intermediate']}, vocabulary {model['vocab']}), {model['dtype']}, attention "
        f"`{model.get('attn_implementation')}`."
    )
    add(
        f"- Inputs: {cfg['inputs']}; context lengths {', '.join(map(str, sorted({c['length'] for c in cells})))}; "
        f"batch sizes {', '.join(map(str, cfg['batch_sizes']))}; {cfg['new_tokens']} decode steps after the prefill; "
        f"{cfg['warmup']} untimed warm-up round(s) of every method on the shortest context of each batch size, then "
        f"{cfg['repeats']} timed rounds per context."
    )
    sched = ("`tail-linear` from layer L // 2 (the paper's)" if cfg["schedule"] == "tail-linear"
             else f"`{cfg['schedule']}` from layer 2 (the library default)")
    modes = cfg.get("modes") or ["query"]  # results from before --modes measured the query side only
    lead = cfg.get("lead_mode") or "query"  # results from before the KV side (the library default) led
    window = cfg.get("window") or cfg.get("recent") or 64
    kv_ratios = cfg.get("kv_ratios") or cfg["ratios"]
    library = window == 64 and cfg["schedule"] == "uniform"
    parts = {
        "kv": f"the KV side at ratios {', '.join(f'{r:g}' for r in kv_ratios)} (rows `KV side r (R={window})`: "
              f"`skip=\"none\"`, `kv=\"drop\"`, recent window {window}"
              + (", i.e. `TokenFilter(ratio=r)`, the library default)" if library else ")"),
        "query": f"the query side at ratios {', '.join(f'{r:g}' for r in cfg['ratios'])} (rows `query side r`, "
                 f"`ratio r` in earlier results: the paper's reading, skip=`{cfg['skip']}`, kv=`{cfg['kv']}`)",
        "sliding-window": "the sliding-window preset (`TokenFilter.sliding_window(recent="
                          f"{window})`: 4 sinks + the window, every layer)",
    }
    add(f"- Token Filtering, schedule {sched}; modes: {'; '.join(parts[m] for m in modes if m in parts)}.")
    add(
        f"- Overhead run: the {SIDE.get(lead, lead)}'s configuration at threshold {cfg['overhead_threshold']:g} "
        "(scores computed, nothing filtered); the paired measurement and the profiled cell are the "
        f"{SIDE.get(lead, lead)}'s too."
    )
    for s in result.get("skipped", []):
        where = f"batch {s['batch']}, length {s['length']}" if "batch" in s else f"length {s['length']}"
        add(f"- Skipped {where}: {s['reason']}.")
    for p in result.get("past_positions", []):
        add(f"- Length {p['length']}: {p['note']}.")
    add("")
    add("How to read the tables:")
    add("")
    add(
        "- **TTFT**: prefill of the whole context into an empty cache, logits of the last position only (as "
        "`generate` computes them), plus the argmax: the time to first token. **decode**: greedy steps on that cache; "
        "tokens/s counts every sequence of the batch."
    )
    add(
        "- **×**: speed ratio, dense time / this method's time (median over rounds of the per-round ratio; > 1 is "
        "faster than dense). **ideal**: `flops_dense / flops_actual` of the FLOP model (`tokenfilter.stats`) for the "
        "decisions this very run made (LM head charged on the rows computed). **eff.**: measured / ideal. "
        "**gain**: (measured − 1) / (ideal − 1), the share of the predicted saving that was realised; it is the "
        "stricter number when the ideal is close to 1."
    )
    add(
        "- **byte ideal** (decode): the bytes a step must read, dense over filtered: every weight once per step plus "
        "one key/value entry per (query, key) pair and layer; a filtered token saves its Q/O weight read (at batch "
        "> 1 only if the whole batch skips together, which the ideal assumes, so there it is an upper bound). "
        "**byte eff.**: measured / byte ideal."
    )
    add(
        "- **KV MiB**: bytes of the key/value tensors actually allocated in the cache at the end of decoding "
        "(the filtered layers' buffers grow with slack, so allocated can exceed used). **peak MiB**: "
        + ("`torch.cuda.max_memory_allocated` over the trial (weights included)."
           if str(m.get("device", "cpu")).startswith("cuda") else
           "the process's peak resident memory over the trial (weights, Python and torch included; "
           "`VmHWM` after a reset through `/proc/self/clear_refs`). The trials share one process, so freed "
           "memory the allocator keeps hides differences between methods here: the peak of each method in a process "
           "of its own is `tokenfilter bench --memory` ([performance-memory.md](performance-memory.md)).")
    )
    add("")
    if png_name:
        add(f"![speed ratio vs context length]({png_name})")
        add("")
    add("## Results")
    for b in sorted({c["batch"] for c in cells}):
        add("")
        add(f"### Batch size {b}")
        add("")
        add(
            "| context | method | TTFT s | prefill × | ideal | eff. | gain | decode tok/s | decode × | ideal | eff. | "
            "gain | byte ideal | byte eff. | realized ratio | attn FLOPs skipped | KV MiB | KV vs dense | peak MiB |"
        )
        add("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for c in sorted((c for c in cells if c["batch"] == b), key=lambda c: (c["length"], _order(c))):
            p, d, sp = c["prefill"], c["decode"], c["stats_prefill"]
            add(
                f"| {c['length']} | {c['label']} | {_f(p['median_s'])} | {_f(p['speedup'])} | {_f(p['ideal'])} | "
                f"{_f(p['efficiency'], '.2f')} | {_f(p.get('gain_captured'), '.2f')} | "
                f"{_f(d.get('tokens_per_s'), '.1f')} | {_f(d['speedup'])} | {_f(d['ideal'])} | "
                f"{_f(d['efficiency'], '.2f')} | {_f(d.get('gain_captured'), '.2f')} | "
                f"{_f(d.get('byte_ideal'))} | {_f(d.get('byte_efficiency'), '.2f')} | "
                f"{_f(sp['ratio'] if sp else None, '.3f')} | {_pct(sp['attention_flops_skipped'] if sp else None)} | "
                f"{_mib(c['kv_bytes']['peak_allocated'])} | {_f(c['kv_bytes']['peak_allocated_vs_dense'], '.2f')} | "
                f"{_mib(c.get('peak_memory_bytes'))} |"
            )
    if any(c["prefill"].get("cpu_speedup") is not None for c in cells):
        add("")
        add("## The same ratios from process CPU time")
        add("")
        add(
            ("Other jobs shared the cores, so wall-clock times include waiting for a core. " if _shared(m) else
             "Little else ran, so wall clock and CPU time should agree; where other jobs share the cores, ")
            + "the process CPU time (`time.process_time`, user + system, all threads) of the same trials is much less "
            "sensitive to waiting for a core; with one torch thread it is the compute time. Ratios per round against "
            "dense, medians as above."
        )
        add("")
        add("| batch | context | method | prefill × | eff. | decode × | eff. |")
        add("|---:|---:|---|---:|---:|---:|---:|")
        for c in sorted(cells, key=lambda c: (c["batch"], c["length"], _order(c))):
            if c["method"] == "dense":
                continue
            p, d = c["prefill"], c["decode"]
            add(
                f"| {c['batch']} | {c['length']} | {c['label']} | {_f(p.get('cpu_speedup'))} | "
                f"{_f(p.get('cpu_efficiency'), '.2f')} | {_f(d.get('cpu_speedup'))} | "
                f"{_f(d.get('cpu_efficiency'), '.2f')} |"
            )
    over = [c for c in cells if c["method"] == "overhead"]
    if over:
        add("")
        add("## Overhead of the scoring alone (threshold > 1: nothing filtered)")
        add("")
        add("| batch | context | prefill: extra time | decode: extra time | prefill, CPU time | decode, CPU time |")
        add("|---:|---:|---:|---:|---:|---:|")

        def extra(x: float | None) -> str:
            return _pct(1 / x - 1 if x else None)

        for c in sorted(over, key=lambda c: (c["batch"], c["length"])):
            p, d = c["prefill"], c["decode"]
            add(
                f"| {c['batch']} | {c['length']} | {extra(p['speedup'])} | {extra(d['speedup'])} | "
                f"{extra(p.get('cpu_speedup'))} | {extra(d.get('cpu_speedup'))} |"
            )
    paired = [c for c in cells if c.get("paired")]
    if paired:
        add("")
        add("## Paired measurement (`--paired-steps`)")
        add("")
        add(
            "The grid's rounds alternate whole trials a few times per cell, and on a shared machine their spread is "
            "several percent. Here the nothing-filtered run and the lead mode's highest ratio are measured again "
            "against dense, "
            "interleaved at the finest grain: in each cell prefill pairs (alternating which runs first), then decode "
            "steps, a dense step and a filtered step in turn on two caches in one process, so that load drift hits "
            "both sides of a pair alike. Extra time: median over the pairs of (method time / dense time − 1), with "
            "the quartiles of the pairs; speed = 1 / (1 + extra). The overhead and efficiency targets read these "
            "numbers where they exist."
        )
        add("")
        add("| batch | context | method | prefill: extra (pairs) | IQR | decode: extra (steps) | IQR | decode × | "
            "decode eff. | prefill, CPU time | decode, CPU time |")
        add("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for c in sorted(paired, key=lambda c: (c["batch"], c["length"], _order(c))):
            pp, pd = c["paired"]["prefill"], c["paired"]["decode"]
            add(
                f"| {c['batch']} | {c['length']} | {c['label']} | {_pct(pp['extra'])} ({pp['n']}) | "
                f"{_pct(pp['q25'])} .. {_pct(pp['q75'])} | {_pct(pd['extra'])} ({pd['n']}) | "
                f"{_pct(pd['q25'])} .. {_pct(pd['q75'])} | {_f(c['decode'].get('paired_speedup'))} | "
                f"{_f(c['decode'].get('paired_efficiency'), '.2f')} | {_pct(pp['cpu']['extra'])} | "
                f"{_pct(pd['cpu']['extra'])} |"
            )
    checks = result.get("kv_checks", [])
    if checks:
        add("")
        add("## KV cache: bytes saved vs entries dropped")
        add("")
        add(
            "Stored entries are counted in the cache itself (`DynamicLayer` keys plus each `FilteredCacheLayer` "
            "store's `stored_entries()`); the dropped entries and `kv_bytes_saved` are what the run's statistics "
            "report. Exact means: dense entries − stored entries = dropped entries, and the measured bytes saved = "
            "reported bytes saved = dropped × bytes per entry."
        )
        add("")
        add(
            "| batch | context | method | dense entries | held | dropped (reported) | saved MiB measured | "
            "saved MiB reported | saved | exact | allocated MiB dense → filtered |"
        )
        add("|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|---:|")
        for k in checks:
            add(
                f"| {k['batch']} | {k['length']} | {k.get('label') or k['ratio']} | {k['dense_entries']} | "
                f"{k['stored_entries']} | "
                f"{k['dropped_entries_reported']} | {_mib(k['saved_bytes_measured'])} | "
                f"{_mib(k['saved_bytes_reported'])} | {_pct(k['saved_fraction'])} | "
                f"{'yes' if k['exact'] else '**no**'} | "
                f"{_mib(k['dense_allocated_bytes'])} → {_mib(k['filtered_allocated_bytes'])} |"
            )
    targets = result.get("targets", [])
    if targets:
        add("")
        add("## Targets (measured, not asserted)")
        add("")
        add(
            "Evaluated on the wall-clock ratios (the numbers above) and, as a check against the load of a shared "
            "machine, on the ratios of process CPU time (see the next section). The efficiency and not-slower "
            "targets read the measured default's cells: the KV side's (`TokenFilter(ratio=r)`) when the run measured "
            "it, else the query side's; each says which."
        )
        add("")
        add("| target | goal | worst (wall clock) | where | met | worst (CPU time) | met (CPU time) |")
        add("|---|---|---:|---|:---:|---:|:---:|")
        for t in targets:

            def fmt(v: float | None, t: dict = t) -> str:
                return "–" if v is None else (_pct(v) if "fraction" in t["goal"] else _f(v))

            def yes(m: bool | None) -> str:
                return "–" if m is None else ("yes" if m else "**no**")

            add(
                f"| {t['target']}{' (' + READS.get(t['reads'], t['reads']) + ')' if t.get('reads') else ''} | "
                f"{t['goal']} | {fmt(t.get('worst'))} | {t.get('where') or '–'} | "
                f"{yes(t.get('met'))} | {fmt(t.get('worst_cpu'))} | {yes(t.get('met_cpu'))} |"
            )
    prof = result.get("profile")
    if prof:
        lines.extend(_render_profile(prof))
    auto = analysis(result)
    if auto or notes:
        add("")
        add("## Analysis")
        add("")
        lines.extend(auto)
        if notes:
            add("")
            add(notes.strip())
    add("")
    lines.extend(gpu_section(result, gpu))
    add("## Reproduce")
    add("")
    add("```")
    runs = result.get("invocations") or []
    if len(runs) > 1:  # a grid run in several invocations, merged (tokenfilter.bench.merge)
        outs = []
        for r in runs:
            add(f"{r['command']}")
            words = (r["command"] or "").split()
            outs.append(words[words.index("--output") + 1] if "--output" in words else "results/bench")
        add(f"python -m tokenfilter.bench.merge {' '.join(o + '/results.json' for o in outs)} -o merged.json")
        add("python -m tokenfilter.bench.report merged.json docs/performance.md --notes docs/performance-notes.md"
            "   # this page")
    elif command:
        add(f"{command}{'' if '--write-docs' in command else ' --write-docs'}   # this page")
    add("tokenfilter bench --write-docs                    # the default grid (~10 min on 2 cores)")
    add("tokenfilter bench --full --write-docs             # the whole grid: up to 8192 tokens, batch 1 and 4")
    add("python -m tokenfilter.bench.report results/bench/results.json docs/performance.md")
    add("```")
    add("")
    return "\n".join(lines)


def _order(c: dict) -> tuple:
    return ({"dense": 0, "overhead": 1, "filter": 2, "kv": 3, "window": 4}[c["method"]], c["ratio"] or 0)


def _render_profile(prof: dict) -> list[str]:
    what = prof.get("label") or f"ratio {prof['ratio']:g}"
    out = ["", f"## Where the time goes (B={prof['batch']}, context {prof['length']}, {what})", ""]
    out.append(
        "Wall time by module (forward hooks; decode: mean per step over "
        f"{prof['decode_steps']} steps). Filtered layers: {', '.join(map(str, prof.get('filtered_layers', [])))}."
    )
    out.append("")
    for phase in ("prefill", "decode"):
        d, f = prof["dense"].get(phase), prof["filter"].get(phase)
        if not d or not f:
            continue
        keys = list(dict.fromkeys(list(d["parts_s"]) + list(f["parts_s"])))
        out.append(f"| {phase} | dense ms | share | filtered ms | share |")
        out.append("|---|---:|---:|---:|---:|")
        for k in keys:
            dv, fv = d["parts_s"].get(k, 0.0), f["parts_s"].get(k, 0.0)
            out.append(
                f"| {k} | {1e3 * dv:.1f} | {_pct(dv / d['wall_s'] if d['wall_s'] else None, 0)} | {1e3 * fv:.1f} | "
                f"{_pct(fv / f['wall_s'] if f['wall_s'] else None, 0)} |"
            )
        out.append(f"| **total** | {1e3 * d['wall_s']:.1f} | | {1e3 * f['wall_s']:.1f} | |")
        out.append("")
    do, fo = prof["dense"].get("decode_ops"), prof["filter"].get("decode_ops")
    if do and fo:
        out.append(
            f"One decode step launches {do['aten_calls_per_step']:.0f} aten operators dense and "
            f"{fo['aten_calls_per_step']:.0f} filtered. Self CPU time per step by operator group (torch.profiler):"
        )
        out.append("")
        out.append("| operator group | dense ms | filtered ms |")
        out.append("|---|---:|---:|")
        for k in dict.fromkeys(list(do["self_cpu_s_per_step"]) + list(fo["self_cpu_s_per_step"])):
            dv, fv = do["self_cpu_s_per_step"].get(k, 0), fo["self_cpu_s_per_step"].get(k, 0)
            out.append(f"| {k} | {1e3 * dv:.2f} | {1e3 * fv:.2f} |")
        out.append("")
    return out


def analysis(result: dict) -> list[str]:
    """Bullet points derived from the numbers: what the ideal is made of, and which targets were missed."""
    out: list[str] = []
    model = result["model"]
    per = model.get("flops_per_token_no_attention", {})
    if per:
        total = sum(per.values())
        skippable = per["qo_proj"]
        out.append(
            f"- Per token (attention pairs aside) the FLOP model puts {_pct(per['mlp'] / total, 0)} of the work in the "
            f"MLPs, {_pct(per['lm_head'] / total, 0)} in the LM head, {_pct(per['kv_proj'] / total, 0)} in the K/V "
            f"projections (all computed for every token) and {_pct(skippable / total, 0)} in the Q/O projections, "
            "the only per-token part a filtered token skips besides its attention pairs. With `skip=attention` the "
            "ideal speed ratio therefore stays modest and grows with the context only through the attention pairs."
        )
    prof = result.get("profile")
    if prof and prof["dense"].get("decode") and prof["filter"].get("decode"):
        d, f = prof["dense"]["decode"], prof["filter"]["decode"]
        attn_d = sum(v for k, v in d["parts_s"].items() if k.startswith("attention"))
        attn_f = sum(v for k, v in f["parts_s"].items() if k.startswith("attention"))
        out.append(
            f"- Decode at context {prof['length']}: attention modules take {_pct(attn_d / d['wall_s'], 0)} of a dense "
            f"step ({1e3 * attn_d:.1f} ms) and {_pct(attn_f / f['wall_s'], 0)} of a filtered one "
            f"({1e3 * attn_f:.1f} ms); "
            "the rest (MLP, LM head, norms, Python) is not touched by filtering."
        )
    if prof and prof["dense"].get("prefill") and prof["filter"].get("prefill"):
        d, f = prof["dense"]["prefill"], prof["filter"]["prefill"]
        attn_d = sum(v for k, v in d["parts_s"].items() if k.startswith("attention"))
        attn_f = sum(v for k, v in f["parts_s"].items() if k.startswith("attention"))
        out.append(
            f"- Prefill at context {prof['length']}: attention modules {1e3 * attn_d:.0f} ms dense vs "
            f"{1e3 * attn_f:.0f} ms filtered, out of {1e3 * d['wall_s']:.0f} / {1e3 * f['wall_s']:.0f} ms."
        )
    for t in result.get("targets", []):
        if t["met"] is False:
            misses = t.get("misses", [])
            where = "; ".join(
                f"{m['where']}: {_pct(m['value']) if 'fraction' in t['goal'] else _f(m['value'])}" for m in misses[:6]
            )
            more = f" (and {len(misses) - 6} more)" if len(misses) > 6 else ""
            cpu = t.get("met_cpu")
            cpu_txt = "" if cpu is None else (" Met on CPU time." if cpu else " Missed on CPU time too.")
            out.append(f"- Missed: {t['target']} (goal {t['goal']}): {where}{more}.{cpu_txt}")
    return out


def write_docs(
    result: dict,
    md_path: str | Path,
    notes: str | None = None,
    command: str | None = None,
    gpu: dict | None = None,
) -> list[Path]:
    """Write the Markdown and, next to it, the PNG it embeds (``<stem>.png``); ``gpu``: a GPU run's results for
    the GPU section."""
    from tokenfilter.bench.plot import plot_speedup

    md_path = Path(md_path)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    png = md_path.with_suffix(".png")
    plot_speedup(result, png)
    md_path.write_text(render(result, png.name, notes, command, gpu))
    return [md_path, png]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenfilter.bench.report", description=__doc__.split("\n")[0])
    parser.add_argument("results", type=Path, help="the benchmark's results.json")
    parser.add_argument("output", type=Path, nargs="?", default=Path("docs/performance.md"))
    parser.add_argument("--notes", type=Path, default=None, help="Markdown appended to the Analysis section")
    parser.add_argument("--gpu", type=Path, default=None, help="a GPU run's results.json, for the GPU section")
    args = parser.parse_args(argv)
    loaded = []
    for path in (args.results, args.gpu):
        try:
            loaded.append(json.loads(path.read_text()) if path is not None else None)
        except (OSError, json.JSONDecodeError) as exc:
            print(f"error: cannot read {path}: {exc}", file=sys.stderr)
            return 2
    result, gpu = loaded
    if result.get("cells"):  # the targets as they stand now, read from the measured cells
        from tokenfilter.bench.targets import evaluate_targets

        result["targets"] = evaluate_targets(result)
    notes = args.notes.read_text() if args.notes else None
    paths = write_docs(result, args.output, notes, result.get("command"), gpu)
    print("wrote " + ", ".join(os.fspath(p) for p in paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
