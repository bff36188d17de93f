"""A GGUF's `tokenizer.ggml.*` metadata <-> a Hugging Face tokenizer.json, both directions.

GGUF keeps a byte-level BPE as its token strings, token types and merges, and names the pre-tokenizer
(`tokenizer.ggml.pre`) instead of storing its regex: llama.cpp maps the name to the split rules in its
own source. So a tokenizer.json is rebuilt from the names we know; any other name is refused (a wrong split
would tokenize differently without any error), and `--tokenizer` supplies the checkpoint's own file instead.

Token types are llama.cpp's: 1 normal, 3 control (special), 4 user-defined (added, not special), 5 unused.
"""

from __future__ import annotations

import json
from typing import Any

# llama.cpp's pre-tokenizer names -> the tokenizer.json pre_tokenizer that splits the same way.
# `gpt-2`: the byte-level regex of GPT-2 (tokenizers' ByteLevel with use_regex). `lfm2`: the LFM2 models'
# own split (case-insensitive contractions, letters, 1-3 digits, punctuation, newlines, spaces), which llama.cpp
# runs as its llama3 pre-tokenizer, with whole-word vocabulary hits before merges and BOS added by default.
LFM2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True}
PRE_TOKENIZERS: dict[str, dict] = {
    "gpt-2": {**_BYTE_LEVEL, "use_regex": True},
    "lfm2": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LFM2_REGEX}, "behavior": "Isolated", "invert": False},
        {**_BYTE_LEVEL, "use_regex": False}]},
}
PRE_TOKENIZERS["llama-bpe"] = PRE_TOKENIZERS["llama3"] = PRE_TOKENIZERS["lfm2"]
# llama.cpp's defaults for these names: `ignore_merges` (a pre-token found whole in the vocabulary is one token)
# and adding BOS when the file has no tokenizer.ggml.add_bos_token
LLAMA3_STYLE = ("lfm2", "llama-bpe", "llama3")
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


class TokenizerMetadataError(ValueError):
    """Tokenizer metadata that cannot become a tokenizer.json (or the reverse); the message says why."""


def pre_tokenizer_name(pre: Any) -> str | None:
    """The llama.cpp name of a tokenizer.json pre_tokenizer, or None when it is not one we can name."""
    for name, known in PRE_TOKENIZERS.items():  # the first name of a split wins: gpt-2, then lfm2
        if _same(pre, known):
            return name
    return None


def _same(a: Any, b: Any) -> bool:
    """Equal ignoring keys whose values do not change how text is split (offsets trimming)."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = (set(a) | set(b)) - {"trim_offsets"}
        return all(_same(a.get(k), b.get(k)) for k in keys)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def metadata_from_tokenizer(tokenizer: dict, vocab_size: int, add_bos: bool) -> dict[str, Any] | None:
    """tokens, token types, merges and pre name for a byte-level BPE tokenizer.json; None when the tokenizer
    is not one GGUF can hold (a word-level test tokenizer, or a pre-tokenizer llama.cpp does not name).
    Ids without a token (vocabulary padding) get `[PAD{id}]` as unused tokens, as llama.cpp's converter does."""
    model = tokenizer.get("model", {})
    pre = pre_tokenizer_name(tokenizer.get("pre_tokenizer"))
    if model.get("type") != "BPE" or pre is None or tokenizer.get("normalizer") is not None:
        return None
    tokens: dict[int, tuple[str, int]] = {i: (t, NORMAL) for t, i in model["vocab"].items()}
    for added in tokenizer.get("added_tokens", []):
        tokens[added["id"]] = (added["content"], CONTROL if added.get("special") else USER_DEFINED)
    if max(tokens) >= vocab_size:
        raise TokenizerMetadataError(f"tokenizer.json has token id {max(tokens)}, beyond vocab_size {vocab_size}")
    filled = [tokens.get(i, (f"[PAD{i}]", UNUSED)) for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"pre": pre, "tokens": [t for t, _ in filled], "types": [k for _, k in filled], "merges": merges,
            "add_bos": add_bos}


def tokenizer_from_metadata(meta: dict[str, Any], source: str) -> dict:
    """A tokenizer.json (as a dict) from a GGUF's tokenizer fields (`tokenizer.ggml.` keys without the prefix,
    plus `huggingface.json` when the file carries the original)."""
    if meta.get("huggingface.json"):  # the original file, when the GGUF's writer kept it: nothing to rebuild
        return json.loads(meta["huggingface.json"])
    model = meta.get("model")
    if model is None or model == "none":
        raise TokenizerMetadataError(f"{source}: no tokenizer in the GGUF (tokenizer.ggml.model is "
                                     f"{model!r}); pass the model's tokenizer.json with --tokenizer")
    if model != "gpt2":
        raise TokenizerMetadataError(f"{source}: tokenizer.ggml.model {model!r} is not supported (LFM2 models use a "
                                     "byte-level BPE, 'gpt2'); pass the model's tokenizer.json with --tokenizer")
    pre = meta.get("pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise TokenizerMetadataError(f"{source}: tokenizer.ggml.pre {pre!r} is not one whose split rules are known "
                                     f"here ({sorted(PRE_TOKENIZERS)}); pass the model's tokenizer.json with "
                                     "--tokenizer")
    if not isinstance(meta.get("tokens"), list) or not meta["tokens"]:
        raise TokenizerMetadataError(f"{source}: no token list in the GGUF (tokenizer.ggml.tokens is missing); pass "
                                     "the model's tokenizer.json with --tokenizer")
    tokens, types = list(meta["tokens"]), list(meta.get("token_type") or [NORMAL] * len(meta["tokens"]))
    if len(types) != len(tokens):
        raise TokenizerMetadataError(f"{source}: tokenizer.ggml.token_type has {len(types)} entries for "
                                     f"{len(tokens)} tokens")
    vocab: dict[str, int] = {}
    added = []
    for i, (token, kind) in enumerate(zip(tokens, types, strict=True)):
        vocab.setdefault(token, i)
        if kind in (CONTROL, USER_DEFINED):
            added.append({"id": i, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": kind == CONTROL})
    merges = [m.split(" ", 1) for m in meta.get("merges", [])]
    if "add_bos_token" not in meta:
        meta = {**meta, "add_bos_token": pre in LLAMA3_STYLE}
    post = _post_processor(meta, tokens)
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": PRE_TOKENIZERS[pre], "post_processor": post,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": pre in LLAMA3_STYLE, "vocab": vocab, "merges": merges}}


def _post_processor(meta: dict[str, Any], tokens: list[str]) -> dict | None:
    """BOS (and EOS) added around each sequence when the GGUF says llama.cpp adds them."""
    ends = [(meta.get("add_bos_token", False), meta.get("bos_token_id")),
            (meta.get("add_eos_token", False), meta.get("eos_token_id"))]
    bos, eos = [tokens[i] if add and i is not None and 0 <= i < len(tokens) else None for add, i in ends]
    if bos is None and eos is None:
        return None
    special = {t: {"id": t, "ids": [tokens.index(t)], "tokens": [t]} for t in (bos, eos) if t is not None}
    single = ([{"SpecialToken": {"id": bos, "type_id": 0}}] if bos else []) + [{"Sequence": {"id": "A", "type_id": 0}}]
    single += [{"SpecialToken": {"id": eos, "type_id": 0}}] if eos else []
    pair = single + [{"Sequence": {"id": "B", "type_id": 1}}]
    return {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special}


def tokenizer_config(meta: dict[str, Any], tokens: list[str], context: int) -> dict:
    """tokenizer_config.json: the special tokens by name, BOS/EOS adding, and the chat template."""
    def name(key: str) -> str | None:
        i = meta.get(key)
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": context,
                              "clean_up_tokenization_spaces": False,
                              "add_bos_token": bool(meta.get("add_bos_token", False)),
                              "add_eos_token": bool(meta.get("add_eos_token", False))}
    for field, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("pad_token", "padding_token_id"),
                       ("unk_token", "unknown_token_id")):
        if name(key) is not None:
            config[field] = name(key)
    if meta.get("chat_template"):
        config["chat_template"] = meta["chat_template"]
    return config
