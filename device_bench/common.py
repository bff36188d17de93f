"""What the lfm-bench subcommands share: their common options, the progress lines, the header every
bench.json opens with, and writing bench.json / bench.md / bench.png (atomically)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Collection
from pathlib import Path

from ..runtime.bundle import BundleError, read_bundle
from ..runtime.files import write_text
from .measure import device_info

SCHEMA = "lfm-bench/1"


def ints(text: str) -> list[int]:
    """An argparse type: comma-separated integers."""
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers") from None


def parser(prog: str, doc: str | None, out: str = "build/bench") -> argparse.ArgumentParser:
    """A subcommand's parser with the options every workload takes: the bundle, threads, runs, out."""
    p = argparse.ArgumentParser(prog=f"lfm-bench {prog}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="a bundle folder written by lfm-export")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=3, help="measured runs after one warm-up")
    p.add_argument("--out", default=out, help="folder for bench.json / .md / .png")
    return p


def add_peer(p: argparse.ArgumentParser, choices: tuple[str, ...] = ("none", "llama"), default: str = "none") -> None:
    p.add_argument("--peer", choices=choices, default=default,
                   help="also measure a peer on the same weights (llama: llama.cpp on --gguf)")
    p.add_argument("--gguf", help="llama.cpp peer: a GGUF of the same weights (peers/gguf_writer.py, then "
                                  "peers/llama_cpp.py quantize)")


def fail(prog: str, message: str) -> int:
    print(f"lfm-bench {prog}: error: {message}", file=sys.stderr)
    return 2


def progress(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


def check(prog: str, bundle: Path, peer: str = "none", gguf: str | None = None) -> int:
    """0 if the bundle loads (checked as a runtime would, before minutes of measuring) and the peer has what it
    needs; else 2, with one line saying why."""
    import onnxruntime as ort

    if peer in ("llama", "all", "llama-server") and not gguf:
        return fail(prog, f"--peer {peer} needs --gguf FILE")
    if not bundle.exists():
        return fail(prog, f"{bundle}: no such folder")
    try:
        read_bundle(bundle, onnxruntime_version=ort.__version__)
    except BundleError as e:
        return fail(prog, str(e))
    return 0


def header(threads: int, bundle: Path, weights_bytes: int) -> dict:
    """What every bench.json opens with: schema, device, and the bundle measured."""
    return {"schema": SCHEMA, "device": device_info(threads),
            "bundle": {"path": str(bundle), "manifest": manifest_summary(bundle), "weights_bytes": weights_bytes}}


def manifest_summary(bundle: Path) -> dict:
    """The manifest fields a reader of bench.json needs to know what was measured."""
    try:
        manifest = json.loads((bundle / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(manifest, dict):
        return {}
    return {k: manifest.get(k) for k in ("model_type", "ops", "quant", "quant_policy", "target", "versions")}


def link_view(bundle: Path, folder: Path, skip: Collection[str] = (), hard: bool = False) -> Path:
    """`folder` with every entry of `bundle` but those named in `skip` linked into it, for a tool to add its own
    versions of the skipped files without writing into the bundle. Symlinks, or with `hard` hard links to its
    files (one file system): onnxruntime refuses external data that a symlink leads out of the graph's folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in Path(bundle).iterdir():
        if f.name in skip:
            continue
        if not hard:
            (folder / f.name).symlink_to(f.resolve())
        elif f.is_file():
            os.link(f, folder / f.name)
    return folder


def write_reports(result: dict, out: Path, markdown: Callable[[dict, Path], None],
                  plot: Callable[[dict, Path], None]) -> int:
    """bench.json, bench.md and bench.png in `out`; the markdown is printed."""
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "bench.json", json.dumps(result, indent=2))
    markdown(result, out / "bench.md")
    plot(result, out / "bench.png")
    print((out / "bench.md").read_text())
    return 0
