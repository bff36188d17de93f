"""lfm-edge: Liquid LFM2 / LFM2.5 models on phones through ONNX.

The subpackages map to the repository's top-level folders (see pyproject.toml):
``lfm_edge.export``, ``lfm_edge.quant``, ``lfm_edge.runtime``, ``lfm_edge.device_bench``.
"""

__version__ = "0.1.0"
