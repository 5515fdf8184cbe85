"""A GGUF file's metadata and tensor table, parsed in one pass over a read-only memory map.

`gguf.GGUFReader` builds a numpy view for every scalar, string length and string of the header:
the demo model's tokenizer (49,152 tokens and 48,900 merges) took it 7.9 s on a 2-core CPU,
most of the model's load time. Here the header is read with `struct` from the mapped bytes
(strings are decoded when a field is read), and each tensor is one zero-copy numpy view of
the mapping, shaped as GGUFReader shapes it (quantized tensors as rows of block bytes), so the
rest of the loader and gguf's dequantizers work on it unchanged. The file format:
https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import struct
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.quants import quant_shape_to_byte_shape

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# Scalar value types: struct code.
_SCALARS = {
    GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H", GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i", GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q", GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d",
}
# Tensor types stored as plain numbers (the rest are blocks of bytes).
_PLAIN_TENSORS = {
    GGMLQuantizationType.F32: "f4", GGMLQuantizationType.F16: "f2", GGMLQuantizationType.F64: "f8",
    GGMLQuantizationType.I8: "i1", GGMLQuantizationType.I16: "i2", GGMLQuantizationType.I32: "i4",
    GGMLQuantizationType.I64: "i8",
}


@dataclasses.dataclass(frozen=True)
class GGUFField:
    """One metadata entry. `types` as GGUFReader gives them: [type], or [ARRAY, item type]."""

    name: str
    types: list[GGUFValueType]
    value: Any  # a number, raw string bytes, or a list of either

    def contents(self) -> Any:
        """The value as Python data; strings decoded as UTF-8 (raising UnicodeDecodeError)."""
        if self.types[-1] == GGUFValueType.STRING:
            if self.types[0] == GGUFValueType.ARRAY:
                return [s.decode("utf-8") for s in self.value]
            return self.value.decode("utf-8")
        return list(self.value) if self.types[0] == GGUFValueType.ARRAY else self.value


@dataclasses.dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor: `shape` in GGUF order (fastest dimension first), `data` a view of the file."""

    name: str
    tensor_type: GGMLQuantizationType
    shape: np.ndarray
    n_elements: int
    n_bytes: int
    data_offset: int
    data: np.ndarray


class GGUFFile:
    """A parsed GGUF file: `fields` (name -> GGUFField, in file order), `tensors`, `alignment`,
    `data_offset`. Raises ValueError on a malformed file."""

    def __init__(self, path: str | os.PathLike):
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        try:
            self._parse(memoryview(self._map))
        except struct.error as e:  # a read past the end of a cut file
            raise ValueError(f"the file ends inside its header ({e})") from None

    def _parse(self, buf: memoryview) -> None:
        if bytes(buf[:4]) != MAGIC:
            raise ValueError("GGUF magic invalid")
        order = "<"
        version = struct.unpack_from("<I", buf, 4)[0]
        if version & 0xFFFF == 0:  # written on a machine of the other byte order
            order = ">"
            version = struct.unpack_from(">I", buf, 4)[0]
        if version not in SUPPORTED_VERSIONS:
            raise ValueError(f"GGUF version {version} is not supported (only {SUPPORTED_VERSIONS})")
        self._buf, self._order = buf, order
        num_tensors, num_fields = struct.unpack_from(order + "QQ", buf, 8)
        offset = 24
        self.fields: dict[str, GGUFField] = {}
        for _ in range(num_fields):
            name, offset = self._string(offset)
            (kind,), offset = struct.unpack_from(order + "I", buf, offset), offset + 4
            key = name.decode("utf-8")
            types, value, offset = self._value(GGUFValueType(kind), offset)
            self.fields[key] = GGUFField(key, types, value)
        infos = []
        for _ in range(num_tensors):
            name, offset = self._string(offset)
            (num_dims,), offset = struct.unpack_from(order + "I", buf, offset), offset + 4
            dims = np.frombuffer(buf, np.dtype(order + "u8"), num_dims, offset).astype(np.uint64)
            offset += 8 * num_dims
            kind, start = struct.unpack_from(order + "IQ", buf, offset)
            offset += 12
            infos.append((name.decode("utf-8"), dims, GGMLQuantizationType(kind), start))
        alignment = self.fields.get("general.alignment")
        self.alignment = DEFAULT_ALIGNMENT
        if alignment is not None:
            if alignment.types != [GGUFValueType.UINT32]:
                raise ValueError("Bad type for general.alignment field")
            self.alignment = int(alignment.value)
            if self.alignment == 0 or self.alignment & (self.alignment - 1):
                raise ValueError("Invalid alignment: must be a non-zero power of two")
        self.data_offset = offset + (-offset % self.alignment)
        self.tensors = self._tensors(infos)

    def _string(self, offset: int) -> tuple[bytes, int]:
        (length,) = struct.unpack_from(self._order + "Q", self._buf, offset)
        end = offset + 8 + length
        if end > len(self._buf):
            raise ValueError(f"a string at byte {offset} runs past the end of the file")
        return bytes(self._buf[offset + 8:end]), end

    def _value(self, kind: GGUFValueType, offset: int) -> tuple[list[GGUFValueType], Any, int]:
        if kind == GGUFValueType.STRING:
            value, offset = self._string(offset)
            return [kind], value, offset
        if kind in _SCALARS:
            code = self._order + _SCALARS[kind]
            return [kind], struct.unpack_from(code, self._buf, offset)[0], offset + struct.calcsize(code)
        if kind != GGUFValueType.ARRAY:
            raise ValueError(f"unknown GGUF value type {kind}")
        item, count = struct.unpack_from(self._order + "IQ", self._buf, offset)
        item, offset = GGUFValueType(item), offset + 12
        if item == GGUFValueType.STRING:
            values = []
            for _ in range(count):
                s, offset = self._string(offset)
                values.append(s)
            return [kind, item], values, offset
        if item not in _SCALARS:  # nested arrays: GGUFReader does not read them either
            raise ValueError(f"GGUF arrays of {item.name} are not supported")
        dtype = np.dtype(self._order + _SCALARS[item]) if item != GGUFValueType.BOOL else np.dtype(np.bool_)
        if offset + dtype.itemsize * count > len(self._buf):
            raise ValueError(f"an array at byte {offset} runs past the end of the file")
        values = np.frombuffer(self._buf, dtype, count, offset).tolist()
        return [kind, item], values, offset + dtype.itemsize * count

    def _tensors(self, infos) -> list[GGUFTensorInfo]:
        tensors, names = [], set()
        for name, dims, kind, start in infos:
            if name in names:
                raise ValueError(f"Found duplicated tensor with name {name}")
            names.add(name)
            n_elements = int(np.prod(dims))
            block, type_size = GGML_QUANT_SIZES[kind]
            n_bytes = n_elements * type_size // block
            shape = tuple(reversed(dims.tolist()))
            if kind in _PLAIN_TENSORS:
                dtype, count = np.dtype(self._order + _PLAIN_TENSORS[kind]), n_elements
            else:
                dtype, count, shape = np.dtype(np.uint8), n_bytes, quant_shape_to_byte_shape(shape, kind)
            offset = self.data_offset + start
            if offset + dtype.itemsize * count > len(self._buf):
                raise ValueError(f"tensor {name!r} runs past the end of the file")
            data = np.frombuffer(self._buf, dtype, count, offset).reshape(shape)
            tensors.append(GGUFTensorInfo(name, kind, dims, n_elements, n_bytes, offset, data))
        return tensors
