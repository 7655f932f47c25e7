"""Standard COCO box AP (AP, AP50, AP75) for single-image grounding (ODinW / RefCOCO style).

Also home of what every scorer in this package shares: the input error the CLI turns into a one-line
message, JSON reading that names the file on failure, and quiet pycocotools construction (pycocotools
prints progress to stdout, which would corrupt `--json` output).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gemvg.runtime.errors import GemvgError


class BenchmarkInputError(GemvgError, ValueError):
    """Input a scorer cannot use: the message is meant for the user, one line, naming the culprit."""


def read_json(path: str | Path, what: str) -> Any:
    """Parse a JSON file, turning a missing or malformed file into a BenchmarkInputError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise BenchmarkInputError(f"cannot read {what} file {str(path)!r}: {err.strerror or err}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise BenchmarkInputError(f"{what} file {str(path)!r} is not valid JSON: {err}") from None


@contextlib.contextmanager
def quiet_stdout():
    """Swallow pycocotools' progress prints (they go to stdout, where --json output goes)."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def coco_from_dict(dataset: dict) -> Any:
    """A pycocotools COCO object from an in-memory dataset dict (deep-copied: COCO keeps references)."""
    from pycocotools.coco import COCO

    for key in ("images", "annotations", "categories"):
        if not isinstance(dataset.get(key), list):
            raise BenchmarkInputError(f"ground truth is not COCO: its {key!r} entry is missing or not a list")
    coco = COCO()
    coco.dataset = copy.deepcopy(dataset)
    with quiet_stdout():
        coco.createIndex()
    return coco


def validate_results(results: Any, coco_gt: Any) -> list[dict]:
    """Check a COCO results list against its ground truth; raise BenchmarkInputError on the first bad entry.

    pycocotools itself would fail with a bare assert (unknown image) or silently drop unknown categories.
    """
    if not isinstance(results, list):
        raise BenchmarkInputError("predictions must be a JSON list of {image_id, category_id, bbox, score}")
    image_ids, category_ids = set(coco_gt.getImgIds()), set(coco_gt.getCatIds())
    for position, entry in enumerate(results):
        where = f"prediction #{position}"
        if not isinstance(entry, dict):
            raise BenchmarkInputError(f"{where} is not an object")
        for key in ("image_id", "category_id", "bbox", "score"):
            if key not in entry:
                raise BenchmarkInputError(f"{where} has no {key!r}")
        if entry["image_id"] not in image_ids:
            raise BenchmarkInputError(f"{where}: image_id {entry['image_id']!r} is not in the ground truth")
        if entry["category_id"] not in category_ids:
            raise BenchmarkInputError(f"{where}: category_id {entry['category_id']!r} is not in the ground truth")
        bbox = entry["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_finite_number(v) for v in bbox)):
            raise BenchmarkInputError(f"{where}: bbox must be [x, y, w, h] numbers, got {bbox!r}")
        if not _is_finite_number(entry["score"]):
            raise BenchmarkInputError(f"{where}: score must be a number, got {entry['score']!r}")
    return results


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_results(coco_gt: Any, results: list[dict]) -> Any:
    """The detections as a COCO object, like `COCO.loadRes`, also for an empty list (loadRes crashes on one).

    The results are deep-copied because loadRes writes area, id, iscrowd and segmentation into them.
    """
    from pycocotools.coco import COCO

    if results:
        with quiet_stdout():
            return coco_gt.loadRes(copy.deepcopy(results))
    empty = COCO()
    empty.dataset = {"images": list(coco_gt.dataset["images"]), "categories": copy.deepcopy(coco_gt.dataset["categories"]),
                     "annotations": []}
    with quiet_stdout():
        empty.createIndex()
    return empty


def run_cocoeval(coco_gt: Any, coco_dt: Any, accumulate: bool = True) -> Any:
    """COCOeval(bbox) with default parameters, evaluated (and accumulated unless told otherwise), quietly."""
    from pycocotools.cocoeval import COCOeval

    evaluation = COCOeval(coco_gt, coco_dt, "bbox")
    with quiet_stdout():
        evaluation.evaluate()
        if accumulate:
            evaluation.accumulate()
    return evaluation


@dataclass(frozen=True)
class CocoBoxAP:
    """COCO box AP over IoU .50:.95, at .50 and at .75 (area all, 100 detections), as fractions 0-1."""

    ap: float
    ap50: float
    ap75: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _without_annotation_id_zero(dataset: dict) -> dict:
    """The dataset with annotation ids 1..n if any id is 0, else unchanged.

    COCOeval records a match as the matched ground truth's id and later tests it for truth, so a detection
    matched to annotation id 0 counts as a false positive. Real COCO files number from 1; converted ones
    (MC-Bench's included) often start at 0. Ids carry no other meaning, so renumbering only removes the bug.
    MC-Bench's scorer deliberately keeps the bug, since its official numbers include it.
    """
    annotations = dataset.get("annotations")
    if not isinstance(annotations, list) or all(not isinstance(a, dict) or a.get("id") != 0 for a in annotations):
        return dataset
    renumbered = [{**a, "id": i} for i, a in enumerate(annotations, start=1)]
    return {**dataset, "annotations": renumbered}


def coco_box_ap(ground_truth: dict, results: list[dict]) -> CocoBoxAP:
    """Standard COCO box AP of `results` (a COCO results list) against a COCO ground-truth dict.

    With no detections at all the AP is 0 (pycocotools would report 0 too, after its loadRes crashed).
    Ground-truth annotation ids are renumbered from 1 when one of them is 0; see `_without_annotation_id_zero`.
    """
    coco_gt = coco_from_dict(_without_annotation_id_zero(ground_truth))
    validate_results(results, coco_gt)
    evaluation = run_cocoeval(coco_gt, load_results(coco_gt, results))
    with quiet_stdout():
        evaluation.summarize()
    # stats[0..2]: AP@[.5:.95], AP@.5, AP@.75 (area all, maxDets 100); -1 means no ground truth at all.
    ap, ap50, ap75 = (float(v) for v in evaluation.stats[:3])
    return CocoBoxAP(ap=ap, ap50=ap50, ap75=ap75)
