"""Which bundle the app starts with, and loading one through the platform's onnxruntime backend."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lfm_edge.runtime import LfmModel
from lfm_edge.runtime.backends import open_session
from lfm_edge.runtime.files import write_text

# what `lfm-export --target android` and `make export` write from the bundled demo model, best first
DEFAULT_BUNDLES = ("build/demo_model-int4-contrib", "build/demo_model-fp32-contrib")


def default_bundle(cwd: Path | None = None, downloads: Path | None = None) -> Path | None:
    """The demo bundle under `cwd`/build, else the newest complete bundle downloaded earlier (a phone's
    second start must not ask for the model again)."""
    base = cwd or Path.cwd()
    for candidate in DEFAULT_BUNDLES:
        if (base / candidate / "genai_config.json").is_file():
            return base / candidate
    if downloads is not None and downloads.is_dir():
        # hidden folders are unfinished downloads (see download.py): never offered
        done = [p for p in downloads.iterdir() if not p.name.startswith(".") and check_folder(p) is None]
        if done:
            return max(done, key=lambda p: p.stat().st_mtime)
    return None


def check_folder(folder: str | Path) -> str | None:
    """Why `folder` is not a bundle, or None. Cheap: runs on the UI thread before a load starts."""
    path = Path(folder).expanduser()
    if not str(folder).strip():
        return "no folder given"
    if not path.is_dir():
        return f"{path}: no such folder"
    missing = [n for n in ("genai_config.json", "tokenizer.json") if not (path / n).is_file()]
    if missing:
        return f"{path}: not a bundle (no {', '.join(missing)})"
    return None


def load_model(folder: str | Path, threads: int | str | None = None,
               progress: Callable[[str], None] = lambda stage: None, prepack_cache: str = "off",
               threads_cache: Path | None = None) -> LfmModel:
    """Blocking (seconds for a large bundle): call it from a worker thread. The session comes from
    `backends.open_session`, so a phone build without onnxruntime's Python binding plugs in its own.
    `progress(stage)` names each stage as it starts (onnxruntime gives no progress inside a session's
    creation, which is most of the time). `threads="auto"` (what the app passes unless told a count) measures
    the thread counts the first time a bundle loads on this device and keeps the choice in `threads_cache`
    (runtime/threads.py)."""
    folder = Path(folder).expanduser()
    progress("preparing the weights")
    # prepack_cache "auto" maps the weights from a cache next to the bundle (runtime/backends/prepack.py): the app's
    # memory is then mostly file pages the system can reclaim, but the cache costs 2.1x the bundle on disk,
    # its first load a minute on the 8B, and decode ran at 0.85x (the cold-start note of 2026-11-29): off unless memory
    # is the limit
    session = open_session(folder, threads, prepack_cache=prepack_cache, threads_cache=threads_cache)
    progress("reading the tokenizer")
    return LfmModel(folder, session=session)


class LoadTimes:
    """How long each bundle took to load last time on this device (a JSON file in the app's data folder),
    so the next load's progress bar has an honest scale. A damaged or unwritable file is ignored."""

    def __init__(self, path: Path | None):
        self.path = path

    def _read(self) -> dict[str, float]:
        try:
            data = json.loads(self.path.read_text()) if self.path else {}
        except (OSError, ValueError):
            return {}
        return {k: float(v) for k, v in data.items() if isinstance(v, int | float)} if isinstance(data, dict) else {}

    def get(self, folder: Path) -> float | None:
        return self._read().get(str(folder))

    def put(self, folder: Path, seconds: float) -> None:
        if self.path is None:
            return
        data = self._read() | {str(folder): round(seconds, 2)}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text(self.path, json.dumps(data))
        except OSError:  # a record of load times: without it the progress bar guesses
            pass


@dataclass
class BundleInfo:
    folder: Path
    megabytes: float
    quant: str
    target: str
    model_type: str

    def summary(self) -> str:
        target = f"target {self.target}" if self.target else ""
        parts = [self.model_type, self.quant, target, f"{self.megabytes:.1f} MB"]
        return ", ".join(p for p in parts if p)


def bundle_info(folder: str | Path) -> BundleInfo:
    folder = Path(folder)
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        manifest = {}  # bundles from onnxruntime-genai's builder have none
    if not isinstance(manifest, dict):  # a damaged one: the load says why (read_bundle), the summary stays blank
        manifest = {}
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    return BundleInfo(folder, size / 1e6, str(manifest.get("quant", "")), str(manifest.get("target", "") or ""),
                      str(manifest.get("model_type", "")))
