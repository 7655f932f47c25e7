"""COCO box AP for single-image grounding: hand-worked cases, the real MC-Bench COCO file as a generic
ground truth, the annotation-id-0 fix, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gemvg.benchmarks import eval_cli
from gemvg.benchmarks.coco_ap import coco_box_ap, coco_from_dict, load_results, run_cocoeval

from .paths import SHARED_DATA

REAL_GT = SHARED_DATA / "mc-bench" / "MC-Bench_coco_format.json"


def one_box_gt(annotation_id: int = 1) -> dict:
    return {
        "images": [{"id": 1, "width": 200, "height": 200, "file_name": "a.jpg"}],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [{"id": annotation_id, "image_id": 1, "category_id": 1, "bbox": [0, 0, 100, 100],
                         "area": 10000, "iscrowd": 0}],
    }


def detection(bbox, score=1.0, image_id=1, category_id=1) -> dict:
    return {"image_id": image_id, "category_id": category_id, "bbox": bbox, "score": score}


def test_an_iou_of_062_passes_three_of_the_ten_thresholds():
    # [0, 0, 62, 100] inside [0, 0, 100, 100]: IoU 0.62 >= .50, .55, .60 and < .65: AP = 3/10.
    result = coco_box_ap(one_box_gt(), [detection([0, 0, 62, 100])])
    assert result.ap50 == pytest.approx(1.0)
    assert result.ap75 == 0.0
    assert result.ap == pytest.approx(0.3)


def test_a_higher_scored_false_positive_halves_ap50():
    # Ranked: a miss (0.9) then a hit (0.8): precision 0.5 at recall 1, interpolated to every recall.
    result = coco_box_ap(one_box_gt(), [detection([150, 150, 40, 40], 0.9), detection([0, 0, 100, 100], 0.8)])
    assert result.ap50 == pytest.approx(0.5)
    # Reversed scores: the hit comes first, the miss after full recall costs nothing.
    result = coco_box_ap(one_box_gt(), [detection([150, 150, 40, 40], 0.8), detection([0, 0, 100, 100], 0.9)])
    assert result.ap50 == pytest.approx(1.0)


def test_annotation_id_0_is_renumbered_because_pycocotools_would_count_its_match_as_a_miss():
    gt, perfect = one_box_gt(annotation_id=0), [detection([0, 0, 100, 100])]
    raw = coco_from_dict(gt)
    evaluation = run_cocoeval(raw, load_results(raw, perfect))
    assert evaluation.eval["precision"][0, :, 0, 0, 2].max() == 0.0  # plain pycocotools: a miss
    assert coco_box_ap(gt, perfect).ap == pytest.approx(1.0)


def test_no_detections_score_zero():
    assert coco_box_ap(one_box_gt(), []).as_dict() == {"ap": 0.0, "ap50": 0.0, "ap75": 0.0}


def test_real_file_ground_truth_as_detections_scores_1():
    gt = json.loads(REAL_GT.read_text())
    results = [detection(a["bbox"], 1.0, a["image_id"], a["category_id"]) for a in gt["annotations"]]
    result = coco_box_ap(gt, results)
    assert (result.ap, result.ap50, result.ap75) == (pytest.approx(1.0),) * 3
    # Moved right by its image's width, every box lies outside its image and overlaps no ground truth: 0.
    widths = {image["id"]: image["width"] for image in gt["images"]}
    shifted = [dict(r, bbox=[r["bbox"][0] + widths[r["image_id"]], *r["bbox"][1:]]) for r in results]
    assert coco_box_ap(gt, shifted).ap50 == 0.0


def test_cli_json_and_table(tmp_path, capsys):
    gt_path, results_path = tmp_path / "gt.json", tmp_path / "results.json"
    gt_path.write_text(json.dumps(one_box_gt()))
    results_path.write_text(json.dumps([detection([0, 0, 62, 100])]))
    assert eval_cli.main(["coco", "--annotations", str(gt_path), "--predictions", str(results_path), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == {"ap": pytest.approx(0.3), "ap50": pytest.approx(1.0), "ap75": 0.0}
    assert eval_cli.main(["coco", "--annotations", str(gt_path), "--predictions", str(results_path)]) == 0
    assert capsys.readouterr().out.strip() == "AP 30.00   AP50 100.00   AP75 0.00"


@pytest.mark.parametrize("gt_text, results_text, needle", [
    (None, "[]", "cannot read"),
    ("[]", "[]", "must be a JSON object"),
    ('{"images": []}', "[]", "'annotations'"),
    ("GT", "[not json", "not valid JSON"),
    ("GT", '[{"image_id": 7, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1}]', "image_id 7"),
    ("GT", '[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}]', "'score'"),
])
def test_cli_bad_input_is_one_line_and_exit_2(gt_text, results_text, needle, tmp_path, capsys):
    gt_path, results_path = tmp_path / "gt.json", tmp_path / "results.json"
    if gt_text is not None:
        gt_path.write_text(json.dumps(one_box_gt()) if gt_text == "GT" else gt_text)
    results_path.write_text(results_text)
    code = eval_cli.main(["coco", "--annotations", str(gt_path), "--predictions", str(results_path)])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and err.count("\n") == 1 and "Traceback" not in err
