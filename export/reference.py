"""transformers' own pipeline for a checkpoint: the reference gemvg is checked and measured against.

One implementation, used by the parity tests, `gemvg bench` (the transformers row), evaluation with
`--hf` and the export's checks. It assembles inputs as the Qwen-VL processors do (chat template, each
image token expanded to its merged-patch count, `mm_token_type_ids` marking image tokens: without them
transformers 5 silently falls back to 1-D text positions), since the processor classes themselves need
torchvision; images go through transformers' PIL image processor; generation is transformers' greedy
`generate`. The family (gemvg.runtime.families) names the classes.
"""

from __future__ import annotations

import importlib
import json
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from gemvg.runtime.families import Family, checkpoint_family, read_checkpoint_config
from gemvg.runtime.grounding import ImageGeometry


def hf_class(of: Family, which: str):
    """transformers' class of a family: which is "config", "model", "vision" or "text"."""
    name = {"config": of.config_class, "model": of.model_class, "vision": of.vision_class, "text": of.text_class}[which]
    if which in ("config", "model"):
        return getattr(importlib.import_module("transformers"), name)
    return getattr(importlib.import_module(of.module), name)


def load_model(checkpoint: str | Path, attention: str | None = None):
    """The whole model in float32, eval mode (attention: transformers' attn_implementation, default its own)."""
    import torch

    cls = hf_class(checkpoint_family(checkpoint), "model")
    kwargs = {"attn_implementation": attention} if attention else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls.from_pretrained(str(checkpoint), dtype=torch.float32, **kwargs).eval()


class Reference:
    """A checkpoint's tokenizer, image processor and chat template, and (once `model` is read) its model."""

    def __init__(self, checkpoint: str | Path, model=None):
        from transformers import AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        self.checkpoint = Path(checkpoint)
        self.family = checkpoint_family(checkpoint)
        self.config = read_checkpoint_config(self.checkpoint)
        self.tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
        processor_config = json.loads((self.checkpoint / "preprocessor_config.json").read_text())
        processor_config.pop("image_processor_type", None)
        processor_config.pop("processor_class", None)
        # Every family preprocesses images with Qwen2-VL's image processor (Qwen3-VL's ships as it, with
        # patch 16 and mean / std 0.5 in its config).
        self.image_processor = Qwen2VLImageProcessorPil(**processor_config)
        template = self.checkpoint / "chat_template.jinja"
        self.chat_template = template.read_text() if template.is_file() else None
        self.image_token_id = int(self.config["image_token_id"])
        self.image_token = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
        self._model = model

    @property
    def model(self):
        if self._model is None:
            self._model = load_model(self.checkpoint)
        return self._model

    def inputs(self, images: Sequence, text: str) -> dict:
        """What the family's processor would give for one user turn of `images` (paths or PIL images) and
        `text`: input_ids, pixel_values, image_grid_thw, mm_token_type_ids (torch tensors)."""
        import torch
        from transformers.image_utils import load_image

        pictures = [load_image(str(image)) if isinstance(image, (str, Path)) else image for image in images]
        processed = self.image_processor(images=pictures, return_tensors="np")
        prompt = self.prompt(len(pictures), text)
        merge = self.image_processor.merge_size ** 2
        parts = prompt.split(self.image_token)
        expanded = parts[0] + "".join(self.image_token * int(np.prod(grid) // merge) + part
                                      for grid, part in zip(processed["image_grid_thw"], parts[1:]))
        input_ids = torch.tensor([self.tokenizer(expanded)["input_ids"]])
        return {"input_ids": input_ids, "pixel_values": torch.from_numpy(processed["pixel_values"]),
                "image_grid_thw": torch.from_numpy(processed["image_grid_thw"]),
                "mm_token_type_ids": (input_ids == self.image_token_id).to(torch.int32)}

    def prompt(self, num_images: int, text: str) -> str:
        """The chat template rendered for one user turn of `num_images` images and `text`, generation prompt
        added (one image token per image, before expansion)."""
        content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": text}]
        return self.tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                                  chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=True)

    def geometries(self, images: Sequence, inputs: dict) -> list[ImageGeometry]:
        """Each image's original and resized size, as the parser needs them."""
        from transformers.image_utils import load_image

        patch = self.image_processor.patch_size
        pictures = [load_image(str(image)) if isinstance(image, (str, Path)) else image for image in images]
        return [ImageGeometry(p.width, p.height, int(grid[2]) * patch, int(grid[1]) * patch)
                for p, grid in zip(pictures, inputs["image_grid_thw"])]

    def generate(self, inputs: dict, max_new_tokens: int, min_new_tokens: int = 0) -> list[int]:
        """Greedy tokens after the prompt (EOS kept, as gemvg's engine keeps it)."""
        import torch

        with torch.no_grad():
            out = self.model.generate(**inputs, do_sample=False, repetition_penalty=1.0, num_beams=1,
                                      max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                      temperature=None, top_p=None, top_k=None)
        return out[0, inputs["input_ids"].shape[1]:].tolist()

    def position_ids(self, inputs: dict) -> np.ndarray:
        """transformers' 3-D M-RoPE positions [3, 1, seq] of a prompt."""
        positions, _ = self.model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                       image_grid_thw=inputs["image_grid_thw"])
        return positions.numpy()
