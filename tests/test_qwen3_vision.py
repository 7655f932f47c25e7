"""Qwen3-VL's vision tower as an ONNX graph: the host-side feeds (bilinear taps into the learned position
table, rotary tables) against transformers', and one exported graph per target (fused rotary for
onnxruntime, standard ops for tensorrt) against transformers' Qwen3VLVisionModel on grids smaller than,
equal to and larger than the position table (so the resampling shrinks, copies and grows it)."""

from __future__ import annotations

import numpy as np
import pytest

from gemvg.runtime.vision import position_interpolation, vision_feeds

SIDE = 8  # the position table is SIDE x SIDE
# (t, rows, cols) in patches: smaller than the table, mixed, equal, larger, the smallest image
GRIDS = [(1, 4, 6), (1, 8, 4), (1, 10, 12), (1, 8, 8), (1, 16, 20), (1, 2, 2)]
PATCH_DIM = 3 * 2 * 16 * 16
TOLERANCE = 1e-4  # max abs difference, relative to the largest feature magnitude


def hf_interpolation(grid, side=SIDE, merge=2):
    import torch
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights

    taps, weights = get_vision_interpolation_indices_and_weights(
        torch.tensor([grid]), side, mode="bilinear", align_corners=True, spatial_merge_size=merge)
    return taps.numpy(), weights.numpy()


@pytest.mark.parametrize("side", [SIDE, 48, 3])
def test_position_taps_and_weights_are_transformers_bits(side):
    for rows in (2, 4, 6, 8, 10, 16, 34, 96):
        for cols in (2, 4, 8, 12, 20, 98):
            taps, weights = position_interpolation(rows, cols, 2, side * side)
            hf_taps, hf_weights = hf_interpolation((1, rows, cols), side)
            assert taps.dtype == np.int64 and weights.dtype == np.float32 and taps.shape == (rows * cols, 4)
            np.testing.assert_array_equal(taps, hf_taps)
            np.testing.assert_array_equal(weights.view(np.int32), hf_weights.view(np.int32))  # same bits


def test_position_taps_on_the_tables_own_grid_copy_its_rows():
    taps, weights = position_interpolation(SIDE, SIDE, 2, SIDE * SIDE)
    rows = np.arange(SIDE * SIDE).reshape(SIDE // 2, 2, SIDE // 2, 2).transpose(0, 2, 1, 3).ravel()
    np.testing.assert_array_equal(taps[:, 0], rows)  # merge-block order, as the patches
    np.testing.assert_array_equal(weights, np.tile([1, 0, 0, 0], (SIDE * SIDE, 1)).astype(np.float32))


@pytest.fixture(scope="module")
def tower():
    """A random tiny Qwen3VLVisionModel (float32, eager attention) and the manifest's config of it."""
    import torch
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    from gemvg.runtime.families import family

    config = Qwen3VLVisionConfig(depth=4, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=64,
                                 num_position_embeddings=SIDE * SIDE, deepstack_visual_indexes=[1, 2], patch_size=16,
                                 spatial_merge_size=2, temporal_patch_size=2, initializer_range=0.1)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    visual = Qwen3VLVisionModel(config).to(torch.float32).eval()
    return visual, family("qwen3_vl").read_vision(config.to_dict())


def test_vision_feeds_carry_positions_and_no_windows(tower):
    _, vision = tower
    assert vision.num_position_embeddings == SIDE * SIDE and vision.deepstack_layers == (1, 2)
    feeds = vision_feeds(np.zeros((4 * 6, PATCH_DIM), np.float32), (1, 4, 6), vision)
    assert feeds.window_gather is None and feeds.restore_order is None
    hf_taps, hf_weights = hf_interpolation((1, 4, 6))
    np.testing.assert_array_equal(feeds.position_taps, hf_taps)
    np.testing.assert_array_equal(feeds.position_weights, hf_weights)


@pytest.mark.parametrize("head_dim", [16, 72])  # the tiny tower's, Qwen3-VL's (1152 / 16 heads)
def test_rotary_tables_are_qwen3_vision_rotary(head_dim):
    """runtime/vision.py's rotary tables (Qwen2-VL's layout) are Qwen3VLVisionRotaryEmbedding's, up to float32
    rounding (the host rounds inv_freq's power and cos/sin once from float64, torch in float32)."""
    import torch
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionRotaryEmbedding
    from transformers.vision_utils import get_vision_position_ids

    from gemvg.runtime.vision import patch_positions, rotary_tables

    config = Qwen3VLVisionConfig(hidden_size=head_dim * 2, num_heads=2)
    rotary = Qwen3VLVisionRotaryEmbedding(config)
    grid = (1, 48, 64)
    positions = get_vision_position_ids(torch.tensor([grid]), 2)
    np.testing.assert_array_equal(positions.numpy(), patch_positions(48, 64, 2))
    cos, sin = rotary(torch.zeros(1), positions)
    ours_cos, ours_sin = rotary_tables(patch_positions(48, 64, 2), head_dim, config.rope_parameters["rope_theta"])
    assert ours_cos.shape == tuple(cos.shape) == (48 * 64, head_dim)
    assert np.abs(ours_cos - cos.numpy()).max() < 1e-6 and np.abs(ours_sin - sin.numpy()).max() < 1e-6


@pytest.fixture(scope="module")
def graphs(tower, tmp_path_factory):
    """vision.onnx of the tiny tower for each target, each traced once (on vision_example's 20x12 grid)."""
    from gemvg.export.vision_export import export_deepstack_vision

    visual, vision = tower
    paths = {}
    for target in ("onnxruntime", "tensorrt"):
        out = tmp_path_factory.mktemp(f"qwen3-vision-{target}")
        names = export_deepstack_vision(visual, vision, out, 18, target)
        assert names == (["pixel_values", "rotary_cos", "rotary_sin", "position_taps", "position_weights"],
                         ["image_features", "deepstack_features"])
        paths[target] = out / "vision.onnx"
    return paths


@pytest.mark.parametrize("target", ["onnxruntime", "tensorrt"])
def test_exported_tower_matches_transformers_on_every_grid(tower, graphs, target):
    import onnx
    import onnxruntime as ort
    import torch

    from gemvg.export.tensorrt import contrib_ops

    visual, vision = tower
    path = graphs[target]
    assert contrib_ops(path) == (["RotaryEmbedding"] if target == "onnxruntime" else [])
    graph = onnx.load(str(path), load_external_data=False).graph
    ops = {node.op_type for node in graph.node}
    assert not ops & {"If", "Loop", "Scan", "NonZero"} and {"Gather", "ReduceSum"} <= ops
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*graph.input, *graph.output]}
    patches = dims["pixel_values"][0]
    assert isinstance(patches, str) and dims["position_taps"] == dims["position_weights"] == [patches, 4]
    assert dims["deepstack_features"][0] == 2 and dims["deepstack_features"][2] == 64
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for grid in GRIDS:
        pixel_values = np.random.default_rng(grid[1] * 100 + grid[2]).standard_normal(
            (grid[1] * grid[2], PATCH_DIM), dtype=np.float32)
        feeds = vision_feeds(pixel_values, grid, vision)
        features, deepstack = session.run(None, {i.name: getattr(feeds, i.name) for i in session.get_inputs()})
        with torch.no_grad():
            hf = visual(torch.from_numpy(pixel_values), grid_thw=torch.tensor([grid]))
        hf_features, hf_deepstack = hf.pooler_output.numpy(), torch.stack(hf.deepstack_features).numpy()
        assert features.shape == hf_features.shape == (grid[1] * grid[2] // 4, 64)
        assert deepstack.shape == hf_deepstack.shape == (2, grid[1] * grid[2] // 4, 64)
        scale = max(np.abs(hf_features).max(), np.abs(hf_deepstack).max())
        assert scale > 0.5  # non-trivial activations
        assert np.abs(features - hf_features).max() < TOLERANCE * scale, grid
        assert np.abs(deepstack - hf_deepstack).max() < TOLERANCE * scale, grid


def test_export_refuses_a_config_that_does_not_describe_the_tower(tower, tmp_path):
    import dataclasses

    from gemvg.export.exporter import ExportError
    from gemvg.export.vision_export import export_deepstack_vision

    visual, vision = tower
    with pytest.raises(ExportError, match="does not describe"):
        export_deepstack_vision(visual, dataclasses.replace(vision, deepstack_layers=(1,)), tmp_path, 18)
