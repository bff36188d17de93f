"""What can be checked here of the phone builds (neither builds on this machine): buildozer.spec's contents,
the source tree it packages (mobile_app/android/stage.py), the local p4a recipe, and the iOS steps."""

from __future__ import annotations

import configparser
import py_compile
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MOBILE = ROOT / "mobile_app"
sys.path.insert(0, str(MOBILE / "android"))
import stage  # noqa: E402


@pytest.fixture(scope="module")
def spec() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(interpolation=None)
    assert parser.read(MOBILE / "buildozer.spec")
    return parser["app"]


def listed(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def test_spec_identity_and_target(spec):
    assert spec["title"] and spec["package.name"].isidentifier()
    assert re.fullmatch(r"[a-z]+(\.[a-z]+)+", spec["package.domain"])
    assert listed(spec["android.archs"]) == ["arm64-v8a"]
    assert int(spec["android.api"]) >= 33 and 24 <= int(spec["android.minapi"]) <= int(spec["android.api"])
    assert spec["p4a.bootstrap"] == "sdl2"


def test_spec_requirements_and_onnxruntime_aar(spec):
    reqs = {re.split("[=<>]", r)[0] for r in listed(spec["requirements"])}
    assert {"python3", "kivy", "numpy", "pyjnius", "jinja2", "tokenizers", "llguidance"} <= reqs
    assert "plyer" in reqs  # the battery tool (mobile_app/app/tools.py) reads the phone's battery through it
    assert {"starlette", "uvicorn", "h11", "anyio", "idna", "click"} <= reqs  # the Serve switch (app/serving.py)
    assert not {"uvloop", "httptools"} & reqs  # compiled: uvicorn runs without them
    assert "onnxruntime" not in reqs  # no p4a recipe: the Java backend reaches the AAR instead
    deps = listed(spec["android.gradle_dependencies"])
    aar = [d for d in deps if d.startswith("com.microsoft.onnxruntime:onnxruntime-android:")]
    assert len(aar) == 1
    import onnxruntime

    major_minor = ".".join(onnxruntime.__version__.split(".")[:2])
    assert aar[0].rsplit(":", 1)[1].startswith(major_minor), "AAR and the tested onnxruntime should match"


def test_spec_permissions(spec):
    perms = spec["android.permissions"]
    assert "android.permission.INTERNET" in perms  # first-run model download
    assert "READ_EXTERNAL_STORAGE;maxSdkVersion=32" in perms


def test_spec_local_recipe_exists_and_compiles(spec):
    recipes = (MOBILE / spec["p4a.local_recipes"]).resolve()
    for name in ("tokenizers", "llguidance"):
        recipe = recipes / name / "__init__.py"
        py_compile.compile(str(recipe), doraise=True)
        text = recipe.read_text()
        assert "RustCompiledComponentsRecipe" in text and f'name = "{name}"' in text
        from importlib.metadata import version

        assert f'version = "{version(name)}"' in text  # the phone builds what the desktop tests


def test_spec_source_dir_is_the_staged_tree_with_the_app(spec, tmp_path):
    assert (MOBILE / spec["source.dir"]).resolve() == stage.DEFAULT_OUT.resolve()
    assert (MOBILE / "main.py").is_file()
    out = stage.stage(tmp_path / "src")
    for path in ["main.py", "lfm_edge/__init__.py", "lfm_edge/runtime/model.py", "lfm_edge/device_bench/speed.py",
                 "lfm_edge/runtime/backends/java.py", "lfm_edge/runtime/backends/objc.py",
                 "lfm_edge/mobile_app/app/main.py"]:
        assert (out / path).is_file(), path
    assert not (out / "lfm_edge" / "export").exists() and not (out / "lfm_edge" / "mobile_app" / "arm_check").exists()
    assert not (out / "lfm_edge" / "mobile_app" / "main.py").exists()
    exts = set(listed(spec["source.include_exts"]))
    assert {p.suffix[1:] for p in out.rglob("*") if p.is_file()} <= exts
    for file in out.rglob("*.py"):
        py_compile.compile(str(file), doraise=True)


def test_ios_steps_name_the_real_tools():
    text = (MOBILE / "ios" / "README.md").read_text()
    for needed in ["toolchain build python3 kivy numpy", "toolchain create", "pod 'onnxruntime-objc'",
                   "pyobjus", "stage.py"]:
        assert needed in text, needed


def test_readme_says_plainly_what_cannot_be_built_here():
    text = (MOBILE / "README.md").read_text()
    section = text[text.index("## Android and iOS builds"):]
    assert "cannot be built or run on this machine" in section
    for step in ["buildozer android debug", "adb install", "toolchain create"]:
        assert step in section, step
