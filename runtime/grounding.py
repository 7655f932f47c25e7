"""The grounding language: box syntaxes, their parser and formatter, and the task instructions.

Everything that reads or writes boxes in model text goes through here: the engine parses generations
with `parse_answer`, training renders targets with `format_answer`, and evaluation reuses both, so
what a model is trained on is exactly what the engine parses.

Three box syntaxes, as the Qwen-VL model cards write boxes (gemvg.runtime.families says which family
writes which; a bundle's manifest records it as `box_syntax`):

* ``ref_tokens`` (Qwen2-VL): ``<|object_ref_start|>label<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>``
  with integer coordinates 0-1000 relative to the image; the image a box lies in is named in words
  before it ("In the second image: ...", "image 2").
* ``json_pixels`` (Qwen2.5-VL): a JSON list ``[{"bbox_2d": [x1, y1, x2, y2], "label": "...", "image": 2}]``,
  often in a ```json fence, coordinates in absolute pixels of the *resized* image; ``image`` is
  1-based like the words of the other syntax.
* ``json_relative`` (Qwen3-VL): the same JSON with coordinates 0-1000 relative to the image.

In both, an answer may be wrapped as ``<think>...</think><answer>...</answer>`` (chain of thought);
only the answer part is parsed then.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from .errors import InputError

MODES = ("direct", "cot", "raw")
NO_TARGET_TEXT = "None"


@dataclass(frozen=True)
class BoxSyntax:
    """How a model writes boxes: the text form and the coordinate frame."""

    name: str
    form: str  # "ref_tokens" (special-token boxes) | "json" (bbox_2d objects)
    relative: bool  # True: integers 0-1000 of the image's width / height; False: pixels of the resized image


SYNTAXES = {syntax.name: syntax for syntax in (
    BoxSyntax("ref_tokens", "ref_tokens", relative=True),
    BoxSyntax("json_pixels", "json", relative=False),
    BoxSyntax("json_relative", "json", relative=True),
)}


@dataclass(frozen=True)
class Box:
    """A target: the 0-based index of the image it lies in, and its corners in that image's original pixels."""

    image: int
    x1: float
    y1: float
    x2: float
    y2: float
    label: str = ""

    def as_tuple(self) -> tuple[int, tuple[float, float, float, float]]:
        return self.image, (self.x1, self.y1, self.x2, self.y2)


@dataclass(frozen=True)
class ImageGeometry:
    """Original size of an image and the size the preprocessor resized it to (both width, height)."""

    width: int
    height: int
    resized_width: int
    resized_height: int


ORDINALS = (
    "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
    "eleventh", "twelfth",
)
_ORDINAL_INDEX = {word: i for i, word in enumerate(ORDINALS)}
_NUMBER_SUFFIX = r"(?:st|nd|rd|th)"
# "second image", "2nd image", "image 2", "image #2", "picture 2", "Image-2": the last mention before a box names its image.
_IMAGE_REF = re.compile(
    r"\b(?:(?P<word>" + "|".join(ORDINALS) + r")|(?P<num1>\d+)" + _NUMBER_SUFFIX + r")\s+(?:image|picture|photo|frame|view)\b"
    r"|\b(?:image|picture|photo|frame|view)\s*[#:\-]?\s*(?P<num2>\d+)\b",
    re.IGNORECASE,
)
_NUM = r"(-?\d+(?:\.\d+)?)"
_QWEN2_BOX = re.compile(
    r"(?:<\|object_ref_start\|>(?P<label>.*?)<\|object_ref_end\|>\s*)?"
    r"(?:<\|box_start\|>)?\s*\(\s*" + _NUM + r"\s*,\s*" + _NUM + r"\s*\)\s*,\s*\(\s*" + _NUM + r"\s*,\s*" + _NUM
    + r"\s*\)\s*(?:<\|box_end\|>|<\|box_start\|>)?",
    re.DOTALL,
)
_JSON_OBJECT = re.compile(r"\{[^{}]*\}", re.DOTALL)
_BBOX_KEY = re.compile(r'"bbox_2d"\s*:\s*\[\s*' + r"\s*,\s*".join([_NUM] * 4) + r"\s*\]")
_LABEL_KEY = re.compile(r'"label"\s*:\s*"((?:[^"\\]|\\.)*)"')
_IMAGE_KEY = re.compile(r'"(?:image|image_index|image_id|img)"\s*:\s*"?(\d+)"?')
_ANSWER = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.DOTALL)
_THINK_ANSWER = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.DOTALL)


def box_syntax(name: str) -> BoxSyntax:
    """The syntax called `name` (a manifest's box_syntax, a training row's syntax column)."""
    found = SYNTAXES.get(name) if isinstance(name, str) else None
    if found is None:
        raise InputError(f"unknown box syntax {name!r}; expected one of {', '.join(SYNTAXES)}")
    return found


# ----------------------------------------------------------------------------------------------
# Instructions (prompt text added to the query in "direct" and "cot" modes)

_FORMAT_HINT = {
    "ref_tokens": (
        "Give every target as <|object_ref_start|>label<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|> "
        "with coordinates from 0 to 1000, each after the image it lies in (\"In the second image: ...\"). "
        f"If nothing matches, answer {NO_TARGET_TEXT}."
    ),
    "json_pixels": (
        'Give every target as JSON: [{"bbox_2d": [x1, y1, x2, y2], "label": "...", "image": n}], '
        "with pixel coordinates and n the number of the image it lies in. If nothing matches, answer []."
    ),
    "json_relative": (
        'Give every target as JSON: [{"bbox_2d": [x1, y1, x2, y2], "label": "...", "image": n}], '
        "with coordinates from 0 to 1000 and n the number of the image it lies in. If nothing matches, answer []."
    ),
}
_COT_HINT = "First think it through inside <think></think>, then give the final answer inside <answer></answer>."


def build_instruction(query: str, syntax: str, mode: str) -> str:
    """The user text for `query` in a mode: raw sends the query verbatim; direct and cot add the format."""
    hint = _FORMAT_HINT[box_syntax(syntax).name]
    if mode == "raw":
        return query
    if mode == "direct":
        return f"{query}\n{hint}"
    if mode == "cot":
        return f"{query}\n{hint}\n{_COT_HINT}"
    raise InputError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")


# ----------------------------------------------------------------------------------------------
# Formatting (targets -> model text), used to build training answers


def _to_syntax_coords(box: Box, syntax: BoxSyntax, geom: ImageGeometry) -> list[int]:
    if syntax.relative:
        sx, sy = 1000.0 / geom.width, 1000.0 / geom.height
    else:
        sx, sy = geom.resized_width / geom.width, geom.resized_height / geom.height
    return [round(box.x1 * sx), round(box.y1 * sy), round(box.x2 * sx), round(box.y2 * sy)]


def format_boxes(boxes: list[Box], syntax: str, geometries: list[ImageGeometry]) -> str:
    """The answer text for `boxes` in a syntax (NO_TARGET_TEXT / [] when there are none)."""
    syntax = box_syntax(syntax)
    if syntax.form == "json":
        items = []
        for box in boxes:
            item = {"bbox_2d": _to_syntax_coords(box, syntax, geometries[box.image]), "label": box.label}
            if len(geometries) > 1:
                item["image"] = box.image + 1
            items.append(item)
        return "```json\n" + json.dumps(items, ensure_ascii=False) + "\n```"
    if not boxes:
        return NO_TARGET_TEXT
    parts, current_image = [], None
    for box in boxes:
        x1, y1, x2, y2 = _to_syntax_coords(box, syntax, geometries[box.image])
        text = f"<|object_ref_start|>{box.label}<|object_ref_end|><|box_start|>({x1},{y1}),({x2},{y2})<|box_end|>"
        if len(geometries) > 1 and box.image != current_image:
            text = f"In the {_ordinal(box.image)} image: {text}"
            current_image = box.image
        parts.append(text)
    return "\n".join(parts)


def format_answer(boxes: list[Box], syntax: str, geometries: list[ImageGeometry], mode: str = "direct",
                  reasoning: str = "") -> str:
    """A whole assistant turn: the boxes, wrapped in <think>/<answer> for chain-of-thought mode."""
    answer = format_boxes(boxes, syntax, geometries)
    if mode == "cot":
        return f"<think>{reasoning}</think><answer>{answer}</answer>"
    return answer


def _ordinal(index: int) -> str:
    return ORDINALS[index] if index < len(ORDINALS) else f"{index + 1}th"


# ----------------------------------------------------------------------------------------------
# Parsing (model text -> boxes in original pixels); tolerant: what cannot be read is skipped.
# Model text is hostile input (a quantized or fine-tuned model can write anything): the parser never
# raises on any text, and every box it returns is finite and inside its image.

# Image numbers longer than this are not an image (and int() refuses strings over 4300 digits).
_MAX_INDEX_DIGITS = 6


def answer_part(text: str) -> str:
    """The part of a completion that holds the answer: inside the last <answer> when there is one."""
    answers = _ANSWER.findall(text)
    return answers[-1] if answers else text


def follows_mode(text: str, mode: str) -> bool:
    """Whether a completion has the shape its mode asks for (cot: <think>..</think><answer>..</answer>)."""
    if mode == "cot":
        return _THINK_ANSWER.match(text) is not None
    return "<think>" not in text and "<answer>" not in text


# What a model writes in the other form when it leaves its own (a JSON model may still write special-token
# boxes, and vice versa): special-token boxes are always relative; JSON from a special-token model is
# read as Qwen2.5-VL's pixels.
_OTHER_FORM = {"ref_tokens": SYNTAXES["json_pixels"], "json": SYNTAXES["ref_tokens"]}


def parse_answer(text: str, syntax: str, geometries: list[ImageGeometry]) -> list[Box]:
    """Boxes in `text` (a whole completion), mapped to original pixels, clamped to their image.

    Boxes naming an image outside `geometries` are dropped; unreadable fragments are skipped.
    """
    syntax = box_syntax(syntax)
    body = answer_part(text)
    raw = _PARSERS[syntax.form](body)
    if not raw:
        syntax = _OTHER_FORM[syntax.form]
        raw = _PARSERS[syntax.form](body)
    boxes = []
    for image, coords, label in raw:
        if image is None or not 0 <= image < len(geometries):
            continue
        box = _to_original(image, coords, label, syntax, geometries[image])
        if box is not None:
            boxes.append(box)
    return boxes


def has_parsable_answer(text: str, syntax: str) -> bool:
    """Whether the answer part is boxes in the syntax's own form or an explicit no-target answer."""
    body = answer_part(text).strip()
    if box_syntax(syntax).form == "json":
        return bool(_parse_json(body)) or _strip_fence(body) == "[]"
    return bool(_parse_ref_tokens(body)) or body == NO_TARGET_TEXT


def _to_original(image: int, coords: tuple[float, ...], label: str, syntax: BoxSyntax,
                 geom: ImageGeometry) -> Box | None:
    """The box in original pixels, corners ordered and clamped to the image; None when a coordinate is
    not a finite number (NaN cannot be clamped; an overflowing "1e400" or 400-digit number is infinite)."""
    if not all(math.isfinite(value) for value in coords):
        return None
    if syntax.relative:
        sx, sy = geom.width / 1000.0, geom.height / 1000.0
    else:
        sx, sy = geom.width / geom.resized_width, geom.height / geom.resized_height
    x1, x2 = sorted((coords[0] * sx, coords[2] * sx))
    y1, y2 = sorted((coords[1] * sy, coords[3] * sy))
    clamp = lambda v, hi: min(max(v, 0.0), float(hi))  # noqa: E731
    corners = clamp(x1, geom.width), clamp(y1, geom.height), clamp(x2, geom.width), clamp(y2, geom.height)
    if not all(math.isfinite(value) for value in corners):  # a finite coordinate times a scale can overflow
        return None
    return Box(image, *corners, _printable(label.strip()))


def _printable(text: str) -> str:
    """`text` with lone surrogates (from a JSON escape such as \\ud800) replaced, so that a label can be
    printed and encoded as UTF-8."""
    return text.encode("utf-8", "replace").decode("utf-8")


def _index(digits: str) -> int | None:
    """A 1-based image number as a 0-based index; None for a number no image has."""
    return int(digits) - 1 if len(digits) <= _MAX_INDEX_DIGITS else None


def _image_mention(segment: str) -> int | None:
    found = None
    for match in _IMAGE_REF.finditer(segment):
        if match.group("word"):
            found = _ORDINAL_INDEX[match.group("word").lower()]
        else:
            found = _index(match.group("num1") or match.group("num2"))
    return found


def _parse_ref_tokens(text: str) -> list[tuple[int | None, tuple[float, ...], str]]:
    out, image, last_end = [], 0, 0
    for match in _QWEN2_BOX.finditer(text):
        segment = text[last_end:match.start()]
        if _IMAGE_REF.search(segment):  # a mention, even of an image number no image has, moves the box there
            image = _image_mention(segment)
        coords = tuple(float(match.group(i)) for i in range(2, 6))
        out.append((image, coords, match.group("label") or ""))
        last_end = match.end()
    return out


def _strip_fence(text: str) -> str:
    text = text.strip()
    if text.startswith("```"):
        text = text.split("\n", 1)[1] if "\n" in text else ""
        text = text.rsplit("```", 1)[0]
    return text.strip()


def _parse_json(text: str) -> list[tuple[int | None, tuple[float, ...], str]]:
    out = []
    for obj in _JSON_OBJECT.findall(text):
        bbox = _BBOX_KEY.search(obj)
        if not bbox:
            continue
        coords = tuple(float(bbox.group(i)) for i in range(1, 5))
        label_match = _LABEL_KEY.search(obj)
        label = _json_string(label_match.group(1)) if label_match else ""
        image_match = _IMAGE_KEY.search(obj)
        image = _index(image_match.group(1)) if image_match else 0
        out.append((image, coords, label))
    return out


_PARSERS = {"ref_tokens": _parse_ref_tokens, "json": _parse_json}


def _json_string(escaped: str) -> str:
    """The JSON string body `escaped` decoded, or as written when its escapes are bad (`a\\xb`)."""
    try:
        return json.loads(f'"{escaped}"')
    except ValueError:  # JSONDecodeError, and control characters json refuses inside strings
        return escaped


# ----------------------------------------------------------------------------------------------
# What the syntax forces: text no choice of the model can change once an answer has begun a box


# (what the generated text ends with, what must follow), as `format_boxes` writes each form's boxes.
_FORCED = {
    "ref_tokens": (
        (re.compile(r"<\|object_ref_end\|>$"), "<|box_start|>("),
        (re.compile(r"<\|box_start\|>\(\d+,\d+\)$"), ",("),
        (re.compile(r"<\|box_start\|>\(\d+,\d+\),\(\d+,\d+\)$"), "<|box_end|>"),
    ),
    "json": (
        (re.compile(r'\{"$'), 'bbox_2d": ['),
        (re.compile(r'"bbox_2d": \[\d+, \d+, \d+, \d+\]$'), ', "label": "'),
    ),
}


def forced_continuation(text: str, syntax: str, mode: str) -> str:
    """The text the box syntax forces after `text` (what has been generated so far), or "".

    Only inside an answer: in chain-of-thought mode after ``<answer>``, never in raw mode (its format is
    the caller's). The engine's jump-forward feeds this text in one decoder pass instead of generating
    it token by token."""
    form = box_syntax(syntax).form
    if mode == "raw" or (mode == "cot" and "<answer>" not in text):
        return ""
    for ending, forced in _FORCED[form]:
        if ending.search(text):
            return forced
    return ""


def last_image_mention(text: str) -> int | None:
    """The 0-based image the last image reference in `text` names ("the second image", "image-2"), if any.

    Public so that data loaders resolve "locate it in the third image" with the same rules the parser uses.
    """
    return _image_mention(text)
