"""Reading HF safetensors checkpoints (one file or a sharded index) without torch.

The format is an 8-byte little-endian header length, a JSON header mapping tensor names to
dtype, shape and byte offsets, then raw little-endian data. Files are memory-mapped, so a
tensor costs host memory only when it is converted.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from jaxinfer.errors import CheckpointError

_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_MAX_HEADER = 100 * 1024 * 1024
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class SafetensorsFile:
    """One memory-mapped .safetensors file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"safetensors file not found: {self.path}")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path} is not a safetensors file (shorter than 8 bytes)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(_MAX_HEADER, size - 8):
                raise CheckpointError(f"{self.path} is corrupted or truncated: header length {header_len} "
                                      f"does not fit a file of {size} bytes")
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{self.path} is corrupted: header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path} is corrupted: header is not a JSON object")
        header.pop("__metadata__", None)
        data_start = 8 + header_len
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype = _DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except KeyError as e:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported or missing field {e}") from None
            expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if end - begin != expected or begin < 0:
                raise CheckpointError(f"{self.path}: tensor {name!r} has inconsistent offsets")
            if data_start + end > size:
                raise CheckpointError(f"{self.path} is truncated: tensor {name!r} ends at byte "
                                      f"{data_start + end} but the file has {size} bytes")
            self._entries[name] = (dtype, shape, data_start + begin, end - begin)
        self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r") if size else None

    def keys(self) -> list[str]:
        return list(self._entries)

    def get(self, name: str) -> np.ndarray:
        dtype, shape, offset, nbytes = self._entries[name]
        return self._mmap[offset:offset + nbytes].view(dtype).reshape(shape)


class SafetensorsCheckpoint:
    """All tensors of an HF checkpoint directory: `model.safetensors` or a sharded index."""

    def __init__(self, directory: str | os.PathLike):
        directory = Path(directory)
        index = directory / "model.safetensors.index.json"
        single = directory / "model.safetensors"
        self._where: dict[str, SafetensorsFile] = {}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from None
            files = {f: SafetensorsFile(directory / f) for f in sorted(set(weight_map.values()))}
            for name, f in weight_map.items():
                if name not in files[f]._entries:
                    raise CheckpointError(f"index says {name!r} is in {f}, but that shard does not hold it")
                self._where[name] = files[f]
        elif single.is_file():
            f = SafetensorsFile(single)
            self._where = {name: f for name in f.keys()}
        else:
            others = sorted(p.name for p in directory.glob("*.safetensors"))
            if others:
                for p in others:
                    f = SafetensorsFile(directory / p)
                    self._where.update({name: f for name in f.keys()})
            else:
                pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
                if pickles:
                    raise CheckpointError(
                        f"{directory} holds only pickle checkpoints ({', '.join(pickles)}); jaxinfer loads "
                        "safetensors and GGUF only, because unpickling can run arbitrary code. Convert with "
                        "`transformers` (model.save_pretrained(dir, safe_serialization=True)).")
                raise CheckpointError(f"no model.safetensors or safetensors index in {directory}")

    def names(self) -> set[str]:
        return set(self._where)

    def get(self, name: str) -> np.ndarray:
        return self._where[name].get(name)


_DTYPE_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray]) -> None:
    """Writes numpy arrays as one .safetensors file (names sorted, data 8-byte aligned)."""
    header, offset, blobs = {}, 0, []
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        if array.dtype not in _DTYPE_NAMES:
            raise ValueError(f"tensor {name!r}: dtype {array.dtype} has no safetensors name")
        data = array.tobytes()  # little-endian hosts only (as the reader assumes)
        header[name] = {"dtype": _DTYPE_NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for data in blobs:
            f.write(data)
