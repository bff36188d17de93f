"""lfm_edge.export: checkpoint or GGUF -> bundle (README.md in this folder).

    from lfm_edge.export import export
    export("path/to/checkpoint", "build/bundle", target="android")
"""

from .exporter import ExportResult, export
from .options import ExportError, ExportOptions

__all__ = ["ExportError", "ExportOptions", "ExportResult", "export"]
