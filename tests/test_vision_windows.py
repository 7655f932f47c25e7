"""Qwen2.5-VL window attention as a batch of padded windows: the host-side layout (gather / bias /
scatter) on uneven grids, and the encoder against the masked full-attention formulation it replaced
and against transformers' own vision tower, in PyTorch and as the exported ONNX graph."""

from __future__ import annotations

import numpy as np
import pytest

from gemvg.runtime.manifest import VisionConfig
from gemvg.runtime.vision import vision_feeds, window_layout, window_partition

CONFIG = VisionConfig(hidden_size=32, out_hidden_size=64, num_heads=2, head_dim=16, rope_theta=1e4, patch_size=14,
                      spatial_merge_size=2, window_size=112, fullatt_block_indexes=(1,))
# (t, rows, cols) in patches; windows are 8x8 patches: uneven at the bottom and right, thin, under one window
GRIDS = [(1, 22, 14), (1, 16, 16), (1, 2, 30), (1, 4, 4), (1, 26, 18)]


def window_ids(grid_thw, config=CONFIG) -> np.ndarray:
    """Each patch's window (in attention order), as the replaced `window_ids` feed had it."""
    _, rows, cols = grid_thw
    merge = config.spatial_merge_size
    _, ids = window_partition(rows, cols, merge, config.window_size // merge // config.patch_size)
    return np.repeat(ids, merge * merge)


@pytest.mark.parametrize("grid", GRIDS)
def test_window_feeds_on_uneven_grids(grid):
    patches = grid[1] * grid[2]
    feeds = vision_feeds(np.zeros((patches, 3), np.float32), grid, CONFIG)
    gather, bias, scatter = feeds.window_gather, feeds.window_bias, feeds.window_scatter
    windows, longest = gather.shape
    assert gather.dtype == scatter.dtype == np.int64 and bias.dtype == np.float32
    assert bias.shape == (windows, 1, 1, longest) and scatter.shape == (patches,)
    assert longest == min(grid[1], 8) * min(grid[2], 8)
    assert windows == -(-grid[1] // 8) * -(-grid[2] // 8)  # no empty windows

    real = bias[:, 0, 0, :] == 0
    assert np.all(real | np.isneginf(bias[:, 0, 0, :]))  # 0 or -inf, nothing else
    assert np.all(real[:, 0])  # every window has a real key: softmax stays finite
    assert real.sum() == patches
    # scatter inverts gather: every patch sits in exactly one real slot, and is read back from it
    np.testing.assert_array_equal(gather.reshape(-1)[scatter], np.arange(patches))
    assert np.all(real.reshape(-1)[scatter])
    # a window's real slots are its patches, contiguous in attention order; padding repeats its first
    ids = window_ids(grid)
    for w in range(windows):
        members = gather[w, real[w]]
        np.testing.assert_array_equal(members, np.arange(members[0], members[0] + len(members)))
        assert len(set(ids[members])) == 1 and np.sum(ids == ids[members[0]]) == len(members)
        assert np.all(gather[w, ~real[w]] == members[0])
    if grid == (1, 22, 14):  # 3 x 2 windows: 8, 8, 6 rows by 8, 6 columns
        np.testing.assert_array_equal(real.sum(1), [64, 48, 64, 48, 48, 36])


def test_window_layout_rejects_empty_windows():
    gather, bias, scatter = window_layout(np.array([4, 2]))
    np.testing.assert_array_equal(gather, [[0, 1, 2, 3], [4, 5, 4, 4]])
    np.testing.assert_array_equal(scatter, [0, 1, 2, 3, 4, 5])
    assert np.isneginf(bias[1, 0, 0, 2:]).all() and not bias[0].any()
    with pytest.raises(ValueError):
        window_layout(np.array([4, 0]))


def test_no_window_inputs_without_window_attention():
    import dataclasses

    full = dataclasses.replace(CONFIG, window_size=0, fullatt_block_indexes=())
    feeds = vision_feeds(np.zeros((64, 3), np.float32), (1, 8, 8), full)
    assert feeds.window_gather is None and feeds.window_bias is None and feeds.window_scatter is None
    assert feeds.restore_order is None


# -- the encoder -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen25(tiny_checkpoints):
    from gemvg.export.reference import load_model
    from gemvg.runtime.families import family

    model = load_model(tiny_checkpoints["qwen2_5_vl"], "eager")
    return model, family("qwen2_5_vl").vision_config(model.config.to_dict())


def masked_full_encoder(encoder, pixel_values, cos, sin, ids):
    """The replaced formulation: windowed blocks attend over every patch under a -inf mask."""
    import torch

    visual = encoder.visual
    mask = torch.where(ids[None] == ids[:, None], 0.0, float("-inf"))
    hidden = visual.patch_embed(pixel_values)
    for index, block in enumerate(visual.blocks):
        attn, x = block.attn, block.norm1(hidden)
        q, k, v = (t.transpose(0, 1) for t in encoder.qkv(block, x, cos, sin))
        out = encoder.core(attn, q, k, v, None if index in encoder.full_blocks else mask)
        hidden = hidden + attn.proj(out.transpose(0, 1).reshape(x.shape[0], -1))
        hidden = hidden + block.mlp(block.norm2(hidden))
    return visual.merger(hidden)


def random_patches(grid, seed=0):
    return np.random.default_rng(seed).standard_normal((grid[1] * grid[2], 1176), dtype=np.float32)


@pytest.mark.parametrize("grid", [(1, 22, 14), (1, 26, 18), (1, 2, 30)])
def test_windowed_encoder_matches_masked_full_and_transformers(grid, qwen25):
    import torch

    from gemvg.export.graphs import VisionEncoder

    model, vision = qwen25
    encoder = VisionEncoder(model.model.visual, vision.fullatt_block_indexes).eval()
    pixel_values = random_patches(grid)
    feeds = vision_feeds(pixel_values, grid, vision)
    inputs = [torch.from_numpy(getattr(feeds, name)) for name in
              ("pixel_values", "rotary_cos", "rotary_sin", "window_gather", "window_bias", "window_scatter")]
    with torch.no_grad():
        ours = encoder(*inputs).numpy()
        masked = masked_full_encoder(encoder, *inputs[:3], torch.from_numpy(window_ids(grid, vision))).numpy()
        hf = model.model.visual(torch.from_numpy(pixel_values), grid_thw=torch.tensor([grid])).pooler_output.numpy()
    assert np.isfinite(ours).all()
    assert np.abs(ours - masked).max() < 1e-4
    assert np.abs(ours[feeds.restore_order] - hf).max() < 1e-4


def test_exported_graph_attends_in_windows_on_grids_it_was_not_traced_on(qwen25, tiny_bundles):
    """The bundle's vision.onnx (traced on one 20x12 grid) has no control flow and matches
    transformers on other grids, uneven windows included."""
    import onnx
    import onnxruntime as ort
    import torch

    model, vision = qwen25
    path = tiny_bundles["qwen2_5_vl"] / "vision.onnx"
    graph = onnx.load(str(path)).graph
    assert not {node.op_type for node in graph.node} & {"If", "Loop", "Scan", "NonZero"}
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims["window_gather"] == ["windows", "window_len"]
    assert dims["window_bias"] == ["windows", 1, 1, "window_len"]
    assert dims["window_scatter"] == dims["pixel_values"][:1]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for grid in GRIDS:
        pixel_values = random_patches(grid, seed=1)
        feeds = vision_feeds(pixel_values, grid, vision)
        (ours,) = session.run(None, {i.name: getattr(feeds, i.name) for i in session.get_inputs()})
        with torch.no_grad():
            hf = model.model.visual(torch.from_numpy(pixel_values), grid_thw=torch.tensor([grid])).pooler_output
        assert np.abs(ours[feeds.restore_order] - hf.numpy()).max() < 1e-4, grid


def test_engine_feeds_the_window_layout_and_refuses_an_old_window_ids_graph(tiny_bundles, image_files):
    from gemvg.runtime import Engine
    from gemvg.runtime.errors import BundleError

    engine = Engine.load(tiny_bundles["qwen2_5_vl"])
    (image,) = engine.preprocess([image_files["large.jpg"]])
    inputs, restore_order = engine.vision_inputs(image)
    assert set(inputs) == {"pixel_values", "rotary_cos", "rotary_sin", "window_gather", "window_bias",
                           "window_scatter"}
    assert inputs["window_gather"].shape[0] > 1 and restore_order is not None
    engine._vision_inputs = engine._vision_inputs | {"window_ids"}  # as a bundle exported before this layout
    with pytest.raises(BundleError, match="window_ids.*re-export"):
        engine.vision_inputs(image)

    qwen2 = Engine.load(tiny_bundles["qwen2_vl"])
    inputs, restore_order = qwen2.vision_inputs(qwen2.preprocess([image_files["large.jpg"]])[0])
    assert set(inputs) == {"pixel_values", "rotary_cos", "rotary_sin"} and restore_order is None


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_vision_rotary_fused_for_onnxruntime_standard_for_tensorrt(tiny_checkpoints, family, tmp_path):
    """The onnxruntime vision graph writes the rotary as RotaryEmbedding nodes; the tensorrt one keeps
    standard ops only; both compute the same features."""
    import onnxruntime as ort

    from gemvg.export.exporter import export_vision, vision_example
    from gemvg.export.reference import load_model
    from gemvg.export.tensorrt import contrib_ops
    from gemvg.runtime.families import family as family_named

    checkpoint = tiny_checkpoints[family]
    model = load_model(checkpoint, "eager")
    vision = family_named(family).vision_config(model.config.to_dict())
    outputs = {}
    for target in ("onnxruntime", "tensorrt"):
        out = tmp_path / target
        out.mkdir()
        export_vision(model.model.visual, vision, out, 18, target)
        graph = out / "vision.onnx"
        assert contrib_ops(graph) == (["RotaryEmbedding"] if target == "onnxruntime" else [])
        session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
        patch_dim = model.model.visual.patch_embed.in_channels * model.model.visual.patch_embed.temporal_patch_size \
            * model.model.visual.patch_embed.patch_size ** 2
        feeds, names = vision_example(vision, patch_dim, grid=(12, 20), seed=3)
        outputs[target] = session.run(None, {name: feeds[name] for name in names})[0]
    np.testing.assert_allclose(outputs["onnxruntime"], outputs["tensorrt"], atol=1e-5)
