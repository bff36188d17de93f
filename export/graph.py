"""A small ONNX graph writer: nodes by op call, weights streamed straight into one external-data file.

Nothing is kept in memory but the graph's structure: each weight is written out the moment it is added,
so exporting a model of any size holds one tensor at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import chain
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17  # widely implemented (mobile EPs included); contrib ops are com.microsoft version 1
MS = "com.microsoft"
_SMALL = 1024  # constants up to this many elements stay inside model.onnx


class Graph:
    def __init__(self, data_file: Path):
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.initializers: list[TensorProto] = []
        self.data_file = data_file
        self._data = open(data_file, "wb")
        self._names: dict[str, int] = {}
        self._weights: set[str] = set()
        self.bytes_written = 0

    def unique(self, base: str) -> str:
        n = self._names.get(base, 0)
        self._names[base] = n + 1
        return base if n == 0 else f"{base}_{n}"

    def op(self, op_type: str, *inputs: str | None, outputs: int | list[str] = 1, domain: str = "",
           **attrs) -> str | list[str]:
        """Add a node; returns its output name (or names when outputs > 1). None inputs are omitted ones."""
        name = self.unique(f"/{op_type}")
        out = [f"{name}/out{i}" for i in range(outputs)] if isinstance(outputs, int) else outputs
        attrs = {k: v for k, v in attrs.items() if v is not None}
        node = helper.make_node(op_type, ["" if i is None else i for i in inputs], out, name=name,
                                domain=domain or None, **attrs)
        self.nodes.append(node)
        return out[0] if len(out) == 1 else out

    def const(self, value, dtype=np.int64) -> str:
        """A small constant (shapes, axes, scalars) kept inside the graph."""
        array = np.asarray(value, dtype=dtype)
        assert array.size <= _SMALL, "large arrays are weights: use Graph.weight"
        name = self.unique("const")
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def weight(self, name: str, array: np.ndarray) -> str:
        """A weight, appended to the external-data file (once per name), aligned so it can be mapped."""
        if name in self._weights:
            return name
        array = np.ascontiguousarray(array)
        if array.size <= _SMALL:
            self.initializers.append(numpy_helper.from_array(array, name))
        else:
            offset = self._pad_to(4096 if array.nbytes >= 65536 else 64)
            self._data.write(array.reshape(-1).view(np.uint8).data)  # its bytes, not a copy (tobytes makes one)
            self.bytes_written = offset + array.nbytes
            self._external(name, array.dtype, array.shape, offset, array.nbytes)
        self._weights.add(name)
        return name

    def weight_rows(self, name: str, rows: int, parts: Iterable[np.ndarray]) -> str:
        """A weight of `rows` rows given as consecutive row slices, written slice by slice: the same bytes, offset
        and initializer as `weight` of their concatenation, without it in memory (the vocabulary's codes)."""
        parts = iter(parts)
        first = np.ascontiguousarray(next(parts))
        row_shape, dtype = first.shape[1:], first.dtype
        size = rows * int(np.prod(row_shape, dtype=np.int64))
        if size <= _SMALL:
            return self.weight(name, np.concatenate([first, *parts]))
        nbytes = size * dtype.itemsize
        offset = self._pad_to(4096 if nbytes >= 65536 else 64)
        count = 0
        for part in chain([first], parts):
            part = np.ascontiguousarray(part)
            if part.shape[1:] != row_shape or part.dtype != dtype:
                raise ValueError(f"{name}: a slice is {part.dtype}{list(part.shape)}, expected rows of "
                                 f"{dtype}{list(row_shape)}")
            self._data.write(part.reshape(-1).view(np.uint8).data)
            count += part.shape[0]
        if count != rows:
            raise ValueError(f"{name}: {count} rows written, expected {rows}")
        self.bytes_written = offset + nbytes
        self._external(name, dtype, (rows, *row_shape), offset, nbytes)
        self._weights.add(name)
        return name

    def weight_stream(self, name: str, parts: Iterator[np.ndarray]) -> str:
        """A weight stacked from equal parts along a new first axis, written part by part."""
        offset = self._pad_to(4096)
        count, first = 0, None
        for part in parts:
            part = np.ascontiguousarray(part)
            if first is None:
                first = part
            elif part.shape != first.shape or part.dtype != first.dtype:
                raise ValueError(f"{name}: part {count} is {part.dtype}{list(part.shape)}, "
                                 f"expected {first.dtype}{list(first.shape)}")
            self._data.write(part.reshape(-1).view(np.uint8).data)
            count += 1
        length = count * first.nbytes
        self.bytes_written = offset + length
        self._external(name, first.dtype, (count, *first.shape), offset, length)
        self._weights.add(name)
        return name

    def _pad_to(self, align: int) -> int:
        """Pad the data file to a multiple of `align` (pages can then be mapped); returns the new offset."""
        pad = -self.bytes_written % align
        self._data.write(b"\0" * pad)
        self.bytes_written += pad
        return self.bytes_written

    def _external(self, name: str, dtype: np.dtype, dims: tuple, offset: int, length: int) -> None:
        """An initializer whose bytes sit at `offset` in the external-data file."""
        tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), dims=dims,
                             data_location=TensorProto.EXTERNAL)
        for key, value in (("location", self.data_file.name), ("offset", offset), ("length", length)):
            tensor.external_data.add(key=key, value=str(value))
        self.initializers.append(tensor)

    def has_weight(self, name: str) -> bool:
        return name in self._weights

    def input(self, name: str, dtype: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    def optional_input(self, name: str, default: np.ndarray) -> str:
        """A graph input with a default value (an initializer of the same name): runtimes that do not feed it,
        such as onnxruntime-genai, get the default; onnxruntime lists it among the overridable initializers."""
        self.inputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(default.dtype),
                                                         list(default.shape)))
        self.initializers.append(numpy_helper.from_array(default, name))
        return name

    def output(self, value: str, name: str, dtype: int, shape: list) -> None:
        """Expose `value` as graph output `name` (renaming the producing node's output)."""
        for node in self.nodes:
            for i, out in enumerate(node.output):
                if out == value:
                    node.output[i] = name
            for i, inp in enumerate(node.input):
                if inp == value:
                    node.input[i] = name
        self.outputs.append(helper.make_tensor_value_info(name, dtype, shape))

    def save(self, path: Path, producer: str, metadata: dict[str, str]) -> None:
        self._data.close()
        graph = helper.make_graph(self.nodes, "lfm2", self.inputs, self.outputs, self.initializers)
        model = helper.make_model(graph, producer_name=producer,
                                  opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)])
        model.ir_version = 9
        for key, value in metadata.items():
            model.metadata_props.add(key=key, value=value)
        onnx.save_model(model, path)
