"""Checkpoint -> bundle: read a Qwen-VL checkpoint, export its graphs, write the manifest, verify.

Everything the runtime needs is read from the checkpoint (config.json, generation_config.json,
preprocessor_config.json, tokenizer.json, the chat template) and recorded in the manifest; nothing is
hard-coded. What differs between model families is read from gemvg.runtime.families.

The export streams: the model is never loaded whole. The vision tower is built alone from the vision
weights and traced; the token embedding and the decoder are written tensor by tensor from the
safetensors files (gemvg.export.decoder_builder), quantized as they are written for int4 / int8w. Peak
memory is the vision tower (0.68B parameters at every Qwen2-VL size) or one decoder weight, whichever is
larger, not the model. The export ends by checking the bundle part by part against PyTorch
(gemvg.export.verify).

Static INT8 and measured mixed precision (`upgrade_budget` > 0) calibrate and compare whole graphs, so
they first stream an fp32 bundle into a temporary folder and quantize that (gemvg.export.quantize).
"""

from __future__ import annotations

import gc
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

from gemvg.runtime import bundle_io as io
from gemvg.runtime.errors import GemvgError
from gemvg.runtime.families import CheckpointConfigError, Family, UnknownFamilyError, checkpoint_family
from gemvg.runtime.manifest import SCHEMA_VERSION, Limits, Manifest, PromptTemplate, TokenIds, VisionConfig, graph_file

from .memory import peak_rss_gb, trim_heap
from .quantize import UPGRADE_BUDGET, WEIGHT_ONLY_BITS

VISION_INPUTS = io.VISION_INPUTS
TARGETS = ("onnxruntime", "tensorrt")
LOGITS_TOLERANCE = 1e-3  # fp32 export vs PyTorch, max abs difference of last-position logits
# A weight-only export is checked for its cosine against PyTorch's fp32 logits; under this it is broken,
# not merely quantized (measured cosines of healthy 4-bit bundles are reported in the manifest).
QUANTIZED_MIN_COSINE = 0.8


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
    verify_layers: tuple[int, ...] | None = None  # decoder layers of the check (default first, middle, last)
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


def detect_family(model_dir: Path) -> Family:
    try:
        return checkpoint_family(model_dir)
    except UnknownFamilyError as err:
        raise ExportError(f"{model_dir}: {err}") from None
    except CheckpointConfigError as err:
        raise ExportError(str(err)) from None


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


def load_vision_tower(tensors, config, of: Family):
    """transformers' vision tower of a family holding only the checkpoint's vision weights, in float32 (the
    rest of the model is never built)."""
    import torch
    from transformers.initialization import no_init_weights

    from .reference import hf_class

    cls = hf_class(of, "vision")
    vision_config = config.vision_config
    vision_config._attn_implementation = "eager"
    with no_init_weights(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        visual = cls._from_config(vision_config, dtype=torch.float32)
    state = {name[len("visual."):]: torch.from_numpy(tensors.get(name)) for name in tensors.names("visual.")}
    missing = sorted(set(visual.state_dict()) - set(state))
    if missing:
        raise ExportError(f"{tensors.model_dir}: checkpoint lacks vision weight {missing[0]!r}")
    visual.load_state_dict(state, strict=True, assign=True)
    return visual.eval()


def export_vision(visual, vision: VisionConfig, out: Path, opset: int,
                  target: str = "onnxruntime") -> tuple[list[str], list[str]]:
    """vision.onnx from transformers' vision tower `visual`. For onnxruntime the rotary is ONNX Runtime's
    fused RotaryEmbedding; for tensorrt standard ops only (its parser takes the graph whole)."""
    import torch
    from torch.export import Dim

    from .graphs import VisionEncoder, rotary_translation

    patch_dim = visual.patch_embed.in_channels * visual.patch_embed.temporal_patch_size * \
        visual.patch_embed.patch_size ** 2
    fused_rotary = target == "onnxruntime"
    if vision.num_position_embeddings:  # Qwen3-VL: learned positions and DeepStack outputs
        from .vision_export import export_deepstack_vision

        return export_deepstack_vision(visual, vision, out, opset, target)
    encoder = VisionEncoder(visual, vision.fullatt_block_indexes if vision.window_size > 0 else None,
                            fused_rotary).eval()
    translations = ({torch.ops.gemvg.vision_rotary.default: rotary_translation(vision.num_heads, vision.head_dim)}
                    if fused_rotary else None)
    example, vision_inputs = vision_example(vision, patch_dim)
    n = Dim("patches", min=4, max=1 << 20)
    windows, longest = Dim("windows", min=1, max=1 << 20), Dim("window_len", min=1, max=1 << 20)
    shapes = {io.VISION_PIXEL_VALUES: {0: n}, io.VISION_ROTARY_COS: {0: n}, io.VISION_ROTARY_SIN: {0: n},
              io.VISION_WINDOW_GATHER: {0: windows, 1: longest}, io.VISION_WINDOW_BIAS: {0: windows, 3: longest},
              io.VISION_WINDOW_SCATTER: {0: n}}
    export_onnx(encoder, tuple(torch.from_numpy(example[name]) for name in vision_inputs), out / "vision.onnx",
                vision_inputs, [io.VISION_OUTPUT], tuple(shapes[name] for name in vision_inputs), opset, translations)
    return vision_inputs, [io.VISION_OUTPUT]


def resolve_checkpoint(model: str | Path) -> Path:
    """A checkpoint folder, or a model id ("Org/Name") already in the local Hugging Face cache, resolved
    without any network access."""
    path = Path(model)
    if path.is_dir():
        return path
    name = str(model)
    if path.exists():
        raise ExportError(f"checkpoint not found: {path} is not a folder")
    if name.count("/") != 1 or name.startswith(("/", ".")):
        raise ExportError(f"checkpoint not found: {path} is not a folder (nor a model id such as Org/Name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # huggingface_hub raises several types for "not cached"; none of them is ours to show
        raise ExportError(f"checkpoint not found: {name} is neither a folder nor a model in the local Hugging Face "
                          f"cache ({HF_HUB_CACHE}); download it there first (gemvg never downloads)") from None


def check_checkpoint(model_dir: Path) -> Family:
    """The checkpoint's family, once the files an export reads are known to be there."""
    of = detect_family(model_dir)
    for needed in ("tokenizer.json", "preprocessor_config.json"):
        if not (model_dir / needed).is_file():
            raise ExportError(f"{model_dir}: checkpoint lacks {needed}")
    return of


def streams(options: ExportOptions) -> bool:
    """Whether the bundle is written straight from the checkpoint (no fp32 bundle first)."""
    if options.precision == "fp32":
        return True
    return (options.precision in WEIGHT_ONLY_BITS and options.upgrade_budget == 0 and not options.fp32_bundle
            and options.quantize_options().vision in ("fp32", "int8w"))


def export_bundle(model_dir: str | Path, out_dir: str | Path, options: ExportOptions | None = None,
                  progress: Callable[[str], None] = log, build_tensorrt: bool = True) -> Manifest:
    """Export a checkpoint (a folder or a cached model id) to a bundle folder and (by default) check it
    against PyTorch. With target tensorrt the graphs are written for it and, unless build_tensorrt is
    False, its engines built."""
    from transformers import AutoConfig

    from .decoder_builder import DecoderSource, WeightFormat, build_decoder, build_embedding
    from .safetensors_io import CheckpointTensors

    options = options or ExportOptions()
    if options.target not in TARGETS:
        raise ExportError(f"unknown target {options.target!r}; expected {', '.join(TARGETS)}")
    if options.target == "tensorrt":  # fail before any export work
        from .tensorrt import check_target, require_tensorrt

        check_target(options.precision)
        require_tensorrt()
    if options.fp32_bundle and options.precision == "fp32":
        raise ExportError("an fp32 bundle to quantize was given, but the precision is fp32")
    if options.precision != "fp32":
        from .quantize import check_options

        check_options(options.quantize_options())
    if not streams(options):
        return _export_quantized(model_dir, Path(out_dir), options, progress)
    model_dir, out = resolve_checkpoint(model_dir), Path(out_dir)
    of = check_checkpoint(model_dir)
    fmt = WeightFormat(WEIGHT_ONLY_BITS.get(options.precision), options.block_size, options.accuracy_level)
    progress(f"reading {of.model_type} checkpoint {model_dir} (streamed: one tensor at a time)")
    template = prompt_template(model_dir, read_chat_template(model_dir))
    preprocess = of.preprocess_config(read_json(model_dir / "preprocessor_config.json"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = AutoConfig.from_pretrained(str(model_dir))
    config_dict = config.to_dict()  # transformers' defaults filled in
    text, vision = of.text_config(config_dict), of.vision_config(config_dict)
    tokens = read_token_ids(model_dir, config)
    tensors = CheckpointTensors(model_dir)
    out.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    progress("exporting vision encoder (1/3)")
    visual = load_vision_tower(tensors, config, of)
    vision_names = export_vision(visual, vision, out, options.opset, options.target)
    vision_precision = "fp32" if options.precision == "fp32" else options.quantize_options().vision
    vision_record = {"scheme": "fp32"}
    if vision_precision == "int8w":
        from .quantize import weight_only_linears

        progress("  vision linear layers -> weight-only 8-bit")
        with tempfile.TemporaryDirectory(prefix=".vision-", dir=out) as temp:  # same names, then moved over
            vision_record = weight_only_linears(out / "vision.onnx", Path(temp) / "vision.onnx", 8,
                                                options.block_size, options.accuracy_level)
            for name in ("vision.onnx", "vision.onnx.data"):
                (Path(temp) / name).replace(out / name)
                (out / name).chmod(0o644)  # as the other files (onnx writes its data file private)
    progress(f"  vision.onnx written ({time.perf_counter() - started:.1f} s, peak RSS {peak_rss_gb():.1f} GB)")
    vision_check = None
    if options.verify:
        from .verify import check_vision

        progress("  checking the vision encoder against transformers' vision tower")
        # The tower, the largest thing the export holds, goes as soon as its reference outputs exist.
        vision_check = check_vision(out / "vision.onnx", preprocess, vision, visual,
                                    release=lambda: release_weights(visual))
    else:
        release_weights(visual)  # gone before the decoder is written
    started = time.perf_counter()
    progress("writing token embedding (2/3)")
    embed_names = build_embedding(tensors, out / "embed.onnx")
    progress(f"  embed.onnx written ({time.perf_counter() - started:.1f} s, peak RSS {peak_rss_gb():.1f} GB)")
    started = time.perf_counter()
    progress(f"writing text decoder, {fmt.label} weights, GroupQueryAttention and a shared KV cache (3/3)")
    source = DecoderSource(tensors, tied_embeddings=bool(config.text_config.tie_word_embeddings))
    decoder_inputs, decoder_outputs, written = build_decoder(
        source, text, float(config.text_config.rms_norm_eps), int(config.text_config.intermediate_size),
        out / "decoder.onnx", fmt, progress=progress, deepstack_layers=len(vision.deepstack_layers))
    progress(f"  decoder.onnx written ({time.perf_counter() - started:.1f} s, peak RSS {peak_rss_gb():.1f} GB)")
    shutil.copyfile(model_dir / "tokenizer.json", out / "tokenizer.json")

    precision = options.precision
    max_patches = options.max_patches_per_image or preprocess.max_pixels // (preprocess.patch_size ** 2)
    extra = {}
    if fmt.bits is not None:
        extra["quantization"] = {"precision": precision, "vision_precision": vision_precision,
                                 "embed_precision": "fp32", "vision": vision_record,
                                 "decoder": weight_only_record(fmt), "calibration": {}}
    manifest = Manifest(
        schema_version=SCHEMA_VERSION, family=of.model_type, box_syntax=of.box_syntax, precision=precision,
        text=text, vision=vision,
        preprocess=preprocess, tokens=tokens, prompt=template,
        limits=Limits(max_context=options.max_context or text.max_position_embeddings,
                      max_images=options.max_images, max_image_pixels=preprocess.max_image_pixels,
                      max_patches_per_image=max_patches),
        vision_graph=graph_file(out, "vision.onnx", *vision_names, vision_precision),
        embed_graph=graph_file(out, "embed.onnx", *embed_names),
        decoder_graph=graph_file(out, "decoder.onnx", decoder_inputs, decoder_outputs, precision),
        tokenizer=graph_file(out, "tokenizer.json"),
        source={"checkpoint": str(model_dir.resolve()), "exporter": "gemvg", **_versions()},
        extra=extra,
    )
    manifest.write(out)
    if options.verify:
        manifest = _verify(out, manifest, tensors, vision_check, of, config, written, fmt, options, progress)
    if options.target == "tensorrt" and build_tensorrt:
        from .tensorrt import build_engines

        manifest = build_engines(out, manifest, progress)
    progress(f"{precision} bundle written to {out} ({sum(f.stat().st_size for f in out.iterdir()) / 1e6:.1f} MB, "
             f"peak RSS {peak_rss_gb():.1f} GB)")
    return manifest


def release_weights(module) -> None:
    """Free a module's weights now, whoever still refers to the module: torch.onnx's exported IR keeps the
    traced tower's Parameter objects alive after the export returns (through its graph's values), so
    dropping our references alone frees nothing. Emptying each parameter frees its storage, and the heap
    is handed back to the system."""
    import torch

    for parameter in module.parameters():
        parameter.data = torch.empty(0)
    gc.collect()
    trim_heap()


def weight_only_record(fmt) -> dict:
    """The manifest's record of a decoder quantized as it was written (every MatMul at the same bits)."""
    import onnxruntime

    return {"scheme": f"weight-only {fmt.bits}-bit MatMulNBits (com.microsoft), symmetric, block {fmt.block_size}, "
                      f"accuracy_level {fmt.accuracy_level}, quantized while streaming from the checkpoint",
            "onnxruntime": onnxruntime.__version__, "bits": fmt.bits, "block_size": fmt.block_size,
            "accuracy_level": fmt.accuracy_level, "upgraded_groups": [], "upgraded_nodes": [],
            "lm_head_quantized": True}


def _verify(out: Path, manifest: Manifest, tensors, vision_check, of: Family, config, written: dict, fmt,
            options: ExportOptions, progress: Callable[[str], None]) -> Manifest:
    """Check the bundle part by part against PyTorch; an fp32 bundle must match within LOGITS_TOLERANCE,
    a quantized one is reported (its cosine) and must at least keep the logits' direction."""
    from dataclasses import replace

    from .reference import hf_class
    from .verify import verify_bundle

    progress("checking the bundle against PyTorch, part by part (streamed)")
    report = verify_bundle(out, manifest, tensors, vision_check, hf_class(of, "text"), config.text_config,
                           written, fmt, options.verify_layers, progress=progress)
    progress(f"  vision features: max relative difference {report.vision_diff:.3g}, cosine {report.vision_cosine:.6f}; "
             f"embedding rows {'identical' if report.embed_exact else 'DIFFER'}")
    progress(f"  decoder layers {report.layers} + head: max abs logit difference prefill {report.prefill_diff:.3g}, "
             f"decode step {report.decode_diff:.3g}; cosine {report.prefill_cosine:.6f} / {report.decode_cosine:.6f}")
    # Written as "not within" so that a NaN (which compares false with everything) fails.
    failures = []
    if not report.embed_exact:
        failures.append("embedding rows differ from the checkpoint's")
    if manifest.vision_graph.precision == "fp32" and not report.vision_diff <= LOGITS_TOLERANCE:
        failures.append(f"vision features differ by {report.vision_diff:.3g} (relative) > {LOGITS_TOLERANCE:g}")
    if not report.vision_cosine >= QUANTIZED_MIN_COSINE:
        failures.append(f"vision features cosine {report.vision_cosine:.4f} < {QUANTIZED_MIN_COSINE}")
    if fmt.bits is None and not report.max_abs_logit_diff <= LOGITS_TOLERANCE:
        failures.append(f"max abs logit difference {report.max_abs_logit_diff:.3g} > {LOGITS_TOLERANCE:g}")
    worst_cosine = min(report.prefill_cosine, report.decode_cosine)
    if fmt.bits is not None and not worst_cosine >= QUANTIZED_MIN_COSINE:
        failures.append(f"{fmt.bits}-bit logits cosine {worst_cosine:.4f} < {QUANTIZED_MIN_COSINE}")
    if failures:
        raise ExportError(f"bundle does not match PyTorch: {'; '.join(failures)}")
    manifest = replace(manifest, extra={**manifest.extra, "verification": report.to_dict()})
    manifest.write(out)
    return manifest


def _export_quantized(model_dir, out: Path, options: ExportOptions, progress: Callable[[str], None]) -> Manifest:
    """Quantize an fp32 bundle: the given one, or one streamed from the checkpoint (and checked) into a
    temporary folder beside `out`, removed afterwards."""
    from dataclasses import replace

    from .quantize import quantize_bundle

    quantize = options.quantize_options()
    if options.fp32_bundle:
        manifest = quantize_bundle(options.fp32_bundle, out, quantize, progress)
    else:
        model_dir = resolve_checkpoint(model_dir) if model_dir is not None else None
        if model_dir is None:
            raise ExportError("checkpoint not found: no --model given")
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
