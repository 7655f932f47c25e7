"""The model dimensions a bundle records (manifest sections `text` and `vision`), in their own module so
that the manifest and the model families (gemvg.runtime.families) can both use them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TextConfig:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rope_theta: float
    mrope_section: tuple[int, int, int]
    max_position_embeddings: int
    # False: frequency j follows the axis of its mrope_section block (Qwen2-VL, Qwen2.5-VL); True: the
    # axes take turns, t h w t h w ... within each axis' share (Qwen3-VL). See runtime/rotary.py.
    mrope_interleaved: bool = False


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int  # width of the vision blocks
    out_hidden_size: int  # width of the merged features = text hidden size
    num_heads: int
    head_dim: int
    rope_theta: float
    patch_size: int
    spatial_merge_size: int
    window_size: int  # Qwen2.5-VL window attention in pixels; 0 = every block attends to the whole image
    fullatt_block_indexes: tuple[int, ...]
    # Qwen3-VL: a learned num_position_embeddings table (a square grid) resampled to each image's grid;
    # 0 = none (Qwen2-VL, Qwen2.5-VL).
    num_position_embeddings: int = 0
    # Qwen3-VL DeepStack: the vision blocks whose merged outputs are added into the first decoder layers.
    deepstack_layers: tuple[int, ...] = ()
