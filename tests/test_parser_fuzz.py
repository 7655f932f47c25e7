"""Hostile model text: the box parsers of both syntaxes never raise, and every box they return is finite,
ordered and inside the image it names.

A seeded generator writes answers in both syntaxes from hostile pieces (bad JSON escapes, lone
surrogates, NaN, 1e400, 400-digit numbers, inverted and out-of-image boxes, image numbers out of range,
deep brackets, thousands of boxes) and a mutator cuts, repeats and splices them; each text is parsed as
every box syntax (each falls back to the other form).
"""

from __future__ import annotations

import math
import random
import time

import pytest

from gemvg.runtime.grounding import (SYNTAXES, ImageGeometry, answer_part, format_answer, has_parsable_answer,
                                     last_image_mention, parse_answer)
from gemvg.runtime.grounding import Box

GEOMETRIES = [ImageGeometry(640, 480, 644, 476), ImageGeometry(31, 1000, 28, 1008), ImageGeometry(1, 1, 28, 28)]
CASES = 6000

NUMBERS = ["0", "1", "-1", "999", "1000", "1001", "-50", "12.5", "0.0001", "1e400", "-1e400", "NaN", "nan", "inf",
           "Infinity", "1" * 400, "9" * 4400, "1.7976931348623157e308", "00", "-0", "3.", ".5", "1e-400", "",
           "\"7\"", "null", "[1]", "1,2"]
LABELS = ["cup", "a\\xb", "\\ud800", "\\udfff\\ud800", "\\u12", "\\", "\\\\", "\\\"", "é\u2028", "\x00\x1f",
          "<|box_start|>", "{", "}", "\ud800", "a\\nb", "\\u0000", "x" * 300, ""]
IMAGES = ["1", "2", "3", "0", "-1", "4", "99", "1" * 40, "9" * 4400, "\"2\"", "two", "1.5"]
SPECIAL = ["<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<think>", "</think>",
           "<answer>", "</answer>", "```json\n", "\n```", "(", ")", ",", "[", "]", "{", "}", "\"", "\\",
           "In the second image: ", "image 99999999999999 ", "the fifth image ", "image #0 ", "\ud800", "\x00"]


def hostile_number(rng: random.Random) -> str:
    return rng.choice(NUMBERS) if rng.random() < 0.2 else str(rng.randint(-2000, 3000))


def qwen2_box(rng: random.Random) -> str:
    n = lambda: hostile_number(rng)  # noqa: E731
    mention = rng.choice(["", "In the second image: ", "image 3 ", f"image {rng.choice(IMAGES)} ",
                          "the 2nd picture ", "frame-1 "])
    return (f"{mention}<|object_ref_start|>{rng.choice(LABELS)}<|object_ref_end|>"
            f"<|box_start|>({n()},{n()}),({n()},{n()})<|box_end|>")


def qwen2_5_box(rng: random.Random) -> str:
    n = lambda: hostile_number(rng)  # noqa: E731
    parts = [f'"bbox_2d": [{n()}, {n()}, {n()}, {n()}]', f'"label": "{rng.choice(LABELS)}"']
    if rng.random() < 0.7:
        parts.append(f'"{rng.choice(["image", "image_index", "img"])}": {rng.choice(IMAGES)}')
    rng.shuffle(parts)
    return "{" + ", ".join(parts) + "}"


def generated(rng: random.Random) -> str:
    count = rng.choice([0, 1, 2, 3, 5, 20]) if rng.random() < 0.995 else rng.randint(1000, 3000)
    if rng.random() < 0.5:
        body = "\n".join(qwen2_box(rng) for _ in range(count))
    else:
        body = "```json\n[" + ", ".join(qwen2_5_box(rng) for _ in range(count)) + "]\n```"
    if rng.random() < 0.1:
        depth = rng.randint(1, 2000)
        body = rng.choice(["[", "{", "(", "<answer>"]) * depth + body + rng.choice(["]", "}", ")", "</answer>"]) * depth
    if rng.random() < 0.2:
        body = f"<think>{rng.choice(SPECIAL)}</think><answer>{body}</answer>"
    return body


def mutated(rng: random.Random, text: str) -> str:
    for _ in range(rng.randint(1, 6)):
        if not text:
            text = rng.choice(SPECIAL)
        i, j = sorted(rng.randrange(len(text) + 1) for _ in range(2))
        action = rng.randrange(5)
        if action == 0:
            text = text[:i] + text[j:]  # cut
        elif action == 1:
            text = text[:i] + text[i:j] * rng.randint(2, 4) + text[j:]  # repeat
        elif action == 2:
            text = text[:i] + rng.choice(SPECIAL + NUMBERS + LABELS) + text[i:]  # splice a hostile piece
        elif action == 3:
            text = text[:i] + chr(rng.randrange(0x110000)) + text[j:]  # any code point, surrogates included
        else:
            text = text[j:] + text[:i]  # rotate
    return text


def hostile_texts(seed: int, count: int):
    rng = random.Random(seed)
    for _ in range(count):
        text = generated(rng)
        yield mutated(rng, text) if rng.random() < 0.6 else text


def check_boxes(boxes: list[Box], geometries: list[ImageGeometry], text: str) -> None:
    for box in boxes:
        assert isinstance(box.image, int) and 0 <= box.image < len(geometries), text
        geometry = geometries[box.image]
        corners = (box.x1, box.y1, box.x2, box.y2)
        assert all(isinstance(v, float) and math.isfinite(v) for v in corners), (text, box)
        assert 0.0 <= box.x1 <= box.x2 <= geometry.width and 0.0 <= box.y1 <= box.y2 <= geometry.height, (text, box)
        box.label.encode("utf-8")  # printable: no lone surrogate survives


def test_thousands_of_hostile_answers_never_raise_and_every_box_is_inside_its_image():
    start, boxes_seen = time.perf_counter(), 0
    for text in hostile_texts(seed=15, count=CASES):
        for index, syntax in enumerate(SYNTAXES):
            geometries = GEOMETRIES if (len(text) + index) % 2 else GEOMETRIES[:1]
            boxes = parse_answer(text, syntax, geometries)
            check_boxes(boxes, geometries, text)
            boxes_seen += len(boxes)
            has_parsable_answer(text, syntax)
        answer_part(text)
        last_image_mention(text)
    elapsed = time.perf_counter() - start
    assert boxes_seen > CASES  # the generator does write readable boxes, not only noise
    print(f"{CASES} texts x {len(SYNTAXES)} syntaxes in {elapsed:.1f} s, {boxes_seen} boxes")


@pytest.mark.parametrize("syntax", ["ref_tokens", "json_pixels"])  # JSON in pixels: the first's fallback too
def test_named_hostile_answers(syntax):
    one = [GEOMETRIES[0]]
    cases = {
        '[{"bbox_2d": [1, 2, 30, 40], "label": "a\\xb"}]': [Box(0, 1 * 640 / 644, 2 * 480 / 476, 30 * 640 / 644,
                                                                40 * 480 / 476, "a\\xb")],
        '[{"bbox_2d": [1, 2, 30, 40], "label": "\\ud800x"}]': [Box(0, 1 * 640 / 644, 2 * 480 / 476, 30 * 640 / 644,
                                                                   40 * 480 / 476, "?x")],
        '[{"bbox_2d": [1, 2, 30, 40], "image": 99999999999999999999}]': [],
        '[{"bbox_2d": [1, 2, 30, 40], "image": ' + "9" * 5000 + "}]": [],
        "image " + "9" * 5000 + " <|box_start|>(1,2),(3,4)<|box_end|>": [],
        "<|box_start|>(" + "1" * 400 + ",2),(3,4)<|box_end|>": [],  # an infinite coordinate: dropped
        '[{"bbox_2d": [700, 500, -5, -5]}]': [Box(0, 0.0, 0.0, 640.0, 480.0, "")],  # inverted and outside: clipped
        "[" * 10000 + "]" * 10000: [],
    }
    for text, expected in cases.items():
        assert parse_answer(text, syntax, one) == expected, text[:80]


def test_round_trip_still_exact_after_hardening():
    boxes = [Box(0, 10.0, 20.0, 300.0, 400.0, "cup"), Box(1, 1.0, 2.0, 30.0, 500.0, "b\"o\\x")]
    geometries = GEOMETRIES[:2]
    for syntax in SYNTAXES:
        parsed = parse_answer(format_answer(boxes, syntax, geometries), syntax, geometries)
        assert [box.image for box in parsed] == [0, 1] and [box.label for box in parsed] == ["cup", "b\"o\\x"]
