"""The demo model's curriculum (data), its prompt mode, the held-out scorer and the one-command recipe."""

from __future__ import annotations

import json

import pytest

from gemvg.runtime.grounding import Box
from gemvg.train.curriculum import IMAGE_SIDE, STAGES, write_stage
from gemvg.train.evaluate import score
from gemvg.train.hybrid import HybridPolicy
from gemvg.train.schema import Sample, read_jsonl


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_samples_have_one_target_named_by_its_colour_alone(tmp_path, stage):
    samples = read_jsonl(write_stage(tmp_path, stage, 30, seed=3))
    spec = STAGES[stage]
    for sample in samples:
        assert spec.images[0] <= len(sample.images) <= spec.images[1]
        assert sample.image_sizes == [(IMAGE_SIDE, IMAGE_SIDE)] * len(sample.images)
        (target,) = sample.targets
        assert target.label in sample.query
        assert 0 <= target.x1 < target.x2 <= IMAGE_SIDE and 0 <= target.y1 < target.y2 <= IMAGE_SIDE
        colour = target.label.split()[0]
        # The reasoning lists every shape drawn: the target's colour appears exactly once.
        listed = sample.reasoning.rsplit(" The ", 1)[0]
        assert listed.count(f" {colour} ") == 1, sample.reasoning
    if spec.images[1] > 1:  # the target's image varies
        assert len({s.targets[0].image for s in samples}) > 1


def test_stage_data_is_deterministic_by_seed(tmp_path):
    first = (write_stage(tmp_path / "a", "multi", 5, seed=7)).read_text()
    again = (write_stage(tmp_path / "b", "multi", 5, seed=7)).read_text()
    other = (write_stage(tmp_path / "c", "multi", 5, seed=8)).read_text()
    assert first.replace("/a/", "/") == again.replace("/b/", "/") and first != other.replace("/c/", "/a/")
    assert (tmp_path / "a" / "images" / "000000_0.png").read_bytes() == (tmp_path / "b" / "images" / "000000_0.png").read_bytes()


def test_plain_mode_raw_prompts_with_the_query_alone():
    sample = Sample(images=["a.png"], query="Find the red circle.", targets=[], task="curriculum_single")
    assert HybridPolicy(cot_ratio=0.0, plain_mode="raw").mode_for(sample) == "raw"
    assert HybridPolicy(cot_ratio=0.0).mode_for(sample) == "direct"
    with pytest.raises(ValueError):
        HybridPolicy(plain_mode="cot")


def test_score_counts_right_image_and_iou():
    target = Box(1, 10, 10, 50, 50, "red circle")
    samples = [Sample(images=["a", "b"], query="q", targets=[target]) for _ in range(4)]
    predictions = [
        [Box(1, 12, 12, 50, 50, "x")],  # right image, IoU 0.90
        [Box(0, 10, 10, 50, 50, "x")],  # the same box in the wrong image
        [Box(1, 30, 30, 70, 70, "x")],  # right image, IoU 400 / 2800
        [],
    ]
    scores = score(samples, predictions)
    assert scores.samples == 4 and scores.acc_at_05 == 0.25 and scores.right_image == 0.5 and scores.parsed == 0.75
    assert scores.mean_iou == pytest.approx((38 * 38 / 1600 + 400 / 2800) / 4)


def test_recipe_runs_every_stage_and_resumes(tmp_path):
    """The whole recipe at a tiny scale: base, three SFT stages, GRPO, held-out scores; a rerun does nothing."""
    from gemvg.train.recipe import SFT_PLAN, run_recipe

    scale = 0.002
    final = run_recipe(tmp_path, scale=scale)
    assert final == tmp_path / "grpo" and (final / "model.safetensors").is_file()
    for plan in SFT_PLAN:
        scores = json.loads((tmp_path / f"sft-{plan.stage}" / "eval.json").read_text())["scores"]
        assert scores["samples"] >= 1 and 0.0 <= scores["acc_at_05"] <= 1.0
    assert (final / "reward_curves.json").is_file() and (final / "eval.json").is_file()
    before = (final / "model.safetensors").stat().st_mtime_ns
    run_recipe(tmp_path, scale=scale)
    assert (final / "model.safetensors").stat().st_mtime_ns == before


def test_backgrounds_carry_the_position_tint_and_shapes_keep_their_colours():
    from gemvg.train.curriculum import make_stage_sample
    from gemvg.train.synth import COLORS

    for index in range(12):
        made = make_stage_sample(STAGES["multi"], index, seed=4)
        for image in made.images:
            pixels = image.load()
            right, bottom = IMAGE_SIDE - 1, IMAGE_SIDE - 1  # shapes keep 2 px off the border: corners are background
            assert pixels[right, 0][0] > pixels[0, 0][0] and pixels[0, 0][1] == pixels[right, 0][1]
            assert pixels[0, bottom][2] > pixels[0, 0][2]
        target = made.sample.targets[0]
        if target.label.endswith("ring"):  # the only shape with a hole in its middle
            continue
        centre = made.images[target.image].getpixel((round((target.x1 + target.x2) / 2), round((target.y1 + target.y2) / 2)))
        assert centre == COLORS[target.label.split()[0]]


def test_freeze_keeps_matching_parameters_fixed(tmp_path):
    from gemvg.export.checkpoints import make_checkpoint
    from gemvg.train.checkpoint import CheckpointError, freeze_parameters, load_model
    from gemvg.train.config import load_config

    config_file = tmp_path / "run.yaml"
    config_file.write_text('freeze: ["visual\\\\."]\n')
    patterns = load_config(config_file).freeze
    model = load_model(make_checkpoint(tmp_path / "ckpt", "qwen2_vl", "tiny"))
    frozen = freeze_parameters(model, patterns)
    visual = {n: p for n, p in model.named_parameters() if "visual." in n}
    assert visual and frozen == sum(p.numel() for p in visual.values())
    assert all(not p.requires_grad for p in visual.values())
    assert all(p.requires_grad for n, p in model.named_parameters() if n not in visual)
    with pytest.raises(CheckpointError):
        freeze_parameters(model, ["no_such_parameter"])
