"""What a phone bundle adds: onnxruntime's own mobile checks and, where it fits, the ORT format.

- `mobile_usability.txt`: onnxruntime's checker, per execution provider (NNAPI, CoreML), on this graph.
  It loads and optimises the whole model (about 5x the weights in RAM), so above `CHECK_LIMIT` the bundle
  records that it was skipped and how to run it.
- `model.ort` + `required_operators.config`: the ORT format for onnxruntime's minimal/reduced mobile
  builds. It is one FlatBuffer with the weights inline and fails near 2 GB, so bigger models ship as
  .onnx + external data (and need a full onnxruntime build), which the manifest says.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHECK_LIMIT = 1 << 30  # weights above this are not checked here (the checker's memory)
ORT_FORMAT_LIMIT = 2_000_000_000  # the FlatBuffer's practical ceiling


def phone_extras(folder: Path, model_file: str, data_file: str) -> dict:
    """Write the extras into `folder`; returns what the manifest should say about them."""
    weights = (folder / data_file).stat().st_size if (folder / data_file).is_file() else 0
    report: dict = {}
    if weights <= CHECK_LIMIT:
        # run beside the model: the checker prints the path it was given, and the report goes into the bundle
        result = _run(["-m", "onnxruntime.tools.check_onnx_model_mobile_usability", model_file], cwd=folder)
        (folder / "mobile_usability.txt").write_text(result.stdout + result.stderr)
        verdict = [line.split("INFO:", 1)[-1].strip() for line in (result.stdout + result.stderr).splitlines()
                   if "For optimal performance" in line or "not recommended" in line]
        report["mobile_usability"] = {"file": "mobile_usability.txt", "summary": verdict}
    else:
        report["mobile_usability"] = {
            "skipped": f"weights are {weights / 1e9:.1f} GB; the checker needs about 5x that in RAM",
            "run": f"python -m onnxruntime.tools.check_onnx_model_mobile_usability {model_file}",
            "expected": "MatMulNBits, QMoE, GroupQueryAttention and CausalConvWithState run on the CPU EP only"}
    if weights < ORT_FORMAT_LIMIT:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            for name in (model_file, data_file):
                if (folder / name).is_file():
                    shutil.copyfile(folder / name, work / name)
            result = _run(["-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(work / model_file),
                           "--optimization_style", "Fixed"])
            ort_file = work / Path(model_file).with_suffix(".ort").name
            config = work / Path(model_file).with_suffix(".required_operators.config").name
            if result.returncode == 0 and ort_file.is_file():
                shutil.copyfile(ort_file, folder / "model.ort")
                shutil.copyfile(config, folder / "required_operators.config")
                report["ort_format"] = {"file": "model.ort", "required_operators": "required_operators.config"}
            else:
                report["ort_format"] = {"failed": (result.stderr or result.stdout)[-500:]}
    else:
        report["ort_format"] = {
            "skipped": f"weights are {weights / 1e9:.1f} GB: the ORT format inlines them in one FlatBuffer, which "
                       "fails near 2 GB; ship model.onnx + external data with a full onnxruntime build"}
    return report


def _run(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=3600, cwd=cwd)
