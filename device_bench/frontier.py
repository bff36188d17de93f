"""The speed/quality frontier: our policies against llama.cpp's formats, decode speed against KL.

Speed comes from the full model's geometry (random weights: speed does not depend on their values), quality
from a trained model where every format applies (`lfm-bench quality` on demo_model/train.py's `--preset
quality`): one point per policy and per llama.cpp format. Every (our bundle, llama.cpp file) pair runs
`studies/ab.py` in a fresh process, alternated rounds on the same tokens, so each comparison is a per-round
ratio measured side by side, not two numbers minutes apart on a shared machine.

    lfm-bench frontier --ours int4=DIR --ours int2-experts=DIR \\
        --llama Q4_0=FILE --llama Q4_K_M=FILE --quality build/quality/quality.json --rounds 4

Pairs already measured (their JSON in --out/pairs) are reused, so an interrupted run continues. Writes
frontier.json, frontier.md and frontier.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from ..plots import figure
from ..runtime.files import write_text

DOMINATES = 1.15  # the bar: as good in KL and this much faster in decode
DEFAULT_BAR = 1.10  # the default phone policy against llama.cpp Q4_0


def _named(items: list[str], flag: str) -> dict[str, Path]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"{flag} {item!r}: expected NAME=PATH")
        if not Path(path).exists():
            raise ValueError(f"{flag} {item!r}: {path} does not exist")
        out[name] = Path(path)
    return out


def quality_of(quality: list[dict], name: str, llama: bool) -> dict:
    """The quality row of a policy (by policy name) or a llama.cpp format (label "llama.cpp FMT")."""
    label = f"llama.cpp {name}" if llama else name
    for row in quality:
        if row["label"] == label:
            return row
    known = ", ".join(row["label"] for row in quality)
    raise ValueError(f"the quality report has no row {label!r} (it has: {known}); run lfm-quant-report with "
                     f"{'--llama-cpp ' + name if llama else '--policies ' + name}")


def run_pair(bundle: Path, gguf: Path, out: Path, rounds: int, prompt: int, decode: int, threads: int) -> dict:
    """One alternated A/B in its own process (so each pair starts from the same memory state)."""
    if not out.is_file():
        cmd = [sys.executable, "-m", "lfm_edge.device_bench.studies.ab", str(bundle), str(gguf), "--rounds",
               str(rounds), "--prompt", str(prompt), "--decode", str(decode), "--threads", str(threads), "--out",
               str(out)]
        subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


def summarize(pairs: dict[tuple[str, str], dict], quality: list[dict], default: str = "int4") -> dict:
    """Points (tok/s and KL per system), per-pair ratios, and for each llama.cpp format the fastest of our
    policies that is at least as good in KL (the frontier verdict)."""
    ours_names = sorted({o for o, _ in pairs})
    llama_names = sorted({t for _, t in pairs}, key=lambda t: -quality_of(quality, t, True)["kl"])
    points = []
    for name in ours_names:
        q = quality_of(quality, name, False)
        speeds = [p["median"]["ours_decode"] for (o, _), p in pairs.items() if o == name]
        points.append({"system": name, "ours": True, "decode": statistics.median(speeds), "kl": q["kl"],
                       "top1": q["top1"], "ppl": q["ppl"]})
    for name in llama_names:
        q = quality_of(quality, name, True)
        speeds = [p["median"]["llama_decode"] for (_, t), p in pairs.items() if t == name]
        points.append({"system": f"llama.cpp {name}", "ours": False, "decode": statistics.median(speeds),
                       "kl": q["kl"], "top1": q["top1"], "ppl": q["ppl"]})
    kl = {p["system"]: p["kl"] for p in points}
    verdicts = []
    for fmt in llama_names:
        theirs = kl[f"llama.cpp {fmt}"]
        candidates = [(pairs[(o, fmt)]["decode_ratio_per_round"], o) for o in ours_names
                      if (o, fmt) in pairs and kl[o] <= theirs]
        ratio, best = max(candidates) if candidates else (None, None)
        verdicts.append({"llama": fmt, "kl": theirs, "best": best, "best_kl": kl.get(best), "decode_ratio": ratio,
                         "dominates": ratio is not None and ratio >= DOMINATES})
    table = [{"ours": o, "llama": t, "decode_ratio": p["decode_ratio_per_round"],
              "prefill_ratio": p["prefill_ratio_per_round"], "ours_decode": p["median"]["ours_decode"],
              "llama_decode": p["median"]["llama_decode"], "rounds": len(p["rounds"]), "prompt": p["prompt"]}
             for (o, t), p in sorted(pairs.items())]
    goal = None
    if (default, "Q4_0") in pairs:
        ratio = pairs[(default, "Q4_0")]["decode_ratio_per_round"]
        as_good = kl[default] <= kl["llama.cpp Q4_0"]
        goal = {"policy": default, "decode_ratio": ratio, "kl": kl[default], "q4_0_kl": kl["llama.cpp Q4_0"],
                "met": ratio >= DEFAULT_BAR and as_good}
    return {"points": points, "pairs": table, "verdicts": verdicts, "default_vs_q4_0": goal,
            "frontier_dominates": bool(verdicts) and all(v["dominates"] for v in verdicts)}


def write_markdown(result: dict, path: Path) -> None:
    lines = ["# Decode speed against quantization quality", "",
             "Decode tok/s is each system's median over the pairs it ran in; pairs run minutes apart and this "
             "machine's memory speed drifts between them, so compare systems by the per-pair ratios below (each "
             "the median of per-round ratios measured side by side).", "",
             "| system | decode tok/s (full geometry) | KL(fp32 ‖ q) on the quality model | top-1 | perplexity |",
             "|---|---|---|---|---|"]
    for p in sorted(result["points"], key=lambda p: p["kl"]):
        name = f"**{p['system']}**" if p["ours"] else p["system"]
        lines.append(f"| {name} | {p['decode']:.1f} | {p['kl']:.4f} | {p['top1']:.1%} | {p['ppl']:.2f} |")
    lines += ["", "Per pair (alternated rounds; ratio = per-round median of ours / llama.cpp):", "",
              "| ours | llama.cpp | decode ours / theirs tok/s | decode ratio | prefill ratio | rounds |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['ours']} | {r['llama']} | {r['ours_decode']:.1f} / {r['llama_decode']:.1f} | "
              f"{r['decode_ratio']:.2f}x | {r['prefill_ratio']:.2f}x | {r['rounds']} |" for r in result["pairs"]]
    lines += ["", f"At each llama.cpp format's KL, our fastest policy with KL no worse (goal: >= {DOMINATES}x):", "",
              "| llama.cpp | its KL | ours | our KL | decode ratio | >= goal |", "|---|---|---|---|---|---|"]
    for v in result["verdicts"]:
        if v["best"] is None:
            lines.append(f"| {v['llama']} | {v['kl']:.4f} | none as good in KL | | | no |")
        else:
            lines.append(f"| {v['llama']} | {v['kl']:.4f} | {v['best']} | {v['best_kl']:.4f} | "
                         f"{v['decode_ratio']:.2f}x | {'yes' if v['dominates'] else 'no'} |")
    g = result["default_vs_q4_0"]
    if g:
        lines += ["", f"Default policy `{g['policy']}` against llama.cpp Q4_0: decode {g['decode_ratio']:.2f}x, KL "
                  f"{g['kl']:.4f} vs {g['q4_0_kl']:.4f}: goal (>= {DEFAULT_BAR}x, KL no worse) "
                  f"{'met' if g['met'] else 'not met'}."]
    write_text(path, "\n".join(lines) + "\n")


def write_plot(result: dict, path: Path) -> None:
    title = "speed against quality (compare systems by the per-pair ratios in frontier.md)"
    with figure(path, title=title) as (_, ax):
        for ours, color, label in ((True, "tab:blue", "lfm-edge policies"), (False, "tab:orange", "llama.cpp formats")):
            pts = sorted((p for p in result["points"] if p["ours"] == ours), key=lambda p: p["kl"])
            ax.plot([p["kl"] for p in pts], [p["decode"] for p in pts], "o-", color=color, label=label)
            for p in pts:
                ax.annotate(p["system"].replace("llama.cpp ", ""), (p["kl"], p["decode"]), fontsize=8,
                            xytext=(4, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set(xlabel="KL(fp32 ‖ quantized) on the quality model, nats/token (lower is better)",
               ylabel="decode tok/s, full geometry (median over pairs)")
        ax.legend()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lfm-bench frontier", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ours", action="append", default=[], metavar="POLICY=BUNDLE", required=True)
    parser.add_argument("--llama", action="append", default=[], metavar="FORMAT=GGUF", required=True)
    parser.add_argument("--quality", required=True, help="quality.json from lfm-bench quality on the quality model")
    parser.add_argument("--default", default="int4", help="the policy the Q4_0 goal is about")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--decode", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="build/bench/frontier")
    args = parser.parse_args(argv)
    try:
        ours, llama = _named(args.ours, "--ours"), _named(args.llama, "--llama")
        quality = json.loads(Path(args.quality).read_text())
        for name in ours:
            quality_of(quality, name, False)
        for name in llama:
            quality_of(quality, name, True)
    except (ValueError, OSError) as e:
        parser.error(str(e))
    out = Path(args.out)
    (out / "pairs").mkdir(parents=True, exist_ok=True)
    pairs = {}
    todo = [(o, t) for o in ours for t in llama]
    for i, (o, t) in enumerate(todo, 1):
        print(f"[{i}/{len(todo)}] {o} against llama.cpp {t}", file=sys.stderr, flush=True)
        pairs[(o, t)] = run_pair(ours[o], llama[t], out / "pairs" / f"{o}--{t}.json", args.rounds, args.prompt,
                                 args.decode, args.threads)
    result = summarize(pairs, quality, args.default)
    result["quality_report"] = str(args.quality)
    write_text(out / "frontier.json", json.dumps(result, indent=2))
    write_markdown(result, out / "frontier.md")
    write_plot(result, out / "frontier.png")
    print((out / "frontier.md").read_text())
    print(f"Wrote {out / 'frontier.json'}, {out / 'frontier.md'}, {out / 'frontier.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
