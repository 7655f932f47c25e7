"""The TensorRT path without a GPU: profiles from the manifest, provider selection and options, the
engine builder's calls (against a stand-in `tensorrt` module), and the errors when TensorRT or the
CUDA / TensorRT execution providers are missing."""

from __future__ import annotations

import dataclasses
import json
import sys
import types
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from gemvg.export import tensorrt as trt_export
from gemvg.export.cli import main as export_main
from gemvg.export.tensorrt import (ShapeRange, TensorRTError, build_engines, optimization_profiles,
                                   ort_profile_options)
from gemvg.runtime import Engine
from gemvg.runtime.engine import providers_for, tensorrt_options
from gemvg.runtime.errors import ProviderError
from gemvg.runtime.manifest import (SCHEMA_VERSION, GraphFile, Limits, Manifest, PromptTemplate, TextConfig, TokenIds, VisionConfig,
                                    load_manifest)
from gemvg.runtime.preprocess import PreprocessConfig

LAYERS = 2
VISION_INPUTS = ("pixel_values", "rotary_cos", "rotary_sin", "window_gather", "window_bias", "window_scatter")
DECODER_INPUTS = (("inputs_embeds", "cache_positions", "rotary_cos", "rotary_sin") + tuple(f"past_key_{i}" for i in range(LAYERS))
                  + tuple(f"past_value_{i}" for i in range(LAYERS)) + ("seqlens_k", "total_sequence_length"))
DECODER_OUTPUTS = (("logits",) + tuple(f"present_key_{i}" for i in range(LAYERS))
                   + tuple(f"present_value_{i}" for i in range(LAYERS)))


def make_manifest(precision: str = "int8", max_context: int = 4096, max_patches: int = 5120,
                  min_pixels: int = 3136) -> Manifest:
    return Manifest(
        schema_version=SCHEMA_VERSION, family="qwen2_5_vl", box_syntax="json_pixels", precision=precision,
        text=TextConfig(hidden_size=896, num_layers=LAYERS, num_heads=14, num_kv_heads=2, head_dim=64, vocab_size=320,
                        rope_theta=1e6, mrope_section=(8, 12, 12), max_position_embeddings=32768),
        vision=VisionConfig(hidden_size=640, out_hidden_size=896, num_heads=10, head_dim=64, rope_theta=1e4,
                            patch_size=14, spatial_merge_size=2, window_size=112, fullatt_block_indexes=(3,)),
        preprocess=PreprocessConfig(min_pixels=min_pixels, max_pixels=max_patches * 196, patch_size=14,
                                    temporal_patch_size=2, merge_size=2, image_mean=(0.5, 0.5, 0.5),
                                    image_std=(0.5, 0.5, 0.5), rescale_factor=1 / 255, max_image_pixels=10 ** 8),
        tokens=TokenIds(image_pad=1, vision_start=2, vision_end=3, eos=(4,), pad=4),
        prompt=PromptTemplate("<s>", "<img>", "</s>"),
        limits=Limits(max_context=max_context, max_images=4, max_image_pixels=10 ** 8,
                      max_patches_per_image=max_patches),
        vision_graph=GraphFile("vision.onnx", "0", VISION_INPUTS, ("image_features",), precision="int8"),
        embed_graph=GraphFile("embed.onnx", "0", ("input_ids",), ("inputs_embeds",)),
        decoder_graph=GraphFile("decoder.onnx", "0", DECODER_INPUTS, DECODER_OUTPUTS, precision=precision),
        tokenizer=GraphFile("tokenizer.json", "0"),
    )


# -- profiles ------------------------------------------------------------------------------------


def test_profiles_come_from_the_manifest_limits():
    profiles = optimization_profiles(make_manifest())
    vision = profiles["vision"][0]
    assert set(vision) == set(VISION_INPUTS)
    assert vision["pixel_values"] == ShapeRange((16, 1176), (1024, 1176), (5120, 1176))  # min_pixels/14^2 .. limit
    assert vision["rotary_cos"] == ShapeRange((16, 64), (1024, 64), (5120, 64))
    assert vision["window_scatter"] == ShapeRange((16,), (1024,), (5120,))
    # 112-pixel windows of 8x8 patches: min one window of a thin 2x8-patch image; opt a 32x32 grid of 16
    # full windows; max a 2x2560-patch image's 320 windows of 2x8 patches, and full 64-patch windows.
    assert vision["window_gather"] == ShapeRange((1, 16), (16, 64), (320, 64))
    assert vision["window_bias"] == ShapeRange((1, 1, 1, 16), (16, 1, 1, 64), (320, 1, 1, 64))
    assert profiles["embed"] == [{"input_ids": ShapeRange((1, 1), (1, 576), (1, 4096))}]  # 2 x 256 tokens + 64

    prefill, decode = profiles["decoder"]
    assert set(prefill) == set(DECODER_INPUTS) - {"seqlens_k", "total_sequence_length"}
    assert prefill["inputs_embeds"] == ShapeRange((1, 1, 896), (1, 576, 896), (1, 4096, 896))
    assert prefill["cache_positions"] == ShapeRange((1, 1), (1, 576), (1, 4096))
    assert decode["cache_positions"] == ShapeRange((1, 1), (1, 1), (1, 1))
    assert decode["inputs_embeds"] == ShapeRange((1, 1, 896), (1, 1, 896), (1, 1, 896))
    for profile in (prefill, decode):  # the shared cache buffer: [1, kv_heads, capacity, head_dim]
        assert profile["past_value_1"] == ShapeRange((1, 2, 1, 64), (1, 2, 832, 64), (1, 2, 4096, 64))
        assert profile["rotary_cos"] == ShapeRange((1, 32), (832, 32), (4096, 32))  # one row per cache slot


def test_profiles_follow_other_limits_and_reject_impossible_ones():
    small = optimization_profiles(make_manifest(max_context=300, max_patches=258, min_pixels=56 * 56 * 4))
    vision = small["vision"][0]["pixel_values"]
    assert vision == ShapeRange((64, 1176), (256, 1176), (256, 1176))  # whole merge groups, opt clamped to max
    assert small["vision"][0]["window_gather"] == ShapeRange((1, 16), (4, 64), (16, 64))  # 16x16: 4 windows
    assert small["embed"][0]["input_ids"] == ShapeRange((1, 1), (1, 192), (1, 300))
    assert small["decoder"][0]["past_key_0"].max == (1, 2, 300, 64)
    qwen2 = dataclasses.replace(make_manifest(), vision_graph=GraphFile("vision.onnx", "0", VISION_INPUTS[:3], ()))
    assert set(optimization_profiles(qwen2)["vision"][0]) == set(VISION_INPUTS[:3])
    with pytest.raises(TensorRTError, match="max_context"):
        optimization_profiles(make_manifest(max_context=1))
    with pytest.raises(TensorRTError, match="merge group"):
        optimization_profiles(make_manifest(max_patches=3))
    with pytest.raises(ValueError):
        ShapeRange((2,), (1,), (3,))


def test_window_profiles_hold_every_image_grid():
    """The window inputs' ranges hold the feeds of every grid the limits allow, and are reached."""
    import numpy as np

    from gemvg.runtime.vision import vision_feeds

    manifest = make_manifest(max_patches=1000, min_pixels=12 * 196)
    profile = optimization_profiles(manifest)["vision"][0]
    seen = set()
    for rows in range(2, 501, 2):
        for cols in range(2, 501, 2):
            if not 12 <= rows * cols <= 1000:
                continue
            feeds = vision_feeds(np.zeros((rows * cols, 1), np.float32), (1, rows, cols), manifest.vision)
            for name in ("window_gather", "window_bias", "window_scatter"):
                shape, limits = getattr(feeds, name).shape, profile[name]
                assert all(lo <= d <= hi for lo, d, hi in zip(limits.min, shape, limits.max)), (name, rows, cols)
            seen.add(feeds.window_gather.shape)
    gather = profile["window_gather"]
    assert gather.min == (1, min(length for _, length in seen))
    assert gather.max == (max(count for count, _ in seen), max(length for _, length in seen))


def test_ort_profile_strings():
    profile = {"input_ids": ShapeRange((1, 1), (1, 576), (1, 4096)), "x": ShapeRange((2,), (3,), (4,))}
    assert ort_profile_options(profile) == {"min": "input_ids:1x1,x:2", "opt": "input_ids:1x576,x:3",
                                            "max": "input_ids:1x4096,x:4"}


# -- providers and their options -----------------------------------------------------------------


def test_missing_execution_providers_are_clear_errors(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    for device, needed in (("cuda", "CUDAExecutionProvider"), ("tensorrt", "TensorrtExecutionProvider")):
        with pytest.raises(ProviderError, match=needed):
            providers_for(device)
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CPUExecutionProvider"])  # no CUDA EP
    assert providers_for("tensorrt") == ["TensorrtExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(ProviderError, match="CUDAExecutionProvider"):
        providers_for("cuda")
    assert providers_for("cpu") == ["CPUExecutionProvider"]


def test_tensorrt_options_per_graph(tmp_path):
    manifest = make_manifest()
    vision = tensorrt_options(tmp_path, manifest, "vision")
    assert vision["trt_engine_cache_enable"] == "True" and vision["trt_int8_enable"] == "True"
    assert vision["trt_engine_cache_path"] == str(tmp_path / "trt_cache") == vision["trt_timing_cache_path"]
    assert "trt_int8_enable" not in tensorrt_options(tmp_path, manifest, "embed")  # an fp32 graph
    assert "trt_profile_min_shapes" not in vision  # no profile recorded: the EP chooses

    profiles = {"vision": {"min": "pixel_values:16x1176", "opt": "pixel_values:1024x1176",
                           "max": "pixel_values:5120x1176"}}
    recorded = dataclasses.replace(manifest, extra={"tensorrt": {"ort_profiles": profiles}})
    vision = tensorrt_options(tmp_path, recorded, "vision")
    assert vision["trt_profile_opt_shapes"] == "pixel_values:1024x1176"
    assert "trt_profile_min_shapes" not in tensorrt_options(tmp_path, recorded, "decoder")


def write_fake_bundle(folder: Path, manifest: Manifest) -> Path:
    """A manifest, a tokenizer and placeholder graphs: enough for Engine.load(verify=False) with fake sessions."""
    from gemvg.export.checkpoints import build_tokenizer

    folder.mkdir(exist_ok=True)
    manifest.write(folder)
    build_tokenizer().save(str(folder / "tokenizer.json"))
    return folder


def test_engine_load_passes_tensorrt_options_to_each_session(tmp_path, monkeypatch):
    bundle = write_fake_bundle(tmp_path / "bundle", make_manifest(precision="int4"))
    created = []

    class FakeSession:
        def __init__(self, path, options, providers):
            created.append((Path(path).name, providers))

        def get_inputs(self):
            return []

        def io_binding(self):
            return None

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["TensorrtExecutionProvider",
                                                                 "CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", FakeSession)
    Engine.load(bundle, device="tensorrt", verify=False)
    assert [name for name, _ in created] == ["vision.onnx", "embed.onnx", "decoder.onnx"]
    assert (bundle / "trt_cache").is_dir()
    for name, providers in created:
        (trt_name, options), *rest = providers
        assert trt_name == "TensorrtExecutionProvider" and rest == ["CUDAExecutionProvider", "CPUExecutionProvider"]
        assert options["trt_engine_cache_path"] == str(bundle / "trt_cache")
        assert ("trt_int8_enable" in options) == (name == "vision.onnx")  # int4 decoder: no INT8 mode

    created.clear()
    Engine.load(bundle, device="cuda", verify=False)
    assert all(providers == ["CUDAExecutionProvider", "CPUExecutionProvider"] for _, providers in created)


def test_engine_load_without_the_providers_fails_clearly(tmp_path):
    bundle = write_fake_bundle(tmp_path / "bundle", make_manifest())
    available = ort.get_available_providers()
    for device, provider in (("cuda", "CUDAExecutionProvider"), ("tensorrt", "TensorrtExecutionProvider")):
        if provider in available:
            continue  # this onnxruntime has it; the monkeypatched test above covers the error
        with pytest.raises(ProviderError, match=f"device '{device}' needs onnxruntime's {provider}"):
            Engine.load(bundle, device=device, verify=False)
    assert "CPUExecutionProvider" in available


# -- the engine builder against a stand-in tensorrt module -------------------------------------


class FakeTensorRT(types.ModuleType):
    """The slice of TensorRT's Python API that build_engines uses, recording every call."""

    def __init__(self):
        super().__init__("tensorrt")
        self.__version__ = "10.99-fake"
        self.calls = []
        fake = self

        class Logger:
            WARNING = "warning"

            def __init__(self, level):
                fake.calls.append(("logger", level))

        class Profile:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, name, low, opt, high):
                self.shapes[name] = (tuple(low), tuple(opt), tuple(high))

        class Cache:
            def __init__(self, data):
                self.data = data

            def serialize(self):
                return b"timing:" + self.data[-8:]

        class Config:
            def __init__(self):
                self.profiles, self.cache = [], None

            def create_timing_cache(self, data):
                fake.calls.append(("timing_cache_in", bytes(data)))
                return Cache(bytes(data))

            def set_timing_cache(self, cache, ignore_mismatch):
                self.cache = cache

            def get_timing_cache(self):
                return self.cache

            def set_memory_pool_limit(self, pool, size):
                fake.calls.append(("workspace", size))

            def add_optimization_profile(self, profile):
                self.profiles.append(profile.shapes)

        class Network:
            def __init__(self, flags):
                self.flags = flags

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                fake.calls.append(("network", flags))
                return Network(flags)

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                fake.calls.append(("build", network.flags, config.profiles))
                return b"ENGINE"

        class OnnxParser:
            num_errors = 0

            def __init__(self, network, logger):
                pass

            def parse_from_file(self, path):
                fake.calls.append(("parse", Path(path).name))
                return True

        self.Logger, self.Builder, self.OnnxParser = Logger, Builder, OnnxParser
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=3)
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")


def tiny_graph(path: Path, op_type: str, domain: str = "") -> None:
    node = helper.make_node(op_type, ["x"], ["y"], domain=domain)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))


def test_build_engines_calls_the_tensorrt_api_with_the_manifest_profiles(tmp_path, monkeypatch):
    fake = FakeTensorRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    manifest = make_manifest()
    bundle = write_fake_bundle(tmp_path / "bundle", manifest)
    tiny_graph(bundle / "vision.onnx", "Relu")
    tiny_graph(bundle / "embed.onnx", "Identity")
    tiny_graph(bundle / "decoder.onnx", "GroupQueryAttention", "com.microsoft")
    messages = []
    updated = build_engines(bundle, manifest, messages.append, workspace_bytes=1 << 30)

    profiles = optimization_profiles(manifest)
    builds = [call for call in fake.calls if call[0] == "build"]
    assert [call[1] for call in builds] == [1 << 3, 1 << 3]  # strongly typed networks, vision and embed only
    expected = [{name: (s.min, s.opt, s.max) for name, s in profiles[graph][0].items()}
                for graph in ("vision", "embed")]
    assert [call[2] for call in builds] == [[expected[0]], [expected[1]]]
    assert [call[1] for call in fake.calls if call[0] == "parse"] == ["vision.onnx", "embed.onnx"]
    assert ("workspace", 1 << 30) in fake.calls
    # One timing cache: empty for the first build, then what the previous build left.
    caches = [call[1] for call in fake.calls if call[0] == "timing_cache_in"]
    assert caches[0] == b"" and caches[1].startswith(b"timing:")
    assert (bundle / "tensorrt" / "vision.engine").read_bytes() == b"ENGINE"

    record = updated.extra["tensorrt"]
    assert set(record["engines"]) == {"vision", "embed"} and "GroupQueryAttention" in record["skipped"]["decoder"]
    assert record["ort_profiles"]["vision"]["max"].startswith("pixel_values:5120x1176")
    assert load_manifest(bundle, verify=False).extra["tensorrt"] == json.loads(json.dumps(record))
    assert any("no decoder engine" in message for message in messages)


# -- gemvg-export --target tensorrt: one line, before any work -----------------------------------


def test_export_target_tensorrt_without_tensorrt_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    out = tmp_path / "bundle"
    code = export_main(["--model", str(tmp_path / "no-checkpoint"), "--out", str(out), "--target", "tensorrt"])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith("gemvg-export: error: --target tensorrt needs the TensorRT Python package")
    assert not out.exists()  # refused before exporting anything

    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT())
    code = export_main(["--model", str(tmp_path), "--out", str(out), "--precision", "int4", "--target", "tensorrt"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "MatMulNBits" in err
    assert trt_export.TENSORRT_PRECISIONS == ("fp32", "int8")
