"""vision.onnx for Qwen3-VL's DeepStack vision tower (transformers' Qwen3VLVisionModel).

Written as export/exporter.py's `export_vision` writes Qwen2-VL's and Qwen2.5-VL's towers: the graph
(gemvg.export.graphs.DeepStackVisionEncoder) traced on an example feed that the runtime's own
`vision_feeds` builds, one image per run, the patches dimension dynamic, the weights in vision.onnx.data.
For onnxruntime the rotary is ONNX Runtime's fused RotaryEmbedding; for tensorrt standard ops only.

Inputs: pixel_values, rotary_cos, rotary_sin, position_taps, position_weights (gemvg.runtime.bundle_io).
Outputs: image_features [patches / merge^2, out_hidden] and deepstack_features [len(deepstack_layers),
patches / merge^2, out_hidden], in the order of VisionConfig.deepstack_layers.
"""

from __future__ import annotations

from pathlib import Path

from gemvg.runtime import bundle_io as io
from gemvg.runtime.manifest import VisionConfig


def export_deepstack_vision(visual, vision: VisionConfig, out: Path, opset: int,
                            target: str = "onnxruntime") -> tuple[list[str], list[str]]:
    """Write out/"vision.onnx" (+ .data) from transformers' Qwen3VLVisionModel `visual` (float32, eager
    attention); return its input and output names. `vision` must describe `visual` (its position table and
    DeepStack layers are checked against the module's)."""
    import torch
    from torch.export import Dim

    from .exporter import ExportError, export_onnx, vision_example
    from .graphs import DeepStackVisionEncoder, rotary_translation

    table = visual.pos_embed.num_embeddings
    if vision.num_position_embeddings != table or vision.deepstack_layers != tuple(visual.deepstack_visual_indexes):
        raise ExportError(f"vision config (num_position_embeddings {vision.num_position_embeddings}, deepstack_layers "
                          f"{list(vision.deepstack_layers)}) does not describe the vision tower (position table of "
                          f"{table}, DeepStack layers {list(visual.deepstack_visual_indexes)})")
    if vision.window_size > 0:
        raise ExportError("Qwen3-VL's vision tower has no window attention, but the vision config sets window_size")
    embed = visual.patch_embed
    patch_dim = embed.in_channels * embed.temporal_patch_size * embed.patch_size ** 2
    fused_rotary = target == "onnxruntime"
    encoder = DeepStackVisionEncoder(visual, fused_rotary).eval()
    translations = ({torch.ops.gemvg.vision_rotary.default: rotary_translation(vision.num_heads, vision.head_dim)}
                    if fused_rotary else None)
    example, inputs = vision_example(vision, patch_dim)
    expected = [io.VISION_PIXEL_VALUES, io.VISION_ROTARY_COS, io.VISION_ROTARY_SIN, io.VISION_POSITION_TAPS,
                io.VISION_POSITION_WEIGHTS]
    if inputs != expected:  # the forward's argument order
        raise ExportError(f"the runtime's vision feeds are {inputs}, the DeepStack encoder takes {expected}")
    n = Dim("patches", min=4, max=1 << 20)
    outputs = [io.VISION_OUTPUT, io.VISION_DEEPSTACK_OUTPUT]
    export_onnx(encoder, tuple(torch.from_numpy(example[name]) for name in inputs), Path(out) / "vision.onnx",
                inputs, outputs, tuple({0: n} for _ in inputs), opset, translations)
    return inputs, outputs
