"""Check a bundle against the PyTorch model it came from, on a generated multi-image input."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gemvg.runtime.engine import Engine


@dataclass
class VerifyReport:
    prefill_diff: float  # max abs difference of the prefill's last-position logits
    decode_diff: float  # same for one decode step after it
    same_next_token: bool

    @property
    def max_abs_logit_diff(self) -> float:
        return max(self.prefill_diff, self.decode_diff)


def sample_images(seed: int = 0) -> list[np.ndarray]:
    """Two random RGB images of different sizes and aspect ratios."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (90, 130, 3), dtype=np.uint8), rng.integers(0, 256, (150, 70, 3), dtype=np.uint8)]


def hf_logits(model, input_ids: np.ndarray, pixel_values: np.ndarray, grid_thw: np.ndarray, image_token: int):
    """Last-position logits of the prompt and of one greedy step after it, from transformers."""
    import torch

    def last_logits(token_ids: np.ndarray) -> np.ndarray:
        ids = torch.from_numpy(token_ids)[None]
        mm_types = (ids == image_token).to(torch.int32)  # without it transformers 5 silently drops M-RoPE
        with torch.no_grad():
            out = model(input_ids=ids, pixel_values=torch.from_numpy(pixel_values),
                        image_grid_thw=torch.from_numpy(grid_thw), mm_token_type_ids=mm_types, use_cache=False)
        return out.logits[0, -1].float().numpy()

    # The decode step is checked by a cache-free forward over prompt + the greedy token.
    prefill = last_logits(input_ids)
    step = last_logits(np.append(input_ids, np.int64(prefill.argmax())))
    return prefill, step


def verify_bundle(bundle_dir: str | Path, model, query: str = "Where is the red cup?") -> VerifyReport:
    engine = Engine.load(bundle_dir)
    inputs = engine.prepare(sample_images(), query, mode="direct")
    prompt = inputs.prompt
    features = engine.encode_images(inputs.images)
    cache = engine.new_cache(len(prompt.input_ids) + 2)
    ours_prefill = engine.prefill(prompt, features, cache).copy()  # the engine reuses its logits buffer
    next_token = int(ours_prefill.argmax())
    ours_step = engine.decode_one_token(next_token, prompt.next_position, cache)
    ref_prefill, ref_step = hf_logits(model, prompt.input_ids, inputs.pixel_values, inputs.image_grid_thw,
                                      engine.manifest.tokens.image_pad)
    return VerifyReport(float(np.abs(ours_prefill - ref_prefill).max()), float(np.abs(ours_step - ref_step).max()),
                        next_token == int(ref_prefill.argmax()))
