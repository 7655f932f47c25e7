"""Quantized bundles: static INT8 (calibrated Q/DQ), weight-only INT4/INT8, their report, and the runtime.

A linear-heavy random checkpoint (hidden 256, intermediate 1024, 4 layers, vocab 320) makes the size
ratios meaningful; tiny checkpoints of both families go through `gemvg-export` and `gemvg ground`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from gemvg.export.calibration import (CalibrationError, FeedReader, PipelineFeeds, read_calibration,
                                      split_samples)
from gemvg.export.cli import main as export_main
from gemvg.export.quantize import Evaluator, Mixer, node_groups, static_int8
from gemvg.runtime import Engine
from gemvg.runtime.cli import main as gemvg
from gemvg.runtime.manifest import load_manifest, sha256_of
from gemvg.runtime.rotary import MRopeAngles
from gemvg.runtime.vision import vision_feeds

QUERY = "the small red object"
REQUESTS = 10  # 8 calibrate, the last 2 are held back for the report


def quiet(message: str) -> None:
    pass


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory) -> Path:
    """CALIB.jsonl with relative and absolute image paths and fields the reader must ignore."""
    root = tmp_path_factory.mktemp("calib")
    (root / "images").mkdir()
    rng = np.random.default_rng(5)
    lines = []
    for index in range(REQUESTS):
        paths = []
        for part in range(2):
            width, height = (int(v) for v in rng.integers(60, 200, 2))
            small = rng.integers(0, 256, (height // 8 + 2, width // 8 + 2, 3), dtype=np.uint8)
            path = root / "images" / f"{index}_{part}.png"
            Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC).save(path)
            paths.append(str(path) if index == 0 and part == 1 else f"images/{path.name}")
        lines.append(json.dumps({"images": paths, "query": f"object number {index}", "answer": [1, 2, 3, 4]}))
    path = root / "calib.jsonl"
    path.write_text("\n".join(lines[:3]) + "\n\n" + "\n".join(lines[3:]) + "\n")
    return path


@pytest.fixture(scope="module")
def linear_heavy(tmp_path_factory, calib_file) -> dict[str, Path]:
    """fp32, int8, int4 and int8w bundles of a checkpoint whose linear layers dominate its bytes."""
    from gemvg.export.checkpoints import make_checkpoint
    from gemvg.export.exporter import ExportOptions, export_bundle
    from gemvg.export.quantize import MEASURED_UPGRADE_BUDGET

    root = tmp_path_factory.mktemp("linear_heavy")
    checkpoint = make_checkpoint(root / "checkpoint", family="qwen2_5_vl", preset="linear-heavy", seed=3)
    # A context of 1024 keeps the decoder's rotary tables (rows x head_dim x 4 bytes) small beside its linears.
    export_bundle(checkpoint, root / "fp32", ExportOptions(verify=False, max_context=1024), progress=quiet)
    bundles = {"fp32": root / "fp32"}
    for precision in ("int8", "int4", "int8w"):
        argv = ["--fp32-bundle", str(root / "fp32"), "--out", str(root / precision), "--precision", precision]
        if precision != "int8":  # the measured mixed-precision pass (by default every MatMul gets the bits)
            argv += ["--upgrade-budget", str(MEASURED_UPGRADE_BUDGET)]
        if precision != "int8w":  # int8w measures on generated requests
            argv += ["--calibration", str(calib_file)]
        assert export_main(argv) == 0
        bundles[precision] = root / precision
    return bundles


def bundle_bytes(bundle: Path) -> int:
    manifest = load_manifest(bundle)
    return sum((bundle / name).stat().st_size for entry in manifest.files()
               for name in (entry.path, entry.data_path) if name)


def last_logits(engine: Engine, images, query: str) -> np.ndarray:
    inputs = engine.prepare(images, query)
    cache = engine.new_cache(len(inputs.prompt.input_ids))
    return engine.prefill(inputs.prompt, engine.encode_images(inputs.images), cache).copy()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


# -- the linear-heavy model: sizes and accuracy --------------------------------------------------


@pytest.mark.parametrize("precision, max_ratio, min_cosine", [("int8", 0.35, 0.98), ("int4", 0.25, 0.95)])
def test_size_and_logits_cosine_on_held_back_requests(linear_heavy, calib_file, precision, max_ratio, min_cosine):
    bundle = linear_heavy[precision]
    ratio = bundle_bytes(bundle) / bundle_bytes(linear_heavy["fp32"])
    assert ratio <= max_ratio

    # Held-back requests: the file's last ones, which calibration did not see.
    _, held_back = split_samples(read_calibration(calib_file))
    record = load_manifest(bundle).extra["quantization"]
    if precision == "int8":
        assert not {s.origin for s in held_back} & set(record["calibration"]["requests"])
        assert len(record["calibration"]["requests"]) == REQUESTS - len(held_back)
    reference, quantized = Engine.load(linear_heavy["fp32"]), Engine.load(bundle)
    cosines = [cosine(last_logits(quantized, list(s.images), s.query), last_logits(reference, list(s.images), s.query))
               for s in held_back]
    assert len(cosines) == 2 and min(cosines) >= min_cosine

    report = json.loads((bundle / "quantization_report.json").read_text())
    assert report["held_back_requests"] == [s.origin for s in held_back]
    assert report["end_to_end"]["logits_cosine_min"] == pytest.approx(min(cosines), abs=1e-4)
    assert report["sizes"]["ratio"] == pytest.approx(ratio, abs=1e-3)


def test_report_is_complete_and_listed_in_the_manifest(linear_heavy, capsys):
    for precision in ("int8", "int4", "int8w"):
        bundle = linear_heavy[precision]
        manifest = load_manifest(bundle)
        entry = manifest.extra["quantization"]["report"]
        assert sha256_of(bundle / entry["path"]) == entry["sha256"]
        report = json.loads((bundle / entry["path"]).read_text())
        for component in ("vision", "decoder", "end_to_end"):
            assert report[component]
        assert 0.0 <= report["end_to_end"]["greedy_agreement"] <= 1.0
        assert report["decoder"]["token_agreement"] >= 0.5
        assert set(report["sizes"]["files"]) == {"vision", "embed", "decoder", "tokenizer"}
        row = report["per_request"][0]
        assert len(row["fp32_tokens"]) == len(row["tokens"]) == report["new_tokens"]
    vision = json.loads((linear_heavy["int8"] / "quantization_report.json").read_text())["vision"]
    assert 0.99 <= vision["cosine_min"] < 1.0  # int8 vision, measured
    vision = json.loads((linear_heavy["int4"] / "quantization_report.json").read_text())["vision"]
    assert vision["cosine_min"] == 1.0 and vision["max_abs_diff"] == 0.0  # fp32 vision with an int4 decoder


# -- what the graphs hold ------------------------------------------------------------------------


def test_one_bundle_format_for_every_precision(linear_heavy):
    reference = load_manifest(linear_heavy["fp32"])
    for precision in ("int8", "int4", "int8w"):
        manifest = load_manifest(linear_heavy[precision])
        assert manifest.precision == precision and manifest.schema_version == reference.schema_version
        for name in ("vision_graph", "embed_graph", "decoder_graph", "tokenizer"):
            ours, theirs = getattr(manifest, name), getattr(reference, name)
            assert (ours.path, ours.inputs, ours.outputs) == (theirs.path, theirs.inputs, theirs.outputs)
        for name, graph in (("vision", manifest.vision_graph), ("decoder", manifest.decoder_graph)):
            model = onnx.load(str(linear_heavy[precision] / graph.path), load_external_data=False)
            assert [i.name for i in model.graph.input] == list(getattr(reference, f"{name}_graph").inputs)
    assert load_manifest(linear_heavy["int4"]).vision_graph.precision == "fp32"
    assert load_manifest(linear_heavy["int8"]).decoder_graph.precision == "int8"


def test_int8_graphs_are_symmetric_qdq_with_measured_float_groups(linear_heavy):
    bundle = linear_heavy["int8"]
    record = load_manifest(bundle).extra["quantization"]
    for component, graph in (("vision", "vision.onnx"), ("decoder", "decoder.onnx")):
        model = onnx.load(str(bundle / graph))
        inits = {init.name: onnx.numpy_helper.to_array(init) for init in model.graph.initializer}
        producers = {out: node for node in model.graph.node for out in node.output}
        quantizers = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
        assert quantizers
        for node in quantizers:  # activations: int8, zero point 0 (TensorRT's explicit quantization)
            zero_point = inits[node.input[2]]
            assert zero_point.dtype == np.int8 and not zero_point.any()
        entry = record[component]
        groups = node_groups(onnx.load(str(linear_heavy["fp32"] / graph)), component)
        if entry["all_quantized"]["cosine"] < entry["target_cosine"]:  # every group was measured
            assert {e["group"] for e in entry["sensitivity"]} == set(groups)
        else:  # the fully quantized graph met the target: nothing to measure, nothing float
            assert entry["sensitivity"] == [] and entry["float_nodes"] == []
        assert entry["final"]["cosine"] >= entry["target_cosine"]
        float_nodes = set(entry["float_nodes"])
        for node in model.graph.node:
            if node.name in {n for names in groups.values() for n in names}:
                dequantized = [i in producers and producers[i].op_type == "DequantizeLinear" for i in node.input[:2]]
                assert (not any(dequantized)) if node.name in float_nodes else all(dequantized), node.name
    # Weights stay int8 per output channel: one scale per column of a [K, N] MatMul weight.
    model = onnx.load(str(bundle / "decoder.onnx"))
    inits = {init.name: init for init in model.graph.initializer}
    weight_dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                  and inits[n.input[0]].data_type == onnx.TensorProto.INT8]
    assert weight_dqs and all(len(inits[n.input[1]].dims) == 1 and inits[n.input[1]].dims[0] > 1 for n in weight_dqs)


def test_weight_only_uses_matmulnbits_with_the_lm_head(linear_heavy):
    for precision, bits in (("int4", 4), ("int8w", 8)):
        model = onnx.load(str(linear_heavy[precision] / "decoder.onnx"))
        nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
        attributes = [{a.name: a.i for a in n.attribute} for n in nbits]
        assert nbits and all(a["block_size"] == 32 and a["accuracy_level"] == 4 for a in attributes)
        assert [n for n in model.graph.node if n.op_type == "MatMul"] == []
        logits = next(n for n in model.graph.node if "logits" in n.output)
        assert logits.op_type == "MatMulNBits"  # the lm_head
        # The qkv bias rides in MatMulNBits' bias input; attention takes the packed projection.
        assert "Add" not in {n.op_type for n in model.graph.node}
        producers = {out: n for n in model.graph.node for out in n.output}
        for attention in (n for n in model.graph.node if n.op_type == "GroupQueryAttention"):
            qkv = producers[attention.input[0]]
            assert qkv.op_type == "MatMulNBits" and len(qkv.input) == 6 and qkv.input[5]
        counts = {b: sum(a["bits"] == b for a in attributes) for b in (4, 8)}
        record = load_manifest(linear_heavy[precision]).extra["quantization"]["decoder"]
        if bits == 8:  # this onnxruntime supports 8-bit MatMulNBits
            assert counts == {4: 0, 8: len(nbits)}
        else:  # groups that needed it were measured and given 8 bits; the rest is 4-bit
            assert counts[8] == len(record["upgraded_nodes"]) and counts[4] == len(nbits) - counts[8] > counts[8]
            assert record["final"]["cosine"] >= record["target_cosine"] == 0.97 and record["target_met"]
            assert 0 < record["budget"]["used"] <= record["budget"]["fraction_of_weights"] == 0.25


def test_folding_a_bias_add_into_matmulnbits_is_exact(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    import onnxruntime as ort
    from gemvg.export.quantize import _nbits, fold_bias_adds

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Add", ["y", "b"], ["out"])], "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 64])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 48])],
        [numpy_helper.from_array(rng.standard_normal((64, 48), dtype=np.float32), "w"),
         numpy_helper.from_array(rng.standard_normal(48, dtype=np.float32), "b")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "linear.onnx")
    model = _nbits(tmp_path / "linear.onnx", 4, 32, 4)
    x = rng.standard_normal((1, 3, 64), dtype=np.float32)

    def run(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    before = run(model)
    assert fold_bias_adds(model.graph) == 1
    assert [n.op_type for n in model.graph.node] == ["MatMulNBits"] and model.graph.node[0].output[0] == "out"
    np.testing.assert_allclose(run(model), before, rtol=1e-5, atol=1e-5)


def test_zero_upgrade_budget_gives_every_matmul_4_bits(linear_heavy, tmp_path):
    out = tmp_path / "int4-pure"
    argv = ["--fp32-bundle", str(linear_heavy["fp32"]), "--out", str(out), "--precision", "int4", "--upgrade-budget",
            "0", "--block-size", "64"]
    assert export_main(argv) == 0
    model = onnx.load(str(out / "decoder.onnx"))
    attributes = [{a.name: a.i for a in n.attribute} for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert attributes and all(a["bits"] == 4 and a["block_size"] == 64 for a in attributes)
    record = load_manifest(out).extra["quantization"]["decoder"]
    assert record["upgraded_groups"] == [] and record["sensitivity"] == [] and record["budget"]["used"] == 0
    # The measured cosine is still recorded.
    assert 0 < record["final"]["cosine"] == record["all_quantized"]["cosine"] < 1


def test_int8_step_decoder_takes_the_one_token_passes(linear_heavy, calib_file, image_files, tmp_path):
    out = tmp_path / "int8-step"
    argv = ["--fp32-bundle", str(linear_heavy["fp32"]), "--out", str(out), "--precision", "int8", "--calibration",
            str(calib_file), "--step-decoder", "int8w", "--upgrade-budget", "0", "--block-size", "64"]
    assert export_main(argv) == 0
    manifest = load_manifest(out)  # verifies the step graph's sha256 too
    step = manifest.step_decoder_graph
    assert step.path == "decoder_step.onnx" and step.precision == "int8w"
    assert step.inputs == manifest.decoder_graph.inputs and step.outputs == manifest.decoder_graph.outputs
    nodes = onnx.load(str(out / step.path)).graph.node
    assert {a.name: a.i for n in nodes if n.op_type == "MatMulNBits" for a in n.attribute}["bits"] == 8
    quantization = manifest.extra["quantization"]
    assert quantization["step_decoder"]["final"]["cosine"] > 0.98
    report = json.loads((out / "quantization_report.json").read_text())
    assert report["graphs"]["step_decoder"] == "int8w" and report["sizes"]["files"]["step_decoder"]["bytes"] > 0

    engine = Engine.load(out)
    assert engine.step_decoder is not engine.decoder
    calls = {"decoder": 0, "step_decoder": 0}
    for name in calls:
        session = getattr(engine, name)
        run = session.run_with_iobinding

        def counted(binding, *rest, name=name, run=run):
            calls[name] += 1
            return run(binding, *rest)

        session.run_with_iobinding = counted
    images = [image_files["rgb.jpg"], image_files["gray.png"]]
    engine.ground(images, QUERY, max_new_tokens=5, min_new_tokens=5)
    assert calls == {"decoder": 1, "step_decoder": 4}  # the prompt on static INT8, every step on the step graph

    # One step on either graph from the same cached prompt: the same logits, up to quantization.
    inputs = engine.prepare(images, QUERY)
    position = int(inputs.prompt.position_ids.max()) + 1
    steps = {}
    for name in ("decoder", "step_decoder"):
        cache = engine.new_cache(len(inputs.prompt.input_ids) + 1)
        engine.prefill(inputs.prompt, engine.encode_images(inputs.images), cache)
        engine.step_decoder = getattr(engine, name)
        steps[name] = engine.decode_one_token(7, position, cache).copy()
    assert cosine(steps["decoder"], steps["step_decoder"]) > 0.98


def test_step_decoder_needs_int8(linear_heavy, tmp_path, capsys):
    argv = ["--fp32-bundle", str(linear_heavy["fp32"]), "--out", str(tmp_path / "x"), "--precision", "int4",
            "--step-decoder", "int8w"]
    assert export_main(argv) != 0
    assert "--step-decoder goes with --precision int8" in capsys.readouterr().err


# -- the sensitivity machinery -------------------------------------------------------------------


def test_sensitivity_pass_keeps_the_costliest_groups_float(linear_heavy, calib_file, tmp_path):
    fp32 = Engine.load(linear_heavy["fp32"])
    pipeline = PipelineFeeds(fp32)
    samples = read_calibration(calib_file)[:2]
    path = linear_heavy["fp32"] / "vision.onnx"
    work = tmp_path / "work"
    work.mkdir()
    record = static_int8(path, tmp_path / "vision-int8.onnx", "vision", pipeline.vision(samples),
                         pipeline.vision(samples), "minmax", 0.99999, work, quiet)
    ranking = [entry["group"] for entry in record["sensitivity"]]
    assert record["float_groups"] == ranking[:len(record["float_groups"])]  # costliest first
    assert record["float_groups"] and record["all_quantized"]["cosine"] < 0.99999 <= record["final"]["cosine"]
    steps = [step["cosine"] for step in record["steps"]]
    assert steps[-1] == record["final"]["cosine"] and len(steps) == len(record["float_groups"])

    # A target the fully quantized graph already meets measures no group and keeps nothing float.
    met = static_int8(path, tmp_path / "vision-int8-met.onnx", "vision", pipeline.vision(samples),
                      pipeline.vision(samples), "minmax", 0.5, work, quiet)
    assert met["all_quantized"]["cosine"] >= 0.5 and met["target_met"]
    assert met["sensitivity"] == [] and met["float_groups"] == [] and met["steps"] == []

    # The vision MLP's gate and up projections were merged into one GEMM (same numbers).
    assert record["merged_siblings"] and all(len(nodes) == 2 for nodes in record["merged_siblings"].values())
    # Restoring every group of the Q/DQ graph to float gives back the fp32 graph's outputs.
    model = onnx.load(str(work / "vision.onnx"))  # the fp32 graph as prepared for quantization
    qdq = onnx.load(str(work / "vision.qdq.onnx"))
    mixer = Mixer(qdq, model)
    restored = mixer.build({n for names in node_groups(model, "vision").values() for n in names})
    assert not [n for n in restored.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    evaluate = Evaluator(pipeline.vision(samples))
    evaluate.set_reference(path)
    cos, diff = evaluate(restored)
    assert cos > 0.999999 and diff < 1e-4


# -- calibration: the runtime's own code path ----------------------------------------------------


def test_calibration_feeds_are_the_runtimes_inputs(linear_heavy, calib_file):
    engine = Engine.load(linear_heavy["fp32"])
    samples = read_calibration(calib_file)
    calibration, _ = split_samples(samples)
    pipeline = PipelineFeeds(engine)

    reader = FeedReader(pipeline.vision(calibration), "vision")
    first = reader.get_next()
    inputs = engine.prepare(list(calibration[0].images), calibration[0].query)
    expected = vision_feeds(inputs.images[0].pixel_values, inputs.images[0].grid_thw, engine.manifest.vision)
    assert set(first) == {"pixel_values", "rotary_cos", "rotary_sin",  # Qwen2.5-VL windows:
                          "window_gather", "window_bias", "window_scatter"}
    for name in first:
        assert np.array_equal(first[name], getattr(expected, name)), name
    assert len(reader) == 2 * len(calibration)
    while reader.get_next() is not None:
        pass
    reader.rewind()
    assert reader.get_next() is first

    decoder = pipeline.decoder(calibration[:1])[0]
    embeds = engine.embed_prompt(inputs.prompt, engine.encode_images(inputs.images))
    assert np.array_equal(decoder["inputs_embeds"], embeds)
    length = len(inputs.prompt.input_ids)
    assert np.array_equal(decoder["cache_positions"], np.arange(length)[None])
    cos, sin = np.empty((2, length, engine.manifest.text.head_dim // 2), np.float32)
    MRopeAngles(engine.manifest.text).fill(inputs.prompt.position_ids, cos, sin)
    assert np.array_equal(decoder["rotary_cos"][:length], cos) and np.array_equal(decoder["rotary_sin"][:length], sin)
    # Run as it is, the feed gives the logits that Engine.prefill computes for the request.
    logits = engine.decoder.run(["logits"], decoder)[0][0, -1]
    assert np.allclose(logits, last_logits(engine, list(calibration[0].images), calibration[0].query), atol=1e-5)


def test_calibration_file_parsing(calib_file, tmp_path):
    samples = read_calibration(calib_file)
    assert len(samples) == REQUESTS  # the blank line is skipped
    assert all(Path(image).is_file() for s in samples for image in s.images)  # relative to the file's folder
    assert samples[0].origin.endswith("calib.jsonl:1") and samples[3].origin.endswith("calib.jsonl:5")
    calibration, held_back = split_samples(samples, limit=3)
    assert len(calibration) == 3 and len(held_back) == 2 and held_back == samples[-2:]

    bad = {
        "not json": ("{oops", "not valid JSON"),
        "no images": (json.dumps({"query": "q"}), "'images'"),
        "no query": (json.dumps({"images": ["x.png"]}), "'query'"),
        "missing image": (json.dumps({"images": ["nowhere.png"], "query": "q"}), "image not found"),
    }
    for name, (line, needle) in bad.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text(line + "\n")
        with pytest.raises(CalibrationError, match=needle) as caught:
            read_calibration(path)
        assert f"{path}:1" in str(caught.value)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(CalibrationError, match="no calibration samples"):
        read_calibration(tmp_path / "empty.jsonl")


def one_line_error(code: int, err: str, needle: str) -> None:
    lines = [line for line in err.strip().splitlines() if line]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("gemvg-export: error:") and needle in lines[0], lines[0]


def test_export_errors_are_one_line(linear_heavy, tmp_path, capsys):
    fp32 = str(linear_heavy["fp32"])
    cases = [
        (["--precision", "int8"], "needs calibration requests"),
        (["--precision", "int4", "--vision-precision", "int8"], "needs calibration requests"),
        (["--precision", "int8", "--calibration", str(tmp_path / "none.jsonl")], "calibration file not found"),
        (["--precision", "int4", "--block-size", "24"], "--block-size"),
        (["--precision", "int4", "--upgrade-budget", "1.5"], "--upgrade-budget"),
        (["--precision", "int8", "--calibration", str(tmp_path / "bad.jsonl")], "bad.jsonl:1"),
    ]
    (tmp_path / "bad.jsonl").write_text("[1, 2]\n")
    for extra, needle in cases:
        code = export_main(["--fp32-bundle", fp32, "--out", str(tmp_path / "out")] + extra)
        one_line_error(code, capsys.readouterr().err, needle)
    code = export_main(["--fp32-bundle", str(linear_heavy["int4"]), "--out", str(tmp_path / "o"), "--precision",
                        "int8w"])
    one_line_error(code, capsys.readouterr().err, "quantize from an fp32 bundle")


# -- tiny models through the CLIs and the API ----------------------------------------------------


@pytest.mark.parametrize("family, argv", [
    ("qwen2_5_vl", ["--precision", "int8"]),
    ("qwen2_vl", ["--precision", "int4", "--vision-precision", "int8"]),
    ("qwen3_vl", ["--precision", "int8"]),  # DeepStack's features calibrated and fed like the image features
    ("qwen3_vl", ["--precision", "int4", "--vision-precision", "int8"]),
])
def test_tiny_quantized_bundles_ground_through_cli_and_api(family, argv, tiny_checkpoints, calib_file, image_files,
                                                           tmp_path, capsys):
    out = tmp_path / "bundle"
    code = export_main(["--model", str(tiny_checkpoints[family]), "--out", str(out), "--calibration",
                        str(calib_file)] + argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "[gemvg-export]" in captured.err and "calibrating vision" in captured.err  # progress on stderr
    assert "quantization report" in captured.out and "held-back" in captured.out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # the temporary fp32 export is gone
    manifest = load_manifest(out)
    assert manifest.precision == argv[1] and manifest.vision_graph.precision == "int8"

    images = [str(image_files["rgb.jpg"]), str(image_files["wide.jpg"])]
    cli_argv = ["ground", "--bundle", str(out), "--query", QUERY, "--json", "--max-new-tokens", "6"]
    for image in images:
        cli_argv += ["--image", image]
    assert gemvg(cli_argv) == 0
    from_cli = json.loads(capsys.readouterr().out)
    result = Engine.load(out).ground(images, QUERY, max_new_tokens=6)
    assert result.token_ids == from_cli["token_ids"] and 1 <= len(result.token_ids) <= 6
    assert result.text == from_cli["text"]


LEAN = textwrap.dedent("""
    import importlib.abc, json, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers", "onnx") or name.startswith("gemvg.export"):
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Block())
    from gemvg.runtime import Engine
    tokens = [len(Engine.load(bundle).ground([IMAGE], "q", max_new_tokens=3).token_ids) for bundle in BUNDLES]
    print(json.dumps(tokens))
""")


def test_quantized_bundles_run_on_the_lean_runtime(linear_heavy, image_files):
    bundles = [str(linear_heavy[p]) for p in ("int8", "int4", "int8w")]
    script = f"BUNDLES = {bundles!r}\nIMAGE = {str(image_files['rgb.jpg'])!r}\n" + LEAN
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert all(1 <= count <= 3 for count in json.loads(done.stdout.strip().splitlines()[-1]))


def test_quant_speed_script_compares_side_by_side(linear_heavy, tmp_path, capsys):
    from gemvg.benchmarks.quant_speed import main as quant_speed

    out = tmp_path / "speed.json"
    assert quant_speed(["--fp32", str(linear_heavy["fp32"]), "--quant", str(linear_heavy["int8"]), "--runs", "3",
                        "--threads", "2", "--decode-tokens", "2", "--ops", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["precision"] == "int8" and figures["runs"] == 3
    assert figures["logits_cosine"] >= 0.98
    for name in ("fp32", "quant"):
        assert figures[name]["vision_ms"] > 0 and figures[name]["prefill_ms"] > 0
        assert figures[name]["decode_ms_per_token"] > 0
    # onnxruntime turned the Q/DQ pairs into integer kernels, none left as DequantizeLinear + float MatMul.
    ops = figures["optimized_ops"]
    assert ops["decoder.onnx"].get("MatMulIntegerToFloat", 0) > 0 and "DequantizeLinear" not in ops["decoder.onnx"]
    assert ops["vision.onnx"].get("QGemm", 0) > 0 and "Gemm" not in ops["vision.onnx"]
    assert "speed-up" in capsys.readouterr().out
