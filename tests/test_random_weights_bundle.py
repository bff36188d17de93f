"""A random-weights bundle opens in our own tools: it carries a tokenizer of the geometry's vocabulary and a chat
template, and says that the tokenizer is a stand-in."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer

from lfm_edge.export.cli import main as export_main
from lfm_edge.export.exporter import export
from lfm_edge.export.random_tokenizer import random_tokenizer_files
from lfm_edge.export.random_weights import PRESETS, preset
from lfm_edge.mobile_app.app.model import check_folder
from lfm_edge.runtime import LfmModel
from lfm_edge.runtime.cli.chat import main as chat_main
from lfm_edge.runtime.templates import ChatTemplate


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_tokenizer_has_the_geometry_vocabulary_and_special_ids(tmp_path, name):
    config = preset(name)
    for file, text in random_tokenizer_files(config).items():
        (tmp_path / file).write_text(text, encoding="utf-8")
    tokenizer = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert tokenizer.get_vocab_size() == config["vocab_size"]
    assert tokenizer.token_to_id("<|pad|>") == config["pad_token_id"]
    assert tokenizer.token_to_id("<|startoftext|>") == config["bos_token_id"]
    assert tokenizer.token_to_id("<|im_end|>") == config["eos_token_id"]
    assert all(tokenizer.id_to_token(i) is not None for i in range(config["vocab_size"]))  # every id decodes
    text = "Hello, what is 2 + 2? Ünïcödé too."
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False).ids) == text
    prompt = ChatTemplate.from_folder(tmp_path).render([{"role": "user", "content": "Hi"}])
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    assert ids[0] == config["bos_token_id"] and max(ids) < config["vocab_size"]
    assert "not the real model's tokenizer" in json.loads((tmp_path / "tokenizer_config.json").read_text())[
        "lfm_edge_note"]


@pytest.mark.parametrize("name", sorted(n for n, cfg in PRESETS.items() if cfg["model_type"] == "lfm2_moe"))
def test_help_says_how_many_layers_hold_every_layer_kind(name, capsys):
    two, three = preset(f"{name}:2"), preset(f"{name}:3")
    # two layers: conv with a dense FFN only; three: an attention layer and an MoE one too
    assert set(two["layer_types"]) == {"conv"} and two["num_dense_layers"] == 2
    assert "full_attention" in three["layer_types"] and three["num_hidden_layers"] > three["num_dense_layers"]
    with pytest.raises(SystemExit):
        export_main(["--help"])
    assert "keep at least 3 for an attention layer and an MoE one" in " ".join(capsys.readouterr().out.split())


@pytest.mark.slow
def test_random_weights_bundle_chats(tmp_path, capsys):
    # the real LFM2-8B-A1B widths and 65,536-token vocabulary, one layer deep to keep the test short; int8 (RTN)
    # because int4's GPTQ takes minutes at these widths (its path is held to its reference on tiny models)
    bundle = export(None, tmp_path / "random", quant="int8", random_weights="lfm2-8b-a1b:1").bundle
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["source"] == {"random_weights": "lfm2-8b-a1b:1"}
    assert "not the real model's tokenizer" in manifest["tokenizer"]
    assert check_folder(bundle) is None  # what the app asks before it loads
    model = LfmModel(bundle)
    done = model.chat([{"role": "user", "content": "What is a list?"}], max_new_tokens=6)
    assert done.stats.generated_tokens > 0 and done.raw
    assert chat_main([str(bundle), "-p", "hi", "-n", "4", "--no-tools"]) == 0
