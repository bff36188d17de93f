"""bench.json -> bench.md (the table people read) and bench.png (decode speed against context depth)."""

from __future__ import annotations

import statistics
from pathlib import Path

from ..plots import figure, whole_numbers
from ..runtime.files import write_text
from . import roofline


def measured_headline(result: dict) -> str:
    """What was measured, first: the bundle's best decode median here ("" without a decode measurement)."""
    decode = {k: m for k, m in result["results"].items() if k.startswith("decode/")}
    if not decode:
        return ""
    key = max(decode, key=lambda k: decode[k]["median"])
    n, depth = key.split("/")[1].split("@")
    label = result["bundle"].get("label") or Path(result["bundle"]["path"]).name
    return (f"**Measured here: {label} decodes {decode[key]['median']:.1f} tok/s** ({n} tokens after {depth} of "
            f"context, median of {decode[key]['runs']} runs).")


def write_markdown(result: dict, path: Path) -> None:
    """What was measured leads (the headline, the table, roofline, memory, peers); the phone table, a
    prediction about LFM2.5-8B-A1B int4 whatever bundle was measured, follows under a heading saying so."""
    r, roof, dev = result["results"], result["roofline"], result["device"]
    lines = [f"# lfm-bench: {Path(result['bundle']['path']).name}", "",
             f"{dev['cpu_model']}, {dev['threads']} threads, onnxruntime {dev['onnxruntime']}; "
             f"quant {result['bundle']['manifest'].get('quant', '?')}.", ""]
    headline = measured_headline(result)
    lines += [headline, ""] if headline else []
    lines += ["| metric | median | min | max | runs (quiet) |", "|---|---|---|---|---|"]
    for key, m in r.items():
        lines.append(f"| {key} ({m['unit']}) | {m['median']:.3g} | {m['min']:.3g} | {m['max']:.3g} | "
                     f"{m['runs']} ({m['quiet_runs']}) |")
    lines += ["", f"Roofline: {result['bundle']['bytes_per_token'] / 1e6:.0f} MB read per token, read bandwidth "
              f"{roof['read_bandwidth_gbs']:.1f} GB/s -> ceiling {roof['ceiling_tps']:.1f} tok/s; best decode reaches "
              f"{roofline.share_of_ceiling(roof['fraction_reached'])}."]
    lines += _memory_lines(result.get("memory") or {})
    lines += _threads_lines(result.get("threads_sweep"))
    for name, peer in result.get("peers", {}).items():
        if not peer.get("decode_tps"):
            lines += ["", f"Peer {name}: {peer.get('error', 'no result')}"]
            continue
        prompts = ", ".join(f"{p}: {t:.1f}" for p, t in (peer.get("prompt_tps") or {}).items())
        load = f"; load {peer['load_s']:.2f} s; peak RSS {peer['peak_rss_mb']:.0f} MB" if "load_s" in peer else ""
        lines += ["", f"Peer {name}: decode {peer['decode_tps']:.1f} tok/s (median of {peer['runs']})"
                  + (f"; prompt tok/s {prompts}" if prompts else "") + load,
                  "", "| ours / theirs | ratio |", "|---|---|"]
        lines += [f"| {k} | {v:.2f}x |" for k, v in result.get("ratios", {}).get(name, {}).items()]
    lines += _phone_lines(roof)
    write_text(path, "\n".join(lines) + "\n")


def _threads_lines(sweep: dict | None) -> list[str]:
    """threads="auto"'s sweep (speed --sweep-threads): decode tok/s per candidate, the choice and why."""
    if not sweep:
        return []
    lines = ["", f"Threads (\"auto\", {sweep['topology']}): chose {sweep['label']}: {sweep['reason']}.", "",
             "| candidate | decode tok/s (median step) | steps |", "|---|---|---|"]
    return lines + [f"| {s['label']} | {s['tokens_per_second']:.1f} | {s['steps']} |" for s in sweep["sweep"]]


def _memory_lines(mem: dict) -> list[str]:
    if "peak_rss_mb" not in mem:
        return []
    decoding = (f"; while decoding {mem['rss_decoding_mb']:.0f} MB = {mem['rss_decoding_over_weights']:.2f}x"
                if "rss_decoding_mb" in mem else "")
    peak_from = mem.get("peak_from", "")  # absent from bench.json before 2026-12-07: the process's peak
    notes = ["each run's own, load included" if peak_from == "each run" else
             f"{peak_from}, the bandwidth probe included" if peak_from else "",
             f"anonymous {mem['peak_anon_mb']:.0f} MB and file-backed {mem['peak_file_mb']:.0f} MB at their highest"
             if "peak_anon_mb" in mem else ""]
    detail = "; ".join(n for n in notes if n)
    lines = ["", f"Peak RSS {mem['peak_rss_mb']:.0f} MB = {mem['peak_rss_over_weights']:.2f}x the bundle's weights "
             f"({mem['weights_mb']:.0f} MB)" + (f" ({detail})" if detail else "") + f"{decoding}."]
    for when in ("after_load", "decoding"):
        if f"anon_{when}_mb" in mem:
            lines += ["", f"{'After load' if when == 'after_load' else 'While decoding'}: anonymous "
                      f"{mem[f'anon_{when}_mb']:.0f} MB ({mem[f'anon_{when}_over_weights']:.2f}x the weights), "
                      f"file-backed {mem[f'file_{when}_mb']:.0f} MB."]
    return lines


def _phone_lines(roof: dict) -> list[str]:
    """The phone table under a heading that says it is a prediction. It is about LFM2.5-8B-A1B int4
    (roofline.phone_prediction); bench.json files written before that existed predicted the bundle itself at
    its own fraction."""
    pred = roof.get("phone_prediction")
    share = pred["efficiency"] if pred else roof["fraction_reached"]
    if pred:
        p = roofline.PhonePrediction(**pred, phones=roof["phones"])
        lines = ["", f"## Predicted, not measured: {p.model} on phones", "",
                 f"{p.predicted_range(roof['target_tps'])}. {p.basis()}"]
    else:
        lines = ["", "## Predicted, not measured: this bundle on phones, at its own share of the ceiling"]
    lines += ["", f"| phone SoC | bandwidth GB/s | ceiling tok/s | predicted tok/s (at {share:.0%}) "
              f"| >= {roof['target_tps']:.0f} tok/s |", "|---|---|---|---|---|"]
    for p in roof["phones"]:
        lines.append(f"| {p['soc']} | {p['bandwidth_gbs']:.1f} | {p['ceiling_tps']:.1f} | {p['predicted_tps']:.1f} | "
                     f"{'yes' if p['meets_target'] else 'no'} |")
    return lines


def depth_span(depth: int) -> tuple[float, float]:
    """x limits around a single depth: a visible span (not matplotlib's +-0.04 tokens), never far below 0."""
    span = max(256, depth * 0.5)
    return max(depth - span, -0.08 * (depth + span)), depth + span


def spread_out(values: list[float]) -> bool:
    """Values more than 10x apart: a linear axis would flatten the small ones (the 30 tok/s target under a
    cache-resident model's roofline of thousands), so they go on a log scale."""
    return min(values) > 0 and max(values) > 10 * min(values)


def write_plot(result: dict, path: Path) -> None:
    """Decode tok/s against context depth, with the roofline, the target and the peers as lines (every line
    inside the axes and apart: the y axis reaches the highest of them, on a log scale when they span more than
    10x; one depth gets a visible span around it)."""
    series: dict[int, list[tuple[int, float]]] = {}
    for key, m in result["results"].items():
        if key.startswith("decode/"):
            n, depth = key.split("/")[1].split("@")
            series.setdefault(int(n), []).append((int(depth), m["median"]))
    roof = result["roofline"]
    with figure(path, title=Path(result["bundle"]["path"]).name) as (_, ax):
        tops = [roof["ceiling_tps"], roof["target_tps"]]
        for n, points in sorted(series.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"decode {n} tokens")
            tops += [p[1] for p in points]
        ax.axhline(roof["ceiling_tps"], color="gray", linestyle="--", label=f"roofline {roof['ceiling_tps']:.0f} tok/s")
        ax.axhline(roof["target_tps"], color="tab:red", linestyle=":", label=f"target {roof['target_tps']:.0f} tok/s")
        for name, peer in result.get("peers", {}).items():
            if peer.get("decode_tps"):
                ax.axhline(peer["decode_tps"], color="tab:green", linestyle="-.",
                           label=f"{name} {peer['decode_tps']:.0f} tok/s")
                tops.append(peer["decode_tps"])
        depths = sorted({d for points in series.values() for d, _ in points})
        if len(depths) <= 1:
            ax.set_xlim(*depth_span(depths[0] if depths else 0))
        ax.set(xlabel="context depth (tokens)", ylabel="tokens / s")
        if spread_out(tops):
            ax.set_yscale("log")
            ax.set_ylim(min(tops) / 1.6, max(tops) * 1.6)
            ax.set_ylabel("tokens / s (log scale)")
        else:
            ax.set_ylim(0, max(tops) * 1.12)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the axes: over no line


CONVERSATION_LABELS = {"kept": "ours, state kept (Conversation)", "reprefilled": "ours, re-prefilled (LfmModel.chat)",
                       "llama.cpp": "llama.cpp (its prefix reuse)"}


def write_conversation_markdown(result: dict, path: Path) -> None:
    """`--conversation`: time to first token per turn for each system, save and restore, memory."""
    c, dev = result["conversation"], result["device"]
    spec = c["spec"]
    systems = [s for s in CONVERSATION_LABELS if s in c["turns"][0]]
    lines = [f"# lfm-bench --conversation {spec['turns']}:{spec['user']}:{spec['answer']}: "
             f"{Path(result['bundle']['path']).name}", "",
             f"{dev['cpu_model']}, {dev['threads']} threads, onnxruntime {dev['onnxruntime']}; quant "
             f"{result['bundle']['manifest'].get('quant', '?')}; {c['rounds']} conversation(s), systems in rotating "
             f"order each turn; answers of {spec['answer']} tokens"
             + (f" opening with a {spec['reasoning']}-token <think> block" if spec["reasoning"] else "")
             + f"; tokenizer: {c['tokenizer']}, template: {c['template']}.", "",
             "Time to first token, median [min-max] s (tokens prefilled, median):", "",
             "| turn | prompt tokens | " + " | ".join(CONVERSATION_LABELS[s] for s in systems) + " | load avg |",
             "|---" * (len(systems) + 3) + "|"]
    for row in c["turns"]:
        cells = []
        for s in systems:
            if s not in row:
                cells.append("")
                continue
            m = row[s]
            prefilled = statistics.median(d["prefilled"] for d in m["detail"])
            cells.append(f"{m['median']:.2f} [{m['min']:.2f}-{m['max']:.2f}] ({prefilled:.0f})")
        loads = [d["loadavg"][0] for s in systems if s in row for d in row[s]["detail"]]
        lines.append(f"| {row['turn']} | {row['prompt_tokens']} | " + " | ".join(cells)
                     + f" | {min(loads):.1f}-{max(loads):.1f} |")
    s = c["summary"]
    lines += ["", f"Turn {spec['turns']} / turn 1, state kept: {s['last_over_first_kept']:.2f}x; turn {spec['turns']} "
              f"kept / re-prefilled: {s['last_kept_over_reprefilled']:.2f}x"
              + (f"; kept / llama.cpp: {s['last_kept_over_llama']:.2f}x (per-round median "
                 f"{s['last_kept_over_llama_per_round']:.2f}x)" if "last_kept_over_llama" in s else "") + "."]
    r = c.get("restore")
    if r:
        m = r["metrics"]
        lines += ["", f"Saved conversation of {r['state_tokens']} tokens: file {r['file_bytes'] / 1e6:.1f} MB, "
                  f"saved in {r['save_s']:.2f} s ({r['snapshots']} snapshots, {r['snapshots_bytes'] / 1e6:.1f} MB). "
                  f"Continued with a {r['follow_tokens']}-token message, median [min-max] of {r['runs']}:", "",
                  "| | s |", "|---|---|"]
        for key, label in (("load", "load_conversation"), ("restored_ttft", "then the first new token"),
                           ("restored_total", "restored: load + first token"),
                           ("reprefilled_ttft", "re-prefilled: first new token")):
            if key in m:
                lines.append(f"| {label} | {m[key]['median']:.2f} [{m[key]['min']:.2f}-{m[key]['max']:.2f}] |")
        if r.get("speedup"):
            lines += ["", f"Restoring is {r['speedup']:.1f}x faster than re-prefilling."]
    mem = c["memory"]
    lines += ["", f"Memory: snapshots {mem['snapshots_bytes'] / 1e6:.1f} MB at most ({mem['snapshots']} at the end, "
              f"{mem['one_snapshot_bytes'] / 1e3:.0f} kB each; ring limit "
              f"{mem['snapshot_bytes_limit'] / 2**20:.0f} MiB), "
              f"state {mem['state_bytes'] / 1e6:.1f} MB, prefix cache budget "
              f"{mem['prefix_cache_budget_bytes'] / 2**20:.0f} MiB: snapshots + prefix budget = "
              f"{mem['snapshots_and_prefix_budget_over_weights']:.2%} of the weights "
              f"({mem['weights_bytes'] / 1e9:.2f} GB); both limits {mem['limits_over_weights']:.2%}."]
    peer = c.get("peer")
    if peer:
        lines += ["", f"llama.cpp: llama-cpp-python {peer.get('version')}, {Path(peer['gguf']).name} "
                  f"({peer.get('file_bytes', 0) / 1e9:.2f} GB), load {peer.get('load_s', 0):.2f} s, peak RSS "
                  f"{peer.get('peak_rss_mb', 0):.0f} MB (its own process)."]
    write_text(path, "\n".join(lines) + "\n")


def write_conversation_plot(result: dict, path: Path) -> None:
    c = result["conversation"]
    spec = c["spec"]
    title = (f"{Path(result['bundle']['path']).name}: {spec['turns']} turns of {spec['user']} + {spec['answer']} "
             f"tokens" + (f" (<think> {spec['reasoning']})" if spec["reasoning"] else ""))
    with figure(path, title=title) as (_, ax):
        for system, label in CONVERSATION_LABELS.items():
            if system not in c["turns"][0]:
                continue
            rows = [row for row in c["turns"] if system in row]
            turns = [row["turn"] for row in rows]
            med = [row[system]["median"] for row in rows]
            low = [m - row[system]["min"] for m, row in zip(med, rows, strict=True)]
            high = [row[system]["max"] - m for m, row in zip(med, rows, strict=True)]
            ax.errorbar(turns, med, yerr=[low, high], marker="o", capsize=3, label=label)
        ax.set(xlabel="turn", ylabel="time to first token (s)")
        ax.set_ylim(bottom=0)
        whole_numbers(ax.xaxis)
        ax.legend(fontsize=8)


def _long_rows(section: dict) -> list[tuple[str, str, dict]]:
    """(system, depth key, row) in depth order, real depths before synthetic ones."""
    rows = []
    for system, by_depth in section["summary"]["table"].items():
        for key, row in by_depth.items():
            rows.append((system, key, row))
    return sorted(rows, key=lambda r: (r[1].endswith("synthetic"), int(r[1].split()[0]), r[0]))


def write_long_markdown(result: dict, path: Path) -> None:
    """`lfm-bench long-context`: prefill and decode by depth for each system, memory, and the goal ratios."""
    s, dev = result["long_context"], result["device"]
    geo = s["geometry"]
    lines = [f"# lfm-bench long-context: {Path(result['bundle']['path']).name}", "",
             f"{dev['cpu_model']}, {dev['threads']} threads, onnxruntime {dev['onnxruntime']}; quant "
             f"{result['bundle']['manifest'].get('quant', '?')}, KV cache {geo['kv_bits']}-bit; weights "
             f"{geo['weights_bytes'] / 1e9:.2f} GB; llama.cpp: {Path(s['gguf']).name if s['gguf'] else 'not run'}. "
             f"Each system and depth in a process of its own; decode = 1 / median of {s['decode_tokens']} steps.", "",
             "| system | depth | prefill tok/s | decode tok/s | KV cache MB | RSS after load MB | peak RSS MB |",
             "|---|---|---|---|---|---|---|"]
    def num(v, fmt):
        return format(v, fmt) if v is not None else ""
    for system, key, row in _long_rows(s):
        lines.append(f"| {system} | {key} | {num(row['prefill_tps'], '.1f')} | {num(row['decode_tps'], '.1f')} | "
                     f"{row['kv_bytes'] / 1e6:.3g} | {num(row['rss_after_load_mb'], '.0f')} | "
                     f"{num(row['peak_rss_mb'], '.0f')} |")
    refused = [p for p in s["points"] if p.get("refused") or p.get("error")]
    for p in refused:
        lines += ["", f"{p['system']} at depth {p['depth']}: {p.get('refused') or p.get('error')}"]
    if s["summary"]["ratios"]:
        lines += ["", "| ratio | value |", "|---|---|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in s["summary"]["ratios"].items()]
    write_text(path, "\n".join(lines) + "\n")


def write_long_plot(result: dict, path: Path) -> None:
    """Decode tok/s against depth, and peak RSS against depth, one line per system."""
    s = result["long_context"]
    with figure(path, 1, 2, size=(11, 4.2), title=Path(result["bundle"]["path"]).name) as (_, (speed, memory)):
        for system, by_depth in s["summary"]["table"].items():
            points = sorted((int(k.split()[0]), row, k.endswith("synthetic")) for k, row in by_depth.items())
            for axis, metric in ((speed, "decode_tps"), (memory, "peak_rss_mb")):
                xs = [d for d, row, _ in points if row[metric]]
                ys = [row[metric] / (1024 if metric == "peak_rss_mb" else 1) for _, row, _ in points if row[metric]]
                line, = axis.plot(xs, ys, marker="o", label=system)
                synth = [(d, row[metric] / (1024 if metric == "peak_rss_mb" else 1)) for d, row, f in points
                         if f and row[metric]]
                if synth:
                    axis.scatter(*zip(*synth, strict=True), marker="s", s=60, facecolors="none",
                                 edgecolors=line.get_color())
        weights = s["geometry"]["weights_bytes"] / 2**30
        memory.axhline(weights, color="gray", linestyle="--", label=f"our weights {weights:.1f} GiB")
        speed.set(xlabel="context depth (tokens; squares: KV written directly)", ylabel="decode tokens / s",
                  title="decode speed by depth")
        memory.set(xlabel="context depth (tokens)", ylabel="peak RSS (GiB)", title="peak memory by depth")
        for axis in (speed, memory):
            axis.set_ylim(bottom=0)
            axis.legend(fontsize=8)
