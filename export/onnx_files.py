"""How a bundle writes an ONNX graph: its structure in `<name>`, its weights in `<name>.data` beside it.

Every graph, not only those past protobuf's 2 GB limit: ONNX Runtime memory-maps external weights, so a
session opens without parsing them out of the protobuf, and weights it reads in place (the token
embedding's Gather) stay in the page cache, shared and touched row by row, instead of being copied into
the process. Measured on bench-0.5b (onnxruntime 1.32): embed.onnx opens in 1011 ms with 529 MB more
RSS inline, in 4 ms with 14 MB more external; the int4 decoder in 577 against 201 ms."""
from __future__ import annotations

from pathlib import Path

WEIGHTS_SUFFIX = ".data"
LARGE_GRAPH_BYTES = int(1.8e9)  # protobuf's 2 GB limit, with room: over it a graph cannot be held inline


def weights_file(path: Path) -> Path:
    return path.with_name(path.name + WEIGHTS_SUFFIX)


def graph_bytes(path: Path) -> int:
    """The graph's size on disk, weights included."""
    data = weights_file(path)
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def save_graph(model, path: Path) -> None:
    """Write `model` to `path`, every tensor of 1 KiB or more in `<name>.data`."""
    import onnx

    data = weights_file(path)
    if data.exists():
        data.unlink()  # onnx appends to an existing file
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
