"""Editing a GGUF's metadata for tests: a copy with fields added or replaced."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType


def set_fields(src: Path, dst: Path, fields: dict) -> None:
    """A copy of a GGUF with metadata fields added or replaced (gguf-py: read, then write every part anew)."""
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dst, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in fields or name == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), vtype, sub_type=sub)
    for name, value in fields.items():
        if isinstance(value, str):
            writer.add_string(name, value)
        elif isinstance(value, float):
            writer.add_float32(name, value)
        else:
            writer.add_uint32(name, value)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.asarray(t.data), raw_shape=None if t.tensor_type in (Q.F32, Q.F16) else
                          np.asarray(t.data).shape, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
