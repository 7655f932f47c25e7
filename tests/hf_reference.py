"""The transformers reference for parity tests: HF image processor, HF chat template, HF generate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def hf_image_processor(checkpoint: Path):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    config = json.loads((checkpoint / "preprocessor_config.json").read_text())
    config.pop("image_processor_type", None)
    return Qwen2VLImageProcessorPil(**config)


def hf_inputs(checkpoint: Path, image_paths: list[Path], text: str) -> dict:
    """What Qwen2VLProcessor would produce (it cannot be built here: its video processor needs torchvision).

    Same steps as the processor: render the chat template, expand each image token to its feature count
    in the text, tokenize, and mark image tokens in mm_token_type_ids.
    """
    import torch
    from transformers import AutoConfig, AutoTokenizer
    from transformers.image_utils import load_image

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    config = AutoConfig.from_pretrained(str(checkpoint))
    image_token = tokenizer.convert_ids_to_tokens(config.image_token_id)
    images = [load_image(str(path)) for path in image_paths]
    processed = hf_image_processor(checkpoint)(images=images, return_tensors="np")
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    template = (checkpoint / "chat_template.jinja").read_text()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": content}], chat_template=template,
                                           tokenize=False, add_generation_prompt=True)
    merge = 4  # merge_size ** 2
    parts = prompt.split(image_token)
    expanded = parts[0]
    for grid, part in zip(processed["image_grid_thw"], parts[1:]):
        expanded += image_token * int(np.prod(grid) // merge) + part
    input_ids = torch.tensor([tokenizer(expanded)["input_ids"]])
    return {
        "input_ids": input_ids,
        "pixel_values": torch.from_numpy(processed["pixel_values"]),
        "image_grid_thw": torch.from_numpy(processed["image_grid_thw"]),
        "mm_token_type_ids": (input_ids == config.image_token_id).to(torch.int32),
    }


def load_hf_model(checkpoint: Path):
    import torch
    import transformers

    config = json.loads((checkpoint / "config.json").read_text())
    model_cls = getattr(transformers, config["architectures"][0])
    return model_cls.from_pretrained(str(checkpoint), dtype=torch.float32).eval()


def hf_generate(model, inputs: dict, max_new_tokens: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, repetition_penalty=1.0, max_new_tokens=max_new_tokens,
                             num_beams=1, temperature=None, top_p=None, top_k=None)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def hf_position_ids(model, inputs: dict) -> np.ndarray:
    positions, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                              image_grid_thw=inputs["image_grid_thw"])
    return positions.numpy()
