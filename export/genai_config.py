"""genai_config.json: what onnxruntime-genai 0.18 needs to run a bundle, and what our runtime reads too.

Field names and layout follow the genai builder's own output for LFM2 models; search defaults come from
the checkpoint's generation_config.json the way transformers reads them.
"""

from __future__ import annotations

import json
from typing import Any

from .checkpoint import Checkpoint

GENAI_TYPES = {"lfm2": "lfm2", "lfm2_moe": "lfm2_moe"}
# genai allocates a shared KV buffer of search.max_length rows per attention layer: the full 128K context
# of the real models would cost gigabytes before the first token, so the default is a phone-sized window.
DEFAULT_MAX_LENGTH = 4096
_SEARCH_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
                    "repetition_penalty": 1.0}


def generation_settings(ckpt: Checkpoint) -> dict[str, Any]:
    """generation_config.json as the checkpoint has it (a folder's file, or a GGUF's sampling metadata)."""
    try:
        return json.loads(ckpt.files().get("generation_config.json", b"{}"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}


def genai_config(ckpt: Checkpoint, share_buffer: bool, filename: str = "model.onnx",
                 max_length: int = DEFAULT_MAX_LENGTH) -> dict[str, Any]:
    cfg = ckpt.config
    gen = generation_settings(ckpt)
    eos = gen.get("eos_token_id", list(cfg.eos_token_id))
    eos = eos if isinstance(eos, list) else [eos]
    pad = gen.get("pad_token_id", cfg.pad_token_id)
    context = cfg.max_position_embeddings
    search = {key: gen.get(key, default) if gen.get(key) is not None else default
              for key, default in _SEARCH_DEFAULTS.items()}
    return {
        "model": {
            "bos_token_id": gen.get("bos_token_id", cfg.bos_token_id),
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": cfg.head_dim,
                "hidden_size": cfg.hidden_size,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                    "past_conv_names": "past.%d.conv",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                    "present_conv_names": "present.%d.conv",
                },
                "num_attention_heads": cfg.num_attention_heads,
                "num_hidden_layers": cfg.num_hidden_layers,
                "num_key_value_heads": cfg.num_key_value_heads,
                "layer_types": list(cfg.layer_types),
                "conv_cache_size": cfg.conv_L_cache - 1,
            },
            "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "pad_token_id": pad if pad is not None else eos[0],
            "type": GENAI_TYPES[cfg.model_type],
            "vocab_size": cfg.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": min(max_length, context),
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": share_buffer,
            **search,
        },
    }
