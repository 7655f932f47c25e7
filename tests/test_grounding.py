"""The grounding language: parser and formatter of both box syntaxes."""

from __future__ import annotations

import pytest

from gemvg.runtime.errors import InputError
from gemvg.runtime.grounding import (Box, ImageGeometry, build_instruction, follows_mode, format_answer,
                                     has_parsable_answer, parse_answer)

GEOMS = [ImageGeometry(640, 480, 644, 476), ImageGeometry(100, 50, 112, 56), ImageGeometry(300, 300, 308, 308)]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("mode", ["direct", "cot"])
def test_round_trip(family, mode):
    boxes = [Box(0, 10, 20, 300, 400, "cat"), Box(2, 5, 5, 50, 40, "dog"), Box(2, 0, 0, 300, 300, "all")]
    text = format_answer(boxes, family, GEOMS, mode, reasoning="two animals")
    parsed = parse_answer(text, family, GEOMS)
    assert [b.image for b in parsed] == [0, 2, 2]
    assert [b.label for b in parsed] == ["cat", "dog", "all"]
    for ours, theirs in zip(parsed, boxes):
        tolerance = GEOMS[ours.image].width / 1000 + 1  # one step of the syntax's grid
        assert abs(ours.x1 - theirs.x1) <= tolerance and abs(ours.y2 - theirs.y2) <= tolerance
    assert format_answer(parsed, family, GEOMS, mode, reasoning="two animals") == text
    assert has_parsable_answer(text, family) and follows_mode(text, mode)
    assert not follows_mode(text, "direct" if mode == "cot" else "cot")


def test_qwen2_image_words_and_numbers():
    text = ("It is in the second image. <|box_start|>(100,200),(500,600)<|box_end|> and "
            "image 3: <|object_ref_start|>cup<|object_ref_end|><|box_start|>(0,0),(1000,1000)<|box_end|>")
    boxes = parse_answer(text, "qwen2_vl", GEOMS)
    assert boxes == [Box(1, 10.0, 10.0, 50.0, 30.0, ""), Box(2, 0.0, 0.0, 300.0, 300.0, "cup")]


def test_qwen2_5_pixels_of_resized_image_map_back():
    text = '```json\n[{"bbox_2d": [0, 0, 644, 476], "label": "all", "image": 1}]\n```'
    assert parse_answer(text, "qwen2_5_vl", GEOMS) == [Box(0, 0.0, 0.0, 640.0, 480.0, "all")]


def test_malformed_output_is_tolerated():
    assert parse_answer("<|box_start|>(1,2),(3", "qwen2_vl", GEOMS) == []
    assert parse_answer('[{"bbox_2d": [1, 2, 3]}, {"bbox_2d": [10, 10, 20, 20]}', "qwen2_5_vl", GEOMS) == [
        Box(0, 10 * 640 / 644, 10 * 480 / 476, 20 * 640 / 644, 20 * 480 / 476, "")]
    assert parse_answer("", "qwen2_vl", GEOMS) == []


def test_clamping_reordering_and_out_of_range_images():
    text = "the fifth image <|box_start|>(1,1),(2,2)<|box_end|> the first image <|box_start|>(900,1200),(-50,100)<|box_end|>"
    assert parse_answer(text, "qwen2_vl", GEOMS) == [Box(0, 0.0, 48.0, 576.0, 480.0, "")]


def test_no_target_answers():
    assert format_answer([], "qwen2_vl", GEOMS) == "None"
    assert parse_answer("None", "qwen2_vl", GEOMS) == []
    assert has_parsable_answer("None", "qwen2_vl") and has_parsable_answer("```json\n[]\n```", "qwen2_5_vl")
    assert not has_parsable_answer("I cannot tell", "qwen2_vl")


def test_instruction_modes():
    assert build_instruction("the cup", "qwen2_vl", "raw") == "the cup"
    assert "0 to 1000" in build_instruction("the cup", "qwen2_vl", "direct")
    assert "<think>" in build_instruction("the cup", "qwen2_5_vl", "cot")
    with pytest.raises(InputError):
        build_instruction("the cup", "qwen2_vl", "fast")
