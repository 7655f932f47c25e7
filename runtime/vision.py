"""Host-side vision metadata: the data-dependent tensors the vision encoder takes as inputs.

Qwen-VL vision towers compute rotary positions, a window order and window boundaries from the image
grid with Python control flow that no graph exporter captures. As TensorRT-LLM and ORT GenAI do, we
compute them here, in numpy, and feed them to the exported encoder (one image per run).

Qwen2.5-VL's window attention runs as a batch of windows: `window_layout` pads every window to the
longest one, and the encoder gathers its patch rows into [windows, longest, ...], masks the padding
keys with `window_bias` and scatters the results back to patch order.

Qwen3-VL adds a learned position table (a square grid) resampled bilinearly to each image's grid:
`position_taps` gives each patch's 4 table rows and weights, which the encoder gathers and sums, so the
table stays a weight of the graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .manifest import VisionConfig
from .rotary import cos_sin, inverse_frequencies


@dataclass
class VisionFeeds:
    pixel_values: np.ndarray  # float32 [patches, patch_dim], in attention order
    rotary_cos: np.ndarray  # float32 [patches, head_dim]
    rotary_sin: np.ndarray
    # Window attention only (Qwen2.5-VL; None without it), over the windows padded to the longest, L:
    window_gather: np.ndarray | None  # int64 [windows, L]: the patch row in each slot (padding: the window's first)
    window_bias: np.ndarray | None  # float32 [windows, 1, 1, L]: added to the scores, 0 for patches, -inf for padding
    window_scatter: np.ndarray | None  # int64 [patches]: each patch row's slot in the flat [windows * L] layout
    restore_order: np.ndarray | None  # merged-token permutation back to raster order (window attention only)
    # Learned position embeddings (Qwen3-VL; None without them): 4 bilinear taps per patch into the table.
    position_taps: np.ndarray | None = None  # int64 [patches, 4]
    position_weights: np.ndarray | None = None  # float32 [patches, 4]


def patch_positions(grid_h: int, grid_w: int, merge: int) -> np.ndarray:
    """(row, col) of every patch, laid out merge-block by merge-block as the patches are."""
    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    shape = (grid_h // merge, merge, grid_w // merge, merge)
    rows = rows.reshape(shape).transpose(0, 2, 1, 3).ravel()
    cols = cols.reshape(shape).transpose(0, 2, 1, 3).ravel()
    return np.stack([rows, cols], axis=-1)


def rotary_tables(positions: np.ndarray, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin of the vision tower's axial 2-D rotary embedding: half the frequencies per axis."""
    spatial_dim = head_dim // 2
    inv_freq = inverse_frequencies(theta, spatial_dim)
    freqs = positions[:, :, None].astype(np.float32) * inv_freq  # [n, 2, spatial_dim/2]
    freqs = freqs.reshape(len(positions), -1)  # (h freqs, w freqs)
    angles = np.concatenate([freqs, freqs], axis=-1)
    return cos_sin(angles)


def _bilinear_axis(index: np.ndarray, size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """The 2 taps (int64 [n, 2]) into a `side`-long axis of the table and their float32 weights for
    positions `index` on an axis of `size` patches, align_corners=True: the endpoints map to rows 0 and
    side - 1. float32 operations in transformers' order (its _interpolation_axis_taps_weights), each one
    correctly rounded in both, so the weights are the same bits."""
    src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
    floor = np.floor(src)
    offsets = np.arange(2)
    taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
    distance = np.abs(src[:, None] - floor[:, None] - offsets.astype(np.float32))
    return taps, np.maximum(np.float32(1) - distance, np.float32(0))


def position_interpolation(grid_h: int, grid_w: int, merge: int,
                           num_position_embeddings: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear resampling (align_corners=True) of a square learned position table of
    `num_position_embeddings` rows to a grid_h x grid_w image, as transformers'
    get_vision_interpolation_indices_and_weights(mode="bilinear", align_corners=True,
    spatial_merge_size=merge) computes it for one frame: per patch, in merge-block order, the 4 table
    rows (int64 [patches, 4], (top, left), (top, right), (bottom, left), (bottom, right)) and their
    float32 weights. A patch's embedding is sum_k weights[:, k] * table[taps[:, k]]."""
    side = math.isqrt(num_position_embeddings)  # transformers: int(num_position_embeddings ** 0.5)
    positions = patch_positions(grid_h, grid_w, merge)
    h_taps, h_weights = _bilinear_axis(positions[:, 0], grid_h, side)
    w_taps, w_weights = _bilinear_axis(positions[:, 1], grid_w, side)
    taps = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
    weights = (h_weights[:, :, None] * w_weights[:, None, :]).reshape(-1, 4)
    return taps, weights


def stack_vision_outputs(outputs: list[np.ndarray], restore_order: np.ndarray | None) -> np.ndarray:
    """One vision run's outputs as [1 + deepstack layers, tokens, hidden] in raster order: the image
    features, then DeepStack's for a tower that has it (the feature cache's and the decoder's layout)."""
    stacked = np.concatenate([outputs[0][None], *outputs[1:]]) if len(outputs) > 1 else outputs[0][None]
    return stacked if restore_order is None else stacked[:, restore_order]


def window_partition(grid_h: int, grid_w: int, merge: int, window_merged: int) -> tuple[np.ndarray, np.ndarray]:
    """Qwen2.5-VL's window order of merged tokens and each merged token's window id (in that order)."""
    rows, cols = grid_h // merge, grid_w // merge
    index = np.arange(rows * cols).reshape(rows, cols)
    pad_h, pad_w = window_merged - rows % window_merged, window_merged - cols % window_merged
    padded = np.pad(index, ((0, pad_h), (0, pad_w)), constant_values=-1)
    win_rows, win_cols = padded.shape[0] // window_merged, padded.shape[1] // window_merged
    windows = padded.reshape(win_rows, window_merged, win_cols, window_merged).transpose(0, 2, 1, 3)
    windows = windows.reshape(win_rows * win_cols, -1)
    order, ids = [], []
    for window_id, members in enumerate(windows):
        members = members[members >= 0]
        order.append(members)
        ids.append(np.full(len(members), window_id))
    return np.concatenate(order), np.concatenate(ids)


def window_layout(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gather indices, key bias and scatter indices for windows of `lengths` patches, laid out one after
    the other (as the patches are, in window order), each padded to the longest. Every window is
    non-empty, so every row of scores has a real key and softmax stays finite."""
    lengths = np.asarray(lengths, np.int64)
    if lengths.ndim != 1 or len(lengths) == 0 or lengths.min() < 1:
        raise ValueError(f"window lengths must be a non-empty list of positive counts, got {lengths!r}")
    longest = int(lengths.max())
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    slots = np.arange(longest)
    real = slots[None, :] < lengths[:, None]  # [windows, L]
    gather = np.where(real, starts[:, None] + slots[None, :], starts[:, None]).astype(np.int64)
    bias = np.where(real, np.float32(0), np.float32(-np.inf)).astype(np.float32)[:, None, None, :]
    window = np.repeat(np.arange(len(lengths)), lengths)
    scatter = (window * longest + np.arange(int(lengths.sum())) - starts[window]).astype(np.int64)
    return gather, bias, scatter


def vision_feeds(pixel_values: np.ndarray, grid_thw: tuple[int, int, int], config: VisionConfig) -> VisionFeeds:
    t, grid_h, grid_w = grid_thw
    merge = config.spatial_merge_size
    unit = merge * merge
    positions = np.tile(patch_positions(grid_h, grid_w, merge), (t, 1))
    cos, sin = rotary_tables(positions, config.head_dim, config.rope_theta)
    if config.num_position_embeddings > 0:  # Qwen3-VL: a learned position table, no window attention
        if config.window_size > 0:
            raise ValueError("a vision config with both a learned position table and window attention "
                             "is not a Qwen-VL tower gemvg knows")
        taps, weights = position_interpolation(grid_h, grid_w, merge, config.num_position_embeddings)
        return VisionFeeds(pixel_values, cos, sin, None, None, None, None,
                           position_taps=np.tile(taps, (t, 1)), position_weights=np.tile(weights, (t, 1)))
    if config.window_size <= 0:
        return VisionFeeds(pixel_values, cos, sin, None, None, None, None)
    order, merged_window_ids = window_partition(grid_h, grid_w, merge, config.window_size // merge // config.patch_size)
    regroup = lambda a: np.ascontiguousarray(a.reshape(len(a) // unit, unit, -1)[order].reshape(len(a), -1))  # noqa: E731
    # Window ids increase along the order (empty windows are skipped): run lengths are the window sizes.
    _, merged_lengths = np.unique(merged_window_ids, return_counts=True)
    gather, bias, scatter = window_layout(merged_lengths * unit)
    return VisionFeeds(regroup(pixel_values), regroup(cos), regroup(sin), gather, bias, scatter, np.argsort(order))
