"""Hostile bundles: a manifest or graph that would make the engine read files outside the bundle folder,
or that carries out-of-range numbers, is refused at load with one line (BundleError; exit 2 from the CLI).

Checksums match in every case below (the attacker controls the manifest), so only the path and field
checks stand between such a bundle and the files the process can read.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import onnx
import pytest

from gemvg.runtime import BundleError, Engine, load_manifest
from gemvg.runtime.cli import main as gemvg
from gemvg.runtime.manifest import sha256_of
from gemvg.runtime.onnx_external import external_data_locations


def edit_manifest(bundle: Path, edit) -> None:
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def rehash(bundle: Path, graph: str = "vision_graph") -> None:
    """Record the current sha256 of a graph and its data file, as a hostile manifest would."""
    def edit(data):
        entry = data[graph]
        for name, digest in (("path", "sha256"), ("data_path", "data_sha256")):
            if entry.get(name):
                target = Path(entry[name]) if os.path.isabs(entry[name]) else bundle / entry[name]
                entry[digest] = sha256_of(target)
    edit_manifest(bundle, edit)


def set_locations(model_path: Path, location: str) -> None:
    """Point every external tensor of an ONNX file at `location` (weights not loaded)."""
    model = onnx.load(str(model_path), load_external_data=False)
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    model_path.write_bytes(model.SerializeToString())


def refused(bundle: Path, needle: str, capsys, image: Path) -> None:
    with pytest.raises(BundleError, match=needle):
        load_manifest(bundle)
    with pytest.raises(BundleError, match=needle):
        Engine.load(bundle, verify=False)  # the path and field checks do not depend on checksums
    code = gemvg(["ground", "--bundle", str(bundle), "--image", str(image), "--query", "q"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and needle.split("|")[0].split("(")[0] in err, err


def outside_copy(bundle: Path, name: str) -> Path:
    folder = bundle.parent / "outside"
    folder.mkdir(exist_ok=True)
    return Path(shutil.copy(bundle / name, folder / name))


@pytest.fixture
def image(image_files):
    return image_files["rgb.jpg"]


def test_graph_by_absolute_path(bundle_copy, capsys, image):
    copy = outside_copy(bundle_copy, "vision.onnx")
    edit_manifest(bundle_copy, lambda data: data["vision_graph"].update(path=str(copy)))
    rehash(bundle_copy)
    refused(bundle_copy, "outside the bundle folder", capsys, image)


def test_graph_by_dotdot(bundle_copy, capsys, image):
    outside_copy(bundle_copy, "vision.onnx")
    edit_manifest(bundle_copy, lambda data: data["vision_graph"].update(path="../outside/vision.onnx"))
    refused(bundle_copy, "outside the bundle folder", capsys, image)


def test_graph_through_a_symlink_out(bundle_copy, capsys, image):
    copy = outside_copy(bundle_copy, "vision.onnx")
    (bundle_copy / "vision.onnx").unlink()
    (bundle_copy / "vision.onnx").symlink_to(copy)
    refused(bundle_copy, "symlink leading out", capsys, image)


def test_weights_file_by_absolute_path_and_symlink(bundle_copy, capsys, image):
    copy = outside_copy(bundle_copy, "decoder.onnx.data")
    edit_manifest(bundle_copy, lambda data: data["decoder_graph"].update(data_path=str(copy)))
    refused(bundle_copy, "outside the bundle folder", capsys, image)
    edit_manifest(bundle_copy, lambda data: data["decoder_graph"].update(data_path="decoder.onnx.data"))
    (bundle_copy / "decoder.onnx.data").unlink()
    (bundle_copy / "decoder.onnx.data").symlink_to(copy)
    refused(bundle_copy, "symlink leading out", capsys, image)


def test_a_symlink_inside_the_bundle_is_fine(bundle_copy, image):
    (bundle_copy / "graphs").mkdir()
    shutil.move(bundle_copy / "embed.onnx", bundle_copy / "graphs" / "embed.onnx")
    (bundle_copy / "embed.onnx").symlink_to(Path("graphs") / "embed.onnx")
    assert Engine.load(bundle_copy).ground([image], "q", max_new_tokens=2).token_ids


@pytest.mark.parametrize("location, needle", [
    ("../outside/vision.onnx.data", "outside the bundle folder"),
    ("/etc/hostname", "outside the bundle folder"),
    ("stray.data", "not a data file the manifest names"),
    ("manifest.json", "not a data file the manifest names"),
])
def test_external_data_location_must_be_a_checksummed_file_inside(bundle_copy, capsys, image, location, needle):
    assert set(external_data_locations(bundle_copy / "vision.onnx")) == {"vision.onnx.data"}
    outside_copy(bundle_copy, "vision.onnx.data")
    shutil.copy(bundle_copy / "vision.onnx.data", bundle_copy / "stray.data")
    set_locations(bundle_copy / "vision.onnx", location)
    assert set(external_data_locations(bundle_copy / "vision.onnx")) == {location}  # the walk reads what onnx wrote
    rehash(bundle_copy)
    refused(bundle_copy, needle, capsys, image)


def test_checksums_come_before_any_graph_is_parsed(bundle_copy, capsys, image):
    (bundle_copy / "decoder.onnx").write_bytes(b"\xff" * 64)  # not a protobuf
    with pytest.raises(BundleError, match="altered"):
        load_manifest(bundle_copy)
    rehash(bundle_copy, "decoder_graph")  # the checksum now matches: the graph itself is refused, in one line
    refused(bundle_copy, "decoder.onnx is not an ONNX model|onnxruntime cannot open decoder.onnx", capsys, image)


BAD_FIELDS = [
    ("text", "num_layers", -1), ("text", "num_layers", 10 ** 9), ("text", "hidden_size", 0),
    ("text", "head_dim", "16"), ("text", "vocab_size", True), ("text", "num_kv_heads", 3),
    ("text", "rope_theta", math.nan), ("text", "rope_theta", -1.0), ("text", "mrope_section", [2, 3]),
    ("vision", "spatial_merge_size", 0), ("vision", "patch_size", 10 ** 7), ("vision", "fullatt_block_indexes", [-1]),
    ("vision", "num_position_embeddings", -4), ("vision", "deepstack_layers", [0, "x"]),
    ("vision", "deepstack_layers", list(range(9))), ("text", "mrope_interleaved", "yes"),
    ("preprocess", "max_pixels", 10 ** 20), ("preprocess", "image_std", [0, 0, 0]),
    ("preprocess", "image_mean", [0.5, "x", 0.5]), ("preprocess", "min_pixels", 10 ** 9),
    ("tokens", "image_pad", 10 ** 6), ("tokens", "eos", []), ("tokens", "eos", [-1]), ("tokens", "pad", None),
    ("limits", "max_context", 0), ("limits", "max_images", 10 ** 7), ("limits", "max_patches_per_image", -5),
    ("limits", "max_image_pixels", 1.5),
]


@pytest.mark.parametrize("section, name, value", BAD_FIELDS)
def test_out_of_range_fields_are_refused(bundle_copy, section, name, value):
    edit_manifest(bundle_copy, lambda data: data[section].__setitem__(name, value))
    with pytest.raises(BundleError) as error:
        load_manifest(bundle_copy, verify=False)
    assert "\n" not in str(error.value) and (name in str(error.value) or section in str(error.value))


@pytest.mark.parametrize("where, value, needle", [
    ("family", "llama", "unknown model family"),
    ("box_syntax", "xml", "unknown box syntax"),
    ("precision", "fp8", "unknown precision"),
    ("decoder_graph.precision", "int3", "unknown decoder.onnx precision"),
])
def test_unknown_names_are_refused_in_one_line(bundle_copy, capsys, image, where, value, needle):
    def edit(data):
        *parents, leaf = where.split(".")
        target = data
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    edit_manifest(bundle_copy, edit)
    refused(bundle_copy, needle, capsys, image)
