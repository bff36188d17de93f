"""A bundle whose files are intact but whose fields are wrong is refused with the file and the field named,
and `lfm-chat` says so in one line, never a traceback.

"With a manifest" means the damage slipped past it: manifest.json is rewritten to match the damaged files (as a
buggy exporter or a hand edit followed by a re-hash would leave it), so only the field checks can catch it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from shared_bundles import demo_bundle

from lfm_edge.runtime import LfmModel
from lfm_edge.runtime.bundle import BundleError, sampled_sha256, sha256
from lfm_edge.runtime.cli.chat import main as chat_main

# the no-manifest cases load bundles without manifest.json on purpose: their UnverifiedBundle warning is expected
pytestmark = pytest.mark.filterwarnings("ignore::lfm_edge.runtime.bundle.UnverifiedBundle")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return demo_bundle(tmp_path_factory.getbasetemp(), "int4")


def _edit(name: str, change: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(bundle: Path) -> None:
        data = json.loads((bundle / name).read_text())
        change(data)
        (bundle / name).write_text(json.dumps(data))
    return apply


def _set(name: str, *keys_and_value) -> Callable[[Path], None]:
    *keys, last, value = keys_and_value

    def change(data: dict) -> None:
        for key in keys:
            data = data[key]
        data[last] = value
    return _edit(name, change)


def _garbage_model(bundle: Path) -> None:
    (bundle / "model.onnx").write_bytes(b"not a protobuf \x00\xff" * 64)


# (damage, file named, field named)
FIELD_DAMAGE = {
    "context_length_negative": (_set("genai_config.json", "model", "context_length", -5), "genai_config.json",
                                "model.context_length"),
    "vocab_size_text": (_set("genai_config.json", "model", "vocab_size", "x"), "genai_config.json", "model.vocab_size"),
    "eos_text": (_set("genai_config.json", "model", "eos_token_id", "abc"), "genai_config.json", "model.eos_token_id"),
    "eos_list_with_text": (_set("genai_config.json", "model", "eos_token_id", [7, "8"]), "genai_config.json",
                           "model.eos_token_id"),
    "pad_negative": (_set("genai_config.json", "model", "pad_token_id", -1), "genai_config.json", "model.pad_token_id"),
    "share_buffer_text": (_set("genai_config.json", "search", "past_present_share_buffer", "false"),
                          "genai_config.json", "search.past_present_share_buffer"),
    "model_null": (_set("genai_config.json", "model", None), "genai_config.json", "model"),
    "filename_escapes": (_set("genai_config.json", "model", "decoder", "filename", "../model.onnx"),
                         "genai_config.json", "model.decoder.filename"),
    "threads_text": (_set("genai_config.json", "model", "decoder", "session_options", "intra_op_num_threads", "4"),
                     "genai_config.json", "intra_op_num_threads"),
    "template_syntax": (_set("tokenizer_config.json", "chat_template", "{% if messages %}{{ messages[0] }"),
                        "tokenizer_config.json", "chat_template: Jinja syntax error"),
    "template_not_text": (_set("tokenizer_config.json", "chat_template", {"default": 3}), "tokenizer_config.json",
                          "chat_template['default']"),
    "temperature_text": (_set("generation_config.json", "temperature", "hot"), "generation_config.json", "temperature"),
    "top_p_out_of_range": (_set("generation_config.json", "top_p", 1.5), "generation_config.json", "top_p"),
    "garbage_model": (_garbage_model, "model.onnx", "cannot load it"),
}

MANIFEST_DAMAGE = {
    "manifest_is_a_list": (lambda b: (b / "manifest.json").write_text("[1, 2]"), "manifest.json",
                           "must be a JSON object, found a list"),
    "files_null": (_set("manifest.json", "files", None), "manifest.json", "files must be a JSON object, found null"),
    "file_bytes_text": (_edit("manifest.json", lambda m: m["files"]["model.onnx"].update(bytes="12")),
                        "manifest.json", "files['model.onnx'].bytes"),
    "file_outside": (_edit("manifest.json", lambda m: m["files"].update({"../x": m["files"]["model.onnx"]})),
                     "manifest.json", "files['../x']"),
    "requires_not_a_version": (_set("manifest.json", "requires", {"onnxruntime": "latest"}), "manifest.json",
                               "requires.onnxruntime"),
}


def _rehash(bundle: Path) -> None:
    """Make manifest.json agree with the files as they now are."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    for name, info in manifest["files"].items():
        path = bundle / name
        info.update(bytes=path.stat().st_size, sha256=sha256(path), sampled_sha256=sampled_sha256(path))
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def _chat(bundle: Path, capsys) -> tuple[int, str]:
    code = chat_main([str(bundle), "-p", "hi", "-n", "4"])  # an exception here is the traceback a user would see
    return code, capsys.readouterr().err


@pytest.mark.parametrize("manifest", ["rehashed-manifest", "no-manifest"])
@pytest.mark.parametrize("case", sorted(FIELD_DAMAGE))
@pytest.mark.slow
def test_bad_field_is_named(demo, tmp_path, capsys, case, manifest):
    damage, file, field = FIELD_DAMAGE[case]
    bundle = tmp_path / "bundle"
    shutil.copytree(demo, bundle)
    damage(bundle)
    if manifest == "no-manifest":
        (bundle / "manifest.json").unlink()
    else:
        _rehash(bundle)
    with pytest.raises(BundleError) as raised:
        LfmModel(bundle)
    assert str(bundle / file) in str(raised.value) and field in str(raised.value)
    code, err = _chat(bundle, capsys)
    assert code == 2 and f"lfm-chat: error: {bundle / file}" in err and field in err


@pytest.mark.parametrize("case", sorted(MANIFEST_DAMAGE))
def test_bad_manifest_is_named(demo, tmp_path, capsys, case):
    damage, file, field = MANIFEST_DAMAGE[case]
    bundle = tmp_path / "bundle"
    shutil.copytree(demo, bundle)
    damage(bundle)
    with pytest.raises(BundleError) as raised:
        LfmModel(bundle)
    assert str(bundle / file) in str(raised.value) and field in str(raised.value)
    code, err = _chat(bundle, capsys)
    assert code == 2 and field in err


def test_the_undamaged_copy_chats(demo, tmp_path, capsys):
    """The cases above fail for their damage, not for the copying or the re-hashing."""
    bundle = tmp_path / "bundle"
    shutil.copytree(demo, bundle)
    _rehash(bundle)
    code, _ = _chat(bundle, capsys)
    assert code == 0


def test_the_command_prints_no_traceback(demo, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(demo, bundle)
    (bundle / "manifest.json").write_text("[]")
    lfm_chat = str(Path(sys.executable).parent / "lfm-chat")
    result = subprocess.run([lfm_chat, str(bundle), "-p", "hi"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "manifest.json: the file must be a JSON object" in result.stderr


def test_context_smaller_than_the_request_is_one_line(demo, tmp_path, capsys):
    """A valid bundle with a short context and a long -n: the generation's refusal, without a traceback."""
    bundle = tmp_path / "bundle"
    shutil.copytree(demo, bundle)
    _set("genai_config.json", "model", "context_length", 8)(bundle)
    _rehash(bundle)
    code = chat_main([str(bundle), "-p", "hi", "-n", "16"])
    err = capsys.readouterr().err
    assert code == 2 and "lfm-chat: " in err and "context length 8" in err
