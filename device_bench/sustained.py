"""`lfm-bench sustained BUNDLE --minutes M`: decode without pause for minutes, as a phone does in a long answer,
and record per window of `--window` seconds the decode speed, what the OS says about heat (thermal zone
temperatures and CPU frequencies from /sys on Linux and Android; Android's PowerManager thermal status and iOS's
ProcessInfo.thermalState through the phone backends) and the process's anonymous and file-backed memory.

A 30-second benchmark says nothing about the tenth minute: phones throttle as they heat. The result leads with the
first and the last minute's decode speed and their ratio. Each turn prefills a fresh prompt and decodes a fixed
number of tokens; the tokens fed are varied ids, as in `lfm-bench speed` (a repeated token re-reads the same
experts and flatters the number). A sensor the OS does not expose is reported as missing, never as zero.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..plots import figure
from ..runtime import backends
from ..runtime.files import write_text
from ..runtime.memory import resident_mb
from . import common, roofline
from .measure import cpu_wait_seconds
from .speed import Cancelled

THERMAL = Path("/sys/class/thermal")
CPUS = Path("/sys/devices/system/cpu")


def thermal_zones(root: Path = THERMAL) -> dict[str, float]:
    """°C per thermal zone ("type:N"), from /sys/class/thermal/thermal_zone*/temp (millidegrees); {} where none."""
    zones = {}
    for zone in sorted(root.glob("thermal_zone*")):
        try:
            celsius = int((zone / "temp").read_text().strip()) / 1000
            kind = (zone / "type").read_text().strip() or "zone"
        except (OSError, ValueError):
            continue  # a zone that cannot be read now (some phones' zones answer EAGAIN or are disabled)
        zones[f"{kind}:{zone.name.removeprefix('thermal_zone')}"] = celsius
    return zones


def cpu_frequencies(root: Path = CPUS) -> dict[str, float]:
    """MHz per CPU from cpufreq's scaling_cur_freq (kHz); {} where cpufreq is not exposed (e.g. many VMs)."""
    found = {}
    for cpu in sorted(root.glob("cpu[0-9]*"), key=lambda p: int(p.name[3:])):
        try:
            found[cpu.name] = int((cpu / "cpufreq" / "scaling_cur_freq").read_text().strip()) / 1000
        except (OSError, ValueError):
            continue
    return found


class Sensors:
    """What the OS exposes about heat, read at each window's end; `missing` names what it does not expose."""

    def __init__(self, thermal_root: Path = THERMAL, cpu_root: Path = CPUS,
                 platform_status: Callable[[], str | None] | None = None):
        self.thermal_root, self.cpu_root = thermal_root, cpu_root
        self.platform_status = platform_status or backends.thermal_status

    def read(self) -> dict[str, Any]:
        return {"temperatures_c": thermal_zones(self.thermal_root) or None,
                "cpu_mhz": cpu_frequencies(self.cpu_root) or None,
                "platform_thermal_status": self.platform_status()}

    @staticmethod
    def missing(windows: list[dict]) -> list[str]:
        names = {"temperatures_c": f"thermal zones ({THERMAL})", "cpu_mhz": f"CPU frequencies ({CPUS}/cpu*/cpufreq)",
                 "platform_thermal_status": "the platform's thermal status (Android PowerManager / iOS "
                                            "ProcessInfo.thermalState: the phone backends)"}
        return [label for key, label in names.items() if all(w.get(key) is None for w in windows)]


def run(session: Any, seconds: float, window: float = 10.0, turn_tokens: int = 128, prompt_tokens: int = 64,
        seed: int = 0, sensors: Sensors | None = None, progress: Callable[[float, str], None] = lambda f, m: None,
        cancel: threading.Event | None = None, threads: int = 1) -> dict[str, Any]:
    """Decode on `session` (a backend's Session, running `threads` threads) for `seconds`: turns of a fresh
    `prompt_tokens` prompt and `turn_tokens` decoded tokens, one window of measurements every `window` seconds
    (each with the share of thread time spent waiting for a CPU: a window disturbed by another process is known
    as such, measure.py). Returns the result's "windows", "steps" (each decode step's end time and duration) and
    "summary"."""
    if seconds <= 0 or window <= 0 or turn_tokens < 1 or prompt_tokens < 1:
        raise ValueError("seconds, window, turn_tokens and prompt_tokens must be > 0")
    sensors = sensors or Sensors()
    rng = np.random.default_rng(seed)
    high = min(session.vocab_size, 30000)
    steps: list[tuple[float, float]] = []  # (end since start, seconds) per decode step
    windows: list[dict[str, Any]] = []
    start = time.perf_counter()
    next_window, window_start, turns = window, 0, 0
    waited, opened = cpu_wait_seconds(), 0.0

    def close_window(now: float) -> None:
        nonlocal window_start, next_window, waited, opened
        mine = steps[window_start:]
        busy = sum(dt for _, dt in mine)
        wait = cpu_wait_seconds()
        windows.append({"end_s": round(now, 3), "decode_tps": len(mine) / busy if busy else None,
                        "tokens": len(mine), "cpu_wait_share": round((wait - waited) / ((now - opened) * threads), 3),
                        **sensors.read(), **_memory()})
        window_start, next_window, waited, opened = len(steps), next_window + window, wait, now
        progress(min(now / seconds, 1.0), f"{now:.0f}/{seconds:.0f} s: "
                 + (f"{windows[-1]['decode_tps']:.1f} tok/s" if windows[-1]["decode_tps"] else "prefilling"))

    while time.perf_counter() - start < seconds:
        turns += 1
        cache = session.new_cache(1, prompt_tokens + turn_tokens + 1)
        cache.step(rng.integers(100, high, (1, prompt_tokens)), last=1)
        for token in rng.integers(100, high, turn_tokens):
            if cancel is not None and cancel.is_set():
                raise Cancelled()
            t0 = time.perf_counter()
            cache.step(np.array([[token]]))
            t1 = time.perf_counter()
            steps.append((t1 - start, t1 - t0))
            if t1 - start >= next_window:
                close_window(t1 - start)
            if t1 - start >= seconds:
                break
    end = time.perf_counter() - start
    if window_start < len(steps):
        close_window(end)
    return {"windows": windows, "steps": [[round(t, 4), round(dt, 5)] for t, dt in steps],
            "summary": summarize(steps, windows, end, turns)}


def _memory() -> dict[str, float]:
    now = resident_mb()
    return {"anonymous_mb": round(now["anonymous"], 1), "file_mb": round(now["file"], 1)}


def summarize(steps: list[tuple[float, float]], windows: list[dict], duration: float, turns: int,
              edge: float = 60.0) -> dict[str, Any]:
    """Decode speed over the first and the last `edge` seconds (a minute; half the run when it is shorter)."""
    edge = min(edge, duration / 2)

    def speed(chosen: list[tuple[float, float]]) -> float | None:
        busy = sum(dt for _, dt in chosen)
        return len(chosen) / busy if busy else None

    first = speed([s for s in steps if s[0] <= edge])
    last = speed([s for s in steps if s[0] > duration - edge])
    temps = [max(w["temperatures_c"].values()) for w in windows if w.get("temperatures_c")]
    return {"duration_s": round(duration, 1), "turns": turns, "decoded_tokens": len(steps), "edge_s": round(edge, 1),
            "first_tps": first, "last_tps": last, "last_over_first": last / first if first and last else None,
            "overall_tps": speed(steps), "hottest_c": max(temps) if temps else None,
            "missing_sensors": Sensors.missing(windows)}


def markdown(result: dict, path: Path) -> None:
    s = result["summary"]

    def fmt(x: float | None, spec: str = ".1f") -> str:
        return "n/a" if x is None else format(x, spec)

    minute = "minute" if s["edge_s"] >= 60 else f"{s['edge_s']:.0f} s"
    lines = [f"# Sustained decode: {result['bundle']['path']}", "",
             f"{s['duration_s']:.0f} s, {s['turns']} turns of {result['settings']['turn_tokens']} tokens, "
             f"{result['device']['threads']} threads on {result['device']['cpu_model']}.", "",
             "| first " + minute + " | last " + minute + " | last / first | overall | hottest zone |",
             "|---|---|---|---|---|",
             f"| {fmt(s['first_tps'])} tok/s | {fmt(s['last_tps'])} tok/s | {fmt(s['last_over_first'], '.3f')} | "
             f"{fmt(s['overall_tps'])} tok/s | {fmt(s['hottest_c'])}{' °C' * (s['hottest_c'] is not None)} |", ""]
    if s["missing_sensors"]:
        lines += ["Not exposed here (missing, not zero): " + "; ".join(s["missing_sensors"]) + ".", ""]
    lines += ["| window end (s) | decode tok/s | CPU wait | hottest °C | CPU MHz (mean) | thermal status | anon MB | "
              "file MB |", "|---|---|---|---|---|---|---|---|"]
    for w in result["windows"]:
        temp = max(w["temperatures_c"].values()) if w.get("temperatures_c") else None
        mhz = sum(w["cpu_mhz"].values()) / len(w["cpu_mhz"]) if w.get("cpu_mhz") else None
        lines.append(f"| {w['end_s']:.0f} | {fmt(w['decode_tps'])} | {w['cpu_wait_share']:.0%} | {fmt(temp)} | "
                     f"{fmt(mhz, '.0f')} | {w.get('platform_thermal_status') or 'n/a'} | {w['anonymous_mb']:.0f} | "
                     f"{w['file_mb']:.0f} |")
    write_text(path, "\n".join(lines) + "\n")


def plot(result: dict, path: Path) -> None:
    windows = [w for w in result["windows"] if w["decode_tps"] is not None]
    with figure(path, title="Sustained decode") as (fig, ax):
        t = [w["end_s"] / 60 for w in windows]
        ax.plot(t, [w["decode_tps"] for w in windows], "o-", color="tab:blue", label="decode tok/s")
        ax.set_xlabel("minutes")
        ax.set_ylabel("decode tok/s", color="tab:blue")
        ax.set_ylim(bottom=0)
        hot = [(w["end_s"] / 60, max(w["temperatures_c"].values())) for w in windows if w.get("temperatures_c")]
        right = ax.twinx()
        right.set_ylabel("hottest thermal zone, °C", color="tab:red")
        if hot:
            right.plot(*zip(*hot, strict=True), "s--", color="tab:red", label="°C")
        else:
            right.set_yticks([])
            ax.text(0.5, 0.08, "no temperature sensor exposed on this device", transform=ax.transAxes,
                    ha="center", color="tab:red")


def main(argv: list[str] | None = None) -> int:
    parser = common.parser("sustained", __doc__)
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to decode")
    parser.add_argument("--window", type=float, default=10.0, help="seconds per measurement window")
    parser.add_argument("--turn-tokens", type=int, default=128, help="tokens decoded per turn")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="tokens of each turn's fresh prompt")
    args = parser.parse_args(argv)
    bundle = Path(args.bundle)
    if min(args.minutes, args.window) <= 0 or min(args.turn_tokens, args.prompt_tokens) < 1:
        return common.fail("sustained", "--minutes and --window must be > 0, --turn-tokens and --prompt-tokens >= 1")
    if common.check("sustained", bundle):
        return 2
    session = backends.open_session(bundle, args.threads)
    result = run(session, args.minutes * 60, args.window, args.turn_tokens, args.prompt_tokens,
                 progress=lambda f, m: common.progress(m), threads=args.threads)
    weights = roofline.bytes_per_token(bundle).stored
    result = common.header(args.threads, bundle, weights) | {
        "workload": "sustained", "settings": {k: getattr(args, k) for k in
                                              ("minutes", "window", "turn_tokens", "prompt_tokens")}} | result
    return common.write_reports(result, Path(args.out), markdown, plot)
