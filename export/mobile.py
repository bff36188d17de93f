"""What a phone bundle adds: onnxruntime's own mobile checks, where it fits the ORT format, and a README.md that
says which file a phone loads.

- `mobile_usability.txt`: onnxruntime's checker, per execution provider (NNAPI, CoreML), on this graph, without
  its terminal colour codes, under a header that sorts its onnxruntime warnings into the checker's own and the
  ones an app meets: each model file is loaded once more, as an app loads it, and its warnings compared. The
  checker loads and optimises the whole model (about 5x the weights in RAM), so above `CHECK_LIMIT` the bundle
  records that it was skipped and how to run it.
- `model.ort` + `required_operators.config`: the ORT format for onnxruntime's minimal/reduced mobile
  builds. It is one FlatBuffer with the weights inline and fails near 2 GB, so bigger models ship as
  .onnx + external data (and need a full onnxruntime build), which the manifest says.
- `README.md`: the files a phone app needs, which one it loads, and what the two reports above say.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHECK_LIMIT = 1 << 30  # weights above this are not checked here (the checker's memory)
ORT_FORMAT_LIMIT = 2_000_000_000  # the FlatBuffer's practical ceiling
ORT_FILE, OPERATORS_FILE, USABILITY_FILE, README_FILE = ("model.ort", "required_operators.config",
                                                         "mobile_usability.txt", "README.md")

_COLOUR = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # onnxruntime's log colours on a terminal-less pipe
_WARNING = re.compile(r"\[W:onnxruntime:[^\]]*\]\s*(.*)")  # a warning's message after its log prefix
# warnings an app meets on every load of every bundle, and why they are harmless
KNOWN_WARNINGS = {
    "Initializer logits_to_keep appears in graph inputs": "by design: logits_to_keep is an optional input whose "
    "default (0: every row's logits, what onnxruntime-genai gets) is an initializer (export/README.md, Logits)",
}
# loads each file named on the command line as an app does (CPU EP, default options), a marker line before each
_LOAD = ("import sys, onnxruntime as ort\n"
         "for name in sys.argv[1:]:\n"
         "    print('@@ ' + name, file=sys.stderr, flush=True)\n"
         "    ort.InferenceSession(name, providers=['CPUExecutionProvider'])\n")


def phone_extras(folder: Path, model_file: str, data_file: str) -> dict:
    """Write the extras into `folder`; returns what the manifest should say about them."""
    weights = (folder / data_file).stat().st_size if (folder / data_file).is_file() else 0
    report: dict = {}
    checker = None
    if weights <= CHECK_LIMIT:
        # run beside the model: the checker prints the path it was given, and the report goes into the bundle
        result = _run(["-m", "onnxruntime.tools.check_onnx_model_mobile_usability", model_file], cwd=folder)
        checker = _COLOUR.sub("", result.stdout + result.stderr)
        verdict = [line.split("INFO:", 1)[-1].strip() for line in checker.splitlines()
                   if "For optimal performance" in line or "not recommended" in line]
        report["mobile_usability"] = {"file": USABILITY_FILE, "summary": verdict}
    else:
        report["mobile_usability"] = {
            "skipped": f"weights are {weights / 1e9:.1f} GB; the checker needs about 5x that in RAM",
            "run": f"python -m onnxruntime.tools.check_onnx_model_mobile_usability {model_file}",
            "expected": "MatMulNBits, QMoE, GroupQueryAttention and CausalConvWithState run on the CPU EP only"}
    if weights < ORT_FORMAT_LIMIT:
        report["ort_format"] = _ort_format(folder, model_file, data_file)
    else:
        report["ort_format"] = {
            "skipped": f"weights are {weights / 1e9:.1f} GB: the ORT format inlines them in one FlatBuffer, which "
                       "fails near 2 GB; ship model.onnx + external data with a full onnxruntime build"}
    if checker is not None:
        loaded = [model_file] + ([ORT_FILE] if "file" in report["ort_format"] else [])
        on_load = load_warnings(folder, loaded)
        only_checker = sorted(set(ort_warnings(checker)) - {w for ws in on_load.values() for w in ws})
        report["mobile_usability"].update(checker_warnings=only_checker, load_warnings=on_load)
        (folder / USABILITY_FILE).write_text(_usability_header(model_file, only_checker, on_load) + checker)
    (folder / README_FILE).write_text(readme(model_file, data_file, report))
    return report


def _ort_format(folder: Path, model_file: str, data_file: str) -> dict:
    """model.ort and required_operators.config in `folder`, converted in a temporary folder (whose path the
    converter writes into the config's header: it is rewritten to the bundle's file name)."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in (model_file, data_file):
            if (folder / name).is_file():
                shutil.copyfile(folder / name, work / name)
        result = _run(["-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(work / model_file),
                       "--optimization_style", "Fixed"])
        ort_file = work / Path(model_file).with_suffix(".ort").name
        config = work / Path(model_file).with_suffix(".required_operators.config").name
        if result.returncode != 0 or not ort_file.is_file():
            return {"failed": (result.stderr or result.stdout)[-500:]}
        shutil.copyfile(ort_file, folder / ORT_FILE)
        text = config.read_text()
        for path in {str(ort_file), str(ort_file.resolve())}:
            text = text.replace(path, ORT_FILE)
        (folder / OPERATORS_FILE).write_text(text)
    return {"file": ORT_FILE, "required_operators": OPERATORS_FILE}


def ort_warnings(log: str) -> list[str]:
    """onnxruntime's warning messages in a log, in order, each once, without colours, time stamps and source
    lines."""
    found = [m.group(1).strip() for m in map(_WARNING.search, _COLOUR.sub("", log).splitlines()) if m]
    return list(dict.fromkeys(found))


def load_warnings(folder: Path, files: list[str]) -> dict[str, list[str]]:
    """file -> onnxruntime's warnings when an app's session loads it (each file of `folder` in turn)."""
    result = _run(["-c", _LOAD, *files], cwd=folder)
    out: dict[str, list[str]] = {name: [] for name in files}
    sections = re.split(r"^@@ (.+)$", _COLOUR.sub("", result.stderr), flags=re.M)
    for name, log in zip(sections[1::2], sections[2::2], strict=True):
        out[name.strip()] = ort_warnings(log)
    if result.returncode != 0:  # the export's own checks load the bundle; a failure here is the phone's too
        out["error"] = [result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "no output"]
    return out


def _explained(message: str) -> str:
    why = next((why for start, why in KNOWN_WARNINGS.items() if message.startswith(start)), None)
    return f"  - {message}" + (f"\n    ({why})" if why else "")


def _usability_header(model_file: str, only_checker: list[str], on_load: dict[str, list[str]]) -> str:
    lines = [f"onnxruntime's mobile usability checker on {model_file} (python -m "
             f"onnxruntime.tools.check_onnx_model_mobile_usability {model_file}), its output below the line with "
             "the colour codes removed. Its verdicts are about NNAPI and CoreML: this bundle's kernels "
             "(MatMulNBits, QMoE, GroupQueryAttention, CausalConvWithState) run on the CPU execution provider, "
             f"which is what a phone uses. Which file a phone loads: {README_FILE}.", ""]
    if only_checker:
        loaded = " and ".join(name for name in on_load if name != "error")
        lines += ["onnxruntime warnings the checker alone printed: its session writes an optimised copy of the graph "
                  f"(optimized_model_filepath), and none of these was printed when {loaded} loaded as an app loads "
                  "them (checked at export: manifest.json mobile_usability.load_warnings), so they do not describe "
                  "a phone."]
        if any("dequantize + SGEMM" in w for w in only_checker):
            lines[-1] += (" QMoE's 'falling back to dequantize + SGEMM' is the checker's copy: an app's session "
                          "prepacks the experts for onnxruntime's 4-bit (MLAS QNBit) kernels and says nothing.")
        lines += [*map(_explained, only_checker), ""]
    for name, found in on_load.items():
        if found:
            lines += [f"onnxruntime warnings when {name} loads as an app loads it (an app meets these):",
                      *map(_explained, found), ""]
    return "\n".join(lines) + "\n" + "-" * 100 + "\n"


def readme(model_file: str, data_file: str, report: dict) -> str:
    """README.md of a phone bundle: which file a phone loads, what else is in the folder and why."""
    ort_format = report["ort_format"]
    usability = report["mobile_usability"]
    lines = ["# A phone bundle", "",
             "## Which file a phone loads", "",
             f"`{model_file}` with its weights in `{data_file}`: onnxruntime-genai loads it (genai_config.json's "
             "`decoder.filename`), and so do lfm-edge's runtime and its Android (onnxruntime-android) and iOS "
             "(onnxruntime-objc) backends. It needs a full onnxruntime build, at least the version manifest.json's "
             "`requires` names.", ""]
    if "file" in ort_format:
        lines += [f"`{ORT_FILE}` is the same graph in onnxruntime's ORT format, weights inline, for an app that links "
                  f"a minimal (reduced) onnxruntime build, which loads the ORT format only; `{OPERATORS_FILE}` lists "
                  "the operators such a build must include (onnxruntime's build.py --minimal_build "
                  f"--include_ops_by_config {OPERATORS_FILE}). Nothing in lfm-edge or onnxruntime-genai loads it: an "
                  f"app that loads `{model_file}` can leave both files out.", ""]
    elif "skipped" in ort_format:
        lines += [f"No `{ORT_FILE}`: {ort_format['skipped']}.", ""]
    else:
        lines += [f"No `{ORT_FILE}`: onnxruntime's converter failed (manifest.json `ort_format`).", ""]
    lines += ["## Reports", ""]
    if "file" in usability:
        met = sum(len(found) for name, found in usability["load_warnings"].items() if name != "error")
        lines += [f"`{USABILITY_FILE}`: onnxruntime's mobile usability checker. NNAPI and CoreML would take few of "
                  "this graph's nodes; it runs on the CPU execution provider. Its header sorts onnxruntime's "
                  f"warnings into the checker's own ({len(usability['checker_warnings'])}: not a phone's) and those "
                  f"an app meets when it loads the model ({met}), with what each means.", ""]
    else:
        lines += [f"No `{USABILITY_FILE}`: {usability['skipped']}; run `{usability['run']}`.", ""]
    lines += ["`manifest.json`: what was exported and how (quantization policy, KV cache, bytes read per token), and "
              "the size and sha256 of every file. `quality.md`, when present: this bundle against its fp32 export "
              "on held-out text.", ""]
    return "\n".join(lines)


# runs `python -m MODULE ARGS` with torch hidden: onnxruntime.tools' __init__ imports torch whenever it is installed
# (for a PyTorch export helper these tools never call), ~3 s of each child's start
_MODULE = ("import runpy, sys\n"
           "sys.modules['torch'] = None\n"
           "sys.argv = sys.argv[1:]\n"
           "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n")


def _run(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    if args[0] == "-m":
        args = ["-c", _MODULE, *args[1:]]
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=3600, cwd=cwd)
