"""Tiny bundles of every family and test images for the native runtime's ctest (no downloads).

    python runtime/native/tests/make_test_data.py OUT_DIR
"""

import sys
from pathlib import Path

import numpy as np
from PIL import Image

from gemvg.export.checkpoints import make_checkpoint
from gemvg.export.exporter import export_bundle


def main(out: Path) -> None:
    for family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        if not (out / "bundles" / family / "manifest.json").is_file():
            checkpoint = make_checkpoint(out / "checkpoints" / family, family=family, preset="tiny", seed=1)
            export_bundle(checkpoint, out / "bundles" / family, progress=lambda message: None)
    rng = np.random.default_rng(3)
    for name, (width, height) in {"a.jpg": (97, 61), "b.png": (150, 80)}.items():
        pixels = rng.integers(0, 256, (height // 4, width // 4, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((width, height)).save(out / name)
    print(f"test data in {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
