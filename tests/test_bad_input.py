"""Bad input: one clear line and a non-zero exit from the CLI, a typed exception from the API."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gemvg.runtime import Engine
from gemvg.runtime.cli import main as gemvg
from gemvg.runtime.errors import BundleError, ImageError, InputError, PromptTooLongError
from gemvg.runtime.manifest import load_manifest


def run_cli(argv, capsys) -> tuple[int, str]:
    code = gemvg(argv)
    err = capsys.readouterr().err
    return code, err


def assert_one_line_error(code: int, err: str, needle: str) -> None:
    assert code != 0
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1, err
    assert lines[0].startswith("gemvg: error:"), err
    assert "Traceback" not in err
    assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def engine(tiny_bundle):
    return Engine.load(tiny_bundle)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    files = {}
    files["zero_byte"] = root / "empty.png"
    files["zero_byte"].write_bytes(b"")
    files["not_image"] = root / "notes.jpg"
    files["not_image"].write_text("this is not an image\n" * 20)
    good = root / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good)
    data = good.read_bytes()
    files["truncated"] = root / "truncated.png"
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["corrupt"] = root / "corrupt.png"
    files["corrupt"].write_bytes(data[:60] + bytes(len(data) - 60))
    # 14000 x 14000 one-bit pixels: a small file whose decoded size is over the decompression-bomb limit.
    files["bomb"] = root / "bomb.png"
    Image.new("1", (14000, 14000)).save(files["bomb"], optimize=False)
    files["missing"] = root / "does_not_exist.jpg"
    files["directory"] = root
    return files


@pytest.mark.parametrize("kind, needle", [
    ("zero_byte", "empty"), ("not_image", "not a readable image"), ("truncated", "cannot decode"),
    ("corrupt", "cannot decode"), ("bomb", "over the limit"), ("missing", "no such file"),
    ("directory", "is a directory"),
])
def test_bad_image(kind, needle, bad_files, tiny_bundle, engine, capsys):
    with pytest.raises(ImageError, match=needle):
        engine.ground([bad_files[kind]], "a query", max_new_tokens=2)
    code, err = run_cli(["ground", "--bundle", str(tiny_bundle), "--image", str(bad_files[kind]), "--query", "q"],
                        capsys)
    assert_one_line_error(code, err, needle)


def test_no_images(tiny_bundle, engine, capsys):
    with pytest.raises(InputError, match="no images"):
        engine.ground([], "a query")
    code, err = run_cli(["ground", "--bundle", str(tiny_bundle), "--query", "q"], capsys)
    assert_one_line_error(code, err, "no images")


def test_prompt_longer_than_context(tiny_bundle, engine, image_files, capsys):
    limit = engine.manifest.limits.max_context
    with pytest.raises(PromptTooLongError, match="exceeds the model's context"):
        engine.ground([image_files["rgb.jpg"]], "word " * limit, max_new_tokens=4)
    code, err = run_cli(["ground", "--bundle", str(tiny_bundle), "--image", str(image_files["rgb.jpg"]),
                         "--query", "q", "--max-new-tokens", str(limit)], capsys)
    assert_one_line_error(code, err, "exceeds the model's context")


def test_missing_bundle(tmp_path, image_files, capsys):
    with pytest.raises(BundleError, match="bundle not found"):
        Engine.load(tmp_path / "nowhere")
    code, err = run_cli(["ground", "--bundle", str(tmp_path / "nowhere"), "--image", str(image_files["rgb.jpg"]),
                         "--query", "q"], capsys)
    assert_one_line_error(code, err, "bundle not found")


def test_bundle_with_missing_file(bundle_copy, image_files, capsys):
    (bundle_copy / "decoder.onnx").unlink()
    with pytest.raises(BundleError, match="decoder.onnx is missing"):
        Engine.load(bundle_copy)
    code, err = run_cli(["ground", "--bundle", str(bundle_copy), "--image", str(image_files["rgb.jpg"]),
                         "--query", "q"], capsys)
    assert_one_line_error(code, err, "is missing")


def test_bundle_with_altered_file(bundle_copy, image_files, capsys):
    graph = bundle_copy / "vision.onnx"
    data = bytearray(graph.read_bytes())
    data[-10] ^= 0xFF
    graph.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="altered: vision.onnx"):
        Engine.load(bundle_copy)
    code, err = run_cli(["ground", "--bundle", str(bundle_copy), "--image", str(image_files["rgb.jpg"]),
                         "--query", "q"], capsys)
    assert_one_line_error(code, err, "does not match its sha256")


def test_bundle_with_altered_or_missing_weights(bundle_copy, image_files, capsys):
    # Every graph keeps its weights beside it (memory-mapped by onnxruntime): they are checked too.
    manifest = load_manifest(bundle_copy, verify=False)
    for graph in (manifest.vision_graph, manifest.embed_graph, manifest.decoder_graph):
        assert graph.data_path == graph.path + ".data" and graph.data_sha256
        assert (bundle_copy / graph.data_path).stat().st_size > (bundle_copy / graph.path).stat().st_size
    weights = bundle_copy / "embed.onnx.data"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one weight: without the check, silently wrong numbers
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="altered: embed.onnx.data"):
        Engine.load(bundle_copy)
    weights.unlink()
    code, err = run_cli(["ground", "--bundle", str(bundle_copy), "--image", str(image_files["rgb.jpg"]),
                         "--query", "q"], capsys)
    assert_one_line_error(code, err, "embed.onnx.data is missing")


def test_unknown_schema_version(bundle_copy, image_files, capsys):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="unknown manifest schema version 99"):
        Engine.load(bundle_copy)
    code, err = run_cli(["ground", "--bundle", str(bundle_copy), "--image", str(image_files["rgb.jpg"]),
                         "--query", "q"], capsys)
    assert_one_line_error(code, err, "schema version")


def test_inconsistent_rotary_sections(bundle_copy, image_files, capsys):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["text"]["mrope_section"] = [1, 1, 1]
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    code, err = run_cli(["ground", "--bundle", str(bundle_copy), "--image", str(image_files["rgb.jpg"]),
                         "--query", "q"], capsys)
    assert_one_line_error(code, err, "mrope_section")


def test_not_a_bundle(tmp_path, image_files, capsys):
    (tmp_path / "manifest.json").write_text("{not json")
    code, err = run_cli(["ground", "--bundle", str(tmp_path), "--image", str(image_files["rgb.jpg"]), "--query", "q"],
                        capsys)
    assert_one_line_error(code, err, "not valid JSON")


def test_bad_array_and_mode(engine):
    with pytest.raises(ImageError, match="uint8"):
        engine.ground([np.zeros((8, 8, 3), np.float32)], "q")
    with pytest.raises(InputError, match="unknown mode"):
        engine.ground([np.zeros((8, 8, 3), np.uint8)], "q", mode="fast")


def test_extreme_aspect_ratio(engine, tmp_path):
    path = tmp_path / "line.png"
    Image.new("RGB", (1000, 2)).save(path)
    with pytest.raises(ImageError, match="aspect ratio"):
        engine.ground([path], "q")


def test_export_rejects_missing_checkpoint(tmp_path, capsys):
    from gemvg.export.cli import main as export_main

    assert export_main(["--model", str(tmp_path / "nope"), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.strip().startswith("gemvg-export: error: checkpoint not found") and "Traceback" not in err


@pytest.mark.parametrize("names", [
    ["one_pixel.png"], ["rgb.jpg", "rgb.jpg"], ["gray.png"], ["palette.png"], ["rgba.png"],
    ["thin_tall.png", "thin_wide.png"],
])
def test_odd_but_valid_images(names, engine, image_files):
    result = engine.ground([image_files[n] for n in names], "the object", max_new_tokens=6)
    assert len(result.token_ids) >= 1
    assert len(result.images) == len(names)
    for box in result.boxes:
        geometry = result.images[box.image]
        assert 0 <= box.x1 <= box.x2 <= geometry.width and 0 <= box.y1 <= box.y2 <= geometry.height


def test_inputs_as_pil_and_arrays_match_paths(engine, image_files):
    path = image_files["rgb.jpg"]
    pil = Image.open(path)
    array = np.asarray(Image.open(path).convert("RGB"))
    results = [engine.ground([source], "the object", mode="raw", max_new_tokens=8) for source in (path, pil, array)]
    assert results[0].token_ids == results[1].token_ids == results[2].token_ids
