"""GRPO rewards for grounding, with TRL's reward signature `f(completions, **dataset_columns) -> list[float]`.

Plain functions over plain data: no trainer, no torch. Completions may be strings or conversational
lists (`[{"role": "assistant", "content": "..."}]`). The dataset columns they read:

* `mode`: "cot" or "direct", how the sample was prompted;
* `syntax`: the box syntax of the model's family (gemvg.runtime.grounding.SYNTAXES);
* `targets`: per sample a list of `[image, x1, y1, x2, y2]` in original pixels (0-based image);
* `geometries`: per sample a list of `[width, height, resized_width, resized_height]`, one per image,
  which the parser needs to map the syntax's coordinates back to pixels.

Parsing is the runtime's own `parse_answer`, so what earns reward is exactly what the engine reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gemvg.runtime.grounding import ImageGeometry, follows_mode, has_parsable_answer, parse_answer

PlainBox = tuple[float, float, float, float]
Located = tuple[int, PlainBox]  # (0-based image, (x1, y1, x2, y2))


def completion_text(completion: Any) -> str:
    """The text of one completion: a string, or the last assistant message of a conversation."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    for message in reversed(list(completion)):
        if message.get("role", "assistant") != "assistant":
            continue
        content = message.get("content", "")
        if isinstance(content, str):
            return content
        return "".join(part.get("text", "") for part in content if part.get("type", "text") == "text")
    return ""


def iou(a: PlainBox, b: PlainBox) -> float:
    """Intersection over union of two pixel boxes; a box with no area has IoU 0 with everything."""
    if a[2] <= a[0] or a[3] <= a[1] or b[2] <= b[0] or b[3] <= b[1]:
        return 0.0
    inter_w = min(a[2], b[2]) - max(a[0], b[0])
    inter_h = min(a[3], b[3]) - max(a[1], b[1])
    if inter_w <= 0 or inter_h <= 0:
        return 0.0
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def match_score(predicted: Sequence[Located], targets: Sequence[Located]) -> float:
    """Hungarian matching maximising total IoU (boxes in different images score 0), normalised.

    score = sum of matched IoUs / max(#predicted, #targets): extra and missing boxes both cost.
    Both empty (a correct "nothing here") scores 1; exactly one empty scores 0.
    """
    if not predicted and not targets:
        return 1.0
    if not predicted or not targets:
        return 0.0
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    gains = np.zeros((len(predicted), len(targets)))
    for i, (p_image, p_box) in enumerate(predicted):
        for j, (t_image, t_box) in enumerate(targets):
            if int(p_image) == int(t_image):
                gains[i, j] = iou(p_box, t_box)
    rows, cols = linear_sum_assignment(gains, maximize=True)
    return float(gains[rows, cols].sum()) / max(len(predicted), len(targets))


def geometries_from_column(value: Sequence[Sequence[int]]) -> list[ImageGeometry]:
    return [ImageGeometry(*(int(v) for v in row)) for row in value]


def targets_from_column(value: Sequence[Sequence[float]]) -> list[Located]:
    return [(int(row[0]), (float(row[1]), float(row[2]), float(row[3]), float(row[4]))) for row in value]


def format_reward(completions: list, mode: list[str], syntax: list[str], **_: Any) -> list[float]:
    """1 when a completion has its prompt's shape (CoT: <think>..</think><answer>..</answer>; direct:
    no tags) and its answer is boxes in the model's syntax or an explicit no-target answer; else 0."""
    scores = []
    for completion, sample_mode, sample_syntax in zip(completions, mode, syntax, strict=True):
        text = completion_text(completion)
        ok = follows_mode(text, sample_mode) and has_parsable_answer(text, sample_syntax)
        scores.append(1.0 if ok else 0.0)
    return scores


def accuracy_reward(completions: list, targets: list, geometries: list, syntax: list[str], **_: Any) -> list[float]:
    """`match_score` of the boxes parsed from each completion against its sample's targets."""
    scores = []
    for completion, sample_targets, sample_geometries, sample_syntax in zip(
            completions, targets, geometries, syntax, strict=True):
        boxes = parse_answer(completion_text(completion), sample_syntax, geometries_from_column(sample_geometries))
        predicted = [box.as_tuple() for box in boxes]
        scores.append(match_score(predicted, targets_from_column(sample_targets)))
    return scores


REWARD_FUNCTIONS = {"format": format_reward, "accuracy": accuracy_reward}
