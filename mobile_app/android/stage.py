"""Lay out the app's sources the way python-for-android and kivy-ios package them.

buildozer packages one folder (buildozer.spec's source.dir) and the app imports `lfm_edge.*`, which in this
repository is spread over top-level folders mapped by pyproject.toml's package-dir. This copies the entry
point (mobile_app/main.py) and the subpackages the app imports (lfm_edge, runtime, device_bench, mobile_app
without its build folders) into one tree:

    python mobile_app/android/stage.py            # -> build/mobile-src (what buildozer.spec's source.dir names)
    python mobile_app/android/stage.py --out DIR

The exporter, the quantizer and the demo model's training code are left out: a phone only runs bundles.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "build" / "mobile-src"
# lfm_edge subpackage -> repository folder (pyproject.toml [tool.setuptools] package-dir)
PACKAGES = {"lfm_edge": "lfm_edge", "lfm_edge/runtime": "runtime", "lfm_edge/device_bench": "device_bench",
            "lfm_edge/mobile_app": "mobile_app"}
SKIP = {"android", "ios", "arm_check", ".buildozer", "bin", "__pycache__"}


def stage(out: Path = DEFAULT_OUT) -> Path:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copy2(ROOT / "mobile_app" / "main.py", out / "main.py")
    for package, folder in PACKAGES.items():
        src = ROOT / folder
        for file in sorted(src.rglob("*.py")):
            rel = file.relative_to(src)
            entry = folder == "mobile_app" and rel == Path("main.py")  # copied to the top as main.py
            if rel.parts[0] in SKIP or "__pycache__" in rel.parts or entry:
                continue
            dest = out / package / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(file, dest)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    out = stage(parser.parse_args(argv).out)
    print(f"staged {sum(1 for _ in out.rglob('*.py'))} files in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
