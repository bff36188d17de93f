"""bench.json -> bench.md (the table people read) and bench.png (decode speed against context depth)."""

from __future__ import annotations

from pathlib import Path


def write_markdown(result: dict, path: Path) -> None:
    r, roof, dev = result["results"], result["roofline"], result["device"]
    lines = [f"# lfm-bench: {Path(result['bundle']['path']).name}", "",
             f"{dev['cpu_model']}, {dev['threads']} threads, onnxruntime {dev['onnxruntime']}; "
             f"quant {result['bundle']['manifest'].get('quant', '?')}.", "",
             "| metric | median | min | max | runs (quiet) |", "|---|---|---|---|---|"]
    for key, m in r.items():
        lines.append(f"| {key} ({m['unit']}) | {m['median']:.3g} | {m['min']:.3g} | {m['max']:.3g} | "
                     f"{m['runs']} ({m['quiet_runs']}) |")
    lines += ["", f"Roofline: {result['bundle']['bytes_per_token'] / 1e6:.0f} MB read per token, read bandwidth "
              f"{roof['read_bandwidth_gbs']:.1f} GB/s -> ceiling {roof['ceiling_tps']:.1f} tok/s; best decode reaches "
              f"{roof['fraction_reached']:.0%} of it.", "",
              f"| phone SoC | bandwidth GB/s | ceiling tok/s | predicted tok/s (at {roof['fraction_reached']:.0%}) "
              f"| >= {roof['target_tps']:.0f} tok/s |", "|---|---|---|---|---|"]
    for p in roof["phones"]:
        lines.append(f"| {p['soc']} | {p['bandwidth_gbs']:.1f} | {p['ceiling_tps']:.1f} | {p['predicted_tps']:.1f} | "
                     f"{'yes' if p['meets_target'] else 'no'} |")
    mem = result.get("memory")
    if mem and "peak_rss_mb" in mem:
        decoding = (f"; while decoding {mem['rss_decoding_mb']:.0f} MB = {mem['rss_decoding_over_weights']:.2f}x"
                    if "rss_decoding_mb" in mem else "")
        lines += ["", f"Peak RSS {mem['peak_rss_mb']:.0f} MB = {mem['peak_rss_over_weights']:.2f}x the bundle's "
                  f"weights ({mem['weights_mb']:.0f} MB){decoding}."]
        for when in ("after_load", "decoding"):
            if f"anon_{when}_mb" in mem:
                lines += ["", f"{'After load' if when == 'after_load' else 'While decoding'}: anonymous "
                          f"{mem[f'anon_{when}_mb']:.0f} MB ({mem[f'anon_{when}_over_weights']:.2f}x the weights), "
                          f"file-backed {mem[f'file_{when}_mb']:.0f} MB."]
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
    path.write_text("\n".join(lines) + "\n")


def write_plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[int, list[tuple[int, float]]] = {}
    for key, m in result["results"].items():
        if key.startswith("decode/"):
            n, depth = key.split("/")[1].split("@")
            series.setdefault(int(n), []).append((int(depth), m["median"]))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for n, points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"decode {n} tokens")
    roof = result["roofline"]
    ax.axhline(roof["ceiling_tps"], color="gray", linestyle="--", label=f"roofline {roof['ceiling_tps']:.0f} tok/s")
    ax.axhline(roof["target_tps"], color="tab:red", linestyle=":", label=f"target {roof['target_tps']:.0f} tok/s")
    for name, peer in result.get("peers", {}).items():
        if peer.get("decode_tps"):
            ax.axhline(peer["decode_tps"], color="tab:green", linestyle="-.", label=f"{name} {peer['decode_tps']:.0f}")
    ax.set(xlabel="context depth (tokens)", ylabel="tokens / s", title=Path(result["bundle"]["path"]).name)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
