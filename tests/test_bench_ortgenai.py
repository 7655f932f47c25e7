"""The ONNX Runtime GenAI baseline of `gemvg bench`: it runs the same model, and its stages are sane.

On the tiny Qwen2.5-VL checkpoint: the fp32 ORT GenAI folder (ORT GenAI's builder for the decoder,
mobius for vision and embedding) gives transformers' greedy tokens for a 2-image prompt, and the
bench worker returns every stage for a 1-run workload.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("onnxruntime_genai")
pytest.importorskip("mobius")

from gemvg.benchmarks import bench  # noqa: E402
from gemvg.benchmarks import ortgenai_baseline as ob  # noqa: E402

NEW_TOKENS = 8


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from gemvg.export.checkpoints import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("ortgenai") / "tiny", family="qwen2_5_vl", preset="tiny")


@pytest.fixture(scope="module")
def model_dir(checkpoint) -> Path:
    # The default cache (beside the checkpoint), so the bench worker below finds this build.
    return ob.build_ortgenai_model(checkpoint, "fp32", ob.default_cache_dir(checkpoint))


@pytest.fixture(autouse=True)
def _no_cache_override(monkeypatch):
    monkeypatch.delenv("GEMVG_ORTGENAI_CACHE", raising=False)


def _write_images(folder: Path, sizes: list[tuple[int, int]]) -> list[Path]:
    rng = np.random.default_rng(3)
    paths = []
    for index, (width, height) in enumerate(sizes):  # multiples of 28: no resampling on either side
        coarse = rng.integers(0, 256, (height // 14, width // 14, 3), dtype=np.uint8)
        path = folder / f"image_{index}.png"
        Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def two_images(tmp_path_factory) -> list[Path]:
    """Two different images of one size, as `gemvg bench` makes them."""
    return _write_images(tmp_path_factory.mktemp("ortgenai-images"), [(140, 112), (140, 112)])


def _transformers_greedy(checkpoint: Path, images: list[Path], text: str, n: int):
    """transformers' prompt text, input ids, pixel values and n greedy tokens (gemvg.export.reference)."""
    from gemvg.export.reference import Reference

    reference = Reference(checkpoint)
    inputs = reference.inputs(images, text)
    return (reference.prompt(len(images), text), inputs["input_ids"][0].tolist(), inputs["pixel_values"].numpy(),
            reference.generate(inputs, n, min_new_tokens=n))


def test_built_folder(checkpoint, model_dir):
    config = json.loads((model_dir / "genai_config.json").read_text())["model"]
    assert config["type"] == "qwen2_5_vl"
    hf_config = json.loads((checkpoint / "config.json").read_text())
    for key in ("image_token_id", "vision_start_token_id"):  # not Qwen's ids: ORT GenAI must be told
        assert config[key] == hf_config[key]
    assert {config[k]["filename"] for k in ("decoder", "vision", "embedding")} == {
        "decoder/model.onnx", "vision_encoder/model.onnx", "embedding/model.onnx"}
    marker = json.loads((model_dir / ob.BUILD_MARKER).read_text())
    assert "prune_lm_head=true" in marker["commands"][0] and "exclude_embeds=true" in marker["commands"][0]
    import onnx

    decoder = onnx.load(str(model_dir / "decoder" / "model.onnx"), load_external_data=False)
    logits = next(o for o in decoder.graph.output if o.name == "logits")
    assert logits.type.tensor_type.shape.dim[1].dim_value == 1  # pruned lm_head: last position only


def _ort_and_transformers(checkpoint: Path, model_dir: Path, images: list[Path]) -> dict:
    from gemvg.runtime.grounding import build_instruction

    text = build_instruction(bench.QUERY, "json_pixels", "direct")
    vl = ob.OrtGenaiVL(model_dir, threads=2)
    ort_pixels = vl.inputs(text, images)["pixel_values"].as_numpy()
    ort_ids, ort_tokens = vl.generate(text, images, NEW_TOKENS)
    hf_prompt, hf_ids, hf_pixels, hf_tokens = _transformers_greedy(checkpoint, images, text, NEW_TOKENS)
    return {"prompt": (vl.prompt(text, len(images)), hf_prompt), "ids": (ort_ids, hf_ids),
            "pixels": (ort_pixels, hf_pixels), "tokens": (ort_tokens, hf_tokens)}


def test_fp32_greedy_matches_transformers(checkpoint, model_dir, two_images):
    got = _ort_and_transformers(checkpoint, model_dir, two_images)
    assert got["prompt"][0] == got["prompt"][1]  # ORT GenAI's chat template rendering
    assert got["ids"][0] == got["ids"][1]  # image-token expansion and tokenizer
    np.testing.assert_allclose(*got["pixels"], atol=1e-5)  # ORT Extensions' image pipeline
    assert got["tokens"][0] == got["tokens"][1]
    assert len(set(got["tokens"][1])) > 1  # the random weights do vary the output


def test_fp32_greedy_matches_transformers_on_mixed_sizes(checkpoint, model_dir, tmp_path):
    got = _ort_and_transformers(checkpoint, model_dir, _write_images(tmp_path, [(140, 112), (112, 168)]))
    # ORT Extensions pads the smaller image's patches to the larger one's count; ORT GenAI then encodes
    # each image on its own, without the padding.
    assert got["pixels"][0].shape[0] == 2 * 12 * 8 and got["pixels"][1].shape[0] == 10 * 8 + 12 * 8
    assert got["ids"][0] == got["ids"][1]
    assert got["tokens"][0] == got["tokens"][1]


def test_rewind_follow_up_matches_a_fresh_generator(model_dir, two_images):
    from gemvg.runtime.grounding import build_instruction

    first = build_instruction(bench.QUERY, "json_pixels", "direct")
    follow = build_instruction(bench.FOLLOW_UP, "json_pixels", "direct")
    vl = ob.OrtGenaiVL(model_dir, threads=2)
    _, fresh = vl.generate(follow, two_images, NEW_TOKENS)
    inputs = vl.inputs(first, two_images)
    ids = inputs["input_ids"].as_numpy()[0]
    generator = vl.generator(len(ids), NEW_TOKENS, spare=ob.REWIND_MARGIN_TOKENS)
    generator.set_inputs(inputs)
    for _ in range(NEW_TOKENS):
        generator.generate_next_token()
    generator.rewind_to(vl.images_end(ids))
    suffix = vl.suffix_ids(follow, len(two_images))
    generator.append_tokens(suffix)
    rewound = []
    for _ in range(NEW_TOKENS):
        generator.generate_next_token()
        rewound.append(int(generator.get_next_tokens()[0]))
    assert rewound == fresh


def test_bench_worker_returns_sane_stages(checkpoint, model_dir, tmp_path):
    workload = bench.Workload(images=2, image_size=112, new_tokens=4, runs=1, warmup=0, threads=2)
    images = bench.make_images(workload, tmp_path / "images")
    result = bench.worker({"kind": "ortgenai-fp32", "path": str(checkpoint), "images": [str(p) for p in images],
                           "workload": workload.__dict__})
    stages = result["stages_ms"]
    assert set(stages) == set(bench.STAGES)
    assert all(s["median"] > 0 for name, s in stages.items() if name != "prefill")
    ttft = stages["time_to_first_token"]["median"]
    parts = stages["preprocess"]["median"] + stages["vision"]["median"] + stages["prefill"]["median"]
    assert ttft == pytest.approx(parts, rel=1e-6)
    assert stages["total"]["median"] >= ttft
    assert result["name"].endswith("fp32") and result["prompt_tokens"] > 2 * 16
    decoder = model_dir / "decoder"
    assert result["weight_bytes_per_token"] == sum(p.stat().st_size for p in decoder.iterdir())
    assert result["extra"]["model_dir"] == str(model_dir)  # the cached build was reused
    assert result["extra"]["vision_runs_per_query"] >= 1
    assert result["extra"]["rewind_first_token_matches_fresh"] is True


def test_int4_build_command():
    builder = ob.decoder_command(Path("ckpt"), "int4", Path("out"), Path("cache"))
    assert builder[builder.index("-p") + 1] == "int4"
    assert {"prune_lm_head=true", "exclude_embeds=true", "block_size=32", "accuracy_level=4"} <= set(builder)


def test_cli_accepts_ortgenai_baseline():
    args = bench.build_parser().parse_args(["--checkpoint", "c", "--baseline", "ortgenai"])
    assert args.baseline == ["ortgenai"]


def test_missing_ortgenai_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)
    with pytest.raises(RuntimeError) as err:
        ob.require_ortgenai()
    message = str(err.value)
    assert "\n" not in message and "onnxruntime-genai==" in message
