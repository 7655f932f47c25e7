"""M-RoPE angles on the host: cos/sin of every cache slot's rotary angles, for the decoder's attention op.

Qwen2-VL's M-RoPE is ordinary rotary embedding (rotate-half convention) in which frequency j turns by the
position along one axis (`mrope_axes`: in blocks for Qwen2-VL / Qwen2.5-VL, interleaved for Qwen3-VL). Text tokens have the same position on
all three axes. So once each token's cos/sin are known, attention needs no 3-D positions: the decoder's
GroupQueryAttention rotates q and k itself from per-slot tables the host fills (row i = the token in cache
slot i), which replaces a Split and two rotary nodes per layer.

float32, as transformers computes its rotary angles (inv_freq and position products in float32), with the
power in inv_freq and the cos/sin rounded once from float64 (`inverse_frequencies`, `cos_sin`).
"""

from __future__ import annotations

import numpy as np

from .errors import BundleError
from .manifest import TextConfig


def inverse_frequencies(theta: float, dim: int) -> np.ndarray:
    """float32 1 / theta^(2j / dim), j < dim / 2, with the power rounded once from float64.

    Rounded from float64 rather than numpy's float32 power, which is not correctly rounded (it differs
    from torch's at real head sizes, e.g. 64 and 80) and not what the native runtime's libm computes;
    the rounded float64 power is what both runtimes can compute alike (BUNDLE.md)."""
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    power = (np.float64(np.float32(theta)) ** exponents.astype(np.float64)).astype(np.float32)
    return np.float32(1.0) / power


def cos_sin(angles: np.ndarray, cos_out: np.ndarray | None = None,
            sin_out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """float32 cos and sin of float32 angles, computed in float64 and rounded once: the same bits on every
    CPU and in every runtime (numpy's float32 SIMD cos/sin are not correctly rounded and depend on FMA)."""
    return (np.cos(angles, out=cos_out, dtype=np.float64) if cos_out is not None
            else np.cos(angles.astype(np.float64)).astype(np.float32),
            np.sin(angles, out=sin_out, dtype=np.float64) if sin_out is not None
            else np.sin(angles.astype(np.float64)).astype(np.float32))


def mrope_axes(section: tuple[int, int, int], interleaved: bool) -> np.ndarray:
    """The position axis (0 temporal, 1 height, 2 width) each of the head_dim / 2 frequencies follows.

    Blocked (Qwen2-VL, Qwen2.5-VL): section[0] temporal frequencies, then section[1] height, then
    section[2] width. Interleaved (Qwen3-VL): the axes take turns, frequency j follows height when
    j % 3 == 1 and j < 3 * section[1], width when j % 3 == 2 and j < 3 * section[2], else temporal, so
    that every axis spans low and high frequencies."""
    if not interleaved:
        return np.repeat(np.arange(3), section)
    j = np.arange(sum(section))
    axis = np.zeros(len(j), np.int64)
    axis[(j % 3 == 1) & (j < 3 * section[1])] = 1
    axis[(j % 3 == 2) & (j < 3 * section[2])] = 2
    return axis


class MRopeAngles:
    """Writes cos/sin rows [head_dim / 2] of tokens from their (temporal, height, width) positions."""

    def __init__(self, text: TextConfig):
        half = text.head_dim // 2
        if sum(text.mrope_section) != half:
            raise BundleError(f"manifest text.mrope_section {list(text.mrope_section)} does not sum to "
                              f"head_dim / 2 = {half}")
        self.inv_freq = inverse_frequencies(text.rope_theta, text.head_dim)
        self.axis = mrope_axes(text.mrope_section, text.mrope_interleaved)  # frequency j follows positions[axis[j]]

    def fill(self, positions: np.ndarray, cos_rows: np.ndarray, sin_rows: np.ndarray) -> None:
        """positions int [3, n] -> cos_rows, sin_rows [n, head_dim / 2], written in place."""
        angles = positions[self.axis].T.astype(np.float32) * self.inv_freq
        cos_sin(angles, cos_rows, sin_rows)
