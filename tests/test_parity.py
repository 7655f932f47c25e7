"""Parity with transformers: `gemvg ground --mode raw` token ids == HF generate; inspect == HF inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gemvg.export.reference import Reference
from gemvg.runtime.cli import main as gemvg

from .conftest import FAMILIES

IMAGE_SETS = {
    "one_image": ["rgb.jpg"],
    "two_images": ["gray.png", "palette.png"],
    "three_images": ["rgba.png", "wide.jpg", "large.jpg"],
}
QUERY = "Find the small red object."
MAX_NEW_TOKENS = 24


@pytest.fixture(scope="module")
def references(tiny_checkpoints) -> dict[str, Reference]:
    """transformers' pipeline (gemvg.export.reference) per family, its model loaded."""
    return {family: Reference(path) for family, path in tiny_checkpoints.items()}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("image_set", list(IMAGE_SETS))
def test_ground_raw_matches_transformers_generate(family, image_set, tiny_bundles, references, image_files, capsys):
    paths = [image_files[name] for name in IMAGE_SETS[image_set]]
    argv = ["ground", "--bundle", str(tiny_bundles[family]), "--query", QUERY, "--mode", "raw", "--json",
            "--max-new-tokens", str(MAX_NEW_TOKENS)]
    for path in paths:
        argv += ["--image", str(path)]
    assert gemvg(argv) == 0
    ours = json.loads(capsys.readouterr().out)["token_ids"]

    reference = references[family]
    assert ours == reference.generate(reference.inputs(paths, QUERY), MAX_NEW_TOKENS)
    assert len(set(ours)) > 1, "a constant output would make this comparison weak"


@pytest.mark.parametrize("family", FAMILIES)
def test_follow_up_on_the_same_images_matches_transformers(family, tiny_bundles, references, image_files):
    """A second query on the same images reuses their features and the cached prompt prefix, and still
    answers as transformers does on that query alone."""
    from gemvg.runtime import Engine

    engine = Engine.load(tiny_bundles[family])
    paths = [image_files[name] for name in IMAGE_SETS["three_images"]]
    reference = references[family]
    for query in (QUERY, "And the blue one?"):
        result = engine.ground(paths, query, mode="raw", max_new_tokens=MAX_NEW_TOKENS)
        assert result.token_ids == reference.generate(reference.inputs(paths, query), MAX_NEW_TOKENS)
    assert result.reused_prefix_tokens > 0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("image_set", list(IMAGE_SETS))
def test_inspect_matches_hf_inputs(family, image_set, tiny_bundles, references, image_files, tmp_path):
    paths = [image_files[name] for name in IMAGE_SETS[image_set]]
    dump = tmp_path / "dump.npz"
    argv = ["inspect", "--bundle", str(tiny_bundles[family]), "--query", QUERY, "--mode", "raw", "--out", str(dump)]
    for path in paths:
        argv += ["--image", str(path)]
    assert gemvg(argv) == 0
    ours = np.load(dump)

    pipeline = references[family]
    reference = pipeline.inputs(paths, QUERY)
    assert np.abs(ours["pixel_values"] - reference["pixel_values"].numpy()).max() <= 1e-5
    np.testing.assert_array_equal(ours["image_grid_thw"], reference["image_grid_thw"].numpy())
    np.testing.assert_array_equal(ours["input_ids"], reference["input_ids"].numpy())
    np.testing.assert_array_equal(ours["position_ids"], pipeline.position_ids(reference))

    import torch

    with torch.no_grad():
        logits = pipeline.model(**reference).logits[0, -1].numpy()
    assert np.abs(ours["logits"] - logits).max() < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_host_mrope_tables_equal_transformers_rotary(family, tiny_bundles, references):
    """The cos/sin rows the engine writes per cache slot are transformers' M-RoPE cos/sin (first half:
    rotate-half repeats it), for image-like positions that differ per axis and text-like equal ones."""
    import torch

    from gemvg.runtime.manifest import load_manifest
    from gemvg.runtime.rotary import MRopeAngles

    text = load_manifest(tiny_bundles[family]).text
    rng = np.random.default_rng(0)
    positions = np.concatenate([rng.integers(0, 4000, (3, 40)), np.repeat(rng.integers(0, 30000, (1, 24)), 3, 0)], 1)
    cos, sin = np.empty((2, positions.shape[1], text.head_dim // 2), np.float32)
    MRopeAngles(text).fill(positions, cos, sin)

    rotary = references[family].model.model.language_model.rotary_emb
    with torch.no_grad():
        hf_cos, hf_sin = rotary(torch.zeros(1, dtype=torch.float32), torch.from_numpy(positions)[:, None, :])
    half = text.head_dim // 2
    np.testing.assert_allclose(cos, hf_cos[0, :, :half].numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(sin, hf_sin[0, :, :half].numpy(), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(hf_cos[0, :, :half].numpy(), hf_cos[0, :, half:].numpy())
