"""Profiling studies, one question each (device_bench/README.md's table): `python -m
lfm_edge.device_bench.studies.NAME --help`. What they share: a parser named for the module, and writing a result
as a JSON file and a markdown table named for the study."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ...runtime.files import write_text

__all__ = ["parser", "write_result"]


def parser(file: str, doc: str | None) -> argparse.ArgumentParser:
    """A study's parser: `file` is its __file__, `doc` its docstring (shown as written)."""
    return argparse.ArgumentParser(prog=f"python -m {__name__}.{Path(file).stem}", description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def write_result(out: str | Path, name: str, result: dict, markdown: str) -> None:
    """`name` + ".json" and + ".md" in `out` (made if missing), each written atomically; the markdown is printed."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / f"{name}.json", json.dumps(result, indent=2))
    write_text(out / f"{name}.md", markdown)
    print(markdown)
