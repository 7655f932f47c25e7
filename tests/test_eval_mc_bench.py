"""MC-Bench scorer: the official group relabelling (with its quirks), weighted AP50, image-level accuracy,
the conversion of model answers to COCO results, and the CLI, on the real MC-Bench files."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gemvg.benchmarks import eval_cli
from gemvg.benchmarks.coco_ap import coco_from_dict
from gemvg.benchmarks.mc_bench import (
    build_prompt, image_level_accuracy, load_ground_truth, load_pairs, relabel, response_to_results, score,
    subset_ground_truth, weighted_ap50,
)
from gemvg.runtime.grounding import Box, ImageGeometry, format_boxes

from .paths import SHARED_DATA

DATA = SHARED_DATA / "mc-bench"
GT_FILE = DATA / "MC-Bench_coco_format.json"
PAIRS_FILE = DATA / "mc-bench_v0.2_val.json"


@pytest.fixture(scope="module")
def coco_gt():
    return load_ground_truth(GT_FILE)


def as_results(annotations, category_of=lambda ann: ann["category_id"]) -> list[dict]:
    return [{"image_id": a["image_id"], "category_id": category_of(a), "bbox": list(a["bbox"]), "score": 1.0}
            for a in annotations]


def pair_groups(coco_gt) -> dict[tuple[int, int], set[int]]:
    """The ground-truth groups of each pair (first image id, second image id)."""
    groups = {}
    for image in coco_gt.dataset["images"]:
        first = min(image["id"], image["pair_image_id"])
        pair = (first, max(image["id"], image["pair_image_id"]))
        groups.setdefault(pair, set()).update(a["category_id"] for a in coco_gt.imgToAnns[image["id"]])
    return groups


def pairs_with_groups(coco_gt, wanted: set[int]) -> list[tuple[int, int]]:
    return [pair for pair, groups in pair_groups(coco_gt).items() if groups == wanted]


def subset(coco_gt, pairs: list[tuple[int, int]]):
    return subset_ground_truth(coco_gt, [image for pair in pairs for image in pair])


# ----------------------------------------------------------------------------------------------
# Whole-file invariants


def test_perfect_predictions_score_1_when_no_annotation_has_id_0(coco_gt):
    # pycocotools records a match as the ground truth's id and tests it for truth: id 0 reads as unmatched.
    # With ids shifted by one, the ground truth as predictions must score exactly 1.
    shifted = dict(coco_gt.dataset, annotations=[dict(a, id=a["id"] + 1) for a in coco_gt.dataset["annotations"]])
    gt = coco_from_dict(shifted)
    result = score(gt, as_results(gt.dataset["annotations"]))
    assert result.ap50 == pytest.approx(1.0)
    assert all(ap == 1.0 for ap in result.category_ap50.values())
    assert result.image_accuracy == 1.0


def test_perfect_predictions_on_the_real_ids_lose_exactly_annotation_0(coco_gt):
    # The real file numbers annotations from 0, and the official script runs pycocotools on it, so the
    # official score of a perfect answer is below 1: annotation 0's detection counts as a false positive.
    # It is the first detection of its group (equal scores keep image order), so precision is (n-1)/n at
    # every recall up to (n-1)/n, and 0 at the 101st recall threshold (1.0): AP50 = (100/101)(n-1)/n.
    first = coco_gt.anns[0]
    assert first["id"] == 0
    group = first["category_id"]
    assert first["image_id"] == min(a["image_id"] for a in coco_gt.dataset["annotations"] if a["category_id"] == group)
    n = sum(1 for a in coco_gt.dataset["annotations"] if a["category_id"] == group)
    result = score(coco_gt, as_results(coco_gt.dataset["annotations"]))
    expected_group_ap = (100 / 101) * (n - 1) / n
    assert result.category_ap50[group] == pytest.approx(expected_group_ap)
    assert all(ap == 1.0 for c, ap in result.category_ap50.items() if c != group)
    share = n / len(coco_gt.dataset["annotations"])
    assert result.ap50 == pytest.approx(1 - share * (1 - expected_group_ap))
    assert result.image_accuracy == 1.0


def test_no_predictions_score_zero_ap_and_only_empty_pairs_are_right(coco_gt):
    result = score(coco_gt, [])
    assert result.ap50 == 0.0
    empty_pairs = sum(1 for groups in pair_groups(coco_gt).values() if not groups)
    assert empty_pairs > 0
    assert result.image_accuracy == pytest.approx(empty_pairs / (len(coco_gt.dataset["images"]) / 2))


def test_every_group_2_image_is_processed_so_pairs_with_it_twice_come_twice(coco_gt):
    result = score(coco_gt, [])
    with_group_2 = {a["image_id"] for a in coco_gt.dataset["annotations"] if a["category_id"] == 2}
    assert [a.image_id for a in result.assignments] == coco_gt.getImgIds(catIds=[2])
    assert len(result.assignments) == len(with_group_2)
    twice = Counter(frozenset((a.image_id, a.pair_image_id)) for a in result.assignments)
    assert {p for p, c in twice.items() if c == 2} == {
        frozenset((i, coco_gt.imgs[i]["pair_image_id"])) for i in with_group_2 if coco_gt.imgs[i]["pair_image_id"] in with_group_2}


# ----------------------------------------------------------------------------------------------
# Relabelling, on pairs of the real file


def test_relabelling_fixes_predicted_groups_that_are_a_permutation_of_the_ground_truth(coco_gt):
    # Ground-truth groups {1, 2, 3}; the model calls group 3 "1" and group 1 "2" and misses group 2.
    pair = pairs_with_groups(coco_gt, {1, 2, 3})[0]
    gt = subset(coco_gt, [pair])
    renamed = {3: 1, 1: 2}
    predictions = as_results([a for a in gt.dataset["annotations"] if a["category_id"] in renamed],
                             lambda a: renamed[a["category_id"]])
    result = score(gt, predictions)
    assert [a.permutation for a in result.assignments][-1] == (3, 1)
    # k=1: "1" -> 3, then k=2: "2" -> 1; the first rename made no "2", so nothing chains.
    assert result.category_ap50[1] == pytest.approx(1.0) and result.category_ap50[3] == pytest.approx(1.0)
    assert result.category_ap50[2] == 0.0
    counts = Counter(a["category_id"] for a in gt.dataset["annotations"])
    assert result.ap50 == pytest.approx((counts[1] + counts[3]) / sum(counts.values()))
    # Without the relabelling the same predictions would score 0 on every group.
    assert weighted_ap50(gt, predictions)[0] == 0.0


def test_a_swap_of_groups_1_and_2_is_chosen_but_the_chained_renames_merge_both_into_group_1(coco_gt):
    pair = pairs_with_groups(coco_gt, {1, 2})[0]
    gt = subset(coco_gt, [pair])
    predictions = as_results(gt.dataset["annotations"], lambda a: 3 - a["category_id"])  # 1 <-> 2
    result = score(gt, predictions)
    assert result.assignments[-1].permutation == (2, 1)
    assert result.assignments[-1].mean_iou == pytest.approx(1.0)
    # k=1 turns every "1" into 2, then k=2 turns every 2 (old and new) into 1.
    relabelled, _ = relabel(gt, predictions)
    assert {p["category_id"] for p in relabelled} == {1}
    assert result.category_ap50[2] == 0.0
    assert 0.0 < result.category_ap50[1] < 1.0  # group 2's boxes are now false positives of group 1


def test_only_the_last_processed_pair_keeps_its_relabelling(coco_gt):
    pairs = pairs_with_groups(coco_gt, {1, 2, 3})[:2]
    gt = subset(coco_gt, pairs)
    renamed = {3: 1, 1: 2}
    predictions = as_results([a for a in gt.dataset["annotations"] if a["category_id"] in renamed],
                             lambda a: renamed[a["category_id"]])
    relabelled, assignments = relabel(gt, predictions)
    assert [a.permutation for a in assignments] == [(3, 1)] * len(assignments)
    last = {assignments[-1].image_id, assignments[-1].pair_image_id}
    truth = {(a["image_id"], tuple(a["bbox"])): a["category_id"] for a in gt.dataset["annotations"]}
    for raw, final in zip(predictions, relabelled):
        expected = truth[raw["image_id"], tuple(raw["bbox"])] if raw["image_id"] in last else raw["category_id"]
        assert final["category_id"] == expected


def test_predicted_groups_are_taken_by_position_not_by_id(coco_gt):
    # One predicted group, called "2", on group 1's boxes: position 1 looks at category-1 detections,
    # finds none, every permutation scores 0, the first ((1,)) wins and nothing moves.
    pair = pairs_with_groups(coco_gt, {1, 2})[0]
    gt = subset(coco_gt, [pair])
    predictions = as_results([a for a in gt.dataset["annotations"] if a["category_id"] == 1], lambda a: 2)
    result = score(gt, predictions)
    assert result.assignments[-1].permutation == (1,) and result.assignments[-1].mean_iou == 0.0
    assert result.category_ap50[1] == 0.0


def test_more_predicted_groups_than_ground_truth_groups_relabel_nothing(coco_gt):
    pair = pairs_with_groups(coco_gt, {1, 2})[0]
    gt = subset(coco_gt, [pair])
    annotations = gt.dataset["annotations"]
    predictions = as_results(annotations) + [dict(as_results(annotations[:1])[0], category_id=3)]
    result = score(gt, predictions)
    assert result.assignments[-1].permutation is None
    assert relabel(gt, predictions)[0] == predictions


# ----------------------------------------------------------------------------------------------
# Image-level accuracy


def test_image_accuracy_by_hand_ignores_iou(coco_gt):
    # Pair A: one image with boxes, one without; pair B: boxes in both images.
    groups = pair_groups(coco_gt)
    pair_a = next(p for p, g in groups.items() if g and sum(bool(coco_gt.imgToAnns[i]) for i in p) == 1)
    pair_b = next(p for p, g in groups.items() if all(coco_gt.imgToAnns[i] for i in p))
    gt = subset(coco_gt, [pair_a, pair_b])
    positive_a = next(i for i in pair_a if coco_gt.imgToAnns[i])
    far_away = {"category_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}  # IoU 0 with anything real
    predictions = [dict(far_away, image_id=positive_a), dict(far_away, image_id=pair_b[0])]
    assert image_level_accuracy(gt, predictions) == 0.5  # A right (IoU is not looked at), B wrong
    assert image_level_accuracy(gt, predictions + [dict(far_away, image_id=pair_b[1])]) == 1.0
    negative_a = next(i for i in pair_a if i != positive_a)
    assert image_level_accuracy(gt, predictions + [dict(far_away, image_id=negative_a)]) == 0.0


# ----------------------------------------------------------------------------------------------
# Running a model: pairs, prompt, conversion


def test_pairs_file_matches_the_coco_file(coco_gt):
    pairs = load_pairs(PAIRS_FILE)
    assert len(pairs) == 2000
    assert Counter(p.style for p in pairs) == {"Reasoning": 844, "Comparison": 810, "Referring": 346}
    for pair in pairs[:50]:
        for image_id, name, (width, height) in zip(pair.image_ids, pair.file_names, pair.sizes):
            image = coco_gt.imgs[image_id]
            assert (image["file_name"], image["width"], image["height"]) == (name, width, height)
        assert coco_gt.imgs[pair.image_ids[0]]["pair_image_id"] == pair.image_ids[1]


@pytest.mark.parametrize("syntax", ["ref_tokens", "json_pixels", "json_relative"])
def test_prompt_names_the_description_and_the_models_syntax(syntax):
    prompt = build_prompt("The man who has already swung a golf club", syntax)
    assert '"The man who has already swung a golf club"' in prompt and "group 1" in prompt
    assert ("<|box_start|>" in prompt) == (syntax == "ref_tokens")
    assert ("bbox_2d" in prompt) == (syntax != "ref_tokens")


def test_conversion_of_a_qwen2_vl_answer_by_hand():
    text = ("In the first image: <|object_ref_start|>group 2<|object_ref_end|><|box_start|>(100,200),(300,400)"
            "<|box_end|>\nIn the second image: <|object_ref_start|>group 1<|object_ref_end|><|box_start|>(0,0),"
            "(500,1000)<|box_end|>")
    geometries = [ImageGeometry(800, 531, 812, 532), ImageGeometry(400, 300, 392, 308)]
    results = response_to_results(text, "ref_tokens", geometries, (10, 11))
    assert results == [
        {"image_id": 10, "category_id": 2, "bbox": pytest.approx([80, 106.2, 160, 106.2]), "score": 1.0},
        {"image_id": 11, "category_id": 1, "bbox": pytest.approx([0, 0, 200, 300]), "score": 1.0},
    ]


def test_conversion_of_a_qwen2_5_vl_answer_by_hand():
    # Coordinates are pixels of the resized image: x * 800/812, y * 531/532.
    text = '```json\n[{"bbox_2d": [203, 133, 406, 266], "label": "a golfer", "image": 2}]\n```'
    geometries = [ImageGeometry(800, 531, 812, 532), ImageGeometry(800, 531, 812, 532)]
    results = response_to_results(text, "json_pixels", geometries, (10, 11))
    assert results == [{"image_id": 11, "category_id": 1, "score": 1.0,
                        "bbox": pytest.approx([200, 132.75, 200, 132.75], abs=1e-6)}]


@pytest.mark.parametrize("syntax", ["ref_tokens", "json_pixels", "json_relative"])
def test_ground_truth_written_in_each_syntax_scores_ap50_1(coco_gt, syntax):
    # Positive pairs, leaving out the one holding annotation id 0 (pycocotools' id-0 quirk, tested above).
    pairs = [p for p in load_pairs(PAIRS_FILE) if p.positive and coco_gt.anns[0]["image_id"] not in p.image_ids][:40]
    gt = subset(coco_gt, [p.image_ids for p in pairs])
    results = []
    for pair in pairs:
        geometries = [ImageGeometry(w, h, round(w / 28) * 28, round(h / 28) * 28) for w, h in pair.sizes]
        boxes = [Box(pair.image_ids.index(a["image_id"]), a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                     a["bbox"][1] + a["bbox"][3], f"group {a['category_id']}")
                 for image in pair.image_ids for a in coco_gt.imgToAnns[image]]
        text = format_boxes(boxes, syntax, geometries)
        results += response_to_results(text, syntax, geometries, pair.image_ids)
    assert len(results) == len(gt.dataset["annotations"]) > 0
    result = score(gt, results)
    assert result.ap50 == pytest.approx(1.0) and result.image_accuracy == 1.0


# ----------------------------------------------------------------------------------------------
# CLI


def test_cli_json(coco_gt, tmp_path, capsys):
    pair = pairs_with_groups(coco_gt, {1, 2})[0]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(as_results(a for i in pair for a in coco_gt.imgToAnns[i])))
    assert eval_cli.main(["mc-bench", "--annotations", str(GT_FILE), "--predictions", str(path), "--json"]) == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    assert set(printed) == {"ap50", "image_accuracy"}
    assert 0.0 < printed["ap50"] < 1.0
    assert "mc-bench: COCOeval" in captured.err  # progress goes to stderr, not into the JSON


@pytest.mark.parametrize("content, needle", [
    (None, "cannot read"),
    ("[{", "not valid JSON"),
    ('[{"image_id": 999999, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1}]', "image_id 999999"),
    ('[{"image_id": 0, "category_id": 9, "bbox": [0, 0, 1, 1], "score": 1}]', "category_id 9"),
    ('[{"image_id": 0, "category_id": 1, "bbox": [0, 0, 1], "score": 1}]', "bbox"),
    ('{"image_id": 0}', "JSON list"),
])
def test_cli_bad_input_is_one_line_and_exit_2(content, needle, tmp_path, capsys):
    path = tmp_path / "results.json"
    if content is not None:
        path.write_text(content)
    code = eval_cli.main(["mc-bench", "--annotations", str(GT_FILE), "--predictions", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and err.count("\n") == 1 and "Traceback" not in err


# ----------------------------------------------------------------------------------------------
# End to end: run a model over the pairs, resumably, convert, score and chart


def make_pair_images(root: Path, pairs) -> Path:
    rng = np.random.default_rng(0)
    for pair in pairs:
        for name, (width, height) in zip(pair.file_names, pair.sizes):
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            # Small stand-ins: only the recorded sizes matter to the conversion, not the pixels.
            Image.fromarray(rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)).save(path)
    return root


class GroundTruthGrounder:
    """Answers each pair with its ground truth in Qwen2-VL syntax, and records what it was asked."""

    syntax = "ref_tokens"

    def __init__(self, coco_gt, pairs):
        self.coco_gt, self.by_prompt, self.calls = coco_gt, {build_prompt(p.text, "ref_tokens"): p for p in pairs}, []

    def answer(self, images, query, max_new_tokens):
        self.calls.append((list(images), query))
        pair = self.by_prompt[query]
        geometries = [ImageGeometry(w, h, w, h) for w, h in pair.sizes]
        boxes = [Box(pair.image_ids.index(a["image_id"]), a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                     a["bbox"][1] + a["bbox"][3], f"group {a['category_id']}")
                 for image in pair.image_ids for a in self.coco_gt.imgToAnns[image]]
        return eval_cli.ModelAnswer(format_boxes(boxes, "ref_tokens", geometries), geometries)


def test_end_to_end_converts_answers_scores_the_chosen_pairs_and_resumes(coco_gt, tmp_path, monkeypatch, capsys):
    pairs = load_pairs(PAIRS_FILE)[:4]
    root = make_pair_images(tmp_path / "images", pairs)
    fake = GroundTruthGrounder(coco_gt, pairs)
    monkeypatch.setattr(eval_cli, "open_grounder", lambda args: fake)
    out = tmp_path / "run" / "answers.jsonl"
    argv = ["mc-bench", "--annotations", str(GT_FILE), "--image-root", str(root), "--bundle", "unused",
            "--predictions", str(out), "--json"]
    assert eval_cli.main(argv + ["--limit", "3"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [call[1] for call in fake.calls] == [build_prompt(p.text, "ref_tokens") for p in pairs[:3]]
    assert fake.calls[0][0] == [root / name for name in pairs[0].file_names]
    # The scores are those of the converted results on the three pairs' ground truth.
    results = json.loads(out.with_suffix(".coco.json").read_text())
    gt = subset(coco_gt, [p.image_ids for p in pairs[:3]])
    assert len(results) == len(gt.dataset["annotations"]) > 0
    assert printed == pytest.approx(score(gt, results).as_dict())
    assert printed["image_accuracy"] == 1.0
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert "weighted AP50" in out.with_suffix(".table.txt").read_text()
    # Rerun with one more pair: only that one is asked.
    assert eval_cli.main(argv + ["--limit", "4"]) == 0
    capsys.readouterr()
    assert [call[1] for call in fake.calls[3:]] == [build_prompt(pairs[3].text, "ref_tokens")]


def test_end_to_end_with_a_tiny_transformers_checkpoint(tiny_checkpoints, tmp_path, capsys):
    pairs = load_pairs(PAIRS_FILE)[:1]
    root = make_pair_images(tmp_path / "images", pairs)
    out = tmp_path / "answers.jsonl"
    code = eval_cli.main(["mc-bench", "--annotations", str(GT_FILE), "--image-root", str(root), "--hf",
                          str(tiny_checkpoints["qwen2_5_vl"]), "--predictions", str(out), "--limit", "1",
                          "--max-new-tokens", "8", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert set(json.loads(captured.out)) == {"ap50", "image_accuracy"}
    record = json.loads(out.read_text())
    assert record["index"] == 0 and isinstance(record["response"], str) and isinstance(record["results"], list)
