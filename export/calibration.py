"""Calibration data: requests from a JSONL file turned into graph inputs by the runtime's own code path.

CALIB.jsonl holds one JSON object per line, `{"images": ["a.jpg", "b.jpg"], "query": "the red cup"}`
(relative paths are resolved against the file's folder; other fields are ignored). Each request goes
through exactly what `Engine.ground` does before the decoder: `Engine.prepare` (image loading,
smart_resize, patchify, chat template, M-RoPE positions), `Engine.vision_inputs` for the
vision encoder, and `Engine.embed_prompt` (the fp32 vision features spliced into the token embeddings)
and `Engine.decoder_feeds` for the decoder's prefill, with an empty cache. So the activation ranges
are those the runtime produces.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from gemvg.runtime.engine import Engine
from gemvg.runtime.errors import GemvgError
from gemvg.runtime.preprocess import ImageInput, PreparedImage


class CalibrationError(GemvgError):
    """The calibration file is missing, malformed, or names images that cannot be read."""


@dataclass(frozen=True)
class Sample:
    """One request: images (paths or arrays) and a query. `origin` says where it came from (file:line)."""

    images: tuple[ImageInput, ...]
    query: str
    origin: str


def read_calibration(path: str | Path) -> list[Sample]:
    """Parse CALIB.jsonl; every problem is a CalibrationError naming the line."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"calibration file not found: {path}")
    samples = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise CalibrationError(f"{where}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise CalibrationError(f"{where}: expected a JSON object with 'images' and 'query'")
        images, query = record.get("images"), record.get("query")
        if not isinstance(images, list) or not images or not all(isinstance(i, str) and i for i in images):
            raise CalibrationError(f"{where}: 'images' must be a non-empty list of image paths")
        if not isinstance(query, str) or not query.strip():
            raise CalibrationError(f"{where}: 'query' must be a non-empty string")
        resolved = tuple(str(p if p.is_absolute() else path.parent / p) for p in map(Path, images))
        for image in resolved:
            if not Path(image).is_file():
                raise CalibrationError(f"{where}: image not found: {image}")
        samples.append(Sample(resolved, query, where))
    if not samples:
        raise CalibrationError(f"{path}: no calibration samples (one JSON object per line)")
    return samples


def split_samples(samples: Sequence[Sample], limit: int | None = None) -> tuple[list[Sample], list[Sample]]:
    """(calibration, held-back): the last fifth (at least one) is held back for the report when there
    are two or more samples; `limit` caps the calibration part. With one sample nothing is held back."""
    samples = list(samples)
    if limit is not None and limit < 1:
        raise CalibrationError("--calibration-samples must be at least 1")
    held = max(1, len(samples) // 5) if len(samples) >= 2 else 0
    calibration, held_back = samples[:len(samples) - held], samples[len(samples) - held:]
    if limit is not None:
        calibration = calibration[:limit]
    return calibration, held_back


def generated_samples(count: int, seed: int = 1000) -> list[Sample]:
    """Requests over generated images (smooth random blobs, two per request, different shapes)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    queries = ("the red cup", "every person on the left", "the object that appears in both images",
               "the largest window")
    samples = []
    for index in range(count):
        images = []
        for width, height in ((int(rng.integers(80, 200)), int(rng.integers(60, 160))),
                              (int(rng.integers(60, 160)), int(rng.integers(80, 200)))):
            small = rng.integers(0, 256, (max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
            images.append(np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)))
        samples.append(Sample(tuple(images), queries[index % len(queries)], f"generated:{seed}:{index}"))
    return samples


def decoder_inputs(engine: Engine, sample: Sample) -> dict[str, np.ndarray]:
    """The decoder's prefill feed for a request, as `Engine.prefill` builds it for a fresh cache:
    `Engine.prompt_inputs` over the engine's own vision features, the prompt's M-RoPE positions, and
    `Engine.decoder_feeds` (an empty cache sized for the prompt)."""
    inputs = engine.prepare(list(sample.images), sample.query)
    prompt = inputs.prompt
    features = [engine.encode_image(image) for image in inputs.images]
    embeds, deepstack = engine.prompt_inputs(prompt, features)
    cache = engine.new_cache(len(prompt.input_ids))
    return engine.decoder_feeds(embeds, prompt.position_ids[:, None, :], cache, deepstack)


class PipelineFeeds:
    """Graph inputs for requests, computed once per request with an fp32 engine and kept."""

    def __init__(self, engine: Engine, progress: Callable[[str], None] = lambda message: None):
        self.engine = engine
        self.progress = progress
        self._vision: dict[str, list[dict[str, np.ndarray]]] = {}
        self._decoder: dict[str, dict[str, np.ndarray]] = {}

    def vision(self, samples: Sequence[Sample]) -> list[dict[str, np.ndarray]]:
        """One feed per image of every sample, in order."""
        feeds = []
        for sample in samples:
            if sample.origin not in self._vision:
                prepared = self.engine.prepare(list(sample.images), sample.query).images
                self._vision[sample.origin] = [self.engine.vision_inputs(image)[0] for image in prepared]
            feeds.extend(self._vision[sample.origin])
        return feeds

    def decoder(self, samples: Sequence[Sample]) -> list[dict[str, np.ndarray]]:
        feeds = []
        for index, sample in enumerate(samples):
            if sample.origin not in self._decoder:
                self.progress(f"  decoder inputs {index + 1}/{len(samples)} ({sample.origin})")
                self._decoder[sample.origin] = decoder_inputs(self.engine, sample)
            feeds.append(self._decoder[sample.origin])
        return feeds


class FeedReader(CalibrationDataReader):
    """onnxruntime.quantization's CalibrationDataReader protocol over a list of feeds, with progress."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]], what: str,
                 progress: Callable[[str], None] = lambda message: None):
        self.feeds = list(feeds)
        self.what = what
        self.progress = progress
        self._iter: Iterator[dict[str, np.ndarray]] | None = None
        self._index = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._iter is None:
            self._iter = iter(self.feeds)
        feed = next(self._iter, None)
        if feed is not None:
            self._index += 1
            self.progress(f"  calibrating {self.what}: input {self._index}/{len(self.feeds)}")
        return feed

    def rewind(self) -> None:
        self._iter, self._index = None, 0

    def __len__(self) -> int:
        return len(self.feeds)
