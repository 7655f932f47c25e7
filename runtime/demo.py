"""`gemvg demo`: the main job on an embedded default, with no arguments.

Until a trained demo model ships, the demo bundle is a tiny random-weight model that gemvg-export
builds at first use (cached under ~/.cache/gemvg): the pipeline is real, its boxes are meaningless.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .errors import GemvgError
from .manifest import MANIFEST_NAME, SCHEMA_VERSION

DEMO_NAME = "demo-tiny-qwen2_vl"


def demo_home(home: Path | None) -> Path:
    return home or Path(os.environ.get("GEMVG_HOME", Path.home() / ".cache" / "gemvg"))


def cached_schema(folder: Path) -> int | None:
    """The manifest schema of the cached demo bundle, or None when there is no complete one."""
    try:
        manifest = json.loads((folder / "bundle" / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    return manifest.get("schema_version") if (folder / "demo.json").is_file() else None


def ensure_demo(folder: Path) -> None:
    """Build the demo bundle with gemvg-export (a separate process: the runtime never imports export),
    at first use and again when the cached one was made by a gemvg with another bundle schema."""
    schema = cached_schema(folder)
    if schema == SCHEMA_VERSION:
        return
    if schema is None:
        print(f"building the demo bundle in {folder} (first run only) ...", file=sys.stderr, flush=True)
    else:
        print(f"rebuilding the demo bundle in {folder}: the cached one has bundle schema {schema}, this gemvg "
              f"reads {SCHEMA_VERSION} ...", file=sys.stderr, flush=True)
    done = subprocess.run([sys.executable, "-m", "gemvg.export.demo", "--out", str(folder)])
    if done.returncode != 0:
        raise GemvgError("could not build the demo bundle: it needs gemvg[export] (torch, transformers, onnx) "
                         "at first use; pip install 'gemvg[export]'")


def run_demo(home: Path | None = None) -> int:
    from .draw import draw_boxes
    from .engine import Engine
    from .preprocess import load_image

    folder = demo_home(home) / DEMO_NAME
    ensure_demo(folder)
    request = json.loads((folder / "demo.json").read_text())
    images = [str(folder / name) for name in request["images"]]
    engine = Engine.load(folder / "bundle")
    result = engine.ground(images, request["query"], mode="direct", max_new_tokens=request["max_new_tokens"])
    print(f"query: {request['query']!r} over {len(images)} images")
    print(f"model output: {result.text!r}")
    if result.boxes:
        for box in result.boxes:
            print(f"  image {box.image}: ({box.x1:.0f}, {box.y1:.0f}, {box.x2:.0f}, {box.y2:.0f}) {box.label}")
    else:
        print("  no boxes parsed from the output")
    stages = ", ".join(f"{k} {v:.1f} ms" for k, v in result.timings_ms.items())
    print(f"timings: load {engine.load_ms:.1f} ms, {stages}")
    loaded = [load_image(image, engine.manifest.preprocess.max_image_pixels) for image in images]
    drawn = draw_boxes(loaded, result.boxes, folder / "demo_result.png")
    print(f"drawing: {drawn}")
    print("note: the demo model is a tiny random-weight Qwen2-VL built on this machine; its boxes are "
          "meaningless. Export a trained checkpoint with gemvg-export and run gemvg ground on it.")
    return 0
