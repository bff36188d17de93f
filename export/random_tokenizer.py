"""A stand-in tokenizer for random-weight bundles, so lfm-chat, the app and LfmModel can open them.

A random-weight export has no checkpoint and so no tokenizer, but everything that opens a bundle needs one.
This one is the demo model's byte-level BPE (3,000 tokens, trained on English text, with the LFM2 special
tokens and chat template) moved into the geometry's layout: the 16 special tokens sit at the preset's ids
(pad, BOS, ..., <|im_end|> = EOS, ...), and filler tokens pad the vocabulary to its full size so every id
the model can emit decodes to something. It is random in the sense that matters: not the real model's
tokenizer, so prompts and answers carry no meaning; the manifest and tokenizer_config.json say so.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from importlib.resources import files
from typing import Any

NOTE = ("random-weights bundle: the demo model's tokenizer padded to the geometry's vocabulary with filler tokens, "
        "not the real model's tokenizer; text in and out carries no meaning")
# Offsets of these within the 16 LFM2 special tokens (<|pad|> first), as in the real LFM2 and LFM2.5 vocabularies.
_BOS, _EOS, _SPECIALS = 1, 7, 16


def _demo(name: str) -> dict[str, Any]:
    return json.loads(files("lfm_edge.demo_model").joinpath(name).read_text(encoding="utf-8"))


def _fillers(taken: set[str]) -> Iterator[str]:
    """Distinct tokens made of byte-level characters (so the ByteLevel decoder turns them into text): letter
    strings, alone or after "Ġ" (a leading space), shortest first."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    for length in itertools.count(2):
        for chars in itertools.product(letters, repeat=length):
            for token in ("Ġ" + "".join(chars), "".join(chars)):
                if token not in taken:
                    yield token


def random_tokenizer_files(config: dict[str, Any]) -> dict[str, str]:
    """tokenizer.json, tokenizer_config.json and generation_config.json for a random-weights `config`
    (random_weights.preset): file name -> text."""
    vocab_size, base = config["vocab_size"], config["pad_token_id"]
    if config["bos_token_id"] != base + _BOS or config["eos_token_id"] != base + _EOS \
            or base + _SPECIALS > vocab_size:
        raise ValueError(f"random tokenizer: pad/bos/eos {base}/{config['bos_token_id']}/{config['eos_token_id']} "
                         "do not follow the LFM2 special-token layout")
    tokenizer = _demo("tokenizer.json")
    specials = sorted(tokenizer["added_tokens"], key=lambda t: t["id"])
    assert [t["id"] for t in specials] == list(range(_SPECIALS)), "the demo tokenizer's special tokens moved"
    old_vocab: dict[str, int] = tokenizer["model"]["vocab"]
    regular = [token for token, i in sorted(old_vocab.items(), key=lambda item: item[1]) if i >= _SPECIALS]
    fillers = _fillers(set(old_vocab))
    regular += [next(fillers) for _ in range(vocab_size - _SPECIALS - len(regular))]
    free_ids = [i for i in range(vocab_size) if not base <= i < base + _SPECIALS]
    vocab = dict(zip(regular, free_ids, strict=True))
    for token in specials:
        token["id"] = base + token["id"]
        vocab[token["content"]] = token["id"]
    tokenizer["model"]["vocab"] = vocab
    tokenizer["added_tokens"] = specials
    for entry in tokenizer["post_processor"].get("special_tokens", {}).values():  # the BOS it prepends
        entry["ids"] = [vocab[t] for t in entry["tokens"]]

    tokenizer_config = _demo("tokenizer_config.json")
    tokenizer_config["model_max_length"] = config["max_position_embeddings"]
    tokenizer_config["lfm_edge_note"] = NOTE
    generation = {"bos_token_id": base + _BOS, "eos_token_id": base + _EOS, "pad_token_id": base, "do_sample": False}
    return {"tokenizer.json": json.dumps(tokenizer, ensure_ascii=False),
            "tokenizer_config.json": json.dumps(tokenizer_config, indent=2),
            "generation_config.json": json.dumps(generation, indent=2)}
