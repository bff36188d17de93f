"""The pipeline's one direction: which folder may import which (tests/test_layers.py holds every module to it;
docs/pipeline.py draws it into docs/pipeline.png).

    quant    numpy-level primitives (policies, blocks, GPTQ): imports no other folder
    runtime  what a phone carries (onnxruntime, numpy, tokenizers, jinja2): imports no other folder
    demo_model  the bundled demo checkpoint and its training script: the tool chats it is trained on are rendered
             by the runtime's own chat template, tool schemas and demo tools, so the model learns exactly the
             tokens LfmModel feeds it (a copy of them would drift)
    export   checkpoint -> bundle: quantizes with quant, writes the runtime's bundle format and measures what
             it wrote with the runtime
    device_bench, mobile_app   the runtime measured and put in an app (the app's Benchmark screen runs the
             benchmark's workload)
    lfm_edge (the package's own modules, e.g. plots.py): shared helpers over the runtime's file writing
"""

from __future__ import annotations

# folder -> the folders it may import (besides itself); the package root's own modules are "lfm_edge"
ALLOWED: dict[str, tuple[str, ...]] = {
    "lfm_edge": ("runtime",),
    "quant": (),
    "runtime": (),
    "export": ("quant", "runtime", "lfm_edge"),
    "demo_model": ("runtime",),
    "device_bench": ("export", "quant", "runtime", "lfm_edge"),
    "mobile_app": ("runtime", "device_bench", "lfm_edge"),
}
# the order the pipeline picture lays them out in
PIPELINE = ("quant", "export", "runtime", "device_bench", "mobile_app")
