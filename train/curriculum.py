"""A grounding curriculum for a small model trained from scratch, and the base model it starts from.

A from-scratch Qwen2-VL on the full synth mix (2-6 images, clutter, ten task types) learns the answer
format but stays at chance on which image holds the target. The curriculum teaches one thing at a
time on small, plain images (one fixed side, so every image is the same few vision tokens):

* `single`: one image, one big shape; the answer is its box (learn to localize);
* `distractors`: one image, the target and 1-2 shapes of other colours (learn to read the query);
* `multi`: 2-3 images, the target in one, 1-2 shapes of other colours in each (learn which image).

Within a sample every shape other than the target has another colour than the target, so the
query's colour alone identifies it. Deterministic by seed, like `synth`.

The background carries a position tint: red rises by POSITION_TINT levels from left to right and
blue from top to bottom; shapes keep their colours. Qwen2-VL's vision tower has no absolute position
embedding (2-D rotary only, which moves no position into the values), so a model trained from
scratch has to discover where a patch lies. The tint puts each background patch's position into its
pixels, and since a shape covers part of the tinted background, even the plain average of an
image's tokens depends on where the shape is (a tint on the shapes too would average out).
Measured: neither helped within the steps we could run (train/README.md).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from gemvg.runtime.grounding import Box

from .schema import Sample
from .synth import COLORS, SHAPES, Scene, SynthSample, Thing, _a, _draw_shape, _Retry, _place, write_dataset

IMAGE_SIDE = 112  # 8x8 patches of 14 px, 16 vision tokens after the 2x2 merge
POSITION_TINT = 100  # levels of red (left to right) and blue (top to bottom) across an image's background


@dataclass(frozen=True)
class Stage:
    name: str
    images: tuple[int, int]  # how many images, inclusive range
    others: tuple[int, int]  # shapes besides the target per image, inclusive range
    size: tuple[float, float]  # side of a shape as a fraction of the image side
    quadrants: bool = False  # the target fills one quadrant: four possible boxes, the easiest place to start


STAGES = {
    "quadrant": Stage("quadrant", (1, 1), (0, 0), (0.45, 0.45), quadrants=True),
    "single": Stage("single", (1, 1), (0, 0), (0.35, 0.6)),
    "distractors": Stage("distractors", (1, 1), (1, 2), (0.28, 0.42)),
    "multi": Stage("multi", (2, 3), (1, 2), (0.28, 0.42)),
}
QUERIES = ("Find the {n}.", "Where is the {n}?", "Locate the {n}.")


def _plain_scene(rng: random.Random) -> Scene:
    """A near-grey background: a pale tint could be as close to a shape's colour as a pink star on pink."""
    grey = rng.randint(185, 245)
    tint = tuple(min(255, grey + rng.randint(-8, 8)) for _ in range(3))
    return Scene(IMAGE_SIDE, IMAGE_SIDE, ("solid", tint, tint, 8), [])


def position_tinted(image: Image.Image) -> Image.Image:
    """`image` with red shifted by -POSITION_TINT/2..+POSITION_TINT/2 along x and blue along y."""
    pixels = np.asarray(image, dtype=np.int16).copy()
    height, width = pixels.shape[:2]
    pixels[..., 0] += np.round(np.linspace(-POSITION_TINT / 2, POSITION_TINT / 2, width)).astype(np.int16)[None, :]
    pixels[..., 2] += np.round(np.linspace(-POSITION_TINT / 2, POSITION_TINT / 2, height)).astype(np.int16)[:, None]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def render_tinted(scene: Scene) -> Image.Image:
    """The scene with the position tint on its background only; shapes keep their colours."""
    image = position_tinted(replace(scene, things=[], marked=None).render())
    draw = ImageDraw.Draw(image)
    for thing in scene.things:
        _draw_shape(draw, thing.kind, thing.box, COLORS[thing.color])
    return image


def make_stage_sample(stage: Stage, index: int, seed: int = 0) -> SynthSample:
    """Sample `index` of `stage`'s stream for `seed`."""
    for attempt in range(100):
        rng = random.Random(f"curriculum:{stage.name}:{seed}:{index}:{attempt}")
        scenes = [_plain_scene(rng) for _ in range(rng.randint(*stage.images))]
        kind, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        home = rng.randrange(len(scenes))
        other_colors = [c for c in COLORS if c != color]
        try:
            if stage.quadrants:
                side, (x1, y1) = round(IMAGE_SIDE * stage.size[0]), rng.choice([(4, 4), (4, 58), (58, 4), (58, 58)])
                target = Thing(kind, color, (x1, y1, x1 + side, y1 + side))
                scenes[home].things.append(target)
            else:
                target = _place(rng, scenes[home], kind, color, size=rng.uniform(*stage.size))
            for scene in scenes:
                for _ in range(rng.randint(*stage.others)):
                    _place(rng, scene, rng.choice(SHAPES), rng.choice(other_colors), size=rng.uniform(*stage.size))
        except _Retry:
            continue
        query = rng.choice(QUERIES).format(n=target.name)
        names = [f"images/{index:06d}_{k}.png" for k in range(len(scenes))]
        listing = " ".join(f"Image {i + 1} shows {scene.describe()}." for i, scene in enumerate(scenes))
        sample = Sample(images=names, query=query, targets=[Box(home, *map(float, target.box), target.name)],
                        task=f"curriculum_{stage.name}", reasoning=f"{listing} The {target.name} is in image {home + 1}.",
                        image_sizes=[(s.width, s.height) for s in scenes], source=f"curriculum:{stage.name}:{seed}:{index}")
        return SynthSample(sample, [render_tinted(scene) for scene in scenes])
    raise RuntimeError(f"curriculum: no layout fits for sample {index} of stage {stage.name}")


def write_stage(out_dir: str | Path, stage: str, num_samples: int, seed: int = 0) -> Path:
    """Write `num_samples` samples of a stage (images + data.jsonl) to `out_dir`. Returns the JSONL path."""
    spec = STAGES[stage]
    return write_dataset(out_dir, num_samples, seed, make=lambda index, s: make_stage_sample(spec, index, s))


# ----------------------------------------------------------------------------------------------
# The base model: the tiny test checkpoint's tokenizer and processor, wider layers, small images


@dataclass(frozen=True)
class DemoDims:
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 384
    mrope_section: tuple[int, int, int] = (4, 6, 6)  # sums to head_dim / 2 = 16
    vision_width: int = 96
    vision_layers: int = 4
    vision_heads: int = 4
    vision_mlp_ratio: int = 2
    max_pixels: int = IMAGE_SIDE * IMAGE_SIDE  # larger images are scaled down to about 16 vision tokens
    initializer_range: float = 0.02


def make_base_model(out_dir: str | Path, dims: DemoDims = DemoDims(), seed: int = 0) -> Path:
    """A from-scratch Qwen2-VL with `dims`, in HF layout with the byte-level test tokenizer.

    The tokenizer, chat template and preprocessor come from `make_checkpoint`'s tiny preset (its byte
    vocabulary is already small: 256 bytes + specials); only the layer sizes, the initialisation and
    the image budget differ.
    """
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from gemvg.export.checkpoints import make_checkpoint

    out = make_checkpoint(out_dir, family="qwen2_vl", preset="tiny", seed=seed)
    config = json.loads((out / "config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    text.update(hidden_size=dims.text_hidden, num_hidden_layers=dims.text_layers,
                num_attention_heads=dims.text_heads, num_key_value_heads=dims.text_kv_heads,
                intermediate_size=dims.text_intermediate, initializer_range=dims.initializer_range)
    text["rope_parameters"]["mrope_section"] = list(dims.mrope_section)
    for derived in ("layer_types", "head_dim"):  # written for the tiny preset's sizes; rederived from the new ones
        text.pop(derived, None)
    vision.update(embed_dim=dims.vision_width, depth=dims.vision_layers, num_heads=dims.vision_heads,
                  mlp_ratio=dims.vision_mlp_ratio, hidden_size=dims.text_hidden,
                  initializer_range=dims.initializer_range)
    for stale in ("model.safetensors", "config.json"):
        (out / stale).unlink()
    generation = json.loads((out / "generation_config.json").read_text())
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(**config)).eval()
    model.generation_config.eos_token_id = generation["eos_token_id"]
    model.generation_config.pad_token_id = generation["pad_token_id"]
    model.generation_config.bos_token_id = generation.get("bos_token_id")
    model.save_pretrained(out)
    processor = json.loads((out / "preprocessor_config.json").read_text())
    processor["max_pixels"] = dims.max_pixels
    (out / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    return out
