"""The streaming export: checkpoints read one tensor at a time, weights quantized as they are written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from gemvg.export.cli import main as export_main
from gemvg.export.safetensors_io import (DTYPES, CheckpointError, CheckpointTensors, canonical_name, read_header,
                                         write_sharded)
from gemvg.runtime.cli import main as gemvg

from gemvg.export.reference import Reference


def test_safetensors_round_trip_in_every_stored_type(tmp_path):
    import torch

    rng = np.random.default_rng(0)
    values = {"model.layers.0.mlp.down_proj.weight": rng.standard_normal((5, 7), dtype=np.float32),
              "visual.blocks.0.norm1.bias": rng.standard_normal(9, dtype=np.float32),
              "lm_head.weight": rng.standard_normal((3, 4), dtype=np.float32)}
    for dtype, reference in (("BF16", torch.bfloat16), ("F16", torch.float16), ("F32", torch.float32)):
        folder = tmp_path / dtype
        folder.mkdir()
        paths = write_sharded(folder, {k: v.shape for k, v in values.items()}, lambda name, shape: values[name],
                              dtype=dtype, shard_bytes=16)  # one tensor per shard: the index is exercised
        assert len(paths) == 3 and (folder / "model.safetensors.index.json").is_file()
        tensors = CheckpointTensors(folder)
        assert sorted(tensors.names()) == ["lm_head.weight", "text.layers.0.mlp.down_proj.weight",
                                           "visual.blocks.0.norm1.bias"]
        for stored, value in values.items():
            expected = torch.from_numpy(value).to(reference).float().numpy()  # torch's rounding
            np.testing.assert_array_equal(tensors.get(canonical_name(stored)), expected)
        # Row blocks of any size reassemble the tensor.
        blocks = [block for _, block in tensors.row_chunks("text.layers.0.mlp.down_proj.weight", chunk_bytes=3 * 7 * DTYPES[dtype])]
        assert len(blocks) == 2
        np.testing.assert_array_equal(np.concatenate(blocks), tensors.get("text.layers.0.mlp.down_proj.weight"))


def test_both_tensor_namings_read_the_same():
    assert canonical_name("model.language_model.layers.3.self_attn.q_proj.weight") == \
        canonical_name("model.layers.3.self_attn.q_proj.weight") == "text.layers.3.self_attn.q_proj.weight"
    assert canonical_name("model.visual.merger.mlp.0.weight") == canonical_name("visual.merger.mlp.0.weight")
    assert canonical_name("lm_head.weight") == "lm_head.weight"


def test_truncated_and_foreign_files_are_one_line_errors(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    write_sharded(folder, {"model.norm.weight": (64,)}, lambda name, shape: np.ones(shape, np.float32), dtype="F32")
    shard = next(folder.glob("model-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        CheckpointTensors(folder)
    shard.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="header"):
        read_header(shard)
    shard.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        CheckpointTensors(folder)


@pytest.fixture(scope="module")
def hub_layout_checkpoint(tiny_checkpoints, tmp_path_factory) -> Path:
    """The tiny Qwen2-VL checkpoint as real ones are published: bf16, several shards, hub tensor names."""
    from safetensors.numpy import load_file

    from gemvg.export.checkpoints import hub_name
    from gemvg.runtime.families import family

    source = tiny_checkpoints["qwen2_vl"]
    out = tmp_path_factory.mktemp("hub") / "qwen2_vl_bf16"
    shutil.copytree(source, out, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    state = load_file(str(source / "model.safetensors"))
    values = {hub_name(name, family("qwen2_vl")): value for name, value in state.items()}
    write_sharded(out, {name: value.shape for name, value in values.items()}, lambda name, shape: values[name],
                  dtype="BF16", shard_bytes=200_000)
    assert len(list(out.glob("model-*.safetensors"))) > 1
    return out


def test_bf16_sharded_hub_checkpoint_exports_and_matches_transformers(hub_layout_checkpoint, image_files,
                                                                      tmp_path, capsys):
    bundle = tmp_path / "bundle"
    assert export_main(["--model", str(hub_layout_checkpoint), "--out", str(bundle)]) == 0
    capsys.readouterr()
    manifest = json.loads((bundle / "manifest.json").read_text())
    check = manifest["extra"]["verification"]
    assert check["embed_exact"] and check["max_abs_logit_diff"] < 1e-3 and check["vision_diff"] < 1e-3
    paths = [image_files["gray.png"], image_files["wide.jpg"]]
    argv = ["ground", "--bundle", str(bundle), "--query", "the cup", "--mode", "raw", "--json",
            "--max-new-tokens", "16"] + [arg for path in paths for arg in ("--image", str(path))]
    assert gemvg(argv) == 0
    ours = json.loads(capsys.readouterr().out)["token_ids"]
    reference = Reference(hub_layout_checkpoint)
    assert ours == reference.generate(reference.inputs(paths, "the cup"), 16) and len(set(ours)) > 1


@pytest.mark.parametrize("precision, bits", [("int4", 4), ("int8w", 8)])
def test_streamed_weight_only_decoder_equals_quantizing_the_fp32_one(precision, bits, tiny_checkpoints, tiny_bundles,
                                                                     tmp_path, capsys):
    """Quantizing while streaming gives the bytes MatMulNBitsQuantizer gives on the fp32 decoder."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    bundle = tmp_path / precision
    assert export_main(["--model", str(tiny_checkpoints["qwen2_5_vl"]), "--out", str(bundle), "--precision",
                        precision]) == 0
    assert "does not match" not in capsys.readouterr().err
    fp32 = tiny_bundles["qwen2_5_vl"] / "decoder.onnx"
    quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32)), bits=bits, block_size=32, is_symmetric=True,
                                     accuracy_level=4, op_types_to_quantize=("MatMul",))
    quantizer.process()
    reference = {init.name: numpy_helper.to_array(init) for init in quantizer.model.model.graph.initializer}
    streamed = onnx.load(str(bundle / "decoder.onnx"))
    quantized = [init for init in streamed.graph.initializer if init.name.endswith((f"_Q{bits}", "_scales"))]
    assert len(quantized) == 2 * 4 * 2 + 2  # qkv, o, gate_up, down per layer (2 layers) + the lm_head
    for init in quantized:
        np.testing.assert_array_equal(numpy_helper.to_array(init, base_dir=str(bundle)), reference[init.name])
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["precision"] == precision
    assert manifest["extra"]["verification"]["decode_cosine"] > 0.8


def test_the_check_against_pytorch_fails_on_a_damaged_decoder(tiny_checkpoints, tmp_path):
    """The part-by-part check reads the bundle's own bytes: a damaged weight is caught."""
    from gemvg.export import decoder_builder
    from gemvg.export.exporter import ExportError, ExportOptions, export_bundle

    original = decoder_builder.WeightFile.transposed

    def damaged(self, name, *args, **kwargs):
        tensor = original(self, name, *args, **kwargs)
        if name == "l0_o_weight":  # flip the first output row's weights of layer 0's attention output
            self.handle.flush()
            with open(self.path, "r+b") as handle:
                offset = int(next(e.value for e in tensor.external_data if e.key == "offset"))
                handle.seek(offset)
                handle.write(b"\x00\x00\x80\x7f" * 8)  # +inf
        return tensor

    decoder_builder.WeightFile.transposed = damaged
    try:
        with pytest.raises(ExportError, match="does not match PyTorch"):
            export_bundle(tiny_checkpoints["qwen2_vl"], tmp_path / "bundle", ExportOptions(),
                          progress=lambda message: None)
    finally:
        decoder_builder.WeightFile.transposed = original


def test_a_model_id_resolves_from_the_local_cache_only(tiny_checkpoints, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    from gemvg.export.exporter import resolve_checkpoint

    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--tiny-vl" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_checkpoints["qwen2_vl"], snapshot)
    (cache / "models--acme--tiny-vl" / "refs").mkdir()
    (cache / "models--acme--tiny-vl" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert resolve_checkpoint("acme/tiny-vl") == snapshot
    assert export_main(["--model", "acme/absent-vl", "--out", str(tmp_path / "b")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "acme/absent-vl" in error and "cache" in error


def test_vision_tower_weight_only_8bit(tiny_checkpoints, image_files, tmp_path, capsys):
    """--vision-precision int8w: the tower's linear layers become 8-bit MatMulNBits, checked against
    PyTorch by cosine, and the bundle grounds."""
    bundle = tmp_path / "bundle"
    assert export_main(["--model", str(tiny_checkpoints["qwen2_5_vl"]), "--out", str(bundle), "--precision", "int4",
                        "--vision-precision", "int8w"]) == 0
    capsys.readouterr()
    vision = onnx.load(str(bundle / "vision.onnx"), load_external_data=False)
    ops = [node.op_type for node in vision.graph.node]
    assert ops.count("MatMulNBits") >= 4 * 2 and "Gemm" not in ops  # qkv, proj, fc1, fc2 per block (+ merger)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["vision_graph"]["precision"] == "int8w"
    assert manifest["extra"]["verification"]["vision_cosine"] > 0.999
    assert gemvg(["ground", "--bundle", str(bundle), "--image", str(image_files["rgb.jpg"]), "--query", "the cup",
                  "--json", "--max-new-tokens", "4"]) == 0


def test_real_shape_presets_are_written_like_published_checkpoints(tmp_path, monkeypatch):
    """Real-shape presets go through the meta-device writer: bf16 shards, hub names, HF's init values;
    transformers loads the result with nothing missing. (Tiny dims here; the real ones are in the bench.)"""
    from dataclasses import replace

    import torch
    import transformers

    from gemvg.export import checkpoints

    monkeypatch.setitem(checkpoints.PRESETS, "tiny-real", replace(checkpoints.PRESETS["tiny"], real_shape=True,
                                                                  family="qwen2_5_vl"))
    out = checkpoints.make_checkpoint(tmp_path / "ckpt", preset="tiny-real")
    header = read_header(next(out.glob("model-*.safetensors")))
    assert {entry.dtype for entry in header.values()} == {"BF16"}
    assert any(name.startswith("visual.") for name in header) and any(name.startswith("model.layers.") for name in header)
    model, info = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        str(out), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.all(model.model.language_model.norm.weight == 1)
    assert torch.all(model.model.language_model.layers[0].self_attn.q_proj.bias == 0)
    assert 0.05 < float(model.model.language_model.layers[0].mlp.up_proj.weight.detach().std()) < 0.15  # init 0.1


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_real_shape_writer_names_tensors_as_published_so_transformers_loads_every_one(family, tmp_path, monkeypatch):
    """Random checkpoints of real shapes are written tensor by tensor under the names the family's published
    checkpoints use; transformers must find every weight (a name it does not map back would leave that
    weight randomly initialised, and the transformers baseline would be another model)."""
    import dataclasses

    from gemvg.export.checkpoints import PRESETS, make_checkpoint
    from gemvg.export.reference import load_model

    monkeypatch.setitem(PRESETS, "tiny-sharded", dataclasses.replace(PRESETS["tiny"], real_shape=True))
    checkpoint = make_checkpoint(tmp_path / "ckpt", family=family, preset="tiny-sharded", seed=2)
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    published = {"qwen3_vl": "model.language_model.layers.0."}.get(family, "model.layers.0.")
    assert any(name.startswith(published) for name in index)
    model = load_model(checkpoint)
    parameters = dict(model.named_parameters())
    tensors = CheckpointTensors(checkpoint)
    for ours, theirs in (("text.layers.0.mlp.down_proj.weight", "model.language_model.layers.0.mlp.down_proj.weight"),
                         ("text.norm.weight", "model.language_model.norm.weight"),
                         ("visual.blocks.0.attn.qkv.weight", "model.visual.blocks.0.attn.qkv.weight")):
        np.testing.assert_array_equal(parameters[theirs].detach().numpy(), tensors.get(ours))
