"""A llama.cpp GGUF (`lfm2` / `lfm2moe`) as a checkpoint: the same interface as checkpoint.Checkpoint, so the
exporter, the model definition and the backends do not know where the weights came from.

- config from the metadata (`{arch}.*`: widths, per-layer KV head counts -> layer types, experts, rope, norms)
- bundle files from the metadata: tokenizer.json (gguf_tokenizer.py), tokenizer_config.json with the chat
  template and special tokens, generation_config.json with the sampling defaults the file recommends
- tensors read one at a time with pread at the offsets the `gguf` package parses (its memory map is used for
  the header only, so the resident set stays one tensor wide), under the names lfm2.py uses; stacked experts
  are read one expert's bytes at a time
- `quantized(name)`: Q4_0 and Q8_0 blocks as the int4 / int8 kernels' codes and scales, bit for bit; other
  types (K-quants, IQ, ...) are dequantized with `gguf.quants` and re-quantized by the policy, and the error is
  measured (quant_ops.QuantizedOps.conversions)

Everything a GGUF can get wrong (architecture, header, tensor offsets past the end, unknown or unsupported
tensor types, a missing part of a split file, no tokenizer) is refused when the file is opened.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ..quant.blocks import Quantized
from ..quant.policy import QuantSpec
from ..runtime.files import describe, open_regular
from .checkpoint import CheckpointError
from .config import ConfigError, Lfm2Config, check_size
from .gguf_blocks import DEQUANTIZABLE, EXACT, FLOATS, closest_spec, decode, dequantize
from .gguf_tokenizer import TokenizerMetadataError, tokenizer_config, tokenizer_from_metadata

Q = gguf.GGMLQuantizationType
ARCHS = {"lfm2": "lfm2", "lfm2moe": "lfm2_moe"}  # GGUF architecture -> transformers model_type
_SPLIT = re.compile(r"(.*)-(\d{5})-of-(\d{5})\.gguf")
_SAMPLING = {"temp": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
             "penalty_repeat": "repetition_penalty"}


class _Reader(gguf.GGUFReader):
    """gguf-py's reader, with each tensor's type and extent checked before its array view is made: gguf-py
    would fail on a truncated file with a reshape error that names no tensor."""

    def _build_tensors(self, start_offs: int, fields: list) -> None:
        size = len(self.data)
        extents = []
        for field in fields:
            _, name_data, _, dims, raw_dtype, offset = field.parts
            name = bytes(name_data).decode("utf-8", "replace")
            try:
                qtype = Q(int(raw_dtype[0]))
            except ValueError:
                raise CheckpointError(f"{self._path}: tensor {name!r} has unknown GGML type {int(raw_dtype[0])}") \
                    from None
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            n = int(np.prod(dims.astype(np.int64)))
            if int(dims[0]) % block:
                raise CheckpointError(f"{self._path}: tensor {name!r} of type {qtype.name} has rows of {int(dims[0])}, "
                                      f"not a multiple of its block of {block}")
            if n < 0 or any(int(d) <= 0 for d in dims):
                raise CheckpointError(f"{self._path}: tensor {name!r} has dimensions {dims.tolist()}")
            start = start_offs + int(offset[0])
            end = start + n * type_size // block
            if end > size:
                raise CheckpointError(f"{self._path}: tensor {name!r} ends at byte {end}, past the end of the file "
                                      f"({size} bytes): truncated or corrupt")
            extents.append((start, end, name))
        extents.sort()
        for (_, end, name), (start, _, other) in zip(extents, extents[1:], strict=False):
            if start < end:
                raise CheckpointError(f"{self._path}: tensors {name!r} and {other!r} overlap in the file (bytes "
                                      f"{start}..{end}): corrupt or crafted")
        super()._build_tensors(start_offs, fields)

    def __init__(self, path: Path):
        self._path = path
        super().__init__(path, "r")


def _open(path: Path) -> _Reader:
    try:
        open_regular(path).close()  # a FIFO, a device or a folder is refused before gguf-py maps it
        return _Reader(path)
    except CheckpointError:
        raise
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({describe(e)})") from None
    except (ValueError, KeyError, IndexError, UnicodeDecodeError, OverflowError, MemoryError) as e:
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def _value(field: Any) -> Any:
    """A metadata field as a Python value (strings decoded, arrays as lists)."""
    value = field.contents()
    return value.tolist() if isinstance(value, np.ndarray) else value


class GgufCheckpoint:
    """The Checkpoint interface over one GGUF (or all parts of a split one)."""

    def __init__(self, path: str | Path, tokenizer: str | Path | None = None):
        self.path = self.folder = Path(path)  # `folder`: what manifests and messages name as the source
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: no such GGUF file")
        first = _open(self.path)
        self.meta = {name: _value(f) for name, f in first.fields.items() if not name.startswith("GGUF.")}
        arch = self.meta.get("general.architecture")
        if arch not in ARCHS:
            raise CheckpointError(f"{self.path}: architecture {arch!r} is not an LFM2 model (expected one of "
                                  f"{sorted(ARCHS)})")
        self.arch = arch
        self._tensors: dict[str, tuple[Path, Any]] = {}  # GGUF name -> (file, ReaderTensor)
        for path_, reader in self._parts(first):
            for t in reader.tensors:
                self._tensors[t.name] = (path_, t)
        self.config = self._config()
        self.raw_config = self.config.raw
        self._files = self._bundle_files(tokenizer)

    # ---- files ----------------------------------------------------------------------------------------

    def _parts(self, first: _Reader) -> list[tuple[Path, _Reader]]:
        """The file and, for a split GGUF (`name-00001-of-00003.gguf`), every other part, all present."""
        count = self.meta.get("split.count", 1)
        if count <= 1:
            return [(self.path, first)]
        m = _SPLIT.fullmatch(self.path.name)
        if m is None or int(m.group(2)) != 1:
            raise CheckpointError(f"{self.path}: part of a split GGUF ({count} parts); give the first part, "
                                  "named NAME-00001-of-NNNNN.gguf")
        parts = [(self.path, first)]
        for i in range(2, count + 1):
            part = self.path.with_name(f"{m.group(1)}-{i:05d}-of-{count:05d}.gguf")
            if not part.is_file():
                raise CheckpointError(f"{self.path}: split GGUF part {i} of {count} is missing ({part})")
            parts.append((part, _open(part)))
        return parts

    # ---- config ---------------------------------------------------------------------------------------

    def _key(self, name: str, default: Any = ...) -> Any:
        value = self.meta.get(f"{self.arch}.{name}")
        if value is None:
            if default is ...:
                raise CheckpointError(f"{self.path}: metadata {self.arch}.{name} is missing")
            return default
        return value

    def _size(self, name: str, limit: str) -> int:
        """A size the config is computed from (the largest, when it is per layer), checked (config.check_size)
        before it divides, multiplies or allocates anything."""
        value = self._key(name)
        value = max(value, default=0) if isinstance(value, list) else value
        return check_size(str(self.path), f"{self.arch}.{name}", value, limit)

    def _config(self) -> Lfm2Config:
        n = self._size("block_count", "num_hidden_layers")
        kv = self._key("attention.head_count_kv")
        kv = kv if isinstance(kv, list) else [kv] * n
        if len(kv) != n:
            raise CheckpointError(f"{self.path}: {self.arch}.attention.head_count_kv has {len(kv)} entries for {n} "
                                  "layers")
        if len({k for k in kv if k}) > 1:
            raise CheckpointError(f"{self.path}: attention layers with different KV head counts {sorted(set(kv))}")
        heads = self._size("attention.head_count", "num_attention_heads")
        hidden = self._size("embedding_length", "hidden_size")
        embd = self._tensors.get("token_embd.weight")
        if embd is None:
            raise CheckpointError(f"{self.path}: tensor 'token_embd.weight' is missing")
        vocab = self._key("vocab_size", int(embd[1].shape[1]))
        if vocab != int(embd[1].shape[1]):
            raise CheckpointError(f"{self.path}: {self.arch}.vocab_size is {vocab}, but token_embd.weight has "
                                  f"{int(embd[1].shape[1])} rows")
        scaling = self.meta.get(f"{self.arch}.rope.scaling.type", "none")
        if scaling not in ("none", None):
            raise CheckpointError(f"{self.path}: rope scaling {scaling!r} is not supported")
        d: dict[str, Any] = {
            "architectures": ["Lfm2MoeForCausalLM" if self.arch == "lfm2moe" else "Lfm2ForCausalLM"],
            "model_type": ARCHS[self.arch], "num_hidden_layers": n, "hidden_size": hidden,
            "num_attention_heads": heads, "num_key_value_heads": max(kv) or heads,
            "layer_types": ["full_attention" if k else "conv" for k in kv],
            "head_dim": self._key("attention.key_length", hidden // heads),
            "conv_L_cache": self._key("shortconv.l_cache", 3), "conv_bias": False,
            "norm_eps": _f32(self._key("attention.layer_norm_rms_epsilon", 1e-5)),
            "rope_theta": _f32(self._key("rope.freq_base", 1_000_000.0)),
            "max_position_embeddings": self._key("context_length", 128_000),
            "vocab_size": vocab,
            "tie_word_embeddings": "output.weight" not in self._tensors,
            # the width of the dense layers as stored, already adjusted by LFM2's rules
            "intermediate_size": self._dense_width(n), "block_auto_adjust_ff_dim": False,
            "bos_token_id": self.meta.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self.meta.get("tokenizer.ggml.eos_token_id"),
            "pad_token_id": self.meta.get("tokenizer.ggml.padding_token_id"),
        }
        if self.arch == "lfm2moe":
            d.update(num_experts=self._key("expert_count"), num_experts_per_tok=self._key("expert_used_count"),
                     moe_intermediate_size=self._key("expert_feed_forward_length"),
                     num_dense_layers=self._key("leading_dense_block_count", 0),
                     use_expert_bias=any(k.endswith("exp_probs_b.bias") for k in self._tensors),
                     # llama.cpp's lfm2moe always renormalises; a file may say so explicitly
                     norm_topk_prob=bool(self._key("expert_weights_norm", True)),
                     routed_scaling_factor=float(self._key("expert_weights_scale", 1.0)))
        try:
            return Lfm2Config.from_dict(d, source=f"{self.path} (GGUF metadata)")
        except ConfigError as e:
            raise CheckpointError(str(e)) from None

    def _dense_width(self, n: int) -> int:
        for i in range(n):
            t = self._tensors.get(f"blk.{i}.ffn_gate.weight")
            if t is not None:
                return int(t[1].shape[1])
        return self._key("feed_forward_length", 1)

    # ---- bundle files -----------------------------------------------------------------------------------

    def _bundle_files(self, tokenizer: str | Path | None) -> dict[str, bytes]:
        tok_meta = {k[len("tokenizer.ggml."):]: v for k, v in self.meta.items() if k.startswith("tokenizer.ggml.")}
        tok_meta["chat_template"] = self.meta.get("tokenizer.chat_template")
        tok_meta["huggingface.json"] = self.meta.get("tokenizer.huggingface.json")
        files: dict[str, bytes] = {}
        if tokenizer is not None:
            files.update(_tokenizer_files(Path(tokenizer)))
        else:
            try:
                tok = tokenizer_from_metadata(tok_meta, str(self.path))
            except TokenizerMetadataError as e:
                raise CheckpointError(str(e)) from None
            files["tokenizer.json"] = json.dumps(tok, ensure_ascii=False).encode()
        if "tokenizer_config.json" not in files and tok_meta.get("tokens"):
            config = tokenizer_config(tok_meta, tok_meta["tokens"], self.config.max_position_embeddings)
            files["tokenizer_config.json"] = json.dumps(config, indent=2, ensure_ascii=False).encode()
        files["generation_config.json"] = json.dumps(self._generation(), indent=2).encode()
        files["config.json"] = json.dumps(self.config.raw, indent=2).encode()
        return files

    def _generation(self) -> dict[str, Any]:
        cfg = self.config
        gen: dict[str, Any] = {"bos_token_id": cfg.bos_token_id, "eos_token_id": list(cfg.eos_token_id) or None,
                               "pad_token_id": cfg.pad_token_id}
        for key, field in _SAMPLING.items():
            if self.meta.get(f"general.sampling.{key}") is not None:
                gen[field] = self.meta[f"general.sampling.{key}"]
        if gen.get("temperature", 0) > 0:  # a recommended temperature means the model is meant to be sampled
            gen["do_sample"] = True
        return {k: v for k, v in gen.items() if v is not None}

    def files(self) -> dict[str, bytes]:
        """The bundle's tokenizer and config files, made from the metadata (or --tokenizer)."""
        return dict(self._files)

    # ---- tensors -----------------------------------------------------------------------------------------

    @property
    def is_quantized(self) -> bool:
        return any(t.tensor_type not in (Q.F32, Q.F16, Q.BF16, Q.F64) for _, t in self._tensors.values())

    def names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        source = gguf_name(name)
        return source is not None and source[0] in self._tensors

    def gguf_tensor(self, name: str) -> str:
        """The GGUF tensor a model weight is read from (a stacked experts tensor for one expert's weight)."""
        return self._entry(name)[0][0]

    def stored_type(self, name: str) -> str:
        return self._entry(name)[1][1].tensor_type.name

    def _entry(self, name: str) -> tuple[tuple[str, int | None], tuple[Path, Any]]:
        source = gguf_name(name)
        if source is None:
            raise CheckpointError(f"{self.path}: no GGUF tensor corresponds to {name!r}")
        if source[0] not in self._tensors:
            raise CheckpointError(f"{self.path}: tensor {source[0]!r} (for {name!r}) is missing")
        return source, self._tensors[source[0]]

    def shape(self, name: str) -> tuple[int, ...]:
        (gname, expert), (_, t) = self._entry(name)
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        if expert is not None:
            shape = shape[1:]
        if name.endswith(".conv.conv.weight"):  # llama.cpp squeezes the depthwise kernel [H, 1, K] to [H, K]
            shape = (shape[0], 1, *shape[1:])
        return shape

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        (gname, expert), (_, t) = self._entry(name)
        if t.tensor_type not in FLOATS and t.tensor_type not in DEQUANTIZABLE:
            raise CheckpointError(f"{self.path}: tensor {gname!r} has type {t.tensor_type.name}, which no path here "
                                  "converts (supported: float types, Q4_0/Q8_0 exactly, and the types gguf-py "
                                  "dequantizes)")
        if expert is not None and expert >= int(t.shape[-1]):
            raise CheckpointError(f"{self.path}: tensor {gname!r} has {int(t.shape[-1])} experts, expected more "
                                  f"than {expert}")
        if self.shape(name) != tuple(shape):
            raise CheckpointError(f"{self.path}: tensor {gname!r} has shape {list(self.shape(name))} (for {name!r}), "
                                  f"expected {list(shape)}")

    def _raw(self, name: str, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, Any]:
        """The stored bytes of the tensor (or of one expert of a stacked one) as [rows, bytes per row], read
        with pread so no page of the map stays resident; `start`/`stop`: only those rows (a row's blocks are
        consecutive bytes, and rows follow each other)."""
        (gname, expert), (path, t) = self._entry(name)
        rows_all = int(np.prod(t.shape[1:].astype(np.int64))) if len(t.shape) > 1 else 1
        row_bytes = t.n_bytes // rows_all
        offset, rows = t.data_offset, rows_all
        if expert is not None:
            rows = rows_all // int(t.shape[-1])
            offset += expert * rows * row_bytes
        if start or stop is not None:
            stop = rows if stop is None else stop
            if not 0 <= start <= stop <= rows:
                raise CheckpointError(f"{self.path}: rows {start}:{stop} of tensor {gname!r}, which has {rows}")
            offset, rows = offset + start * row_bytes, stop - start
        raw = np.empty((rows, row_bytes), np.uint8)
        view = memoryview(raw.reshape(-1))
        with open(path, "rb") as f:
            done = 0
            while done < raw.size:
                got = os.preadv(f.fileno(), [view[done:]], offset + done)
                if got <= 0:
                    raise CheckpointError(f"{path}: tensor {gname!r} could not be read (truncated?)")
                done += got
        return raw, t

    def tensor(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """One tensor as float32: floats widened, quantized blocks dequantized (gguf-py's numpy codecs)."""
        if shape is not None:
            self.check(name, shape)
        return self._floats(name, *self._raw(name)).reshape(self.shape(name))

    def rows(self, name: str, start: int, stop: int, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """Rows start..stop of a 2-D tensor as float32 from their blocks alone: `tensor(name)[start:stop]`, at the
        memory of the rows (a re-laid vocabulary is dequantized and re-quantized by rows)."""
        return self._floats(name, *self._raw(name, start, stop))

    def _floats(self, name: str, raw: np.ndarray, t: Any) -> np.ndarray:
        """[rows, K] float32 of raw rows: floats widened, quantized blocks dequantized (gguf-py's numpy codecs)."""
        if t.tensor_type in FLOATS:
            out = raw.view(FLOATS[t.tensor_type]).astype(np.float32)
        else:
            out = dequantize(raw, t.tensor_type)
        self._finite(name, out)
        return out

    def _finite(self, name: str, values: np.ndarray) -> None:
        """A weight (or a block scale) that is NaN or infinite would make the bundle emit nothing but padding."""
        bad = ~np.isfinite(values)
        if bad.any():
            gname = self._entry(name)[0][0]
            raise CheckpointError(f"{self.path}: tensor {gname!r} (for {name!r}) holds {int(bad.sum()):,} values "
                                  "that are NaN or infinite: the file is corrupt")

    def closest_spec(self, name: str, min_block: int = 16) -> QuantSpec | None:
        """For a weight stored in a block type that is re-quantized: the kernel layout closest to it."""
        return closest_spec(self._entry(name)[1][1].tensor_type, min_block)

    def exact_bits(self, name: str) -> int | None:
        """4 or 8 when the weight is stored in blocks of 32 the kernels read as they are (Q4_0, Q8_0)."""
        return EXACT.get(self._entry(name)[1][1].tensor_type)

    def quantized(self, name: str, float_zero_points: bool = False, rows: tuple[int, int] | None = None) \
            -> Quantized | None:
        """The weight's blocks as the kernels' codes and scales when the file stores it exactly in one of their
        layouts (gguf_blocks.py), else None; `float_zero_points` when the reader takes them (4-bit MatMulNBits);
        `rows` (start, stop): only those rows' blocks (each row's blocks decode alone)."""
        qtype = self._entry(name)[1][1].tensor_type
        if qtype not in EXACT and qtype not in (Q.Q6_K, Q.Q4_K):
            return None
        q = decode(self._raw(name, *(rows or (0, None)))[0], qtype, float_zero_points)
        if q is not None:
            self._finite(name, np.asarray(q.scales, np.float32))
            if q.zero_points is not None and q.zero_points.dtype.kind == "f":
                self._finite(name, q.zero_points)
        return q


def _f32(value: float) -> float:
    """A float GGUF stored as f32, written back the way it was meant (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


def _tokenizer_files(path: Path) -> dict[str, bytes]:
    """--tokenizer: a tokenizer.json, or a folder holding it (and tokenizer_config.json, chat_template.jinja)."""
    folder, main = (path, path / "tokenizer.json") if path.is_dir() else (path.parent, path)
    if not main.is_file():
        raise CheckpointError(f"--tokenizer {path}: no tokenizer.json there")
    files = {"tokenizer.json": main.read_bytes()}
    if path.is_dir():
        for name in ("tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
            if (folder / name).is_file():
                files[name] = (folder / name).read_bytes()
    return files


_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_EXPERT = re.compile(r"feed_forward\.experts\.(\d+)\.(w1|w2|w3)\.weight")
_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.embedding_norm.weight": "token_embd_norm.weight",
        "lm_head.weight": "output.weight"}
_IN_LAYER = {
    "operator_norm.weight": "attn_norm.weight", "ffn_norm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.out_proj.weight": "attn_output.weight",
    "self_attn.q_layernorm.weight": "attn_q_norm.weight", "self_attn.k_layernorm.weight": "attn_k_norm.weight",
    "conv.conv.weight": "shortconv.conv.weight", "conv.in_proj.weight": "shortconv.in_proj.weight",
    "conv.out_proj.weight": "shortconv.out_proj.weight",
    "feed_forward.w1.weight": "ffn_gate.weight", "feed_forward.w3.weight": "ffn_up.weight",
    "feed_forward.w2.weight": "ffn_down.weight", "feed_forward.gate.weight": "ffn_gate_inp.weight",
    "feed_forward.expert_bias": "exp_probs_b.bias",
}
_EXPERT_STACK = {"w1": "ffn_gate_exps.weight", "w3": "ffn_up_exps.weight", "w2": "ffn_down_exps.weight"}


def gguf_name(name: str) -> tuple[str, int | None] | None:
    """(GGUF tensor, expert index within its stack or None) for a name lfm2.py reads (llama.cpp's names,
    as in gguf-py's tensor map for LFM2 / LFM2MOE)."""
    if name in _TOP:
        return _TOP[name], None
    m = _LAYER.fullmatch(name)
    if m is None:
        return None
    layer, rest = m.group(1), m.group(2)
    e = _EXPERT.fullmatch(rest)
    if e is not None:
        return f"blk.{layer}.{_EXPERT_STACK[e.group(2)]}", int(e.group(1))
    return (f"blk.{layer}.{_IN_LAYER[rest]}", None) if rest in _IN_LAYER else None


def resolve_gguf(spec: str) -> Path:
    """A local .gguf file, or `org/name/file.gguf` (a file in a hub repository) downloaded with huggingface_hub.
    A split file's other parts are downloaded beside it."""
    path = Path(spec)
    if path.exists() or spec.startswith((".", "/")) or spec.count("/") < 2:
        return path
    repo, filename = "/".join(spec.split("/")[:2]), "/".join(spec.split("/")[2:])
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise CheckpointError(f"{spec}: downloading needs huggingface_hub (pip install 'lfm-edge[export]')") from None
    names = [filename]
    m = _SPLIT.fullmatch(Path(filename).name)
    if m is not None:
        stem = filename[: len(filename) - len(Path(filename).name)] + m.group(1)
        names = [f"{stem}-{i:05d}-of-{m.group(3)}.gguf" for i in range(1, int(m.group(3)) + 1)]
    try:
        paths = [Path(hf_hub_download(repo_id=repo, filename=n)) for n in names]
    except Exception as e:  # the hub client raises many types; all mean the same to the user
        raise CheckpointError(f"{spec}: could not download from the Hugging Face hub ({type(e).__name__}: {e})") \
            from None
    return paths[0]
