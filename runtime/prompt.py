"""Prompt building: the chat-template text for N images and a query, its token ids, and M-RoPE positions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InputError
from .manifest import Manifest


@dataclass
class Prompt:
    input_ids: np.ndarray  # int64 [seq]
    position_ids: np.ndarray  # int64 [3, seq]: (temporal, height, width) per token
    image_spans: list[tuple[int, int]]  # [start, end) of each image's pad tokens in input_ids
    next_position: int  # position of the first generated token (max position + 1)


def image_token_counts(grids: list[tuple[int, int, int]], merge_size: int) -> list[int]:
    return [t * h * w // (merge_size * merge_size) for t, h, w in grids]


def tokenize_prompt(tokenizer, manifest: Manifest, user_text: str, grids: list[tuple[int, int, int]]) -> np.ndarray:
    """Token ids of the rendered chat template, each image's single pad token expanded to its feature count.

    The pad token is a special token, so tokenizing with one pad per image and expanding afterwards gives
    the same ids as expanding the text first (what the HF processor does), for less tokenizer work.
    """
    text = manifest.prompt.render(len(grids), user_text)
    ids = np.asarray(tokenizer.encode(text).ids, dtype=np.int64)
    pad = manifest.tokens.image_pad
    pad_positions = np.flatnonzero(ids == pad)
    if len(pad_positions) != len(grids):
        raise InputError("the query must not contain the model's image placeholder token")
    counts = image_token_counts(grids, manifest.vision.spatial_merge_size)
    repeats = np.ones(len(ids), dtype=np.int64)
    repeats[pad_positions] = counts
    return np.repeat(ids, repeats)


def mrope_positions(input_ids: np.ndarray, image_pad: int, grids: list[tuple[int, int, int]],
                    merge_size: int) -> tuple[np.ndarray, list[tuple[int, int]], int]:
    """3-D rotary positions as transformers' get_rope_index computes them for images.

    Text tokens count up on all three axes; an image's tokens carry (t, row, col) of its merged grid
    offset by the running position, and the text after it resumes at that offset + max(rows, cols).
    """
    seq = len(input_ids)
    positions = np.empty((3, seq), dtype=np.int64)
    is_image = input_ids == image_pad
    spans, cursor, current, grid_iter = [], 0, 0, iter(grids)
    while cursor < seq:
        run_end = cursor
        while run_end < seq and is_image[run_end] == is_image[cursor]:
            run_end += 1
        if not is_image[cursor]:
            positions[:, cursor:run_end] = np.arange(current, current + run_end - cursor)
            current += run_end - cursor
        else:
            t, h, w = next(grid_iter)
            rows, cols = h // merge_size, w // merge_size
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(rows), np.arange(cols), indexing="ij")
            block = np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + current
            if block.shape[1] != run_end - cursor:
                raise InputError("image token count does not match the image grid")
            positions[:, cursor:run_end] = block
            spans.append((cursor, run_end))
            current += max(rows, cols)
        cursor = run_end
    next_position = int(positions.max()) + 1 if seq else 0
    return positions, spans, next_position


def build_prompt(tokenizer, manifest: Manifest, user_text: str, grids: list[tuple[int, int, int]]) -> Prompt:
    input_ids = tokenize_prompt(tokenizer, manifest, user_text, grids)
    positions, spans, next_position = mrope_positions(input_ids, manifest.tokens.image_pad, grids,
                                                      manifest.vision.spatial_merge_size)
    return Prompt(input_ids, positions, spans, next_position)


def deepstack_embeds(prompt: Prompt, features: list[np.ndarray | None], start: int, layers: int,
                     hidden: int) -> np.ndarray | None:
    """DeepStack's decoder input for the prompt tokens from `start` on, [layers, 1, tokens, hidden]: each
    image's intermediate vision features (rows 1.. of its [1 + layers, image tokens, hidden] features) at
    its image tokens, zeros elsewhere. None for a model without DeepStack (layers == 0). Images the first
    `start` tokens cover (None features) contribute nothing: their keys and values are already cached."""
    if layers == 0:
        return None
    out = np.zeros((layers, 1, len(prompt.input_ids) - start, hidden), np.float32)
    for (span_start, span_end), image_features in zip(prompt.image_spans, features):
        if image_features is not None and span_end > start:
            out[:, 0, span_start - start:span_end - start] = image_features[1:]
    return out
