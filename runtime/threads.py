"""`threads="auto"`: the intra-op thread count, and on phones with big and little cores which cores, chosen by
measuring decode steps on this device, once per device and bundle, and remembered in a small JSON file.

Why measure: a phone mixes core types, and onnxruntime's weight kernels split each step across the pool's
threads and wait for the slowest; one thread on a little core slows every token. What is fastest depends on
the cores, the bundle (how much of a step parallelises) and what else the phone runs, so no fixed number is right
everywhere (export/options.py TARGET_THREADS is a guess per platform).

- **Topology** (`read_topology`): the online CPUs and, where the OS says, their capacities: Linux and Android's
  `cpuN/cpu_capacity` (arm big.LITTLE, 1024 the biggest), else `cpuN/cpufreq/cpuinfo_max_freq`; with neither,
  all cores count as equal. The reader takes a root folder, so a test gives it a simulated sysfs.
- **Candidates** (`candidates`): with equal cores, all of them, half of them, and the bundle's own count; with
  core tiers, the biggest tier, the two biggest, ... (each pinned to its cores with onnxruntime's
  `session.intra_op_thread_affinities`) and all cores unpinned; and always the default (below).
- **The default** (`incumbent`): the count a session takes without "auto" (the bundle's genai_config value,
  never more than the online CPUs; all of them when the bundle has none). A candidate replaces it only when its
  median decode step is at least `MARGIN` faster, so noise on a shared machine does not move the choice.
- **Measurement** (`measure`): each candidate gets its own session (onnxruntime fixes the pool at creation), a
  short prefill, one warm-up step, then `rounds` x `steps` decode steps, the candidates alternating round by
  round in a rotating order (a burst of other work then hits every candidate, not one); the statistic is the
  median step time. All candidates are open at once when their weights fit twice in the memory available,
  otherwise one after the other.
- **Cache** (`ThreadsCache`): a JSON file keyed by device (architecture, CPU name, topology) and bundle
  (bundle.bundle_identity); written atomically (files.py); a damaged, foreign or unreadable file is a miss, never
  an error, and an entry naming CPUs this device does not have is ignored. A sweep during which other processes
  used more than BUSY_LIMIT of the CPUs (/proc/stat, where readable) is "disturbed": its choice serves this
  process, and the next starts measure again, up to DISTURBED_RETRIES sweeps.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import bundle_identity
from .files import read_text, write_text
from .memory import available_memory

__all__ = ["AFFINITY_KEY", "CACHE_ENV", "CLI_HELP", "MARGIN", "Candidate", "ThreadChoice", "ThreadsCache",
           "Topology", "Trial", "affinity", "announce", "beats", "candidates", "check_cores", "choose", "decide",
           "default_cache_path", "device_key", "device_topology", "incumbent", "measure", "read_topology", "sweep",
           "threads_arg"]

SYSFS_CPU = Path("/sys/devices/system/cpu")
AFFINITY_KEY = "session.intra_op_thread_affinities"  # onnxruntime's session config entry
MARGIN = 0.10  # a candidate must be this much faster (median step time) than the default to replace it
FORMAT = "lfm-edge-threads/1"
MAX_CACHE_BYTES = 1 << 20
CACHE_ENV = "LFM_EDGE_THREADS_CACHE"  # where default_cache_path keeps the choices, when set
CLI_HELP = ('onnxruntime threads: a count, or "auto" (the default): the fastest of a few counts, measured once per '
            f"device and bundle and remembered in ${CACHE_ENV} or ~/.cache/lfm-edge/threads.json")


@dataclass(frozen=True)
class Topology:
    """The CPUs a session may use: logical ids as the OS numbers them, and their relative capacity (empty when
    the OS does not say). `source`: "cpu_capacity", "cpuinfo_max_freq" or "count"."""

    cpus: tuple[int, ...]
    capacity: dict[int, int] = field(default_factory=dict)
    source: str = "count"

    def tiers(self) -> list[tuple[int, ...]]:
        """The CPUs grouped by capacity, the biggest first (one group when capacities are unknown or equal)."""
        if not self.capacity:
            return [self.cpus]
        levels = sorted({self.capacity[c] for c in self.cpus}, reverse=True)
        return [tuple(c for c in self.cpus if self.capacity[c] == level) for level in levels]

    def describe(self) -> str:
        """e.g. "8 CPUs: 1 x 1024 + 3 x 800 + 4 x 400 (cpu_capacity)", or "2 CPUs"."""
        if not self.capacity or len(self.tiers()) == 1:
            return f"{len(self.cpus)} CPUs"
        parts = " + ".join(f"{len(t)} x {self.capacity[t[0]]}" for t in self.tiers())
        return f"{len(self.cpus)} CPUs: {parts} ({self.source})"


def _cpu_list(text: str) -> list[int]:
    """"0-3,5" -> [0, 1, 2, 3, 5] (the kernel's cpulist format)."""
    out: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def _read_int(path: Path) -> int | None:
    try:
        value = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    return value if value > 0 else None


def read_topology(root: str | Path = SYSFS_CPU, allowed: Iterable[int] | None = None) -> Topology:
    """The online CPUs under `root` (sysfs' cpu folder, or a simulated one), restricted to `allowed` (this
    process's affinity mask; None: no restriction), with their capacities where `root` has them. Without an
    `online` file (macOS, iOS): os.cpu_count() equal CPUs."""
    root = Path(root)
    try:
        cpus = _cpu_list((root / "online").read_text())
    except (OSError, ValueError):
        cpus = list(range(os.cpu_count() or 1))
    if allowed is not None:
        keep = set(allowed)
        cpus = [c for c in cpus if c in keep] or cpus
    for source, name in (("cpu_capacity", "cpu_capacity"), ("cpuinfo_max_freq", "cpufreq/cpuinfo_max_freq")):
        values = {c: _read_int(root / f"cpu{c}" / name) for c in cpus}
        if all(v is not None for v in values.values()):
            return Topology(tuple(cpus), {c: int(v) for c, v in values.items() if v is not None}, source)
    return Topology(tuple(cpus))


def device_topology() -> Topology:
    """This device's topology: sysfs where there is one, this process's allowed CPUs."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    return read_topology(SYSFS_CPU, allowed)


@dataclass(frozen=True)
class Candidate:
    """A thread count, and the CPUs the pool's threads are pinned to (empty: not pinned, the OS places them)."""

    threads: int
    cores: tuple[int, ...] = ()

    def label(self) -> str:
        name = f"{self.threads} thread{'s' if self.threads != 1 else ''}"
        return f"{name} on CPUs {','.join(map(str, self.cores))}" if self.cores else name

    def affinity(self) -> str | None:
        """The value of onnxruntime's `session.intra_op_thread_affinities` for this candidate (None: none)."""
        return affinity(self.threads, self.cores)


def affinity(threads: int, cores: Sequence[int]) -> str | None:
    """onnxruntime's intra-op affinity string: one entry per pool thread beyond the calling one (threads - 1
    entries, ';'-separated; onnxruntime refuses another count), each the ','-separated logical processors that
    thread may run on, numbered from 1 (processor 1 is the OS's CPU 0). Every pool thread may run on any of
    `cores`: the scheduler keeps them apart, and none lands on a core outside the set. onnxruntime never pins
    the calling thread (the app's), so one thread is never pinned: None."""
    if threads <= 1 or not cores:
        return None
    allowed = ",".join(str(c + 1) for c in sorted(cores))
    return ";".join([allowed] * (threads - 1))


def check_cores(cores: Sequence[int]) -> None:
    """A ValueError when `cores` names a CPU this process may not run on (onnxruntime would only log that it
    could not pin a thread, and run it anywhere)."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    bad = sorted(set(cores) - allowed) if allowed is not None else [c for c in cores if c < 0]
    if bad:
        raise ValueError(f"cores {list(cores)}: CPU {bad[0]} is not one this process may run on "
                         f"({sorted(allowed) if allowed is not None else 'ids start at 0'})")


def announce(prog: str, choice: ThreadChoice | None) -> None:
    """The command lines' line on stderr about what "auto" chose (nothing for a given count)."""
    if choice is not None:
        print(f"{prog}: {choice.threads} threads ({choice.note()})", file=sys.stderr)


def threads_arg(text: str) -> int | str:
    """argparse type of the CLIs' --threads: a positive count or "auto"."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:  # argparse prints this message as it is
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive count or 'auto'")
    return value


def incumbent(topology: Topology, bundle_threads: int | None) -> Candidate:
    """What a session uses without "auto": the bundle's count (at most the CPUs), else every CPU."""
    n = len(topology.cpus)
    return Candidate(min(bundle_threads, n) if bundle_threads else n)


def candidates(topology: Topology, bundle_threads: int | None = None) -> list[Candidate]:
    """The few configurations worth measuring on `topology` (module docstring), the default among them."""
    n = len(topology.cpus)
    tiers = topology.tiers()
    out: list[Candidate] = []
    if len(tiers) == 1:
        out = [Candidate(n), Candidate(max(1, n // 2))]
    else:
        chosen: list[int] = []
        for tier in tiers[:-1]:
            chosen += tier
            # one thread is the caller's, which onnxruntime does not pin (affinity above)
            out.append(Candidate(len(chosen), tuple(sorted(chosen)) if len(chosen) > 1 else ()))
        out.append(Candidate(n))
    default = incumbent(topology, bundle_threads)  # always measured: the others are judged against it
    out.insert(0, default)
    unique: list[Candidate] = []
    for c in out:
        if c not in unique:
            unique.append(c)
    return unique


@dataclass
class Trial:
    """One candidate's measured decode steps (seconds each, warm-up excluded)."""

    candidate: Candidate
    step_seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.step_seconds) if self.step_seconds else float("inf")

    def quantile(self, q: float) -> float:
        return float(np.quantile(self.step_seconds, q)) if self.step_seconds else float("inf")

    @property
    def tokens_per_second(self) -> float:
        return 1.0 / self.median if self.step_seconds and self.median > 0 else 0.0


@dataclass
class ThreadChoice:
    """What "auto" chose and why. `sweep`: each candidate's decode tok/s (median step), empty when the choice
    came from the cache file with no sweep recorded; `measured`: measured now (False: from the cache)."""

    threads: int
    cores: tuple[int, ...]
    reason: str
    topology: str
    sweep: list[dict[str, Any]]
    measured: bool
    seconds: float = 0.0  # spent measuring
    cache_file: str | None = None
    other_work: float | None = None  # share of the CPUs other processes used during the sweep (None: unknown)
    attempts: int = 1  # sweeps so far for this device and bundle (disturbed ones are repeated, DISTURBED_RETRIES)

    @property
    def disturbed(self) -> bool:
        return self.other_work is not None and self.other_work > BUSY_LIMIT

    @property
    def candidate(self) -> Candidate:
        return Candidate(self.threads, self.cores)

    def label(self) -> str:
        return self.candidate.label()

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"cores": list(self.cores), "label": self.label()}

    def note(self) -> str:
        """How it was chosen, e.g. "auto, measured at load; tok/s: 2 threads 14, 1 thread 9" (the app's Threads
        row and the command lines print it after the count)."""
        sweep = ", ".join(f"{s['label']} {s['tokens_per_second']:.0f}" for s in self.sweep)
        cores = f" on CPUs {','.join(map(str, self.cores))}" if self.cores else ""
        when = "measured at load" if self.measured else "measured earlier on this device"
        return f"auto{cores}, {when}" + (f"; tok/s: {sweep}" if sweep else "")


def beats(challenger: Trial, base: Trial, margin: float = MARGIN) -> bool:
    """`challenger` is faster than `base` by more than the margin and the noise: its median step at least
    `margin` shorter, and its steps' upper quartile below base's lower quartile (the middle halves of the two
    distributions do not overlap, so a burst of other work during some rounds cannot make the difference)."""
    return challenger.median <= base.median * (1 - margin) and challenger.quantile(0.75) < base.quantile(0.25)


def decide(trials: Sequence[Trial], default: Candidate, margin: float = MARGIN) -> tuple[Candidate, str]:
    """The default, unless another candidate `beats` it: then the fastest of those that do."""
    base = next((t for t in trials if t.candidate == default), None)
    if base is None:
        best = min(trials, key=lambda t: t.median)
        return best.candidate, f"fastest of {len(trials)} (the default {default.label()} was not measured)"
    better = [t for t in trials if t is not base and beats(t, base, margin)]
    best = min(better, key=lambda t: t.median) if better else base
    if best is not base:
        return best.candidate, (f"{best.candidate.label()}: {best.tokens_per_second:.1f} tok/s, "
                                f"{base.median / best.median - 1:.0%} faster than the default {default.label()}")
    runner = min((t for t in trials if t is not base), key=lambda t: t.median, default=None)
    than = f"; fastest other: {runner.candidate.label()} at {runner.tokens_per_second:.1f}" if runner else ""
    if runner is not None and runner.median <= base.median * (1 - margin):
        than += (f" (median step {base.median / runner.median - 1:.0%} shorter, but the middle halves of the "
                 f"step times overlap: noise)")
    return default, (f"the default {default.label()}: {base.tokens_per_second:.1f} tok/s, no candidate "
                     f"clearly faster (by {margin:.0%} and beyond the noise){than}")


def measure(open_candidate: Callable[[Candidate], Any], cands: Sequence[Candidate], steps: int = 4, rounds: int = 5,
            together: bool = True, seed: int = 0) -> tuple[list[Trial], Any]:
    """Decode steps on a session per candidate (`open_candidate(c)` returns a backend Session). `together`: all
    sessions open at once and the rounds alternate between them; otherwise one session at a time (its rounds in
    a row). Returns the trials and the last session opened (the caller may keep it, or drop it)."""
    rng = np.random.default_rng(seed)
    trials = [Trial(c) for c in cands]

    def prepare(session: Any) -> Any:
        vocab = max(2, min(int(getattr(session, "vocab_size", 1000)), 30000))
        cache = session.new_cache(1, 16 + steps * rounds + 2)
        cache.step(rng.integers(1, vocab, (1, 16)), last=1)  # a short context, as a first reply has
        cache.step(rng.integers(1, vocab, (1, 1)))  # warm-up step: first-run allocations
        return cache, vocab

    def run(trial: Trial, state: tuple[Any, int]) -> None:
        cache, vocab = state
        ids = rng.integers(1, vocab, (1, steps))  # varied ids: routing varies as in real text
        for i in range(steps):
            start = time.perf_counter()
            cache.step(ids[:, i:i + 1])
            trial.step_seconds.append(time.perf_counter() - start)

    session = None
    if together:
        sessions = [open_candidate(c) for c in cands]
        states = [prepare(s) for s in sessions]
        for r in range(rounds):
            for k in range(len(trials)):
                i = (k + r) % len(trials)
                run(trials[i], states[i])
        session = sessions[-1]
        del sessions, states
    else:
        for trial in trials:
            session = None
            gc.collect()  # the previous candidate's weights go before the next one's load
            session = open_candidate(trial.candidate)
            state = prepare(session)
            for _ in range(rounds):
                run(trial, state)
            del state
    gc.collect()
    return trials, session


BUSY_LIMIT = 0.25  # other processes using more than this share of the CPUs during a sweep: it is "disturbed"
DISTURBED_RETRIES = 3  # starts that measure again after a disturbed sweep before its choice is kept for good


def _cpu_busy_seconds() -> float | None:
    """CPU seconds all processes have used (Linux /proc/stat; None where it cannot be read, e.g. Android apps)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        ticks = [int(v) for v in fields[1:9]]
    except (OSError, ValueError, IndexError):
        return None
    busy = sum(ticks) - ticks[3] - ticks[4]  # all but idle and iowait
    return busy / os.sysconf("SC_CLK_TCK")


class OtherWork:
    """The share of the CPUs other processes used while the block ran (None where the OS does not say)."""

    def __enter__(self) -> OtherWork:
        self.share: float | None = None
        self._busy, self._own, self._wall = _cpu_busy_seconds(), _own_seconds(), time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        busy, wall = _cpu_busy_seconds(), time.monotonic() - self._wall
        if busy is None or self._busy is None or wall <= 0:
            return
        others = (busy - self._busy) - (_own_seconds() - self._own)
        self.share = max(0.0, others / (wall * (os.cpu_count() or 1)))


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


def device_key(topology: Topology) -> str:
    """Which device a measurement belongs to: architecture, CPU name, topology."""
    name = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip().lower() in ("model name", "hardware", "cpu model") and value.strip():
                name += " " + value.strip()
                break
    except OSError:
        name += " " + platform.platform()
    cores = ",".join(f"{c}:{topology.capacity.get(c, 0)}" for c in topology.cpus)
    return f"{name} | {cores}"


def default_cache_path() -> Path:
    """$LFM_EDGE_THREADS_CACHE if set, else $XDG_CACHE_HOME/lfm-edge/threads.json (~/.cache/...): where a desktop
    keeps its choices. An app passes a file in its own data folder."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lfm-edge" / "threads.json"


class ThreadsCache:
    """The choices made on this device, per device and bundle, in one small JSON file. Reading never fails:
    a missing, damaged, oversized or foreign file is empty. Writing replaces the file atomically; a write that
    fails (read-only folder, full disk) is reported by `put`'s return value, never raised."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path is not None else None

    def _entries(self) -> dict[str, Any]:
        if self.path is None:
            return {}
        try:
            doc = json.loads(read_text(self.path, MAX_CACHE_BYTES))
        except (OSError, ValueError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            return {}
        if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("entries"), dict):
            return {}
        return doc["entries"]

    def get(self, device: str, bundle: str, topology: Topology) -> ThreadChoice | None:
        entry = self._entries().get(f"{device} | {bundle}")
        try:
            threads, cores = entry["threads"], tuple(entry["cores"])
            if type(threads) is not int or not 1 <= threads <= len(topology.cpus) or \
                    not all(type(c) is int and c in topology.cpus for c in cores):
                return None
            sweep = [s for s in entry.get("sweep", []) if isinstance(s, dict)]
            other, attempts = entry.get("other_work"), entry.get("attempts", 1)
            choice = ThreadChoice(threads, cores, str(entry.get("reason", "")), topology.describe(), sweep,
                                  measured=False, cache_file=str(self.path),
                                  other_work=float(other) if isinstance(other, int | float) else None,
                                  attempts=attempts if type(attempts) is int else 1)
        except (TypeError, KeyError):  # no entry, or one of another shape
            return None
        # measured while other work took the CPUs: measure again at the next starts, a few times
        return None if choice.disturbed and choice.attempts < DISTURBED_RETRIES else choice

    def attempts(self, device: str, bundle: str) -> int:
        """Sweeps recorded so far for this device and bundle (0 if none)."""
        entry = self._entries().get(f"{device} | {bundle}")
        n = entry.get("attempts", 1) if isinstance(entry, dict) else 0
        return n if type(n) is int and n >= 0 else 1

    def put(self, device: str, bundle: str, choice: ThreadChoice) -> bool:
        if self.path is None:
            return False
        entries = self._entries()
        entries[f"{device} | {bundle}"] = {"threads": choice.threads, "cores": list(choice.cores),
                                           "reason": choice.reason, "sweep": choice.sweep,
                                           "other_work": choice.other_work, "attempts": choice.attempts,
                                           "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text(self.path, json.dumps({"format": FORMAT, "entries": entries}, indent=1))
        except OSError:
            return False
        return True


# choices made in this process, so a second "auto" session of a bundle does not measure again without a file
_memo: dict[str, ThreadChoice] = {}


def choose(bundle: str | Path, open_candidate: Callable[[Candidate], Any], bundle_threads: int | None = None,
           cache_path: str | Path | None = None, topology: Topology | None = None, steps: int = 4,
           rounds: int = 5, weights_bytes: int | None = None, margin: float = MARGIN) -> tuple[ThreadChoice, Any]:
    """The thread configuration for `bundle` on this device: from the cache file (`cache_path`) or this
    process's memory when measured before, else measured now (and saved). Returns the choice and, when the
    measurement left the chosen configuration's session open, that session (else None: open it yourself)."""
    topology = topology or device_topology()
    device, identity = device_key(topology), bundle_identity(bundle)
    cache = ThreadsCache(cache_path)
    key = f"{device} | {identity} | {cache_path}"
    known = cache.get(device, identity, topology)
    if known is None and key in _memo:  # measured earlier in this process (and not in the file, or disturbed)
        known = replace(_memo[key], measured=False)
    if known is not None:
        return known, None
    choice, last = sweep(bundle, open_candidate, bundle_threads, topology, steps, rounds, weights_bytes, margin)
    choice.attempts = cache.attempts(device, identity) + 1
    if cache.put(device, identity, choice):
        choice.cache_file = str(cache.path)
    _memo[key] = choice
    return choice, last


def sweep(bundle: str | Path, open_candidate: Callable[[Candidate], Any], bundle_threads: int | None = None,
          topology: Topology | None = None, steps: int = 4, rounds: int = 5, weights_bytes: int | None = None,
          margin: float = MARGIN) -> tuple[ThreadChoice, Any]:
    """Measure the candidates now (no cache: what lfm-bench reports) and decide. Returns the choice and, when the
    chosen configuration's session was the last one opened, that session (else None)."""
    topology = topology or device_topology()
    cands = candidates(topology, bundle_threads)
    if weights_bytes is None:
        weights_bytes = sum(p.stat().st_size for p in Path(bundle).iterdir() if p.name.startswith("model.onnx"))
    # each session repacks the weights into memory of its own: all at once only when they fit with room to spare
    # (unknown memory, as on iOS: one at a time)
    together = weights_bytes * len(cands) * 2 < (available_memory() or 0)
    start = time.perf_counter()
    with OtherWork() as other:
        trials, last = measure(open_candidate, cands, steps, rounds, together)
    chosen, reason = decide(trials, incumbent(topology, bundle_threads), margin)
    if other.share is not None and other.share > BUSY_LIMIT:
        reason += f"; disturbed: other processes used {other.share:.0%} of the CPUs meanwhile"
    table = [{"threads": t.candidate.threads, "cores": list(t.candidate.cores), "label": t.candidate.label(),
              "tokens_per_second": round(t.tokens_per_second, 2), "median_step_ms": round(t.median * 1e3, 3),
              "steps": len(t.step_seconds)} for t in trials]
    choice = ThreadChoice(chosen.threads, chosen.cores, reason, topology.describe(), table, measured=True,
                          seconds=time.perf_counter() - start, other_work=other.share)
    return choice, (last if last is not None and trials[-1].candidate == chosen else None)
