"""Random-weight checkpoints with real Qwen-VL architectures (every family of gemvg.runtime.families),
written in HF layout.

No weights can be downloaded here, so tests, the demo and the benchmarks build their models from a
config. The tokenizer is a byte-level BPE built in code whose special tokens sit at ids of its own
(not Qwen's), so nothing downstream can get away with hard-coded ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)

# Qwen2-VL's chat template (the one the Qwen2-VL and Qwen2.5-VL instruct checkpoints ship).
QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class Preset:
    """Dimensions of a random checkpoint. Vision fields follow each family's own config names."""

    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_intermediate: int
    vocab_size: int
    mrope_section: tuple[int, int, int]
    vision_width: int
    vision_layers: int
    vision_heads: int
    vision_intermediate: int  # qwen2_5_vl MLP width; qwen2_vl uses mlp_ratio = intermediate / width
    tie_word_embeddings: bool = False
    max_pixels: int = 28 * 28 * 1280
    min_pixels: int = 56 * 56
    initializer_range: float = 0.02
    family: str | None = None  # a real model's family; None: either
    fullatt_block_indexes: tuple[int, ...] | None = None  # qwen2_5_vl; default every fourth block
    deepstack_layers: tuple[int, ...] | None = None  # qwen3_vl; default the first three blocks (fewer if small)
    position_embeddings: int = 16  # qwen3_vl: the learned position table (a square grid)
    # Real shapes are written as real checkpoints are: bf16 shards with hub tensor names, one tensor at a
    # time from a model built on the meta device (a 7B never sits in memory). Small presets are saved by
    # transformers from an initialised model.
    real_shape: bool = False


PRESETS: dict[str, Preset] = {
    # Small enough that a test exports and runs it in seconds; wide init so greedy output varies.
    "tiny": Preset(64, 2, 4, 2, 128, 320, (2, 3, 3), 32, 2, 2, 64, max_pixels=28 * 28 * 64,
                   initializer_range=0.1),
    # Linear layers dominate its bytes (small vocab and vision tower): quantization size ratios are meaningful.
    "linear-heavy": Preset(256, 4, 4, 2, 1024, 320, (8, 12, 12), 32, 2, 2, 64, max_pixels=28 * 28 * 64),
    # The bench model (benchmarks/RESULTS.md): Qwen2.5-0.5B text dims with an 8-layer, 640-wide vision tower.
    "bench-0.5b": Preset(896, 24, 14, 2, 4864, 151936, (8, 12, 12), 640, 8, 10, 1712, tie_word_embeddings=True),
    # The published models' dimensions (their config.json files).
    "qwen2-vl-2b": Preset(1536, 28, 12, 2, 8960, 151936, (16, 24, 24), 1280, 32, 16, 5120,
                          tie_word_embeddings=True, max_pixels=12845056, family="qwen2_vl", real_shape=True),
    "qwen2-vl-7b": Preset(3584, 28, 28, 4, 18944, 152064, (16, 24, 24), 1280, 32, 16, 5120,
                          max_pixels=12845056, family="qwen2_vl", real_shape=True),
    "qwen2.5-vl-3b": Preset(2048, 36, 16, 2, 11008, 151936, (16, 24, 24), 1280, 32, 16, 3420,
                            tie_word_embeddings=True, max_pixels=12845056, family="qwen2_5_vl",
                            fullatt_block_indexes=(7, 15, 23, 31), real_shape=True),
    "qwen3-vl-2b": Preset(2048, 28, 16, 8, 6144, 151936, (24, 20, 20), 1024, 24, 16, 4096,
                          tie_word_embeddings=True, min_pixels=65536, max_pixels=16777216, family="qwen3_vl",
                          deepstack_layers=(5, 11, 17), position_embeddings=2304, real_shape=True),
}


def build_tokenizer():
    """A byte-level BPE tokenizer (no merges) with Qwen's special tokens at ids 256 and up."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(QWEN_SPECIAL_TOKENS))
    return tokenizer


def _config_dict(of, preset: Preset, token_ids: dict[str, int]) -> dict:
    head_dim = preset.text_hidden // preset.text_heads
    if sum(preset.mrope_section) * 2 != head_dim:
        raise ValueError(f"mrope_section {preset.mrope_section} does not cover head_dim {head_dim}")
    rope = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": list(preset.mrope_section)}
    if of.mrope_interleaved:
        rope["mrope_interleaved"] = True
    text = {
        "vocab_size": preset.vocab_size,
        "hidden_size": preset.text_hidden,
        "intermediate_size": preset.text_intermediate,
        "num_hidden_layers": preset.text_layers,
        "num_attention_heads": preset.text_heads,
        "num_key_value_heads": preset.text_kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_parameters": rope,
        "initializer_range": preset.initializer_range,
        "tie_word_embeddings": preset.tie_word_embeddings,
        "bos_token_id": token_ids["<|endoftext|>"],
        "eos_token_id": token_ids["<|im_end|>"],
    }
    vision = {**of.random_vision(preset), "initializer_range": preset.initializer_range}
    return {
        "text_config": text,
        "vision_config": vision,
        "image_token_id": token_ids["<|image_pad|>"],
        "video_token_id": token_ids["<|video_pad|>"],
        "vision_start_token_id": token_ids["<|vision_start|>"],
        "vision_end_token_id": token_ids["<|vision_end|>"],
        "tie_word_embeddings": preset.tie_word_embeddings,
    }


def make_checkpoint(out_dir: str | Path, family: str | None = None, preset: str = "tiny", seed: int = 0,
                    progress=None) -> Path:
    """Write a random-weight checkpoint (config, safetensors, tokenizer, preprocessor, chat template).
    `family` defaults to the preset's own (real shapes) or qwen2_vl."""
    import torch
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    from gemvg.runtime.families import FAMILIES

    from .reference import hf_class

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    dims = PRESETS[preset]
    family = family or dims.family or "qwen2_vl"
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    if dims.family and family != dims.family:
        raise ValueError(f"preset {preset!r} is a {dims.family} model, not {family}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer()
    token_ids = {tok: tokenizer.token_to_id(tok) for tok in QWEN_SPECIAL_TOKENS}
    of = FAMILIES[family]
    config_cls, model_cls = hf_class(of, "config"), hf_class(of, "model")
    config = config_cls(**_config_dict(of, dims, token_ids))
    config.architectures = [model_cls.__name__]
    generation = GenerationConfig(eos_token_id=[token_ids["<|im_end|>"], token_ids["<|endoftext|>"]],
                                  pad_token_id=token_ids["<|endoftext|>"], bos_token_id=token_ids["<|endoftext|>"])
    if dims.real_shape:
        config.dtype = "bfloat16"
        config.save_pretrained(out)
        generation.save_pretrained(out)
        with torch.device("meta"):
            meta = model_cls(config)
        write_random_weights(out, meta, of, dims, seed, progress)
        del meta
    else:
        torch.manual_seed(seed)
        model = model_cls(config).eval()
        model.generation_config = generation
        model.save_pretrained(out)

    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, unk_token=None)
    fast.chat_template = QWEN_VL_CHAT_TEMPLATE
    fast.save_pretrained(out)
    (out / "chat_template.jinja").write_text(QWEN_VL_CHAT_TEMPLATE)
    processor_type = "Qwen2VLImageProcessor"
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": processor_type,
        # The pixel bounds as transformers 5 writes them (and Qwen3-VL checkpoints ship them).
        "size": {"shortest_edge": dims.min_pixels, "longest_edge": dims.max_pixels},
        "patch_size": of.patch_size, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": list(of.image_mean), "image_std": list(of.image_std), "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True, "do_convert_rgb": True, "resample": 3,
    }, indent=2))
    return out


def hub_name(name: str, of) -> str:
    """transformers 5's parameter name -> the name published checkpoints of family `of` store it under."""
    for ours, hub in of.published_prefixes:
        if name.startswith(ours):
            return hub + name[len(ours):]
    return name


def write_random_weights(out: Path, meta_model, of, dims: Preset, seed: int, progress=None) -> None:
    """bf16 shards of random weights for every parameter of a meta-device model: matrices and embeddings
    normal(0, initializer_range), norm weights 1, biases 0 (HF's init), each made and written alone."""
    from .safetensors_io import write_sharded

    shapes = {hub_name(name, of): tuple(tensor.shape) for name, tensor in meta_model.state_dict().items()}
    if dims.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)  # published tied checkpoints store the embedding only
    rng = np.random.default_rng(seed)

    def make(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name.endswith(".bias"):
            return np.zeros(shape, np.float32)
        if len(shape) == 1 and ("norm" in name or "ln_q" in name):
            return np.ones(shape, np.float32)
        values = rng.standard_normal(shape, dtype=np.float32)
        values *= dims.initializer_range
        return values

    write_sharded(out, shapes, make, progress=progress)
