"""Shared fixtures: tiny random checkpoints of every family, their bundles, and test images.

Built once per session in a temporary folder; nothing is downloaded.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    from gemvg.export.checkpoints import make_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    return {family: make_checkpoint(root / family, family=family, preset="tiny", seed=1) for family in FAMILIES}


@pytest.fixture(scope="session")
def tiny_bundles(tiny_checkpoints, tmp_path_factory) -> dict[str, Path]:
    from gemvg.export.exporter import export_bundle

    root = tmp_path_factory.mktemp("bundles")
    bundles = {}
    for family, checkpoint in tiny_checkpoints.items():
        export_bundle(checkpoint, root / family, progress=lambda message: None)
        bundles[family] = root / family
    return bundles


@pytest.fixture(scope="session")
def tiny_bundle(tiny_bundles) -> Path:
    """The Qwen2-VL tiny bundle (GeM-VG's base family)."""
    return tiny_bundles["qwen2_vl"]


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path) -> Path:
    """A throwaway copy of the tiny bundle, for tests that damage it."""
    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))


def _random_image(rng, width: int, height: int, mode: str) -> Image.Image:
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    # Smooth blobs rather than pure noise, so JPEG and resizing behave like on photos.
    image = Image.fromarray(pixels).resize((max(1, width // 4), max(1, height // 4))).resize((width, height))
    return image.convert(mode) if mode != "P" else image.convert("P", palette=Image.Palette.ADAPTIVE)


@pytest.fixture(scope="session")
def image_files(tmp_path_factory) -> dict[str, Path]:
    """Images of different sizes, modes and formats, written to disk."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(7)
    specs = {
        "rgb.jpg": (97, 61, "RGB"),
        "gray.png": (150, 80, "L"),
        "palette.png": (60, 120, "P"),
        "rgba.png": (50, 50, "RGBA"),
        "wide.jpg": (200, 40, "RGB"),
        "large.jpg": (220, 180, "RGB"),  # several Qwen2.5-VL attention windows, uneven at the edges
        "one_pixel.png": (1, 1, "RGB"),
        "thin_tall.png": (2, 300, "RGB"),
        "thin_wide.png": (180, 1, "RGB"),
    }
    paths = {}
    for name, (width, height, mode) in specs.items():
        path = root / name
        _random_image(rng, width, height, mode).save(path)
        paths[name] = path
    return paths
