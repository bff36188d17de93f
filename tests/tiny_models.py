"""Tiny random LFM2 / LFM2-MoE checkpoints built with transformers: the reference for exactness tests.

Each config varies what the exporter must get right: where attention layers sit (first, last, none,
all), dense-layer count, expert bias, renormalised routing, scaling, widths and vocabularies that are not
multiples of 32, grouped and full key/value heads, the dense width rules, tied and untied heads.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

MOE = "lfm2_moe"
DENSE = "lfm2"


def _types(n: int, attention: list[int]) -> list[str]:
    return ["full_attention" if i in attention else "conv" for i in range(n)]


CONFIGS: dict[str, tuple[str, dict]] = {
    "moe_mixed": (MOE, dict(vocab_size=300, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                            layer_types=_types(4, [1, 3]), num_dense_layers=1, num_experts=4,
                            num_experts_per_tok=2)),
    "moe_attn_first_last_nobias": (MOE, dict(vocab_size=257, hidden_size=48, intermediate_size=80,
                                             moe_intermediate_size=24, num_hidden_layers=5, num_attention_heads=6,
                                             num_key_value_heads=1, layer_types=_types(5, [0, 4]),
                                             num_dense_layers=0, num_experts=8, num_experts_per_tok=3,
                                             use_expert_bias=False, norm_topk_prob=False)),
    "moe_conv_only": (MOE, dict(vocab_size=333, hidden_size=40, intermediate_size=72, moe_intermediate_size=20,
                                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                layer_types=_types(4, []), num_dense_layers=2, num_experts=4,
                                num_experts_per_tok=1)),
    "moe_attention_only": (MOE, dict(vocab_size=290, hidden_size=64, intermediate_size=64,
                                     moe_intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
                                     num_key_value_heads=4, layer_types=_types(3, [0, 1, 2]), num_dense_layers=0,
                                     num_experts=6, num_experts_per_tok=2, routed_scaling_factor=2.5)),
    "moe_scaled_unnormed": (MOE, dict(vocab_size=411, hidden_size=72, intermediate_size=100,
                                      moe_intermediate_size=36, num_hidden_layers=4, num_attention_heads=9,
                                      num_key_value_heads=3, layer_types=_types(4, [2]), num_dense_layers=1,
                                      num_experts=5, num_experts_per_tok=2, norm_topk_prob=False,
                                      routed_scaling_factor=1.7, tie_word_embeddings=False)),
    "dense_mixed": (DENSE, dict(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                                num_attention_heads=4, num_key_value_heads=2, layer_types=_types(4, [0, 2]),
                                block_multiple_of=32)),
    "dense_conv_only_idxs": (DENSE, dict(vocab_size=259, hidden_size=56, intermediate_size=100, num_hidden_layers=3,
                                         num_attention_heads=7, num_key_value_heads=7, full_attn_idxs=[],
                                         block_auto_adjust_ff_dim=False)),
    "dense_attention_last": (DENSE, dict(vocab_size=301, hidden_size=80, intermediate_size=200, num_hidden_layers=3,
                                         num_attention_heads=5, num_key_value_heads=1, full_attn_idxs=[2],
                                         block_ffn_dim_multiplier=1.5, block_multiple_of=16,
                                         rope_parameters={"rope_type": "default", "rope_theta": 5e6})),
}


# Widths of 256: the K-quants' super-block, so GGUF tests can store every matrix in them (not in CONFIGS, which
# every exactness test runs through).
WIDE = {"moe_wide_256": (MOE, dict(vocab_size=300, hidden_size=256, intermediate_size=256, moe_intermediate_size=256,
                                   num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                   layer_types=_types(3, [1]), num_dense_layers=1, num_experts=4,
                                   num_experts_per_tok=2))}


def build(name: str, folder: Path, seed: int = 0, fused_experts: bool = False):
    """Save a random transformers model for CONFIGS[name] into folder; return the model (eval mode).

    Weights get a larger spread than transformers' init so that routing and logits are not flat, and the
    expert bias is non-zero (it only changes routing when it is)."""
    from transformers import Lfm2Config, Lfm2ForCausalLM, Lfm2MoeConfig, Lfm2MoeForCausalLM

    kind, kwargs = CONFIGS[name] if name in CONFIGS else WIDE[name]
    torch.manual_seed(seed)
    common = dict(max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if kind == MOE:
        model = Lfm2MoeForCausalLM(Lfm2MoeConfig(**common, **kwargs))
    else:
        model = Lfm2ForCausalLM(Lfm2Config(**common, **kwargs))
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15 if "embed" not in pname else 0.5)
        for bname, b in model.named_buffers():
            if bname.endswith("expert_bias"):
                b.copy_(0.3 * torch.randn_like(b))
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    if fused_experts:
        _fuse_experts(folder / "model.safetensors")
    write_tokenizer(folder, model.config.vocab_size)
    return model


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer covering the vocabulary: bundles carry one, exactness tests use raw ids."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<|pad|>", "<|startoftext|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(len(specials), vocab_size)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|pad|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|startoftext|>", "eos_token": "<|im_end|>",
        "pad_token": "<|pad|>"}))


def write_lfm2_tokenizer(folder: Path, vocab_size: int, text: str) -> None:
    """A byte-level BPE with LFM2's split (Split regex + ByteLevel, whole-word hits first) trained on `text` to
    exactly `vocab_size` tokens: what a GGUF vocabulary can hold, unlike the word-level one."""
    import json

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from lfm_edge.export.gguf_tokenizer import LFM2_REGEX

    specials = ["<|pad|>", "<|startoftext|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LFM2_REGEX), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|startoftext|>", "eos_token": "<|im_end|>",
        "pad_token": "<|pad|>", "add_bos_token": True, "chat_template": "{{ bos_token }}{% for m in messages %}"
        "{{ m['role'] }}: {{ m['content'] }}<|im_end|>{% endfor %}"}))


def _fuse_experts(path: Path) -> None:
    """Rewrite per-expert tensors into transformers' in-memory fused layout, the other layout on the hub."""
    tensors = load_file(path)
    prefixes = sorted({k.split(".experts.")[0] for k in tensors if ".experts." in k})
    for p in prefixes:
        e = len({k for k in tensors if k.startswith(f"{p}.experts.") and k.endswith(".w1.weight")})
        w = {n: [tensors.pop(f"{p}.experts.{j}.{n}.weight") for j in range(e)] for n in ("w1", "w3", "w2")}
        pairs = zip(w["w1"], w["w3"], strict=True)
        tensors[f"{p}.experts.gate_up_proj"] = torch.stack([torch.cat([a, b]) for a, b in pairs])
        tensors[f"{p}.experts.down_proj"] = torch.stack(w["w2"])
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})
