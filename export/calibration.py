"""What GPTQ (quant/blocks.py gptq) needs from calibration text: each linear's input second moments H = sum x x^T.

One pass of the fp32 model (the streaming reference: one tensor in memory at a time) over windows of calibration
tokens, the text and its fallbacks as for the KV cache's scales (kv_cache.calibration_ids). Inputs come from the
unquantized model, not from already-quantized earlier layers: one pass instead of one per layer, and on the quality
model that is what the measured gain was (quant/README.md).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .kv_cache import calibration_ids
from .lfm2 import Lfm2Model

GPTQ_TOKENS = 4096
WINDOW = 512


def linear_hessians(ckpt, wanted: Callable[[str], bool], text: str | None = None, tokens: int = GPTQ_TOKENS,
                    progress: Callable[[str], None] = lambda m: None) -> tuple[dict[str, np.ndarray], str | None]:
    """weight name -> H [K, K] (float64) for every linear whose weight name `wanted` accepts, and the tokens'
    source; ({}, None) without a pass when the model has no such weight."""
    import torch

    from .reference import StreamingReference, _TorchOps  # torch: needed for calibration only

    if not any(wanted(w.name) for w in Lfm2Model(ckpt.config).weights()):
        return {}, None
    ids, source = calibration_ids(ckpt, text, tokens)
    hessians: dict[str, torch.Tensor] = {}

    layers = ckpt.config.num_hidden_layers
    seen: set[str] = set()
    shared: list = [None, None]  # the last input and its H: q/k/v, and a dense FFN's w1/w3, read the same x

    class Recording(_TorchOps):
        def linear(self, x, layer):
            name = layer.weight.name
            prefix = ".".join(name.split(".")[:3])  # model.layers.N
            if prefix.startswith("model.layers.") and prefix not in seen:
                seen.add(prefix)
                progress(f"GPTQ calibration: layer {prefix.split('.')[2]} of {layers}")
            if wanted(name):
                if x is not shared[0]:
                    flat = x.reshape(-1, x.shape[-1]).double()
                    shared[:] = [x, flat.T @ flat]
                hessians[name] = hessians[name] + shared[1] if name in hessians else shared[1]
            return super().linear(x, layer)

        def logit_rows(self, x):  # the LM head's inputs only when its weight is wanted
            return x if wanted("model.embed_tokens.weight") or wanted("lm_head.weight") else x[:, -1:]

    window = min(WINDOW, len(ids))
    rows = torch.tensor([ids[i:i + window] for i in range(0, len(ids) - window + 1, window)], dtype=torch.int64)
    progress(f"GPTQ calibration: {rows.shape[0]} windows of {window} tokens, one pass")
    StreamingReference(ckpt).record(Recording, rows)  # all windows in one batch: every weight is read once
    return {name: h.numpy() for name, h in hessians.items()}, f"{rows.numel()} tokens of {source}"
