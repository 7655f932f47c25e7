"""Safetensors checkpoints read and written one tensor at a time, never the whole model.

A 7B Qwen2-VL checkpoint is 16.6 GB in bf16 and 33 GB in float32: more than the machines people export
on. Like llama.cpp's converter, the exporter reads each tensor when it needs it (a positioned read of its
bytes, converted to float32 in numpy) and lets it go, so what it holds is one layer, not the model.

The format is small enough to read directly: 8 bytes little-endian header length, a JSON header mapping
names to dtype, shape and data offsets, then the raw bytes. Sharded checkpoints list their files in
`model.safetensors.index.json`. bf16 (what real checkpoints store), fp16 and fp32 are read.

Checkpoints name their tensors two ways: as published on the hub (`visual.blocks.0...`,
`model.layers.0...`, `lm_head.weight`) and as transformers 5 saves them (`model.visual...`,
`model.language_model...`). Both are read under one canonical naming: `visual.*`, `text.*`, `lm_head.*`.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from gemvg.runtime.errors import GemvgError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
READ_CHUNK_BYTES = 256 << 20  # large tensors are converted in pieces of this many source bytes
DTYPES = {"BF16": 2, "F16": 2, "F32": 4}

# (prefix as stored, canonical prefix), the more specific first.
_PREFIXES = (("model.visual.", "visual."), ("model.language_model.", "text."), ("visual.", "visual."),
             ("model.", "text."), ("lm_head.", "lm_head."))


class CheckpointError(GemvgError):
    """The checkpoint's weight files are missing, truncated or of an unsupported type."""


def canonical_name(stored: str) -> str | None:
    for prefix, canonical in _PREFIXES:
        if stored.startswith(prefix):
            return canonical + stored[len(prefix):]
    return None


def to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Raw little-endian bytes of `dtype` -> float32 (bf16 is the top half of a float32: exact)."""
    if dtype == "BF16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if dtype == "F16":
        return raw.view(np.float16).astype(np.float32)
    return raw.view(np.float32).copy()


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def row_bytes(self) -> int:
        """Bytes of one slice along the first axis (one element for a vector)."""
        return int(np.prod(self.shape[1:], dtype=np.int64)) * DTYPES[self.dtype]


def read_header(path: Path) -> dict[str, TensorEntry]:
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > 100 << 20:
                raise CheckpointError(f"{path}: not a safetensors file (header of {length} bytes)")
            header = json.loads(handle.read(length))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: cannot read its safetensors header ({err})") from None
    size = path.stat().st_size
    base = 8 + length
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = info.get("dtype")
        if dtype not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name} is {dtype}; gemvg reads BF16, F16 and F32 checkpoints")
        start, end = (base + int(v) for v in info["data_offsets"])
        shape = tuple(int(d) for d in info["shape"])
        if end > size or end - start != int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype]:
            raise CheckpointError(f"{path}: tensor {name} lies outside the file or has the wrong size (truncated?)")
        entries[name] = TensorEntry(path, dtype, shape, start, end)
    return entries


class CheckpointTensors:
    """The tensors of a checkpoint folder by canonical name, read on demand as float32 numpy arrays."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        index = self.model_dir / INDEX_NAME
        if index.is_file():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise CheckpointError(f"{index}: malformed index ({err})") from None
        elif (self.model_dir / SINGLE_NAME).is_file():
            files = [SINGLE_NAME]
        else:
            raise CheckpointError(f"{self.model_dir}: no {SINGLE_NAME} or {INDEX_NAME} (gemvg reads safetensors "
                                  "checkpoints)")
        self.entries: dict[str, TensorEntry] = {}
        for name in files:
            path = self.model_dir / name
            if not path.is_file():
                raise CheckpointError(f"{self.model_dir}: the index lists {name}, which is missing")
            for stored, entry in read_header(path).items():
                canonical = canonical_name(stored)
                if canonical is not None:
                    self.entries[canonical] = entry

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self, prefix: str = "") -> list[str]:
        return [name for name in self.entries if name.startswith(prefix)]

    def entry(self, name: str) -> TensorEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise CheckpointError(f"{self.model_dir}: checkpoint lacks tensor {name!r}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entry(name).shape

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a tensor (along its first axis) as float32."""
        entry = self.entry(name)
        row = entry.row_bytes
        count = (stop - start) * row
        raw = np.empty(count, np.uint8)
        with open(entry.file, "rb", buffering=0) as handle:
            handle.seek(entry.start + start * row)
            if handle.readinto(memoryview(raw)) != count:
                raise CheckpointError(f"{entry.file}: short read of tensor {name!r}")
        return to_float32(raw, entry.dtype).reshape((stop - start, *entry.shape[1:]))

    def get(self, name: str) -> np.ndarray:
        """A whole tensor as float32."""
        entry = self.entry(name)
        if not entry.shape:
            raise CheckpointError(f"{entry.file}: tensor {name!r} is a scalar; no Qwen-VL weight is")
        return self.rows(name, 0, entry.shape[0])

    def row_chunks(self, name: str, chunk_bytes: int = READ_CHUNK_BYTES) -> Iterable[tuple[int, np.ndarray]]:
        """(first row, float32 rows) pieces of a tensor, each of at most about `chunk_bytes` stored bytes."""
        entry = self.entry(name)
        per_chunk = max(1, chunk_bytes // entry.row_bytes)
        for start in range(0, entry.shape[0], per_chunk):
            yield start, self.rows(name, start, min(entry.shape[0], start + per_chunk))


# -- writing, tensor by tensor ---------------------------------------------------------------------


def write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], make: Callable[[str, tuple[int, ...]], np.ndarray],
                      dtype: str = "BF16", metadata: dict[str, str] | None = None) -> None:
    """A safetensors file of `shapes`, each tensor made by `make(name, shape)` (float32) and written at
    once: the header is known from the shapes, so no more than one tensor is ever held."""
    width = DTYPES[dtype]
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        size = int(np.prod(shape, dtype=np.int64)) * width
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for name, shape in shapes.items():
            values = np.ascontiguousarray(make(name, shape), np.float32)
            if values.shape != tuple(shape):
                raise ValueError(f"{name}: made {values.shape}, expected {shape}")
            handle.write(from_float32(values, dtype).tobytes())
        handle.flush()
        os.fsync(handle.fileno())


def from_float32(values: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":  # round to nearest even, as torch does
        bits = values.view(np.uint32)
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        return (rounded >> 16).astype(np.uint16)
    if dtype == "F16":
        return values.astype(np.float16)
    return values


def write_sharded(model_dir: Path, shapes: dict[str, tuple[int, ...]],
                  make: Callable[[str, tuple[int, ...]], np.ndarray], dtype: str = "BF16",
                  shard_bytes: int = 4 << 30, progress: Callable[[str], None] | None = None) -> list[Path]:
    """Shards of at most about `shard_bytes` and their `model.safetensors.index.json`, as HF writes them."""
    width = DTYPES[dtype]
    shards: list[dict[str, tuple[int, ...]]] = [{}]
    size = 0
    for name, shape in shapes.items():
        tensor_bytes = int(np.prod(shape, dtype=np.int64)) * width
        if shards[-1] and size + tensor_bytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = shape
        size += tensor_bytes
    paths, weight_map = [], {}
    total = sum(int(np.prod(s, dtype=np.int64)) * width for s in shapes.values())
    for index, shard in enumerate(shards, 1):
        name = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        if progress:
            progress(f"writing {name} ({len(shard)} tensors)")
        write_safetensors(model_dir / name, shard, make, dtype)
        paths.append(model_dir / name)
        weight_map.update({tensor: name for tensor in shard})
    (model_dir / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                   indent=2))
    return paths
