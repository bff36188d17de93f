"""Demo bundles the test files share, each exported once per test session (once for all of pytest-xdist's
workers: the first to need one exports it under a file lock in the run's shared folder, the others wait and read
it). Read them, never write into them: a test that damages or edits a bundle copies it first."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from filelock import FileLock

from lfm_edge.export.cli import demo_model_path
from lfm_edge.export.exporter import export

# The KV-cache variants' GPTQ calibrates on 512 tokens, not 4,096: their tests are about the cache, and the
# calibration pass is most of an int4 export's time (a demo export: ~11 s against ~20 s on a loaded machine).
# Not round-to-nearest: its int4 weights push keys past the cache's calibrated scales, and onnxruntime's two
# attention kernels saturate differently (test_attention_kernels: 0.12 apart in the logits, 4e-6 with GPTQ or
# with --kv-margin 4).
KINDS = {"fp32": {}, "portable": {"ops": "portable"}, "int4": {"quant": "int4"},
         "int4-int8kv": {"quant": "int4", "kv_cache": "int8", "calibration_tokens": 512},
         "int4-int4kv": {"quant": "int4", "kv_cache": "int4", "calibration_tokens": 512},
         "android": {"quant": "int4", "target": "android"}}


@functools.cache
def demo_bundle(root: Path, kind: str) -> Path:
    """The demo model exported as `kind` (KINDS) under the session's `root` (pytest's basetemp)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):  # each worker's basetemp lies in the run's folder
        root = Path(root).parent
    out = Path(root) / f"shared-demo-{kind}"
    with FileLock(f"{out}.lock"):
        if not out.exists():  # an export moves its bundle into place only when it is complete
            export(demo_model_path(), out, **KINDS[kind])
    return out
