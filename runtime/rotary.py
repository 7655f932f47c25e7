"""M-RoPE angles on the host: cos/sin of every cache slot's rotary angles, for the decoder's attention op.

Qwen2-VL's M-RoPE is ordinary rotary embedding (rotate-half convention) in which frequency j turns by the
position along one axis: the first mrope_section[0] frequencies follow the temporal position, the next
mrope_section[1] the height, the last mrope_section[2] the width. Text tokens have the same position on
all three axes. So once each token's cos/sin are known, attention needs no 3-D positions: the decoder's
GroupQueryAttention rotates q and k itself from per-slot tables the host fills (row i = the token in cache
slot i), which replaces a Split and two rotary nodes per layer.

float32 throughout, as transformers computes its rotary angles (inv_freq and position products in float32).
"""

from __future__ import annotations

import numpy as np

from .errors import BundleError
from .manifest import TextConfig


class MRopeAngles:
    """Writes cos/sin rows [head_dim / 2] of tokens from their (temporal, height, width) positions."""

    def __init__(self, text: TextConfig):
        half = text.head_dim // 2
        if sum(text.mrope_section) != half:
            raise BundleError(f"manifest text.mrope_section {list(text.mrope_section)} does not sum to "
                              f"head_dim / 2 = {half}")
        exponents = np.arange(0, text.head_dim, 2, dtype=np.float32) / np.float32(text.head_dim)
        self.inv_freq = (1.0 / (np.float32(text.rope_theta) ** exponents)).astype(np.float32)
        self.axis = np.repeat(np.arange(3), text.mrope_section)  # frequency j follows positions[axis[j]]

    def fill(self, positions: np.ndarray, cos_rows: np.ndarray, sin_rows: np.ndarray) -> None:
        """positions int [3, n] -> cos_rows, sin_rows [n, head_dim / 2], written in place."""
        angles = positions[self.axis].T.astype(np.float32) * self.inv_freq
        np.cos(angles, out=cos_rows)
        np.sin(angles, out=sin_rows)
