"""The grounding language: parser and formatter of both box syntaxes."""

from __future__ import annotations

import pytest

from gemvg.runtime.errors import InputError
from gemvg.runtime.grounding import (Box, ImageGeometry, build_instruction, follows_mode, format_answer,
                                     has_parsable_answer, parse_answer)

GEOMS = [ImageGeometry(640, 480, 644, 476), ImageGeometry(100, 50, 112, 56), ImageGeometry(300, 300, 308, 308)]


@pytest.mark.parametrize("syntax", ["ref_tokens", "json_pixels", "json_relative"])
@pytest.mark.parametrize("mode", ["direct", "cot"])
def test_round_trip(syntax, mode):
    boxes = [Box(0, 10, 20, 300, 400, "cat"), Box(2, 5, 5, 50, 40, "dog"), Box(2, 0, 0, 300, 300, "all")]
    text = format_answer(boxes, syntax, GEOMS, mode, reasoning="two animals")
    parsed = parse_answer(text, syntax, GEOMS)
    assert [b.image for b in parsed] == [0, 2, 2]
    assert [b.label for b in parsed] == ["cat", "dog", "all"]
    for ours, theirs in zip(parsed, boxes):
        tolerance = GEOMS[ours.image].width / 1000 + 1  # one step of the syntax's grid
        assert abs(ours.x1 - theirs.x1) <= tolerance and abs(ours.y2 - theirs.y2) <= tolerance
    assert format_answer(parsed, syntax, GEOMS, mode, reasoning="two animals") == text
    assert has_parsable_answer(text, syntax) and follows_mode(text, mode)
    assert not follows_mode(text, "direct" if mode == "cot" else "cot")


def test_qwen2_image_words_and_numbers():
    text = ("It is in the second image. <|box_start|>(100,200),(500,600)<|box_end|> and "
            "image 3: <|object_ref_start|>cup<|object_ref_end|><|box_start|>(0,0),(1000,1000)<|box_end|>")
    boxes = parse_answer(text, "ref_tokens", GEOMS)
    assert boxes == [Box(1, 10.0, 10.0, 50.0, 30.0, ""), Box(2, 0.0, 0.0, 300.0, 300.0, "cup")]


def test_qwen2_5_pixels_of_resized_image_map_back():
    text = '```json\n[{"bbox_2d": [0, 0, 644, 476], "label": "all", "image": 1}]\n```'
    assert parse_answer(text, "json_pixels", GEOMS) == [Box(0, 0.0, 0.0, 640.0, 480.0, "all")]


def test_malformed_output_is_tolerated():
    assert parse_answer("<|box_start|>(1,2),(3", "ref_tokens", GEOMS) == []
    assert parse_answer('[{"bbox_2d": [1, 2, 3]}, {"bbox_2d": [10, 10, 20, 20]}', "json_pixels", GEOMS) == [
        Box(0, 10 * 640 / 644, 10 * 480 / 476, 20 * 640 / 644, 20 * 480 / 476, "")]
    assert parse_answer("", "ref_tokens", GEOMS) == []


def test_clamping_reordering_and_out_of_range_images():
    text = "the fifth image <|box_start|>(1,1),(2,2)<|box_end|> the first image <|box_start|>(900,1200),(-50,100)<|box_end|>"
    assert parse_answer(text, "ref_tokens", GEOMS) == [Box(0, 0.0, 48.0, 576.0, 480.0, "")]


def test_no_target_answers():
    assert format_answer([], "ref_tokens", GEOMS) == "None"
    assert parse_answer("None", "ref_tokens", GEOMS) == []
    assert has_parsable_answer("None", "ref_tokens") and has_parsable_answer("```json\n[]\n```", "json_pixels")
    assert not has_parsable_answer("I cannot tell", "ref_tokens")


def test_instruction_modes():
    assert build_instruction("the cup", "ref_tokens", "raw") == "the cup"
    assert "0 to 1000" in build_instruction("the cup", "ref_tokens", "direct")
    assert "<think>" in build_instruction("the cup", "json_pixels", "cot")
    with pytest.raises(InputError):
        build_instruction("the cup", "ref_tokens", "fast")


def test_qwen3_json_is_relative_to_the_original_image():
    text = '```json\n[{"bbox_2d": [0, 500, 1000, 1000], "label": "floor", "image": 2}]\n```'
    assert parse_answer(text, "json_relative", GEOMS) == [Box(1, 0.0, 25.0, 100.0, 50.0, "floor")]
    assert "0 to 1000" in build_instruction("the cup", "json_relative", "direct")
    # A Qwen3 model that answers with special-token boxes is still read (those are relative too).
    assert parse_answer("<|box_start|>(0,0),(500,500)<|box_end|>", "json_relative", GEOMS) == [
        Box(0, 0.0, 0.0, 320.0, 240.0, "")]


def test_unknown_syntax_is_one_clear_error():
    with pytest.raises(InputError, match="unknown box syntax 'qwen2_vl'"):
        parse_answer("None", "qwen2_vl", GEOMS)


def test_every_family_reads_both_forms_of_the_pixel_bounds():
    """preprocessor_config.json carries min/max pixels (older processors) or size {shortest_edge, longest_edge}
    (transformers 5, Qwen3-VL); both read alike, nulls fall back to the family's defaults."""
    from gemvg.runtime.families import FAMILIES, UnknownFamilyError, family

    base = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    for found in FAMILIES.values():
        old = found.preprocess_config({**base, "min_pixels": 3136, "max_pixels": 50176})
        new = found.preprocess_config({**base, "size": {"shortest_edge": 3136, "longest_edge": 50176}})
        assert old == new and (old.min_pixels, old.max_pixels) == (3136, 50176)
        nulls = found.preprocess_config({"min_pixels": None, "size": None, "patch_size": None})
        assert (nulls.min_pixels, nulls.patch_size, nulls.image_mean) == (found.min_pixels, found.patch_size,
                                                                          found.image_mean)
    assert family("qwen3_vl").preprocess_config({}).factor == 32
    with pytest.raises(UnknownFamilyError, match="'llava'"):
        family("llava")
