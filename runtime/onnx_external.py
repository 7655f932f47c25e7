"""The external-data files an ONNX model names, read from its protobuf without loading any weights.

onnx is not a runtime dependency, and ONNX Runtime opens whatever a tensor's `location` names, so the
manifest check (every file a bundle reads lies inside it and is checksummed) needs these names before
a session exists. This is a walk of the protobuf wire format over the messages that can hold tensors
(onnx.proto field numbers): model -> graph, functions; graph -> node, initializer, sparse_initializer;
node -> attribute; attribute -> t, g, tensors, graphs, sparse_tensor(s); tensor -> external_data.
Everything else (weights included) is skipped by its length, so a graph is read in one pass over its
bytes, memory-mapped.
"""

from __future__ import annotations

import mmap
from pathlib import Path

_MODEL, _GRAPH, _NODE, _ATTRIBUTE, _FUNCTION, _TENSOR, _SPARSE, _ENTRY = range(8)
# message kind -> {field number: kind of the message it holds}
_SCHEMA = {
    _MODEL: {7: _GRAPH, 25: _FUNCTION},
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},
    _NODE: {5: _ATTRIBUTE},
    _ATTRIBUTE: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},
    _FUNCTION: {7: _NODE},
    _SPARSE: {1: _TENSOR, 2: _TENSOR},
    _TENSOR: {13: _ENTRY},  # TensorProto.external_data: StringStringEntryProto (key 1, value 2)
}


class MalformedModel(ValueError):
    """The bytes are not an ONNX protobuf."""


def external_data_locations(path: str | Path) -> list[str]:
    """Every `location` of every tensor stored as external data in the ONNX model at `path`."""
    with open(path, "rb") as handle:
        if handle.seek(0, 2) == 0:
            raise MalformedModel("the file is empty")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            try:
                return _locations(view)
            finally:
                view.release()


def _locations(model: memoryview) -> list[str]:
    found, stack = [], [(_MODEL, model)]
    while stack:  # a stack, not recursion: hostile nesting cannot exhaust Python's recursion limit
        kind, message = stack.pop()
        if kind == _ENTRY:
            entry = {number: bytes(value) for number, value in _length_fields(message)}
            if entry.get(1) == b"location":
                try:
                    found.append(entry.get(2, b"").decode("utf-8"))
                except UnicodeDecodeError:
                    raise MalformedModel("an external-data location is not UTF-8") from None
            continue
        holds = _SCHEMA[kind]
        stack.extend((holds[number], value) for number, value in _length_fields(message) if number in holds)
    return found


def _length_fields(message: memoryview):
    """(field number, bytes) of the length-delimited fields of one message; other fields are skipped."""
    position, end = 0, len(message)
    while position < end:
        key, position = _varint(message, position)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, position = _varint(message, position)
        elif wire == 1:
            position += 8
        elif wire == 5:
            position += 4
        elif wire == 2:
            length, position = _varint(message, position)
            if position + length > end:
                raise MalformedModel("a field runs past the end of its message")
            yield number, message[position:position + length]
            position += length
        else:
            raise MalformedModel(f"unknown protobuf wire type {wire}")
        if position > end:
            raise MalformedModel("a field runs past the end of its message")


def _varint(data: memoryview, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if position >= len(data) or shift > 63:
            raise MalformedModel("a truncated or overlong varint")
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7
