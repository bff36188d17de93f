"""The folders import in one direction (lfm_edge/layers.py), and project imports sit at module top unless a
heavy or platform-specific dependency is the reason, which a comment on the import says."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from lfm_edge.layers import ALLOWED

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"lfm_edge": "lfm_edge", **{folder: folder for folder in ALLOWED if folder != "lfm_edge"}}


def modules():
    """(folder, path, dotted package of the module) for every module of the project."""
    for folder, directory in PACKAGES.items():
        for path in sorted((ROOT / directory).rglob("*.py")):
            if ".buildozer" in path.parts or (folder == "lfm_edge" and path.parent != ROOT / "lfm_edge"):
                continue
            rel = path.relative_to(ROOT / directory).with_suffix("")
            parts = ["lfm_edge"] + ([] if folder == "lfm_edge" else [folder]) + list(rel.parts)
            package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
            yield folder, path, package


def imported(node: ast.AST, package: list[str]) -> str | None:
    """The lfm_edge folder an import statement reaches, or None for third-party and standard modules."""
    if isinstance(node, ast.ImportFrom):
        if node.level:
            base = package[:len(package) - node.level + 1]
            name = ".".join(base + ([node.module] if node.module else []))
        else:
            name = node.module or ""
    elif isinstance(node, ast.Import):
        name = node.names[0].name
    else:
        return None
    parts = name.split(".")
    if parts[0] != "lfm_edge":
        return None
    if len(parts) == 1 or parts[1] not in ALLOWED:
        if isinstance(node, ast.ImportFrom) and len(parts) == 1:  # from lfm_edge import runtime
            names = {a.name for a in node.names}
            return next((n for n in names if n in ALLOWED), "lfm_edge")
        return "lfm_edge"
    return parts[1]


def test_imports_follow_the_pipelines_direction():
    wrong = []
    for folder, path, package in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            target = imported(node, package)
            if target is not None and target != folder and target not in ALLOWED[folder]:
                wrong.append(f"{path.relative_to(ROOT)}:{node.lineno} ({folder}) imports {target}")
    assert not wrong, "imports against the pipeline's direction (lfm_edge/layers.py):\n" + "\n".join(wrong)


@pytest.mark.slow
def test_project_imports_inside_functions_say_why():
    silent = []
    for _, path, package in modules():
        lines = path.read_text().splitlines()
        for fn in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if imported(node, package) is not None and "#" not in lines[node.lineno - 1] and \
                        not lines[node.lineno - 2].strip().startswith("#"):
                    silent.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not silent, "project imports inside functions without a comment saying why:\n" + "\n".join(silent)


def test_the_layers_check_catches_a_backward_import(tmp_path):
    """The check itself: an export module importing device_bench is found."""
    module = ast.parse("from ..device_bench import roofline\nimport lfm_edge.runtime.files\n")
    targets = [imported(node, ["lfm_edge", "export"]) for node in module.body]
    assert targets == ["device_bench", "runtime"]
    assert "device_bench" not in ALLOWED["export"] and "runtime" in ALLOWED["export"]


@pytest.mark.slow
def test_the_pipeline_picture_is_drawn_from_the_same_table(tmp_path):
    out = tmp_path / "pipeline.png"
    subprocess.run([sys.executable, str(ROOT / "docs" / "pipeline.py"), "--out", str(out)], check=True, timeout=120)
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert (ROOT / "docs" / "pipeline.png").is_file()
