"""MC-Bench (Xu et al., 2024): the official weighted AP50 and image-level accuracy, prompt and conversion.

The official scoring (MC-Bench's evaluation script) is reproduced step by step, quirks included:

1. COCOeval(bbox) runs once on the raw predictions; its per-(image, category) ground-truth and detection
   lists feed the group relabelling.
2. For each image holding a "group 2" box (pycocotools' getImgIds order; a pair with group 2 in both images
   is processed twice), the permutation of the pair's ground-truth groups that best fits the predicted
   groups *by position* is chosen. The predictions are then re-read from the file before the relabelling is
   applied, so only the last processed pair's relabelling survives, and the renames run one after another,
   so they can chain (a 1<->2 swap first turns 1 into 2, then every 2 into 1).
3. Weighted AP50: COCOeval(bbox) on the relabelled predictions; per category, the mean of the precision
   values > -1 at IoU .5, area all, 100 detections; weighted by the category's share of ground-truth boxes.
4. Image-level accuracy: consecutive images in id order form pairs; a pair is right when, in both images,
   "has a ground-truth box" equals "has a prediction".

pycocotools' own quirk is kept too: COCOeval stores a match as the matched ground truth's id and tests it
for truth, so a detection matched to annotation id 0 (the real file numbers from 0) is a false positive.
The official numbers include it: perfect predictions score AP50 0.9907, not 1 (see the tests).
"""

from __future__ import annotations

import itertools
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gemvg.benchmarks.coco_ap import (
    BenchmarkInputError, coco_from_dict, load_results, read_json, run_cocoeval, validate_results,
)
from gemvg.runtime.grounding import Box, ImageGeometry, build_instruction, parse_answer

GROUP_TWO = 2  # the category id of "group 2": only pairs holding it can have more than one group
CONVERTED_SCORE = 1.0  # models state no confidence: every converted box gets the same score
GROUP_LABEL = re.compile(r"^\s*group\s*(\d+)\s*$", re.IGNORECASE)
# Our prompt (neither the benchmark's paper nor its data give an official one): the description, the facts the task
# relies on (zero, one or two images may hold targets; several targets form groups), then the model's
# box syntax from the runtime, whose parser reads the answer back.
QUERY_TEMPLATE = (
    'Find every object in the two images that matches this description: "{text}". '
    "The objects may be in one image, in both or in neither. Label each box with its group, "
    '"group 1", "group 2" and so on: boxes of the same object, or of objects that belong together, '
    "share a group."
)

Progress = Callable[[str], None]


def _silent(_: str) -> None:
    pass


# ----------------------------------------------------------------------------------------------
# Inputs


def load_ground_truth(path: str | Path) -> Any:
    """MC-Bench_coco_format.json as a pycocotools COCO object (each image carries `pair_image_id`)."""
    dataset = read_json(path, "MC-Bench ground truth")
    if not isinstance(dataset, dict):
        raise BenchmarkInputError(f"MC-Bench ground truth {str(path)!r} must be a COCO JSON object")
    coco = coco_from_dict(dataset)
    if any("pair_image_id" not in image for image in coco.dataset["images"]):
        raise BenchmarkInputError(f"{str(path)!r} is not MC-Bench_coco_format.json: images lack 'pair_image_id'")
    return coco


def subset_ground_truth(coco_gt: Any, image_ids: Sequence[int]) -> Any:
    """The ground truth restricted to some images (whole pairs, in file order, keep the pairing intact)."""
    keep = set(image_ids)
    dataset = coco_gt.dataset
    return coco_from_dict({
        **dataset,
        "images": [image for image in dataset["images"] if image["id"] in keep],
        "annotations": [ann for ann in dataset["annotations"] if ann["image_id"] in keep],
    })


def load_predictions(path: str | Path, coco_gt: Any) -> list[dict]:
    """A COCO results list, checked against the ground truth (images and categories must exist)."""
    return validate_results(read_json(path, "MC-Bench predictions"), coco_gt)


# ----------------------------------------------------------------------------------------------
# Step 2: group relabelling


@dataclass(frozen=True)
class PairAssignment:
    """The relabelling chosen for one processed image and its pair.

    `permutation[k-1]` is the ground-truth category predicted group k is renamed to; None when there were
    more predicted groups than ground-truth groups (no permutation exists; nothing is renamed).
    """

    image_id: int
    pair_image_id: int
    permutation: tuple[int, ...] | None
    mean_iou: float


def _matched_ious(detections: list[dict], ground_truths: list[dict]) -> list[float]:
    """IoUs of a one-to-one Hungarian matching (on -IoU) of detections to ground truths, as the official code."""
    from pycocotools import mask as mask_utils
    from scipy.optimize import linear_sum_assignment

    if not detections or not ground_truths:
        return []
    ious = np.asarray(mask_utils.iou([d["bbox"] for d in detections], [g["bbox"] for g in ground_truths],
                                     [int(g["iscrowd"]) for g in ground_truths]), dtype=float)
    rows, cols = linear_sum_assignment(-ious)
    return [float(ious[r, c]) for r, c in zip(rows, cols)]


def categories_by_image(table: dict) -> dict[int, set[int]]:
    """The categories each image has entries for in a COCOeval _gts or _dts table ((image, category) -> list)."""
    found: dict[int, set[int]] = {}
    for (image, category), anns in table.items():
        if anns:
            found.setdefault(image, set()).add(category)
    return found


def choose_permutation(evaluation: Any, image_ids: tuple[int, int], gt_categories: list[int],
                       predicted_count: int) -> tuple[tuple[int, ...] | None, float]:
    """The official best permutation for a pair of images, from a COCOeval's _gts/_dts lists.

    `gt_categories` is the pair's set of ground-truth categories in the set's iteration order. Predicted
    group k (k = 1..predicted_count, by position, not by the predicted id) is scored against ground-truth
    category P[k-1] in both images; a permutation scores the mean of all matched IoUs (0 with none); the
    first best wins. No permutation exists when there are more predicted than ground-truth groups.
    """
    # The matching of predicted group k to ground-truth category c in an image does not depend on the rest
    # of the permutation: compute each once (a 7-group pair has 5,040 permutations).
    matched = {
        (position, gt_category, image): _matched_ious(evaluation._dts.get((image, position), []),
                                                       evaluation._gts.get((image, gt_category), []))
        for position in range(1, predicted_count + 1) for gt_category in gt_categories for image in image_ids
    }
    best: tuple[tuple[int, ...] | None, float] = (None, 0.0)
    for permutation in itertools.permutations(gt_categories, predicted_count):
        collected: list[float] = []
        for position, gt_category in enumerate(permutation, start=1):
            for image in image_ids:
                collected += matched[position, gt_category, image]
        mean = float(np.mean(collected)) if collected else 0.0
        if best[0] is None or mean > best[1]:
            best = (permutation, mean)
    return best


def pair_assignments(coco_gt: Any, evaluation: Any, progress: Progress = _silent) -> list[PairAssignment]:
    """The relabelling of every processed pair, in the official processing order."""
    gt_by_image, dt_by_image = categories_by_image(evaluation._gts), categories_by_image(evaluation._dts)
    image_ids = coco_gt.getImgIds(catIds=[GROUP_TWO])
    assignments = []
    for count, image_id in enumerate(image_ids, start=1):
        pair_id = coco_gt.imgs[image_id]["pair_image_id"]
        pair = (image_id, pair_id)
        # Python's own iteration order of the set, as the official code builds it (ascending for small ids).
        gt_categories = list(gt_by_image.get(image_id, set()) | gt_by_image.get(pair_id, set()))
        predicted_count = len(dt_by_image.get(image_id, set()) | dt_by_image.get(pair_id, set()))
        permutation, mean_iou = choose_permutation(evaluation, pair, gt_categories, predicted_count)
        assignments.append(PairAssignment(image_id, pair_id, permutation, mean_iou))
        if count % 50 == 0 or count == len(image_ids):
            progress(f"mc-bench: relabelled {count}/{len(image_ids)} group-2 images")
    return assignments


def apply_relabelling(raw_predictions: Sequence[dict], assignment: PairAssignment) -> list[dict]:
    """A fresh copy of the raw predictions (the official re-read) with one pair's renames applied in order.

    For k = 1..|D|, every prediction in either image whose category is k becomes P[k-1]; a later k sees the
    results of the earlier renames, so they chain.
    """
    predictions = [dict(p) for p in raw_predictions]
    if assignment.permutation is None:
        return predictions
    pair = {assignment.image_id, assignment.pair_image_id}
    for position, new_category in enumerate(assignment.permutation, start=1):
        for prediction in predictions:
            if prediction["image_id"] in pair and prediction["category_id"] == position:
                prediction["category_id"] = new_category
    return predictions


def relabel(coco_gt: Any, raw_predictions: list[dict], progress: Progress = _silent
            ) -> tuple[list[dict], list[PairAssignment]]:
    """Steps 1-2: the predictions after the official relabelling, and every pair's chosen assignment.

    Every pair re-reads the predictions before renaming, so the result is the raw predictions with only the
    last processed pair's renames; earlier pairs' choices are returned for inspection but change nothing.
    """
    progress("mc-bench: COCOeval on the raw predictions")
    evaluation = run_cocoeval(coco_gt, load_results(coco_gt, raw_predictions), accumulate=False)
    assignments = pair_assignments(coco_gt, evaluation, progress)
    if not assignments:
        return [dict(p) for p in raw_predictions], assignments
    return apply_relabelling(raw_predictions, assignments[-1]), assignments


# ----------------------------------------------------------------------------------------------
# Steps 3-4: metrics


def weighted_ap50(coco_gt: Any, predictions: list[dict]) -> tuple[float, dict[int, float]]:
    """Official weighted AP50 and the per-category AP50 it weights (fractions 0-1)."""
    evaluation = run_cocoeval(coco_gt, load_results(coco_gt, predictions))
    params = evaluation.params
    iou_index = int(np.flatnonzero(np.isclose(params.iouThrs, 0.5))[0])
    area_index = params.areaRngLbl.index("all")
    dets_index = params.maxDets.index(100)
    precision = evaluation.eval["precision"]
    total_gt = len(coco_gt.getAnnIds())
    if total_gt == 0:  # only possible for a subset without boxes: nothing to weight
        return 0.0, {int(c): 0.0 for c in params.catIds}
    per_category: dict[int, float] = {}
    weighted = 0.0
    for k, category in enumerate(int(c) for c in params.catIds):
        values = precision[iou_index, :, k, area_index, dets_index]
        values = values[values > -1]
        # A category without ground truth has only -1 values; its weight is 0, so its AP cannot matter.
        per_category[category] = float(np.mean(values)) if values.size else 0.0
        weighted += per_category[category] * len(coco_gt.getAnnIds(catIds=[category])) / total_gt
    return weighted, per_category


def image_level_accuracy(coco_gt: Any, predictions: list[dict]) -> float:
    """Share of consecutive image pairs (COCO id order) in which both images' has-box / predicted agree."""
    image_ids = coco_gt.getImgIds()
    predicted_images = {p["image_id"] for p in predictions}
    correct = 0
    for first, second in zip(image_ids[0::2], image_ids[1::2]):
        if all(bool(coco_gt.getAnnIds(imgIds=[i])) == (i in predicted_images) for i in (first, second)):
            correct += 1
    return correct / (len(image_ids) / 2)


@dataclass(frozen=True)
class McBenchScore:
    """Official MC-Bench metrics (fractions 0-1) and what produced them."""

    ap50: float
    image_accuracy: float
    category_ap50: dict[int, float] = field(default_factory=dict)
    assignments: list[PairAssignment] = field(default_factory=list)

    def as_dict(self) -> dict[str, float]:
        return {"ap50": self.ap50, "image_accuracy": self.image_accuracy}


def score(coco_gt: Any, predictions: list[dict], progress: Progress = _silent) -> McBenchScore:
    """The official MC-Bench evaluation of a COCO results list."""
    validate_results(predictions, coco_gt)
    relabelled, assignments = relabel(coco_gt, predictions, progress)
    progress("mc-bench: COCOeval on the relabelled predictions")
    ap50, per_category = weighted_ap50(coco_gt, relabelled)
    return McBenchScore(ap50, image_level_accuracy(coco_gt, relabelled), per_category, assignments)


def format_report(result: McBenchScore, coco_gt: Any) -> str:
    """A readable summary: the two official numbers and the per-group AP50 with each group's weight."""
    total_gt = len(coco_gt.getAnnIds())
    lines = [f"{'group':<10}{'GT boxes':>10}{'weight':>9}{'AP50':>9}"]
    for category, ap in result.category_ap50.items():
        count = len(coco_gt.getAnnIds(catIds=[category]))
        name = coco_gt.cats[category]["name"]
        lines.append(f"{name:<10}{count:>10}{count / total_gt:>9.3f}{100 * ap:>9.2f}")
    lines.append(f"weighted AP50:        {100 * result.ap50:.2f}")
    lines.append(f"image-level accuracy: {100 * result.image_accuracy:.2f}")
    return "\n".join(lines)


def stderr_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Running a model: the pairs, the prompt, and model boxes -> COCO results


@dataclass(frozen=True)
class McBenchPair:
    """One MC-Bench sample: a description, its style, and the two images (COCO ids, files, sizes)."""

    text_id: int
    text: str
    style: str  # "Referring", "Comparison" or "Reasoning"
    positive: bool
    image_ids: tuple[int, int]
    file_names: tuple[str, str]
    sizes: tuple[tuple[int, int], tuple[int, int]]  # (width, height) of each image


def load_pairs(path: str | Path) -> list[McBenchPair]:
    """The samples of mc-bench_v0.2_val.json, in file order (its image ids are the COCO file's)."""
    data = read_json(path, "MC-Bench annotations")
    try:
        images = {image["id"]: image for image in data["images"]}
        pairs = []
        for description in data["descriptions"]:
            first, second = (images[i] for i in description["images_id"])
            pairs.append(McBenchPair(
                text_id=description["id"], text=description["text"], style=description["text_style"],
                positive=bool(description["positive_sample"]), image_ids=(first["id"], second["id"]),
                file_names=(first["file_name"], second["file_name"]),
                sizes=((first["width"], first["height"]), (second["width"], second["height"])),
            ))
    except (KeyError, TypeError, ValueError) as err:
        raise BenchmarkInputError(f"{str(path)!r} is not mc-bench_v0.2_val.json (bad or missing {err})") from None
    return pairs


def build_query(text: str) -> str:
    """The MC-Bench question for a description, before the model's format instruction."""
    return QUERY_TEMPLATE.format(text=text)


def build_prompt(text: str, syntax: str) -> str:
    """The full user text sent with the two images: the query plus the model's box-syntax instruction."""
    return build_instruction(build_query(text), syntax, "direct")


def group_ids(labels: Sequence[str], category_count: int) -> list[int | None]:
    """The group (category id) of each label: "group N" -> N; other labels numbered in order of appearance.

    Labels compare case-insensitively, so an answer whose boxes all carry one label (or none) is group 1.
    Groups beyond the benchmark's categories get None: the box is dropped, since the scorer rejects unknown
    categories and MC-Bench has at most `category_count` groups.
    """
    explicit = [GROUP_LABEL.match(label) for label in labels]
    taken = {int(m.group(1)) for m in explicit if m}
    numbered: dict[str, int] = {}
    groups: list[int | None] = []
    for label, match in zip(labels, explicit):
        if match:
            group = int(match.group(1))
        else:
            key = label.strip().lower()
            if key not in numbered:
                used = taken | set(numbered.values())
                numbered[key] = next(g for g in itertools.count(1) if g not in used)
            group = numbered[key]
        groups.append(group if 1 <= group <= category_count else None)
    return groups


def boxes_to_results(boxes: Sequence[Box], image_ids: tuple[int, int], category_count: int = 7) -> list[dict]:
    """COCO results ({image_id, category_id, bbox [x, y, w, h], score}) for boxes in original pixels.

    `Box.image` is 0 or 1 within the pair; boxes naming another image are dropped.
    """
    results = []
    for box, group in zip(boxes, group_ids([b.label for b in boxes], category_count)):
        if group is None or not 0 <= box.image < len(image_ids):
            continue
        results.append({"image_id": image_ids[box.image], "category_id": group,
                        "bbox": [box.x1, box.y1, box.x2 - box.x1, box.y2 - box.y1], "score": CONVERTED_SCORE})
    return results


def response_to_results(text: str, syntax: str, geometries: Sequence[ImageGeometry], image_ids: tuple[int, int],
                        category_count: int = 7) -> list[dict]:
    """A model's answer for a pair as COCO results, read with the runtime's parser for its box syntax.

    Qwen2-VL boxes are 0-1000 relative, Qwen2.5-VL boxes are pixels of the resized image: `geometries`
    (original and resized size of each image) maps both to original pixels.
    """
    return boxes_to_results(parse_answer(text, syntax, list(geometries)), image_ids, category_count)
