"""One sample schema for generalized multi-image grounding, and its JSONL form.

A sample is a few images, a query and zero, one or many targets, each a `Box` in one of the images.
Loaders of every source produce it, `synth` writes it, SFT/GRPO read it.

Boxes are in the original pixels of their image (`units="pixel"`), except for sources that give
boxes relative to images we do not have (MIG-Bench, MGrounding-630k without images): those keep
boxes as fractions 0-1 of the image (`units="normalized"`) until a size is known; `in_pixels` then
converts. Training needs pixels (the answer text depends on the image size), so the dataset builder
resolves sizes from the image files only when it must.

JSONL: one sample per line. `images` (paths) and `query` are top-level because the calibration tool
reads the same file and looks at nothing else. Image paths are relative to the JSONL file's folder;
absolute paths pass through.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

from gemvg.runtime.errors import GemvgError
from gemvg.runtime.grounding import Box

UNITS = ("pixel", "normalized")
ImageSize = tuple[int, int]  # (width, height)


class DataError(GemvgError, ValueError):
    """Input data that cannot be read into the schema; the message names the file and the item."""


@dataclass
class Sample:
    images: list[str]
    query: str
    targets: list[Box] = field(default_factory=list)
    task: str = "grounding"
    reasoning: str = ""  # chain-of-thought text for CoT answers; empty when the source has none
    image_sizes: list[ImageSize] | None = None  # (width, height) per image, when known
    units: str = "pixel"  # of the targets' coordinates: "pixel" or "normalized" (0-1 of the image)
    source: str = ""  # where it came from ("mig-bench:123"), for error messages and analysis

    def __post_init__(self) -> None:
        if self.units not in UNITS:
            raise DataError(f"{self.source or 'sample'}: unknown box units {self.units!r}")
        if self.image_sizes is not None and len(self.image_sizes) != len(self.images):
            raise DataError(f"{self.source or 'sample'}: {len(self.image_sizes)} image sizes "
                            f"for {len(self.images)} images")
        for box in self.targets:
            if not 0 <= box.image < len(self.images):
                raise DataError(f"{self.source or 'sample'}: a target lies in image {box.image + 1} "
                                f"of {len(self.images)}")

    def in_pixels(self, size_of: Callable[[str], ImageSize] | None = None) -> "Sample":
        """This sample with sizes known and boxes in pixels; `size_of(path)` is asked only for missing sizes."""
        sizes = self.image_sizes
        if sizes is None:
            if size_of is None:
                raise DataError(f"{self.source or 'sample'}: image sizes are unknown and no way to read them was given")
            sizes = [tuple(size_of(path)) for path in self.images]
        if self.units == "pixel":
            return replace(self, image_sizes=list(sizes))
        targets = []
        for box in self.targets:
            width, height = sizes[box.image]
            targets.append(Box(box.image, box.x1 * width, box.y1 * height, box.x2 * width, box.y2 * height, box.label))
        return replace(self, targets=targets, image_sizes=list(sizes), units="pixel")


def read_image_size(path: str) -> ImageSize:
    """(width, height) from the image header, EXIF rotation applied as the processors apply it."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1)
    except FileNotFoundError as err:
        raise DataError(f"image not found: {path}") from err
    except OSError as err:
        raise DataError(f"cannot read image {path}: {err}") from err
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


# ----------------------------------------------------------------------------------------------
# JSONL


def sample_to_json(sample: Sample, base_dir: str | Path) -> dict:
    base = Path(base_dir).resolve()
    record: dict = {
        "images": [_relative_path(path, base) for path in sample.images],
        "query": sample.query,
        "targets": [{"image": b.image, "bbox": [b.x1, b.y1, b.x2, b.y2], "label": b.label} for b in sample.targets],
        "task": sample.task,
        "units": sample.units,
    }
    if sample.reasoning:
        record["reasoning"] = sample.reasoning
    if sample.image_sizes is not None:
        record["image_sizes"] = [list(size) for size in sample.image_sizes]
    if sample.source:
        record["source"] = sample.source
    return record


def sample_from_json(record: dict, base_dir: str | Path, where: str = "") -> Sample:
    base = Path(base_dir)
    try:
        images = record["images"]
        query = record["query"]
        if not isinstance(images, list) or not all(isinstance(p, str) for p in images) or not images:
            raise DataError(f"{where}: 'images' must be a non-empty list of paths")
        if not isinstance(query, str):
            raise DataError(f"{where}: 'query' must be a string")
        targets = []
        for target in record.get("targets", []):
            x1, y1, x2, y2 = (float(v) for v in target["bbox"])
            targets.append(Box(int(target.get("image", 0)), x1, y1, x2, y2, str(target.get("label", ""))))
        sizes = record.get("image_sizes")
        return Sample(
            images=[p if os.path.isabs(p) else str(base / p) for p in images],
            query=query,
            targets=targets,
            task=str(record.get("task", "grounding")),
            reasoning=str(record.get("reasoning", "")),
            image_sizes=[(int(w), int(h)) for w, h in sizes] if sizes is not None else None,
            units=str(record.get("units", "pixel")),
            source=str(record.get("source", where)),
        )
    except DataError:
        raise
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"{where}: not a sample ({type(err).__name__}: {err})") from err


def write_jsonl(samples: Iterable[Sample], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for sample in samples:
            out.write(json.dumps(sample_to_json(sample, path.parent), ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[Sample]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    samples = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: invalid JSON ({err.msg})") from err
            if not isinstance(record, dict):
                raise DataError(f"{where}: a line must be a JSON object")
            samples.append(sample_from_json(record, path.parent, where))
    return samples


def _relative_path(path: str, base: Path) -> str:
    """Relative to `base` when the image lies under it (portable datasets); else absolute."""
    absolute = Path(path).resolve()
    try:
        return absolute.relative_to(base).as_posix()
    except ValueError:
        return str(absolute)
