"""Model families: what gemvg knows about each Qwen-VL generation, in one place.

A family is a checkpoint's `model_type`. Its record says which transformers classes build it, how its
config.json and preprocessor_config.json read into the bundle's configs, which box syntax its model
writes (gemvg.runtime.grounding), how its M-RoPE lays frequencies over the three axes, and how a random
checkpoint of it is configured. Export, training, the benchmarks and evaluation read a family from
here; nothing else branches on a family's name.

Torch-free on purpose: the runtime imports it. transformers classes are named, not imported
(gemvg.export.reference builds them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from .errors import GemvgError
from .model_config import TextConfig, VisionConfig
from .preprocess import PreprocessConfig

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_MAX_IMAGE_PIXELS = 178_956_970  # PIL's own decompression-bomb error threshold


class UnknownFamilyError(GemvgError):
    """A checkpoint or bundle of a model family gemvg does not know."""


def _vision_rope_theta(vision: Mapping) -> float:
    return float((vision.get("rope_parameters") or {}).get("rope_theta", 10000.0))


def _qwen2_vl_vision(vision: Mapping) -> VisionConfig:
    width = vision["embed_dim"]
    return VisionConfig(hidden_size=width, out_hidden_size=vision["hidden_size"], num_heads=vision["num_heads"],
                        head_dim=width // vision["num_heads"], rope_theta=_vision_rope_theta(vision),
                        patch_size=vision["patch_size"], spatial_merge_size=vision["spatial_merge_size"],
                        window_size=0, fullatt_block_indexes=())


def _qwen2_5_vl_vision(vision: Mapping) -> VisionConfig:
    width = vision["hidden_size"]
    return VisionConfig(hidden_size=width, out_hidden_size=vision["out_hidden_size"], num_heads=vision["num_heads"],
                        head_dim=width // vision["num_heads"], rope_theta=_vision_rope_theta(vision),
                        patch_size=vision["patch_size"], spatial_merge_size=vision["spatial_merge_size"],
                        window_size=vision["window_size"],
                        fullatt_block_indexes=tuple(vision["fullatt_block_indexes"]))


def _qwen3_vl_vision(vision: Mapping) -> VisionConfig:
    width = vision["hidden_size"]
    return VisionConfig(hidden_size=width, out_hidden_size=vision["out_hidden_size"], num_heads=vision["num_heads"],
                        head_dim=width // vision["num_heads"], rope_theta=_vision_rope_theta(vision),
                        patch_size=vision["patch_size"], spatial_merge_size=vision["spatial_merge_size"],
                        window_size=0, fullatt_block_indexes=(),
                        num_position_embeddings=vision["num_position_embeddings"],
                        deepstack_layers=tuple(vision["deepstack_visual_indexes"]))


# -- random checkpoints: each family's vision config for given dimensions (gemvg.export.checkpoints) ------

def _qwen2_vl_random_vision(dims) -> dict:
    return {"depth": dims.vision_layers, "embed_dim": dims.vision_width, "hidden_size": dims.text_hidden,
            "num_heads": dims.vision_heads, "mlp_ratio": dims.vision_intermediate // dims.vision_width,
            "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}


def _qwen2_5_vl_random_vision(dims) -> dict:
    full = dims.fullatt_block_indexes or [i for i in range(dims.vision_layers) if i % 4 == 3] or [dims.vision_layers - 1]
    return {"depth": dims.vision_layers, "hidden_size": dims.vision_width, "intermediate_size": dims.vision_intermediate,
            "out_hidden_size": dims.text_hidden, "num_heads": dims.vision_heads, "patch_size": 14,
            "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112, "hidden_act": "silu",
            "fullatt_block_indexes": list(full)}


def _qwen3_vl_random_vision(dims) -> dict:
    # Qwen3-VL feeds three vision layers' features into the first three decoder layers; a small model as many
    # as both of its towers have.
    deepstack = dims.deepstack_layers or list(range(min(3, dims.vision_layers, dims.text_layers)))
    return {"depth": dims.vision_layers, "hidden_size": dims.vision_width, "intermediate_size": dims.vision_intermediate,
            "out_hidden_size": dims.text_hidden, "num_heads": dims.vision_heads, "patch_size": 16,
            "spatial_merge_size": 2, "temporal_patch_size": 2, "hidden_act": "gelu_pytorch_tanh",
            "num_position_embeddings": dims.position_embeddings, "deepstack_visual_indexes": list(deepstack)}


@dataclass(frozen=True)
class Family:
    model_type: str  # config.json's model_type
    module: str  # the transformers module that defines the classes below
    config_class: str
    model_class: str  # the whole model (generate, training)
    vision_class: str  # the vision tower alone (export builds and traces it)
    text_class: str  # the text decoder alone (export checks its graph against it)
    box_syntax: str  # gemvg.runtime.grounding.SYNTAXES: how this family's models write boxes
    mrope_interleaved: bool  # how M-RoPE frequencies follow the three axes (gemvg.runtime.rotary)
    patch_size: int  # preprocessing defaults, for a preprocessor_config.json that omits them
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    min_pixels: int
    max_pixels: int
    read_vision: Callable[[Mapping], VisionConfig]
    random_vision: Callable[[object], dict]  # vision_config of a random checkpoint (gemvg.export.checkpoints)
    # How published checkpoints name tensors, as (transformers 5's prefix, the published one): Qwen2-VL and
    # Qwen2.5-VL were published before transformers 5 moved the towers under model.visual and
    # model.language_model (which it maps back when loading); Qwen3-VL was published with those names.
    published_prefixes: tuple[tuple[str, str], ...] = ()

    def text_config(self, config: Mapping) -> TextConfig:
        """The bundle's TextConfig from a config.json (as a dict with transformers' defaults filled in)."""
        text = config["text_config"]
        rope = text.get("rope_parameters") or {}
        return TextConfig(
            hidden_size=text["hidden_size"], num_layers=text["num_hidden_layers"],
            num_heads=text["num_attention_heads"], num_kv_heads=text["num_key_value_heads"],
            head_dim=text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"],
            vocab_size=text["vocab_size"], rope_theta=float(rope.get("rope_theta", 1000000.0)),
            mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
            max_position_embeddings=text["max_position_embeddings"], mrope_interleaved=self.mrope_interleaved)

    def vision_config(self, config: Mapping) -> VisionConfig:
        return self.read_vision(config["vision_config"])

    def preprocess_config(self, preprocessor: Mapping,
                          max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> PreprocessConfig:
        """The bundle's PreprocessConfig from preprocessor_config.json, which carries the pixel bounds either
        as min_pixels / max_pixels (older processors) or as size {shortest_edge, longest_edge} (transformers 5,
        Qwen3-VL); null entries fall back to the family's defaults."""
        size = preprocessor.get("size") or {}
        pick = lambda *values: next((v for v in values if v is not None), None)  # noqa: E731
        return PreprocessConfig(
            min_pixels=int(pick(preprocessor.get("min_pixels"), size.get("shortest_edge"), self.min_pixels)),
            max_pixels=int(pick(preprocessor.get("max_pixels"), size.get("longest_edge"), self.max_pixels)),
            patch_size=int(pick(preprocessor.get("patch_size"), self.patch_size)),
            temporal_patch_size=int(pick(preprocessor.get("temporal_patch_size"), 2)),
            merge_size=int(pick(preprocessor.get("merge_size"), 2)),
            image_mean=tuple(float(v) for v in pick(preprocessor.get("image_mean"), self.image_mean)),
            image_std=tuple(float(v) for v in pick(preprocessor.get("image_std"), self.image_std)),
            rescale_factor=float(pick(preprocessor.get("rescale_factor"), 1 / 255)),
            max_image_pixels=max_image_pixels,
        )


_QWEN2_MODULE = "transformers.models.qwen2_vl.modeling_qwen2_vl"
_BEFORE_TRANSFORMERS_5 = (("model.visual.", "visual."), ("model.language_model.", "model."))

FAMILIES: dict[str, Family] = {family.model_type: family for family in (
    Family("qwen2_vl", _QWEN2_MODULE, "Qwen2VLConfig", "Qwen2VLForConditionalGeneration",
           "Qwen2VisionTransformerPretrainedModel", "Qwen2VLTextModel", box_syntax="ref_tokens",
           mrope_interleaved=False, patch_size=14, image_mean=CLIP_MEAN, image_std=CLIP_STD,
           min_pixels=56 * 56, max_pixels=28 * 28 * 1280, read_vision=_qwen2_vl_vision,
           random_vision=_qwen2_vl_random_vision, published_prefixes=_BEFORE_TRANSFORMERS_5),
    Family("qwen2_5_vl", "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VLConfig",
           "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VisionTransformerPretrainedModel", "Qwen2_5_VLTextModel",
           box_syntax="json_pixels", mrope_interleaved=False, patch_size=14, image_mean=CLIP_MEAN,
           image_std=CLIP_STD, min_pixels=56 * 56, max_pixels=28 * 28 * 1280, read_vision=_qwen2_5_vl_vision,
           random_vision=_qwen2_5_vl_random_vision, published_prefixes=_BEFORE_TRANSFORMERS_5),
    Family("qwen3_vl", "transformers.models.qwen3_vl.modeling_qwen3_vl", "Qwen3VLConfig",
           "Qwen3VLForConditionalGeneration", "Qwen3VLVisionModel", "Qwen3VLTextModel",
           box_syntax="json_relative", mrope_interleaved=True, patch_size=16, image_mean=(0.5, 0.5, 0.5),
           image_std=(0.5, 0.5, 0.5), min_pixels=256 * 256, max_pixels=16_777_216, read_vision=_qwen3_vl_vision,
           random_vision=_qwen3_vl_random_vision),
)}


def family(model_type: str) -> Family:
    """The family of a config.json model_type (or a manifest's family field)."""
    found = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if found is None:
        raise UnknownFamilyError(f"model_type {model_type!r} is not a family gemvg knows; it reads "
                                 f"{', '.join(FAMILIES)}")
    return found


class CheckpointConfigError(GemvgError):
    """A model folder without a readable config.json."""


def read_checkpoint_config(model_dir: str | Path) -> dict:
    """A checkpoint folder's config.json; one-line errors for a missing folder, file or bad JSON."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointConfigError(f"model directory not found: {model_dir}")
    path = model_dir / "config.json"
    if not path.is_file():
        raise CheckpointConfigError(f"{model_dir} has no config.json: not a Hugging Face checkpoint")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointConfigError(f"{path}: invalid JSON ({err})") from None
    if not isinstance(config, dict):
        raise CheckpointConfigError(f"{path}: expected a JSON object")
    return config


def checkpoint_family(model_dir: str | Path) -> Family:
    """The family of a checkpoint folder, from its config.json's model_type (export, training and the
    transformers reference read a checkpoint's family here)."""
    return family(read_checkpoint_config(model_dir).get("model_type"))
