"""Parity with transformers: `gemvg ground --mode raw` token ids == HF generate; inspect == HF inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gemvg.runtime.cli import main as gemvg

from .hf_reference import hf_generate, hf_inputs, hf_position_ids, load_hf_model

IMAGE_SETS = {
    "one_image": ["rgb.jpg"],
    "two_images": ["gray.png", "palette.png"],
    "three_images": ["rgba.png", "wide.jpg", "large.jpg"],
}
QUERY = "Find the small red object."
MAX_NEW_TOKENS = 24


@pytest.fixture(scope="module")
def hf_models(tiny_checkpoints):
    return {family: load_hf_model(path) for family, path in tiny_checkpoints.items()}


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("image_set", list(IMAGE_SETS))
def test_ground_raw_matches_transformers_generate(family, image_set, tiny_checkpoints, tiny_bundles, hf_models,
                                                  image_files, capsys):
    paths = [image_files[name] for name in IMAGE_SETS[image_set]]
    argv = ["ground", "--bundle", str(tiny_bundles[family]), "--query", QUERY, "--mode", "raw", "--json",
            "--max-new-tokens", str(MAX_NEW_TOKENS)]
    for path in paths:
        argv += ["--image", str(path)]
    assert gemvg(argv) == 0
    ours = json.loads(capsys.readouterr().out)["token_ids"]

    reference = hf_generate(hf_models[family], hf_inputs(tiny_checkpoints[family], paths, QUERY), MAX_NEW_TOKENS)
    assert ours == reference
    assert len(set(ours)) > 1, "a constant output would make this comparison weak"


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("image_set", list(IMAGE_SETS))
def test_inspect_matches_hf_inputs(family, image_set, tiny_checkpoints, tiny_bundles, hf_models, image_files,
                                   tmp_path):
    paths = [image_files[name] for name in IMAGE_SETS[image_set]]
    dump = tmp_path / "dump.npz"
    argv = ["inspect", "--bundle", str(tiny_bundles[family]), "--query", QUERY, "--mode", "raw", "--out", str(dump)]
    for path in paths:
        argv += ["--image", str(path)]
    assert gemvg(argv) == 0
    ours = np.load(dump)

    reference = hf_inputs(tiny_checkpoints[family], paths, QUERY)
    assert np.abs(ours["pixel_values"] - reference["pixel_values"].numpy()).max() <= 1e-5
    np.testing.assert_array_equal(ours["image_grid_thw"], reference["image_grid_thw"].numpy())
    np.testing.assert_array_equal(ours["input_ids"], reference["input_ids"].numpy())
    np.testing.assert_array_equal(ours["position_ids"], hf_position_ids(hf_models[family], reference))

    import torch

    with torch.no_grad():
        logits = hf_models[family](**reference).logits[0, -1].numpy()
    assert np.abs(ours["logits"] - logits).max() < 1e-4
