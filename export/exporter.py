"""Checkpoint -> bundle: read a Qwen2-VL / Qwen2.5-VL checkpoint, export its graphs, write the manifest, verify.

Everything the runtime needs is read from the checkpoint (config.json, generation_config.json,
preprocessor_config.json, tokenizer.json, the chat template) and recorded in the manifest; nothing is
hard-coded. The export ends by running the bundle against PyTorch on a generated multi-image input.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from gemvg.runtime.errors import GemvgError
from gemvg.runtime.manifest import (SCHEMA_VERSION, Limits, Manifest, PromptTemplate, TextConfig, TokenIds,
                                    VisionConfig, graph_file)
from gemvg.runtime.preprocess import PreprocessConfig

from .quantize import UPGRADE_BUDGET

FAMILY_CLASSES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
}
VISION_INPUTS = ("pixel_values", "rotary_cos", "rotary_sin", "window_gather", "window_bias", "window_scatter")
DEFAULT_MAX_IMAGE_PIXELS = 178_956_970  # PIL's own decompression-bomb error threshold
TARGETS = ("onnxruntime", "tensorrt")
LOGITS_TOLERANCE = 1e-3  # fp32 export vs PyTorch, max abs difference of last-position logits


class ExportError(GemvgError):
    """The checkpoint cannot be exported (unknown family, missing files, failed verification)."""


@dataclass
class ExportOptions:
    precision: str = "fp32"  # fp32 | int8 (static, calibrated) | int4 | int8w (weight-only decoder)
    max_context: int | None = None  # default: the model's max_position_embeddings
    max_images: int = 16
    max_patches_per_image: int | None = None  # default: from max_pixels
    opset: int = 18
    verify: bool = True
    # Quantization (gemvg.export.quantize) and targets; the defaults leave an fp32 export as it was.
    vision_precision: str | None = None  # fp32 | int8; default int8 for int8, fp32 for int4/int8w
    calibration: str | Path | None = None  # CALIB.jsonl
    calibration_method: str = "minmax"
    calibration_samples: int | None = None
    block_size: int = 32
    accuracy_level: int = 4
    target_cosine: float | None = None  # default by precision (gemvg.export.quantize.DEFAULT_TARGETS)
    upgrade_budget: float = UPGRADE_BUDGET  # weight-only: fraction of weights that may get 8 bits (int4) / stay float
    step_decoder: str | None = None  # int8: int8w | int4 weight-only decoder for one-token steps
    fp32_bundle: str | Path | None = None  # quantize this fp32 bundle instead of exporting the checkpoint
    target: str = "onnxruntime"  # onnxruntime | tensorrt (also builds TensorRT engines)

    def quantize_options(self):
        from .quantize import QuantizeOptions

        return QuantizeOptions(precision=self.precision, vision_precision=self.vision_precision,
                               calibration=self.calibration, calibration_method=self.calibration_method,
                               calibration_samples=self.calibration_samples, block_size=self.block_size,
                               accuracy_level=self.accuracy_level, target_cosine=self.target_cosine,
                               upgrade_budget=self.upgrade_budget, step_decoder=self.step_decoder)


def log(message: str) -> None:
    print(f"[gemvg-export] {message}", file=sys.stderr, flush=True)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(f"{path.parent}: checkpoint lacks {path.name}") from None
    except json.JSONDecodeError as err:
        raise ExportError(f"{path}: not valid JSON ({err})") from None


def detect_family(model_dir: Path) -> str:
    config = read_json(model_dir / "config.json")
    family = config.get("model_type")
    if family not in FAMILY_CLASSES:
        raise ExportError(f"{model_dir}: model_type {family!r} is not supported; gemvg exports "
                          f"{', '.join(FAMILY_CLASSES)} checkpoints")
    return family


def read_chat_template(model_dir: Path) -> str:
    """The chat template, wherever the checkpoint keeps it."""
    if (model_dir / "chat_template.jinja").is_file():
        return (model_dir / "chat_template.jinja").read_text()
    for name in ("chat_template.json", "tokenizer_config.json"):
        if (model_dir / name).is_file():
            template = read_json(model_dir / name).get("chat_template")
            if template:
                return template
    raise ExportError(f"{model_dir}: no chat template (chat_template.jinja, chat_template.json or "
                      "tokenizer_config.json)")


def prompt_template(model_dir: Path, template: str) -> PromptTemplate:
    """Split what the chat template renders for one user turn into prefix + image * N + text + suffix.

    Rendered for 0, 1 and 2 images around a sentinel text; the split is then checked on 3 images, so a
    template that numbers or interleaves images fails here instead of producing wrong prompts later.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    sentinel = "\ue000QUERY\ue000"

    def render(num_images: int) -> str:
        content = [{"type": "image"}] * num_images + [{"type": "text", "text": sentinel}]
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], chat_template=template,
                                             tokenize=False, add_generation_prompt=True)

    prefix, suffix = render(0).split(sentinel)
    one_prefix, one_suffix = render(1).split(sentinel)
    if not one_prefix.startswith(prefix) or one_suffix != suffix:
        raise ExportError("the chat template does not render images as a block before the text")
    pieces = PromptTemplate(prefix, one_prefix[len(prefix):], suffix)
    for count in (2, 3):
        if pieces.render(count, sentinel) != render(count):
            raise ExportError("the chat template renders each image differently (numbered images?); "
                              "gemvg needs identical image blocks")
    return pieces


def read_preprocess(model_dir: Path) -> PreprocessConfig:
    config = read_json(model_dir / "preprocessor_config.json")
    size = config.get("size") or {}
    return PreprocessConfig(
        min_pixels=int(config.get("min_pixels") or size.get("shortest_edge") or 56 * 56),
        max_pixels=int(config.get("max_pixels") or size.get("longest_edge") or 28 * 28 * 1280),
        patch_size=int(config.get("patch_size", 14)),
        temporal_patch_size=int(config.get("temporal_patch_size", 2)),
        merge_size=int(config.get("merge_size", 2)),
        image_mean=tuple(float(v) for v in config["image_mean"]),
        image_std=tuple(float(v) for v in config["image_std"]),
        rescale_factor=float(config.get("rescale_factor", 1 / 255)),
        max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS,
    )


def read_token_ids(model_dir: Path, model_config) -> TokenIds:
    generation = read_json(model_dir / "generation_config.json") if (model_dir / "generation_config.json").is_file() else {}
    eos = generation.get("eos_token_id", model_config.text_config.eos_token_id)
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if not eos:
        raise ExportError(f"{model_dir}: no eos_token_id in generation_config.json or config.json")
    pad = generation.get("pad_token_id")
    return TokenIds(
        image_pad=int(model_config.image_token_id),
        vision_start=int(model_config.vision_start_token_id),
        vision_end=int(model_config.vision_end_token_id),
        eos=tuple(int(t) for t in eos),
        pad=int(pad if pad is not None else eos[0]),
    )


def text_and_vision_configs(family: str, config) -> tuple[TextConfig, VisionConfig]:
    text, vision = config.text_config, config.vision_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    rope = text.rope_parameters or {}
    text_config = TextConfig(
        hidden_size=text.hidden_size, num_layers=text.num_hidden_layers, num_heads=text.num_attention_heads,
        num_kv_heads=text.num_key_value_heads, head_dim=head_dim, vocab_size=text.vocab_size,
        rope_theta=float(rope.get("rope_theta", 1000000.0)),
        mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
        max_position_embeddings=text.max_position_embeddings,
    )
    if family == "qwen2_vl":
        width, out_width, window, full = vision.embed_dim, vision.hidden_size, 0, ()
    else:
        width, out_width = vision.hidden_size, vision.out_hidden_size
        window, full = vision.window_size, tuple(vision.fullatt_block_indexes)
    vision_rope = getattr(vision, "rope_parameters", None) or {}
    vision_config = VisionConfig(
        hidden_size=width, out_hidden_size=out_width, num_heads=vision.num_heads,
        head_dim=width // vision.num_heads, rope_theta=float(vision_rope.get("rope_theta", 10000.0)),
        patch_size=vision.patch_size, spatial_merge_size=vision.spatial_merge_size,
        window_size=window, fullatt_block_indexes=full,
    )
    return text_config, vision_config


def load_model(model_dir: Path, family: str):
    import torch
    import transformers

    model_cls = getattr(transformers, FAMILY_CLASSES[family])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = model_cls.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def export_onnx(module, args: tuple, path: Path, input_names: list[str], output_names: list[str],
                dynamic_shapes, opset: int, custom_translation_table: dict | None = None) -> None:
    import torch

    # torch.onnx logs a warning per torchvision op it cannot register; torchvision is not used here.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, args, dynamo=True, input_names=input_names, output_names=output_names,
                                    dynamic_shapes=dynamic_shapes, opset_version=opset, verbose=False,
                                    optimize=True, external_data=False,
                                    custom_translation_table=custom_translation_table)
        program.save(str(path), external_data=True)  # weights in <name>.data: see onnx_files


def vision_example(vision: VisionConfig, patch_dim: int, grid: tuple[int, int] | None = None,
                   seed: int = 0) -> tuple[dict[str, np.ndarray], list[str]]:
    """The vision encoder's example feed and input names, built by the runtime's own `vision_feeds` on a
    `grid` (rows, columns) of random patches. The default grid is 3 x 2 windows with partial ones at
    the bottom and right (20x12 patches for Qwen2.5-VL's 8-patch windows: 240 patches, 6 windows of at
    most 64): sizes that differ from each other and from 1, so the exporter keeps them dynamic."""
    from gemvg.runtime.vision import vision_feeds

    if grid is None:
        side = vision.window_size // vision.patch_size if vision.window_size > 0 else 8
        merge = vision.spatial_merge_size
        grid = (2 * side + 2 * merge, side + 2 * merge)
    rng = np.random.default_rng(seed)
    pixel_values = rng.standard_normal((grid[0] * grid[1], patch_dim), dtype=np.float32)
    feeds = vision_feeds(pixel_values, (1, *grid), vision)
    example = {name: getattr(feeds, name) for name in VISION_INPUTS}
    return example, [name for name in VISION_INPUTS if example[name] is not None]


def export_graphs(model, family: str, text: TextConfig, vision: VisionConfig, out: Path, opset: int,
                  progress: Callable[[str], None],
                  target: str = "onnxruntime") -> dict[str, tuple[list[str], list[str]]]:
    """vision.onnx, embed.onnx and decoder.onnx in `out`. For onnxruntime the vision rotary is ONNX
    Runtime's fused RotaryEmbedding; for tensorrt standard ops only (its parser takes the graph whole)."""
    import torch
    from torch.export import Dim

    from .decoder_builder import build_decoder
    from .graphs import TokenEmbedding, VisionEncoder, rotary_translation

    names: dict[str, tuple[list[str], list[str]]] = {}
    inner = model.model
    patch_dim = inner.visual.patch_embed.in_channels * inner.visual.patch_embed.temporal_patch_size * \
        inner.visual.patch_embed.patch_size ** 2

    started = time.perf_counter()
    progress("exporting vision encoder (1/3)")
    fused_rotary = target == "onnxruntime"
    encoder = VisionEncoder(inner.visual, None if family == "qwen2_vl" else vision.fullatt_block_indexes,
                            fused_rotary).eval()
    translations = ({torch.ops.gemvg.vision_rotary.default: rotary_translation(vision.num_heads, vision.head_dim)}
                    if fused_rotary else None)
    example, vision_inputs = vision_example(vision, patch_dim)
    n = Dim("patches", min=4, max=1 << 20)
    windows, longest = Dim("windows", min=1, max=1 << 20), Dim("window_len", min=1, max=1 << 20)
    shapes = {"pixel_values": {0: n}, "rotary_cos": {0: n}, "rotary_sin": {0: n},
              "window_gather": {0: windows, 1: longest}, "window_bias": {0: windows, 3: longest},
              "window_scatter": {0: n}}
    export_onnx(encoder, tuple(torch.from_numpy(example[name]) for name in vision_inputs), out / "vision.onnx",
                vision_inputs, ["image_features"], tuple(shapes[name] for name in vision_inputs), opset, translations)
    names["vision"] = (vision_inputs, ["image_features"])
    progress(f"  vision.onnx written ({time.perf_counter() - started:.1f} s)")

    started = time.perf_counter()
    progress("exporting token embedding (2/3)")
    embedding = TokenEmbedding(inner.language_model.embed_tokens).eval()
    seq = Dim("seq", min=1, max=1 << 20)
    export_onnx(embedding, (torch.zeros(1, 5, dtype=torch.long),), out / "embed.onnx", ["input_ids"],
                ["inputs_embeds"], ({1: seq},), opset)
    names["embed"] = (["input_ids"], ["inputs_embeds"])
    progress(f"  embed.onnx written ({time.perf_counter() - started:.1f} s)")

    started = time.perf_counter()
    progress("building text decoder with GroupQueryAttention and a shared KV cache (3/3)")
    inputs, outputs = build_decoder(model, text, out / "decoder.onnx")
    names["decoder"] = (inputs, outputs)
    progress(f"  decoder.onnx written ({time.perf_counter() - started:.1f} s)")
    return names


def export_bundle(model_dir: str | Path, out_dir: str | Path, options: ExportOptions | None = None,
                  progress: Callable[[str], None] = log, build_tensorrt: bool = True) -> Manifest:
    """Export a checkpoint to a bundle folder and (by default) verify it against PyTorch. With target
    tensorrt the graphs are written for it and, unless build_tensorrt is False, its engines built."""
    options = options or ExportOptions()
    if options.target not in TARGETS:
        raise ExportError(f"unknown target {options.target!r}; expected {', '.join(TARGETS)}")
    if options.target == "tensorrt":  # fail before any export work
        from .tensorrt import check_target, require_tensorrt

        check_target(options.precision)
        require_tensorrt()
    if options.precision != "fp32":
        return _export_quantized(model_dir, Path(out_dir), options, progress)
    if options.fp32_bundle:
        raise ExportError("an fp32 bundle to quantize was given, but the precision is fp32")
    model_dir, out = Path(model_dir), Path(out_dir)
    if not model_dir.is_dir():
        raise ExportError(f"checkpoint not found: {model_dir} is not a folder")
    family = detect_family(model_dir)
    for needed in ("tokenizer.json", "preprocessor_config.json"):
        if not (model_dir / needed).is_file():
            raise ExportError(f"{model_dir}: checkpoint lacks {needed}")
    progress(f"reading {family} checkpoint {model_dir}")
    template = prompt_template(model_dir, read_chat_template(model_dir))
    preprocess = read_preprocess(model_dir)
    model = load_model(model_dir, family)
    text, vision = text_and_vision_configs(family, model.config)
    tokens = read_token_ids(model_dir, model.config)

    out.mkdir(parents=True, exist_ok=True)
    max_context = options.max_context or text.max_position_embeddings
    names = export_graphs(model, family, text, vision, out, options.opset, progress, options.target)
    shutil.copyfile(model_dir / "tokenizer.json", out / "tokenizer.json")

    max_patches = options.max_patches_per_image or preprocess.max_pixels // (preprocess.patch_size ** 2)
    manifest = Manifest(
        schema_version=SCHEMA_VERSION, family=family, precision=options.precision, text=text, vision=vision,
        preprocess=preprocess, tokens=tokens, prompt=template,
        limits=Limits(max_context=max_context,
                      max_images=options.max_images, max_image_pixels=preprocess.max_image_pixels,
                      max_patches_per_image=max_patches),
        vision_graph=graph_file(out, "vision.onnx", *names["vision"]),
        embed_graph=graph_file(out, "embed.onnx", *names["embed"]),
        decoder_graph=graph_file(out, "decoder.onnx", *names["decoder"]),
        tokenizer=graph_file(out, "tokenizer.json"),
        source={"checkpoint": str(model_dir.resolve()), "exporter": "gemvg", **_versions()},
    )
    manifest.write(out)
    if options.verify:
        from .verify import verify_bundle

        progress("verifying the bundle against PyTorch on a generated 2-image input")
        report = verify_bundle(out, model)
        progress(f"max abs logit difference vs PyTorch: {report.max_abs_logit_diff:.3g} "
                 f"(prefill {report.prefill_diff:.3g}, decode step {report.decode_diff:.3g}, "
                 f"tolerance {LOGITS_TOLERANCE:g})")
        if report.max_abs_logit_diff > LOGITS_TOLERANCE:
            raise ExportError(f"bundle does not match PyTorch: max abs logit difference "
                              f"{report.max_abs_logit_diff:.3g} > {LOGITS_TOLERANCE:g}")
    if options.target == "tensorrt" and build_tensorrt:
        from .tensorrt import build_engines

        manifest = build_engines(out, manifest, progress)
    progress(f"bundle written to {out} ({sum(f.stat().st_size for f in out.iterdir()) / 1e6:.1f} MB)")
    return manifest


def _export_quantized(model_dir, out: Path, options: ExportOptions, progress: Callable[[str], None]) -> Manifest:
    """Quantize an fp32 bundle: the given one, or one exported (and verified) from the checkpoint into a
    temporary folder beside `out`, removed afterwards."""
    from dataclasses import replace

    from .quantize import check_options, quantize_bundle

    quantize = options.quantize_options()
    check_options(quantize)
    if options.fp32_bundle:
        manifest = quantize_bundle(options.fp32_bundle, out, quantize, progress)
    else:
        if model_dir is None or not Path(model_dir).is_dir():
            raise ExportError(f"checkpoint not found: {model_dir} is not a folder")
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{out.name}-fp32-", dir=out.parent) as temp:
            fp32 = replace(options, precision="fp32", fp32_bundle=None)  # graphs for the same target
            export_bundle(model_dir, temp, fp32, progress, build_tensorrt=False)
            manifest = quantize_bundle(temp, out, quantize, progress)
    if options.target == "tensorrt":
        from .tensorrt import build_engines

        manifest = build_engines(out, manifest, progress)
    progress(f"{options.precision} bundle written to {out} "
             f"({sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 1e6:.1f} MB)")
    return manifest


def _versions() -> dict:
    import onnx
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__,
            "numpy": np.__version__}
