"""Export memory: each `lfm-export` run's resident memory over time, its peak, and its child processes' apart.

    python -m lfm_edge.device_bench.studies.export_memory \
        --run "--random-weights lfm2.5-8b-a1b:2 --target android" --run "--random-weights lfm2-1.2b --target android" \
        [--out DIR] [--name NAME]

Each run is `lfm-export ARGS --out TMP --quiet` in a fresh process, its RSS (and each descendant's: a phone bundle's
onnxruntime checks run in child processes, export/mobile.py) sampled every 0.2 s from /proc; the peak lfm-export
prints itself (VmHWM, exact) is read from its last line. The bundle is deleted afterwards unless --keep. Writes
a json, a markdown table and a png (RSS over time, one line per run) named --name in DIR (default
build/export-memory). A child's
getrusage peak is no use here: Linux carries the parent's high-water mark into a child across exec.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ...runtime.memory import status_mb
from . import parser, write_result

MIB = 1 << 20
PERIOD = 0.2
_PEAK = re.compile(r"peak memory ([0-9.]+) GiB")  # lfm-export's last line (export/cli.py)


def _rss_mib(pid: int) -> float:
    return status_mb("VmRSS", pid=pid).get("VmRSS", 0.0)  # 0 once the process has ended


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def measure(args: str, keep: Path | None = None) -> dict:
    """One export: its RSS series [(s, own MiB, largest child MiB)], peaks, wall time and lfm-export's own line."""
    work = Path(tempfile.mkdtemp(prefix="export-memory-"))
    out = keep or work / "bundle"
    # this interpreter, not a PATH lookup: a venv used without activation has no lfm-export on PATH
    command = [sys.executable, "-m", "lfm_edge.export.cli", *shlex.split(args), "--out", str(out), "--quiet"]
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    series: list[tuple[float, float, float]] = []
    while proc.poll() is None:
        child = max((_rss_mib(c) for c in _descendants(proc.pid)), default=0.0)
        series.append((round(time.perf_counter() - started, 2), _rss_mib(proc.pid), child))
        time.sleep(PERIOD)
    output = proc.stdout.read()
    seconds = time.perf_counter() - started
    shutil.rmtree(work, ignore_errors=True)
    if proc.returncode != 0:
        raise SystemExit(f"lfm-export {args}: exit {proc.returncode}\n{output[-2000:]}")
    printed = _PEAK.findall(output)
    return {"args": args, "seconds": round(seconds, 1),
            "peak_gib_printed": float(printed[-1]) if printed else None,
            "peak_own_mib_sampled": round(max(s[1] for s in series), 1) if series else None,
            "peak_child_mib_sampled": round(max(s[2] for s in series), 1) if series else None,
            "series": series}


def markdown(result: dict) -> str:
    lines = [f"# Export memory ({result['date']})", "", result["note"], "",
             "| lfm-export arguments | peak RSS (lfm-export's own line) | sampled own peak | largest child | time |",
             "|---|---|---|---|---|"]
    for r in result["runs"]:
        printed = f"{r['peak_gib_printed']:.2f} GiB" if r["peak_gib_printed"] is not None else "-"
        lines.append(f"| `{r['args']}` | **{printed}** | {r['peak_own_mib_sampled']:,.0f} MiB | "
                     f"{r['peak_child_mib_sampled']:,.0f} MiB | {r['seconds']:,.0f} s |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    from ...plots import figure  # matplotlib: imported when a plot is drawn

    with figure(path, title="lfm-export resident memory over time") as (_, ax):
        for r in result["runs"]:
            t = [s[0] / 60 for s in r["series"]]
            ax.plot(t, [s[1] / 1024 for s in r["series"]], label=r["args"])
            if any(s[2] for s in r["series"]):
                ax.plot(t, [s[2] / 1024 for s in r["series"]], linestyle=":", color=ax.lines[-1].get_color(),
                        label="  its child processes")
        ax.set_xlabel("minutes")
        ax.set_ylabel("RSS (GiB)")
        ax.legend(fontsize=7)


def main(argv: list[str] | None = None) -> int:
    p = parser(__file__, __doc__)
    p.add_argument("--run", action="append", required=True, help="lfm-export's arguments (without --out), quoted")
    p.add_argument("--out", default="build/export-memory")
    p.add_argument("--name", default="export-memory")
    p.add_argument("--note", default="", help="a line for the report: which code, which machine state")
    p.add_argument("--keep", default=None, help="keep the (last) bundle in this folder")
    args = p.parse_args(argv)
    runs = []
    for run in args.run:
        runs.append(measure(run, Path(args.keep) if args.keep else None))
        print(f"{run}: peak {runs[-1]['peak_gib_printed']} GiB (own line), {runs[-1]['seconds']:.0f} s", flush=True)
    result = {"date": time.strftime("%Y-%m-%d"), "note": args.note, "runs": runs}
    write_result(args.out, args.name, result, markdown(result))
    plot(result, Path(args.out) / f"{args.name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
