"""What GPTQ (quant/blocks.py gptq) needs from calibration text: each linear's input second moments H = sum x x^T.

One pass of the fp32 model (the streaming reference: one tensor in memory at a time) over windows of calibration
tokens, the text and its fallbacks as for the KV cache's scales (kv_cache.calibration_ids). Inputs come from the
unquantized model, not from already-quantized earlier layers: one pass instead of one per layer, and on the quality
model that is what the measured gain was (quant/README.md).

The exporter takes them a layer at a time (`LayerHessians`): the pass is run one decoder layer further each time
the trace reaches a layer, so what it holds is the residual stream between layers ([windows, window, hidden] fp32:
32 MB at LFM2.5-8B-A1B's 4,096 tokens) and one layer's H matrices, where `linear_hessians` (the same pass, all at
once) holds every layer's (~3 GB at that geometry). Both run the same torch ops on the same tensors in the same
order, so their H are the same bits (tests/test_calibration.py holds the two exports' bytes equal).
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
    source; ({}, None) without a pass when the model has no such weight. All layers' at once: for a small model
    and for tests (the exporter streams them, `LayerHessians`)."""
    from .reference import StreamingReference  # torch: needed for calibration only

    if not any(wanted(w.name) for w in Lfm2Model(ckpt.config).weights()):
        return {}, None
    rows, source = _windows(ckpt, text, tokens)
    hessians: dict = {}
    progress(f"GPTQ calibration: {rows.shape[0]} windows of {rows.shape[1]} tokens, one pass")
    StreamingReference(ckpt).record(_recording(wanted, hessians), rows)  # all windows in one batch
    return {name: h.numpy() for name, h in hessians.items()}, source


def _windows(ckpt, text: str | None, tokens: int) -> tuple:
    """The calibration ids as rows of WINDOW tokens [windows, window] (torch int64), and their source."""
    import torch

    ids, source = calibration_ids(ckpt, text, tokens)
    window = min(WINDOW, len(ids))
    rows = torch.tensor([ids[i:i + window] for i in range(0, len(ids) - window + 1, window)], dtype=torch.int64)
    return rows, f"{rows.numel()} tokens of {source}"


class LayerHessians:
    """`linear_hessians`' H matrices as the exporter reaches each layer: `get(name)` runs the fp32 pass up to and
    through the layer that reads `name` and hands its H out once (kept until then, dropped then). Names are asked for
    in the model's order (a trace's); asking for a layer the pass has left behind is an error, not a silent rerun.
    `source`: the tokens' source, None when no weight is wanted (then nothing is ever run)."""

    def __init__(self, ckpt, wanted: Callable[[str], bool], text: str | None = None, tokens: int = GPTQ_TOKENS,
                 progress: Callable[[str], None] = lambda m: None):
        self.ckpt, self.wanted, self.progress = ckpt, wanted, progress
        self.model = Lfm2Model(ckpt.config)
        self.source: str | None = None
        if any(wanted(w.name) for w in self.model.weights()):
            self.rows, self.source = _windows(ckpt, text, tokens)
            progress(f"GPTQ calibration: {self.rows.shape[0]} windows of {self.rows.shape[1]} tokens, a layer at a "
                     "time")
        self._ops = None
        self._x = None  # the residual stream [windows, window, hidden] entering layer `_next`
        self._next = 0
        self._hessians: dict = {}

    def __bool__(self) -> bool:
        return self.source is not None

    def get(self, name: str, default: np.ndarray | None = None) -> np.ndarray | None:
        if self.source is None or not self.wanted(name):
            return default
        layers = len(self.model.layers)
        parts = name.split(".")
        at = int(parts[2]) if name.startswith("model.layers.") and parts[2].isdigit() else layers
        if at < self._next - 1:
            raise ValueError(f"GPTQ calibration: {name!r} asked for after the pass moved past it (layer "
                             f"{self._next - 1}); weights must be asked for in the model's order")
        while self._next <= at:
            self._step()
        if name not in self._hessians:
            raise ValueError(f"GPTQ calibration: {name!r} was asked for twice; each H is handed out once, then "
                             "dropped (its weight's codes are made once)")
        return self._hessians.pop(name).numpy()  # dropped here: q/k/v's shared H lives on while one still needs it

    def _step(self) -> None:
        import torch

        from .reference import StreamingReference  # torch: needed for calibration only

        with torch.no_grad():
            if self._ops is None:
                ref = StreamingReference(self.ckpt)
                state = ref.new_state(self.rows.shape[0])
                state.mask = torch.ones_like(self.rows)
                self._ops = _recording(self.wanted, self._hessians)(ref, state)
                self._x = self._ops.embed(self.rows, self.model.embed_tokens)
            self._hessians.clear()
            self._ops.shared[:] = [None, None]
            layers = self.model.layers
            if self._next < len(layers):
                self.progress(f"GPTQ calibration: layer {self._next} of {len(layers)}")
                self._x = layers[self._next](self._ops, self._x)
                for cache in (self._ops.state.key, self._ops.state.value, self._ops.state.conv):
                    cache.pop(self._next, None)  # one pass: the layer's keys/values are never read again (~17 MB)
            else:  # the LM head's input, when a policy ever calibrates it
                m = self.model
                m.lm_head(self._ops, m.norm(self._ops, self._ops.logit_rows(self._x)))
                self._x = None
            self._ops.shared[:] = [None, None]  # the layer's last input and its H: in `_hessians` if wanted
            self._next += 1


def _recording(wanted: Callable[[str], bool], hessians: dict) -> type:
    """A _TorchOps that adds each wanted linear's input x x^T (float64) into `hessians`, as linear_hessians does."""
    from .reference import _TorchOps  # torch: needed for calibration only

    class Recording(_TorchOps):
        def __init__(self, ref, state):
            super().__init__(ref, state)
            self.shared: list = [None, None]  # the last input and its H: q/k/v, a dense FFN's w1/w3 read the same x

        def linear(self, x, layer):
            name = layer.weight.name
            if wanted(name):
                if x is not self.shared[0]:
                    flat = x.reshape(-1, x.shape[-1]).double()
                    self.shared[:] = [x, flat.T @ flat]
                hessians[name] = hessians[name] + self.shared[1] if name in hessians else self.shared[1]
            return super().linear(x, layer)

        def logit_rows(self, x):  # the LM head's inputs only when its weight is wanted
            return x if wanted("model.embed_tokens.weight") or wanted("lm_head.weight") else x[:, -1:]

    return Recording
