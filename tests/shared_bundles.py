"""Demo bundles the test files share, each exported once per test session. Read them, never write into them:
a test that damages or edits a bundle copies it first."""

from __future__ import annotations

import functools
from pathlib import Path

from lfm_edge.export.cli import demo_model_path
from lfm_edge.export.exporter import export

KINDS = {"fp32": {}, "portable": {"ops": "portable"}, "int4": {"quant": "int4"},
         "int4-int8kv": {"quant": "int4", "kv_cache": "int8"}, "int4-int4kv": {"quant": "int4", "kv_cache": "int4"},
         "android": {"quant": "int4", "target": "android"}}


@functools.cache
def demo_bundle(root: Path, kind: str) -> Path:
    """The demo model exported as `kind` (KINDS) under the session's `root`."""
    return export(demo_model_path(), Path(root) / f"shared-demo-{kind}", **KINDS[kind]).bundle
