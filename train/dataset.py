"""Samples -> rows TRL's trainers take: a conversational prompt, the images, and columns the rewards read.

One row per sample:
* `images`: the image files (decoded to PIL by `datasets` only when a batch needs them);
* `prompt`: one user turn whose text is `build_instruction(query, syntax, mode)`; TRL puts the images
  before the text, as the runtime's prompt does;
* `completion` (SFT): the assistant turn, `format_answer(targets, syntax, geometries, mode, reasoning)`;
* `mode`, `syntax` (the model family's box syntax), `task`, `targets` ([image, x1, y1, x2, y2]), `geometries` ([w, h, resized w, resized h]).
"""

from __future__ import annotations

from dataclasses import dataclass

from gemvg.runtime.grounding import ImageGeometry, build_instruction, format_answer

from .checkpoint import ResizeSettings
from .hybrid import HybridPolicy
from .schema import Sample, read_image_size


@dataclass(frozen=True)
class RowOptions:
    syntax: str  # gemvg.runtime.grounding.SYNTAXES name: the model family's box syntax
    policy: HybridPolicy
    resize: ResizeSettings
    with_completion: bool  # SFT: the target answer; GRPO: the model writes it
    # SFT teaches a chain of thought only from real reasoning text: a CoT sample without any is taught direct.
    cot_needs_reasoning: bool = True


def sample_geometries(sample: Sample, resize: ResizeSettings) -> list[ImageGeometry]:
    geometries = []
    for width, height in sample.image_sizes:
        resized_w, resized_h = resize.resized(width, height)
        geometries.append(ImageGeometry(width, height, resized_w, resized_h))
    return geometries


def sample_row(sample: Sample, options: RowOptions) -> dict:
    sample = sample.in_pixels(read_image_size)  # reads image headers only when sizes are unknown
    geometries = sample_geometries(sample, options.resize)
    mode = options.policy.mode_for(sample)
    if mode == "cot" and options.with_completion and options.cot_needs_reasoning and not sample.reasoning:
        mode = "direct"
    row = {
        "images": list(sample.images),
        "prompt": [{"role": "user", "content": build_instruction(sample.query, options.syntax, mode)}],
        "mode": mode,
        "syntax": options.syntax,
        "task": sample.task,
        "targets": [[float(b.image), b.x1, b.y1, b.x2, b.y2] for b in sample.targets],
        "geometries": [[g.width, g.height, g.resized_width, g.resized_height] for g in geometries],
    }
    if options.with_completion:
        answer = format_answer(sample.targets, options.syntax, geometries, mode, sample.reasoning)
        row["completion"] = [{"role": "assistant", "content": answer}]
    return row


def to_dataset(rows: list[dict]):
    """A `datasets.Dataset` with typed columns; images stay paths on disk until a batch decodes them."""
    from datasets import Dataset, Features, Image, List, Value

    turn = List({"role": Value("string"), "content": Value("string")})
    features = {
        "images": List(Image()),
        "prompt": turn,
        "mode": Value("string"),
        "syntax": Value("string"),
        "task": Value("string"),
        "targets": List(List(Value("float64"))),
        "geometries": List(List(Value("int64"))),
    }
    if rows and "completion" in rows[0]:
        features["completion"] = turn
    return Dataset.from_list(rows, features=Features(features))


def build_dataset(samples: list[Sample], options: RowOptions):
    return to_dataset([sample_row(sample, options) for sample in samples])
