"""MIG-Bench (Migician, ACL 2025): loader, official prompt, official scoring, and a stricter variant.

The official protocol (Migician's MIG-Bench evaluation script) is reproduced to the letter, quirks included:

* box extraction tries six regex patterns in a fixed order and keeps every match of the first one that
  matches anything;
* normalisation divides by 1000 when v >= 1 for a single match but only when v > 1 for several matches
  (so a literal 1 means 1.0 there), and only the first of several boxes is scored;
* IoU is computed in 0-1 space without the +1 pixel convention, is 0 when the boxes do not overlap
  (right < left or bottom < top), and uses signed areas;
* the image index is never checked.

The `strict` variant additionally checks the image index: every box in the response is scored, each in
the image the response names before it, and boxes are matched to the ground truth one to one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from gemvg.benchmarks.coco_ap import BenchmarkInputError, read_json
# The runtime parser's rule for image references ("second image", "2th image", "image-2", "Image2"), so
# --strict places boxes exactly where the engine's parser would.
from gemvg.runtime.grounding import last_image_mention

# Appended verbatim (typos and the second <|box_start|> included) when an item's need_format is true.
OFFICIAL_FORMAT_SUFFIX = "Format:<|box_start|>(x1,y1),(x2,y2)<|box_start|>. Don't generate addtional words."
OFFICIAL_MAX_NEW_TOKENS = 128
THRESHOLDS = (0.7, 0.5, 0.3)
METRIC_KEYS = ("IOU@0.7", "IOU@0.5", "IOU@0.3", "AVE_IOU")

Box = list[float]


# ----------------------------------------------------------------------------------------------
# Annotations


@dataclass(frozen=True)
class MigItem:
    """One MIG-Bench item; `index` is its position in MIG_data.json (the key predictions use)."""

    index: int
    task: str
    images: tuple[str, ...]
    question: str
    answer: tuple[float, float, float, float]
    additional_info: str
    need_format: bool


_ITEM_KEYS = ("task", "images", "question", "answer", "additional_info", "need_format")


def load_annotations(path: str | Path) -> list[MigItem]:
    """Read MIG_data.json into MigItems, raising BenchmarkInputError on anything that is not that format."""
    raw = read_json(path, "MIG-Bench annotations")
    if not isinstance(raw, list):
        raise BenchmarkInputError(f"MIG-Bench annotations {str(path)!r} must be a JSON list of items")
    return [_parse_item(position, entry) for position, entry in enumerate(raw)]


def _parse_item(position: int, entry: object) -> MigItem:
    if not isinstance(entry, dict) or any(key not in entry for key in _ITEM_KEYS):
        raise BenchmarkInputError(f"MIG-Bench item #{position} lacks one of the keys {', '.join(_ITEM_KEYS)}")
    answer = entry["answer"]
    if not (isinstance(answer, list) and len(answer) == 4 and all(isinstance(v, (int, float)) for v in answer)):
        raise BenchmarkInputError(f"MIG-Bench item #{position}: answer must be 4 numbers, got {answer!r}")
    return MigItem(
        index=position, task=str(entry["task"]), images=tuple(entry["images"]), question=str(entry["question"]),
        answer=tuple(float(v) for v in answer), additional_info=str(entry["additional_info"] or ""),
        need_format=bool(entry["need_format"]),
    )


def official_prompt(item: MigItem) -> str:
    """The text the official evaluation sends with the item's images.

    The suffix is concatenated without a separator: the official script appends it to the question, and
    almost every question already ends in a space (refer_grounding's do not, giving "image-2.Format:...").
    """
    return item.question + OFFICIAL_FORMAT_SUFFIX if item.need_format else item.question


# ----------------------------------------------------------------------------------------------
# Which image an item's target lies in (not part of the official protocol: used by --strict only)

# The region task shows a source image followed by crops of it; the target is always in the source image.
_SOURCE_IMAGE_TASKS = frozenset({"region"})
# Spot-the-difference pairs: the question names no image and the box is the same in both images.
_UNNAMED_TARGET_TASKS = frozenset({"diff"})
# group_grounding questions name no image: the target's image is stated in additional_info
# ("It is in the fifth image. <|box_start|>...").
_TARGET_IN_ADDITIONAL_INFO_TASKS = frozenset({"group_grounding"})


def question_image(item: MigItem) -> int | None:
    """The image the question tells the model to look in (0-based), or None where it names none.

    Worked out from the data (every template of every task): the target is the *last* image the question
    names ("...marked in the first image ... locate it in the 4th image"), except in region, where it is the
    "source image" (always the first), and in diff and group_grounding, whose questions name no image.
    """
    if item.task in _SOURCE_IMAGE_TASKS:
        return 0
    if item.task in _UNNAMED_TARGET_TASKS | _TARGET_IN_ADDITIONAL_INFO_TASKS:
        return None
    return last_image_mention(item.question)


def target_image(item: MigItem) -> int | None:
    """The image the ground-truth box lies in (0-based), or None when any image is right (diff)."""
    if item.task in _TARGET_IN_ADDITIONAL_INFO_TASKS:
        return last_image_mention(item.additional_info)
    return question_image(item)


# ----------------------------------------------------------------------------------------------
# Official box extraction

_INT = r"(\d+)"
_DEC = r"(\d+\.\d+)"
# The official cascade, in its order; the first pattern with any match wins.
OFFICIAL_BOX_PATTERNS: tuple[re.Pattern[str], ...] = (
    re.compile(r"\(" + _INT + r",\s*" + _INT + r"\),\s*\(" + _INT + r",\s*" + _INT + r"\)"),      # (a) (x1,y1),(x2,y2)
    re.compile(r"\[" + _DEC + r",\s*" + _DEC + r",\s*" + _DEC + r",\s*" + _DEC + r"\]"),        # (b) [0.1, 0.2, 0.3, 0.4]
    re.compile(r"\(" + _DEC + r"," + _DEC + r"\),\(" + _DEC + r"," + _DEC + r"\)"),              # (c) (0.1,0.2),(0.3,0.4)
    re.compile(r"\(" + _DEC + r",\s*" + _DEC + r",\s*" + _DEC + r",\s*" + _DEC + r"\)"),        # (d) (0.1, 0.2, 0.3, 0.4)
    re.compile(r"\[" + _INT + r",\s*" + _INT + r",\s*" + _INT + r",\s*" + _INT + r"\]"),        # (e) [1, 2, 3, 4]
    re.compile(r"<box>" + _INT + r"\s+" + _INT + r"\s+" + _INT + r"\s+" + _INT + r"</box>"),    # (f) <box>1 2 3 4</box>
)


def find_box_matches(response: str) -> list[re.Match[str]]:
    """Every match of the first official pattern that matches anything in `response` (empty if none does)."""
    for pattern in OFFICIAL_BOX_PATTERNS:
        matches = list(pattern.finditer(response))
        if matches:
            return matches
    return []


def normalise_matches(captures: list[tuple[str, ...]]) -> list[Box]:
    """The official normalisation of a pattern's captured coordinate strings, one box per match.

    One match: v -> v/1000 if v >= 1. Several matches: v -> v/1000 if v > 1 (a literal 1 stays 1.0).
    A box whose strings do not convert becomes [0, 0, 0, 0]; with the official patterns every capture is
    digits, so this branch cannot be reached from `extract_box` and exists for fidelity only.
    """
    single = len(captures) == 1
    boxes = []
    for capture in captures:
        try:
            values = [float(v) for v in capture]
        except (TypeError, ValueError):
            boxes.append([0.0, 0.0, 0.0, 0.0])
            continue
        if single:
            boxes.append([v / 1000 if v >= 1 else v for v in values])
        else:
            boxes.append([v / 1000 if v > 1 else v for v in values])
    return boxes


def extract_box(response: str) -> Box | None:
    """The box the official scorer reads from a response (0-1 space), or None when no pattern matches."""
    matches = find_box_matches(response)
    if not matches:
        return None
    return normalise_matches([m.groups() for m in matches])[0]


def official_iou(pred: Box, gt: Box) -> float:
    """IoU as the official scorer computes it: 0-1 space, no +1, signed areas, 0 when the overlap is empty.

    A zero union (two identical degenerate boxes) would divide by zero in the official code; it scores 0 here.
    """
    left, top = max(pred[0], gt[0]), max(pred[1], gt[1])
    right, bottom = min(pred[2], gt[2]), min(pred[3], gt[3])
    if right < left or bottom < top:
        return 0.0
    intersection = (right - left) * (bottom - top)
    area_pred = (pred[2] - pred[0]) * (pred[3] - pred[1])
    area_gt = (gt[2] - gt[0]) * (gt[3] - gt[1])
    union = area_gt + area_pred - intersection
    if union == 0:
        return 0.0
    return intersection / union


def official_item_iou(response: str | None, item: MigItem) -> float:
    """The official per-item score: IoU of the first extracted box, 0 with no response or no box."""
    if response is None:
        return 0.0
    box = extract_box(response)
    return 0.0 if box is None else official_iou(box, list(item.answer))


# ----------------------------------------------------------------------------------------------
# Strict scoring: image index checked, every box counted


@dataclass(frozen=True)
class PlacedBox:
    """A box read from a response and the image (0-based) the response places it in (None: unnamed)."""

    image: int | None
    box: Box


def boxes_with_images(response: str, default_image: int | None) -> list[PlacedBox]:
    """All boxes of the winning official pattern, each in the last image named before it.

    Coordinates follow the official normalisation (several boxes: v/1000 if v > 1). A box with no image
    named anywhere before it lies in `default_image`: the image the question pointed the model to, since
    the official prompt forbids additional words (so a compliant answer names no image).
    """
    matches = find_box_matches(response)
    boxes = normalise_matches([m.groups() for m in matches])
    placed, image, segment_start = [], default_image, 0
    for match, box in zip(matches, boxes):
        mentioned = last_image_mention(response[segment_start:match.start()])
        if mentioned is not None:
            image = mentioned
        placed.append(PlacedBox(image, box))
        segment_start = match.end()
    return placed


def strict_item_score(response: str | None, item: MigItem) -> float:
    """Sum of one-to-one matched IoUs over max(#predicted, #ground truth); a box in the wrong image scores 0.

    Matching is Hungarian on IoU. The ground truth is one box (MIG-Bench has one target per item), so
    extra predicted boxes dilute the score. Where the target image is unnamed (diff), any image is right.
    """
    from scipy.optimize import linear_sum_assignment

    if response is None:
        return 0.0
    predicted = boxes_with_images(response, question_image(item))
    if not predicted:
        return 0.0
    gt_image, gt_boxes = target_image(item), [list(item.answer)]
    matrix = [[official_iou(p.box, gt) if gt_image is None or p.image == gt_image else 0.0 for gt in gt_boxes]
              for p in predicted]
    rows, cols = linear_sum_assignment(matrix, maximize=True)
    matched = sum(matrix[r][c] for r, c in zip(rows, cols))
    return matched / max(len(predicted), len(gt_boxes))


# ----------------------------------------------------------------------------------------------
# Predictions


def load_predictions(path: str | Path, item_count: int) -> dict[int, str]:
    """Read JSON lines {"index": i, "response": text}; indices must be unique and within the annotations."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise BenchmarkInputError(f"cannot read predictions file {str(path)!r}: {err.strerror or err}") from None
    predictions: dict[int, str] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        index, response = parse_prediction_line(line, f"{path}:{number}")
        if not 0 <= index < item_count:
            raise BenchmarkInputError(f"{path}:{number}: index {index} is out of range (the annotations have "
                                      f"{item_count} items, 0..{item_count - 1})")
        if index in predictions:
            raise BenchmarkInputError(f"{path}:{number}: index {index} appears twice")
        predictions[index] = response
    return predictions


def parse_prediction_line(line: str, where: str) -> tuple[int, str]:
    """The index and response of one predictions line; `where` (file:line) prefixes any error."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise BenchmarkInputError(f"{where}: not valid JSON ({err.msg})") from None
    if not isinstance(record, dict) or "index" not in record or "response" not in record:
        raise BenchmarkInputError(f'{where}: expected {{"index": i, "response": "..."}}')
    index, response = record["index"], record["response"]
    if not isinstance(index, int) or isinstance(index, bool):
        raise BenchmarkInputError(f"{where}: index must be an integer, got {index!r}")
    if not isinstance(response, str):
        raise BenchmarkInputError(f"{where}: response must be a string, got {type(response).__name__}")
    return index, response


def prediction_line(index: int, response: str) -> str:
    """One line of a predictions file (what `load_predictions` reads back)."""
    return json.dumps({"index": index, "response": response}, ensure_ascii=False)


# ----------------------------------------------------------------------------------------------
# Aggregation


@dataclass
class TaskTally:
    """Running counts for one task: items, items at or above each IoU threshold, and the IoU sum."""

    total: int = 0
    at_or_above: dict[float, int] = field(default_factory=lambda: {t: 0 for t in THRESHOLDS})
    iou_sum: float = 0.0

    def add(self, iou: float) -> None:
        self.total += 1
        self.iou_sum += iou
        for threshold in THRESHOLDS:
            if iou >= threshold:
                self.at_or_above[threshold] += 1

    def as_dict(self) -> dict[str, float | int]:
        """The official report: each count and the IoU sum as 100*value/TOTAL, plus TOTAL."""
        percent = (lambda value: 100.0 * value / self.total) if self.total else (lambda value: 0.0)
        row: dict[str, float | int] = {f"IOU@{t}": percent(self.at_or_above[t]) for t in THRESHOLDS}
        row["AVE_IOU"] = percent(self.iou_sum)
        row["TOTAL"] = self.total
        return row


def item_scores(annotations: list[MigItem], predictions: Mapping[int, str], strict: bool = False,
                indices: Iterable[int] | None = None) -> dict[int, float]:
    """Per-item score (official IoU, or the strict score) for the items in `indices` (default: all)."""
    scorer = strict_item_score if strict else official_item_iou
    chosen = range(len(annotations)) if indices is None else indices
    return {i: scorer(predictions.get(i), annotations[i]) for i in chosen}


def score(annotations: list[MigItem], predictions: Mapping[int, str], strict: bool = False,
          indices: Iterable[int] | None = None) -> dict:
    """Per-task and overall scores: {"tasks": {task: row}, "overall": {"micro": row, "macro": row}}.

    A row holds "IOU@0.7", "IOU@0.5", "IOU@0.3", "AVE_IOU" (percent) and "TOTAL" (items). Micro averages
    over all scored items; macro is the unweighted mean of the task rows (its "TASKS" counts them). Items
    without a prediction score 0. `indices` restricts scoring to some items (e.g. a --limit run).
    """
    per_item = item_scores(annotations, predictions, strict, indices)
    tallies: dict[str, TaskTally] = {}
    overall = TaskTally()
    for index, value in per_item.items():
        tallies.setdefault(annotations[index].task, TaskTally()).add(value)
        overall.add(value)
    tasks = {task: tally.as_dict() for task, tally in tallies.items()}
    macro: dict[str, float | int] = {
        key: (sum(row[key] for row in tasks.values()) / len(tasks) if tasks else 0.0) for key in METRIC_KEYS
    }
    macro["TASKS"] = len(tasks)
    return {"tasks": tasks, "overall": {"micro": overall.as_dict(), "macro": macro}}


def format_table(result: dict) -> str:
    """A readable per-task table of a `score` result, with micro and macro rows."""
    header = f"{'task':<18}{'TOTAL':>7}" + "".join(f"{key:>10}" for key in METRIC_KEYS)
    lines = [header, "-" * len(header)]
    for task, row in result["tasks"].items():
        lines.append(f"{task:<18}{row['TOTAL']:>7}" + "".join(f"{row[key]:>10.2f}" for key in METRIC_KEYS))
    lines.append("-" * len(header))
    micro, macro = result["overall"]["micro"], result["overall"]["macro"]
    lines.append(f"{'overall (micro)':<18}{micro['TOTAL']:>7}" + "".join(f"{micro[k]:>10.2f}" for k in METRIC_KEYS))
    lines.append(f"{'overall (macro)':<18}{'':>7}" + "".join(f"{macro[k]:>10.2f}" for k in METRIC_KEYS))
    return "\n".join(lines)
