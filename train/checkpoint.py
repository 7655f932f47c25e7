"""Checkpoint I/O for training: family detection, model and processor loading, export-ready saving.

The processor is built from the checkpoint's image processor and tokenizer without AutoProcessor:
Qwen-VL's AutoProcessor also builds a video processor, which needs torchvision. Images are all we feed.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from gemvg.runtime.families import (CheckpointConfigError, Family, UnknownFamilyError, family,
                                    read_checkpoint_config)

from .schema import DataError

# Everything besides the weights and config.json that a checkpoint needs to be used (and exported) as is.
COMPANION_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
    "generation_config.json",
)


class CheckpointError(DataError):
    """A model directory that is missing or not a checkpoint of a family gemvg knows."""


def read_config(model_dir: str | Path) -> dict:
    try:
        return read_checkpoint_config(model_dir)
    except CheckpointConfigError as err:
        raise CheckpointError(str(err)) from None


def checkpoint_family(model_dir: str | Path, require_processor: bool = True) -> Family:
    """A checkpoint's model family (gemvg.runtime.families), from its config's model_type."""
    try:
        found = family(read_config(model_dir).get("model_type"))
    except UnknownFamilyError as err:
        raise CheckpointError(f"{model_dir}: {err}") from None
    if require_processor and not (Path(model_dir) / "preprocessor_config.json").is_file():
        raise CheckpointError(f"{model_dir} has no preprocessor_config.json")
    return found


@dataclass(frozen=True)
class ResizeSettings:
    """What the image processor resizes to: smart_resize's factor and pixel bounds, from preprocessor_config.json."""

    factor: int
    min_pixels: int
    max_pixels: int

    @classmethod
    def from_checkpoint(cls, model_dir: str | Path) -> "ResizeSettings":
        path = Path(model_dir) / "preprocessor_config.json"
        try:
            config = json.loads(path.read_text())
        except FileNotFoundError as err:
            raise CheckpointError(f"{model_dir} has no preprocessor_config.json") from err
        # Read as the exporter reads it, so that training resizes as the engine will.
        pre = checkpoint_family(model_dir, require_processor=False).preprocess_config(config)
        return cls(factor=pre.factor, min_pixels=pre.min_pixels, max_pixels=pre.max_pixels)

    def resized(self, width: int, height: int) -> tuple[int, int]:
        """(resized_width, resized_height) of an image, by Qwen's smart_resize."""
        from gemvg.runtime.preprocess import smart_resize  # the engine's own, so train and engine cannot disagree

        h, w = smart_resize(height, width, factor=self.factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        return w, h


def load_processor(model_dir: str | Path):
    """An image-only Qwen-VL processor (ProcessorMixin, so TRL treats the model as a VLM)."""
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class QwenVLImageProcessor(Qwen2VLProcessor):
        """Qwen2VLProcessor without its video processor (whose class needs torchvision to even be checked)."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    model_dir = Path(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    chat_template = tokenizer.chat_template
    template_file = model_dir / "chat_template.jinja"
    if template_file.is_file():
        chat_template = template_file.read_text()
    elif (model_dir / "chat_template.json").is_file():
        chat_template = json.loads((model_dir / "chat_template.json").read_text())["chat_template"]
    if not chat_template:
        raise CheckpointError(f"{model_dir} has no chat template")
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(model_dir)
    return QwenVLImageProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)


def load_model(model_dir: str | Path, dtype: str = "float32"):
    import torch

    from gemvg.export.reference import hf_class

    model_cls = hf_class(checkpoint_family(model_dir, require_processor=False), "model")
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    return model_cls.from_pretrained(model_dir, dtype=torch_dtype)


def freeze_parameters(model, patterns: list[str]) -> int:
    """Keep the parameters whose names match any of `patterns` (regex, searched) as loaded; returns how many."""
    import re

    compiled = [re.compile(pattern) for pattern in patterns]
    frozen = 0
    for name, parameter in model.named_parameters():
        if any(pattern.search(name) for pattern in compiled):
            parameter.requires_grad_(False)
            frozen += parameter.numel()
    if patterns and not frozen:
        raise CheckpointError(f"freeze: no parameter matches {patterns}")
    return frozen


def copy_companion_files(base_dir: str | Path, out_dir: str | Path) -> None:
    """Tokenizer, chat template, preprocessor and generation config of the base, verbatim.

    Training changes none of them, and copying (not re-saving) keeps what the exporter reads identical
    to the base checkpoint's; the processor config the trainer may have written (naming our processor
    class) is dropped.
    """
    base, out = Path(base_dir), Path(out_dir)
    for name in COMPANION_FILES:
        if (base / name).is_file():
            shutil.copyfile(base / name, out / name)
    stray = out / "processor_config.json"
    if stray.is_file() and not (base / "processor_config.json").is_file():
        stray.unlink()


def build_export_checkpoint(trained_dir: str | Path, base_dir: str | Path, out_dir: str | Path) -> Path:
    """A full HF checkpoint the exporter takes as is, from what `Trainer.save_model` wrote.

    `trained_dir` holds either full weights or a LoRA adapter; an adapter is merged into the base
    weights. Going through `save_model` (rather than the in-memory model) is what gathers ZeRO-3
    shards and writes on the main process only, so one path serves CPU, DDP and DeepSpeed runs.
    Weights are saved in the base checkpoint's dtype (a bf16 base stays bf16 even if trained in fp32).
    """
    import torch

    trained, out = Path(trained_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base_config = read_config(base_dir)
    base_dtype = base_config.get("dtype") or base_config.get("torch_dtype") or "float32"
    if not isinstance(getattr(torch, str(base_dtype), None), torch.dtype):
        base_dtype = "float32"
    if (trained / "adapter_config.json").is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(load_model(base_dir, base_dtype), trained).merge_and_unload()
    else:
        model = load_model(trained, base_dtype)
    for config in (model.config, model.config.get_text_config()):
        config.use_cache = True  # trainers switch the cache off for training; inference wants it
    model.save_pretrained(out)
    copy_companion_files(base_dir, out)
    return out
