"""Builds the demo: a tiny random Qwen2-VL checkpoint, its bundle, two drawn scenes and a query."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from PIL import Image, ImageDraw

from .checkpoints import make_checkpoint
from .exporter import export_bundle

QUERY = "the red circle"


def draw_scenes(folder: Path) -> list[str]:
    """Two small scenes with coloured shapes; the red circle is in the second."""
    scenes = {
        "scene_1.png": ((320, 240), [("rectangle", (30, 40, 130, 150), "#3060d0"), ("ellipse", (180, 60, 280, 160), "#30a050")]),
        "scene_2.png": ((280, 300), [("ellipse", (40, 150, 150, 260), "#d03030"), ("rectangle", (160, 30, 250, 120), "#e0c020")]),
    }
    names = []
    for name, (size, shapes) in scenes.items():
        image = Image.new("RGB", size, "#f4f1ea")
        pen = ImageDraw.Draw(image)
        for kind, corners, colour in shapes:
            getattr(pen, kind)(corners, fill=colour)
        image.save(folder / name)
        names.append(name)
    return names


def build_demo(out: Path) -> Path:
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    print("[gemvg-export] writing a tiny random-weight Qwen2-VL checkpoint", file=sys.stderr, flush=True)
    make_checkpoint(staging / "checkpoint", family="qwen2_vl", preset="tiny", seed=0)
    export_bundle(staging / "checkpoint", staging / "bundle")
    images = draw_scenes(staging)
    (staging / "demo.json").write_text(json.dumps({"images": images, "query": QUERY, "max_new_tokens": 48}))
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)  # only a complete demo folder ever appears under the final name
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gemvg.export.demo", description=__doc__)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    build_demo(Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
