"""MIG-Bench scorer: the official extraction cascade, its normalisation quirks, IoU, aggregation, --strict,
the prompt and the CLI, on the real MIG_data.json with predictions built here."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gemvg.benchmarks import eval_cli
from gemvg.benchmarks.coco_ap import BenchmarkInputError
from gemvg.benchmarks.mig_bench import (
    METRIC_KEYS, OFFICIAL_FORMAT_SUFFIX, TaskTally, extract_box, load_annotations, load_predictions, normalise_matches,
    official_iou, official_item_iou, official_prompt, prediction_line, question_image, score,
    strict_item_score, target_image,
)
from gemvg.runtime.grounding import ORDINALS

from .paths import SHARED_DATA

MIG_DATA = SHARED_DATA / "mig-bench" / "MIG_data.json"


@pytest.fixture(scope="module")
def items():
    return load_annotations(MIG_DATA)


def as_qwen2_box(box) -> str:
    """A box in Qwen2-VL's 0-1000 integer syntax, which pattern (a) reads back exactly."""
    x1, y1, x2, y2 = (round(v * 1000) for v in box)
    return f"<|box_start|>({x1},{y1}),({x2},{y2})<|box_end|>"


def is_reversed(box) -> bool:
    return box[2] < box[0] or box[3] < box[1]


# ----------------------------------------------------------------------------------------------
# Extraction: each pattern of the cascade, worked out by hand


@pytest.mark.parametrize("response, expected", [
    # (a) integer corner pairs, with or without spaces after the commas; 0-1000 -> 0-1
    ("<|box_start|>(100,200),(300,400)<|box_end|>", [0.1, 0.2, 0.3, 0.4]),
    ("It is at (100, 200), (300, 400).", [0.1, 0.2, 0.3, 0.4]),
    # (b) a bracketed list of four decimals: values below 1 are already normalised, 12.5 >= 1 is divided
    ("[0.1, 0.2, 0.3, 0.4]", [0.1, 0.2, 0.3, 0.4]),
    ("[12.5, 0.2, 300.0, 0.4]", [0.0125, 0.2, 0.3, 0.4]),
    # (c) decimal corner pairs, no spaces allowed
    ("(0.1,0.2),(0.3,0.4)", [0.1, 0.2, 0.3, 0.4]),
    # (d) a parenthesised list of four decimals
    ("(0.1, 0.2, 0.3, 0.4)", [0.1, 0.2, 0.3, 0.4]),
    # (e) a bracketed list of four integers
    ("[100, 200, 300, 400]", [0.1, 0.2, 0.3, 0.4]),
    # (f) Kosmos-style <box> with space-separated integers
    ("<box>100 200 300 400</box>", [0.1, 0.2, 0.3, 0.4]),
])
def test_each_official_pattern_reads_its_syntax(response, expected):
    assert extract_box(response) == pytest.approx(expected)


def test_the_earlier_pattern_wins_even_when_its_match_comes_later_in_the_text():
    # (e) matches first in the text, but (a) is tried first and wins.
    assert extract_box("[1, 2, 3, 4] then (100,200),(300,400)") == pytest.approx([0.1, 0.2, 0.3, 0.4])
    # (b) beats (e) the same way.
    assert extract_box("[100, 200, 300, 400] or [0.5, 0.6, 0.7, 0.8]") == pytest.approx([0.5, 0.6, 0.7, 0.8])


def test_decimal_corner_pairs_with_spaces_match_no_pattern():
    # (c) allows no spaces and (d) wants four numbers in one pair of parentheses: nothing is read.
    assert extract_box("(0.1, 0.2),(0.3, 0.4)") is None


def test_no_match_means_no_box_and_iou_zero(items):
    assert extract_box("The object is in the top left corner.") is None
    assert official_item_iou("The object is in the top left corner.", items[0]) == 0.0
    assert official_item_iou(None, items[0]) == 0.0


# ----------------------------------------------------------------------------------------------
# Normalisation quirks


def test_single_match_divides_a_value_of_exactly_one():
    # One match: v >= 1 is divided, so 1 becomes 0.001.
    assert extract_box("(1,1),(500,500)") == pytest.approx([0.001, 0.001, 0.5, 0.5])
    assert extract_box("[1.0, 0.5, 0.6, 0.7]") == pytest.approx([0.001, 0.5, 0.6, 0.7])


def test_several_matches_keep_a_value_of_exactly_one_and_score_only_the_first_box():
    # Several matches: only v > 1 is divided, so the literal 1 stays 1.0 -- a reversed box, IoU 0.
    box = extract_box("(1,1),(500,500) and (2,2),(3,3)")
    assert box == pytest.approx([1.0, 1.0, 0.5, 0.5])
    assert official_iou(box, [0.001, 0.001, 0.5, 0.5]) == 0.0
    # The second box is ignored even when it is the right one.
    assert extract_box("(600,600),(700,700) (100,200),(300,400)") == pytest.approx([0.6, 0.6, 0.7, 0.7])
    assert extract_box("[1.0, 0.5, 0.6, 0.7] [0.1, 0.2, 0.3, 0.4]") == pytest.approx([1.0, 0.5, 0.6, 0.7])


def test_a_box_that_does_not_convert_becomes_all_zeros():
    # Unreachable from extract_box (every official capture is digits); the fallback itself, by hand:
    assert normalise_matches([("x", "1", "2", "3")]) == [[0.0, 0.0, 0.0, 0.0]]
    assert normalise_matches([("100", "200", "300", "400"), ("a", "b", "c", "d")]) == [
        pytest.approx([0.1, 0.2, 0.3, 0.4]), [0.0, 0.0, 0.0, 0.0]]


# ----------------------------------------------------------------------------------------------
# IoU


def test_official_iou_by_hand():
    assert official_iou([0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]) == 1.0
    assert official_iou([0.0, 0.0, 0.5, 1.0], [0.0, 0.0, 1.0, 1.0]) == pytest.approx(0.5)
    # 0.2x0.2 overlap of two 0.4x0.4 boxes: 0.04 / (0.16 + 0.16 - 0.04)
    assert official_iou([0.0, 0.0, 0.4, 0.4], [0.2, 0.2, 0.6, 0.6]) == pytest.approx(0.04 / 0.28)
    assert official_iou([0.0, 0.0, 0.1, 0.1], [0.5, 0.5, 0.6, 0.6]) == 0.0
    # Touching edges: right == left is not "right < left", the overlap is empty: 0.
    assert official_iou([0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0]) == 0.0


def test_a_reversed_box_on_either_side_scores_zero_even_against_itself(items):
    reversed_pred = [0.5, 0.1, 0.2, 0.4]  # x2 < x1
    assert official_iou(reversed_pred, [0.0, 0.0, 1.0, 1.0]) == 0.0
    assert official_iou(reversed_pred, reversed_pred) == 0.0
    # The real file has ground truths like that (item 7: y2 < y1); their perfect answer scores 0.
    assert is_reversed(items[7].answer)
    assert official_item_iou(as_qwen2_box(items[7].answer), items[7]) == 0.0


def test_degenerate_identical_boxes_score_zero_instead_of_dividing_by_zero():
    assert official_iou([0.1, 0.1, 0.1, 0.5], [0.1, 0.1, 0.1, 0.5]) == 0.0


# ----------------------------------------------------------------------------------------------
# The real file and aggregation


def test_the_real_file_has_the_documented_tasks_and_counts(items):
    counts = Counter(item.task for item in items)
    assert len(items) == 4295
    assert counts == {"region": 1203, "common_object": 816, "object_tracking": 550, "diff": 528,
                      "group_grounding": 499, "multi_view": 288, "correspondence": 117, "reasoning": 101,
                      "refer_grounding": 99, "view_diff": 94}


def test_ground_truth_as_answers_scores_100_except_for_the_reversed_ground_truths(items):
    predictions = {item.index: as_qwen2_box(item.answer) for item in items}
    result = score(items, predictions)
    reversed_per_task = Counter(item.task for item in items if is_reversed(item.answer))
    assert sum(reversed_per_task.values()) > 0  # the file does contain some
    for task, row in result["tasks"].items():
        total = sum(1 for item in items if item.task == task)
        expected = 100.0 * (total - reversed_per_task[task]) / total
        assert row["TOTAL"] == total
        for key in METRIC_KEYS:
            assert row[key] == pytest.approx(expected)
    micro = result["overall"]["micro"]
    assert micro["TOTAL"] == len(items)
    assert micro["AVE_IOU"] == pytest.approx(100.0 * (len(items) - sum(reversed_per_task.values())) / len(items))


def test_no_predictions_score_zero_everywhere(items):
    result = score(items, {})
    rows = list(result["tasks"].values()) + [result["overall"]["micro"], result["overall"]["macro"]]
    assert all(row[key] == 0.0 for row in rows for key in METRIC_KEYS)
    assert result["overall"]["micro"]["TOTAL"] == len(items)
    assert result["overall"]["macro"]["TASKS"] == 10


def test_micro_weighs_items_and_macro_weighs_tasks(items):
    # Perfect answers for the region task only (no reversed ground truth there).
    region = [item for item in items if item.task == "region"]
    assert not any(is_reversed(item.answer) for item in region)
    result = score(items, {item.index: as_qwen2_box(item.answer) for item in region})
    assert result["tasks"]["region"]["AVE_IOU"] == pytest.approx(100.0)
    assert result["overall"]["micro"]["AVE_IOU"] == pytest.approx(100.0 * len(region) / len(items))
    assert result["overall"]["macro"]["AVE_IOU"] == pytest.approx(100.0 / 10)


def test_thresholds_count_an_iou_between_them(items):
    # A box covering the left 60% of the ground truth: IoU 0.6, counted at 0.5 and 0.3, not at 0.7.
    item = items[0]
    x1, y1, x2, y2 = item.answer
    partial = [x1, y1, x1 + 0.6 * (x2 - x1), y2]
    response = "[" + ", ".join(f"{v:.6f}" for v in partial) + "]"  # pattern (b), values below 1 kept
    iou = official_item_iou(response, item)
    assert iou == pytest.approx(0.6, abs=1e-4)
    row = score(items, {0: response}, indices=[0])["tasks"][item.task]
    assert (row["IOU@0.7"], row["IOU@0.5"], row["IOU@0.3"]) == (0.0, 100.0, 100.0)
    assert row["AVE_IOU"] == pytest.approx(100 * iou)


def test_an_iou_of_exactly_a_threshold_counts_at_that_threshold():
    # Two halves of a unit box: IoU exactly 0.5 in floating point, so ">=" must count it at 0.5.
    iou = official_iou([0.0, 0.0, 0.5, 1.0], [0.0, 0.0, 1.0, 1.0])
    assert iou == 0.5
    tally = TaskTally()
    for value in (iou, 0.7, 0.3):
        tally.add(value)
    row = tally.as_dict()
    assert (row["IOU@0.7"], row["IOU@0.5"], row["IOU@0.3"]) == pytest.approx((100 / 3, 200 / 3, 100.0))
    assert row["AVE_IOU"] == pytest.approx(100 * 1.5 / 3)


def test_a_missing_prediction_scores_zero_but_still_counts(items):
    first_two = [items[0].index, items[1].index]
    result = score(items, {items[0].index: as_qwen2_box(items[0].answer)}, indices=first_two)
    row = result["tasks"][items[0].task]
    assert row["TOTAL"] == 2
    assert row["AVE_IOU"] == pytest.approx(50.0)


# ----------------------------------------------------------------------------------------------
# The target image (used by --strict) and the prompt


def test_every_item_has_a_target_image_inside_its_image_list_except_spot_the_difference(items):
    for item in items:
        target = target_image(item)
        if item.task == "diff":
            assert target is None
        else:
            assert target is not None and 0 <= target < len(item.images), item.index


def test_target_images_of_hand_checked_questions(items):
    by_task = {}
    for item in items:
        by_task.setdefault(item.task, item)
    # "...locate this object in the 1th image." (the data's own spelling of ordinals)
    assert "1th image" in items[0].question and target_image(items[0]) == 0
    multi_view = by_task["multi_view"]  # names the first image (the marked one), then the target
    assert "first image" in multi_view.question and target_image(multi_view) == int(
        multi_view.question.split("this object in the ")[1][0]) - 1
    assert target_image(by_task["region"]) == 0  # "...in the source image": the first one
    group = by_task["group_grounding"]  # the question names no image; additional_info does
    assert question_image(group) is None
    ordinal = group.additional_info.split("It is in the ")[1].split(" image")[0]
    assert target_image(group) == ORDINALS.index(ordinal)
    assert target_image(by_task["refer_grounding"]) == 1  # "...in image-1 locate in the image-2."
    assert target_image(by_task["reasoning"]) == 1  # "...Find it and locate it in the second image."


def test_official_prompt_appends_the_format_only_when_need_format(items):
    assert OFFICIAL_FORMAT_SUFFIX == (
        "Format:<|box_start|>(x1,y1),(x2,y2)<|box_start|>. Don't generate addtional words.")
    without_format = {item.task for item in items if not item.need_format}
    assert without_format == {"group_grounding", "object_tracking"}
    for item in items[:3] + [i for i in items if not i.need_format][:3]:
        expected = item.question + OFFICIAL_FORMAT_SUFFIX if item.need_format else item.question
        assert official_prompt(item) == expected


# ----------------------------------------------------------------------------------------------
# --strict


def migician_answer(item, image: int | None) -> str:
    """Migician's style: the image in words, then the box."""
    words = f"It's in the {ORDINALS[image]} image. " if image is not None else ""
    return words + as_qwen2_box(item.answer)


def test_strict_gives_100_to_answers_in_the_right_image(items):
    predictions = {item.index: migician_answer(item, target_image(item)) for item in items}
    result = score(items, predictions, strict=True)
    reversed_per_task = Counter(item.task for item in items if is_reversed(item.answer))
    for task, row in result["tasks"].items():
        total = row["TOTAL"]
        assert row["AVE_IOU"] == pytest.approx(100.0 * (total - reversed_per_task[task]) / total)


def test_strict_scores_a_box_in_the_wrong_image_zero_where_the_official_protocol_does_not(items):
    item = next(i for i in items if i.task == "common_object" and target_image(i) == 2)
    wrong = migician_answer(item, 0)
    assert official_item_iou(wrong, item) == 1.0
    assert strict_item_score(wrong, item) == 0.0
    assert strict_item_score(migician_answer(item, 2), item) == 1.0


def test_strict_takes_an_unnamed_box_to_lie_in_the_image_the_question_names(items):
    named = next(i for i in items if i.task == "object_tracking")
    assert strict_item_score(as_qwen2_box(named.answer), named) == 1.0
    # group_grounding's question names no image: an unnamed box cannot be placed, so it scores 0.
    group = next(i for i in items if i.task == "group_grounding")
    assert strict_item_score(as_qwen2_box(group.answer), group) == 0.0
    # Migician's own answer text for it (additional_info) names the image: full marks.
    assert strict_item_score(group.additional_info, group) == 1.0
    # diff names no image anywhere: any image is right.
    diff = next(i for i in items if i.task == "diff")
    assert strict_item_score(migician_answer(diff, 1), diff) == 1.0


def test_strict_divides_by_the_number_of_predicted_boxes(items):
    # An item whose corners are all > 0.001, so several-match normalisation leaves them unchanged.
    item = next(i for i in items if i.task == "common_object" and min(i.answer) > 0.001
                and not is_reversed(i.answer) and target_image(i) == 1)
    decoy = "<|box_start|>(0,0),(5,5)<|box_end|>"
    response = f"In the second image: {as_qwen2_box(item.answer)} and also {decoy}"
    assert strict_item_score(response, item) == pytest.approx(0.5)
    # The official protocol reads only the first box.
    assert official_item_iou(response, item) == pytest.approx(1.0)
    # A second mention moves the later box: "first image" applies to the decoy only.
    moved = f"In the first image: {decoy} In the second image: {as_qwen2_box(item.answer)}"
    assert strict_item_score(moved, item) == pytest.approx(0.5)


# ----------------------------------------------------------------------------------------------
# Predictions file and CLI


def write_predictions(path: Path, predictions: dict[int, str]) -> Path:
    path.write_text("".join(prediction_line(i, r) + "\n" for i, r in predictions.items()))
    return path


def test_load_predictions_rejects_bad_lines(tmp_path):
    cases = {
        "out_of_range": '{"index": 4295, "response": "x"}\n',
        "negative": '{"index": -1, "response": "x"}\n',
        "duplicate": '{"index": 1, "response": "x"}\n{"index": 1, "response": "y"}\n',
        "malformed": '{"index": 1, "response": \n',
        "not_int": '{"index": "1", "response": "x"}\n',
        "no_response": '{"index": 1}\n',
    }
    for name, text in cases.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text(text)
        with pytest.raises(BenchmarkInputError):
            load_predictions(path, 4295)


def test_cli_json_matches_the_scorer(items, tmp_path, capsys):
    predictions = {item.index: as_qwen2_box(item.answer) for item in items[:50]}
    path = write_predictions(tmp_path / "p.jsonl", predictions)
    assert eval_cli.main(["mig-bench", "--annotations", str(MIG_DATA), "--predictions", str(path), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(score(items, predictions)))
    assert set(printed["tasks"]["common_object"]) == {"IOU@0.7", "IOU@0.5", "IOU@0.3", "AVE_IOU", "TOTAL"}
    assert set(printed["overall"]) == {"micro", "macro"}


def test_cli_table_and_strict(items, tmp_path, capsys):
    path = write_predictions(tmp_path / "p.jsonl", {0: as_qwen2_box(items[0].answer)})
    assert eval_cli.main(["mig-bench", "--annotations", str(MIG_DATA), "--predictions", str(path)]) == 0
    table = capsys.readouterr().out
    assert "common_object" in table and "overall (micro)" in table and "AVE_IOU" in table
    assert eval_cli.main(["mig-bench", "--annotations", str(MIG_DATA), "--predictions", str(path),
                          "--strict", "--json"]) == 0
    strict = json.loads(capsys.readouterr().out)
    assert math.isclose(strict["tasks"]["common_object"]["AVE_IOU"], 100.0 / 816)


@pytest.mark.parametrize("problem", ["missing_predictions", "missing_annotations", "malformed", "out_of_range",
                                     "annotations_not_mig"])
def test_cli_bad_input_is_one_line_and_exit_2(problem, tmp_path, capsys):
    predictions = write_predictions(tmp_path / "p.jsonl", {0: "x"})
    annotations = MIG_DATA
    if problem == "missing_predictions":
        predictions = tmp_path / "nope.jsonl"
    elif problem == "missing_annotations":
        annotations = tmp_path / "nope.json"
    elif problem == "malformed":
        predictions.write_text('{"index": 0, "response": "x"\n')
    elif problem == "out_of_range":
        predictions.write_text('{"index": 99999, "response": "x"}\n')
    elif problem == "annotations_not_mig":
        annotations = tmp_path / "bad.json"
        annotations.write_text('{"images": []}')
    code = eval_cli.main(["mig-bench", "--annotations", str(annotations), "--predictions", str(predictions)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("gemvg eval: error: ") and err.count("\n") == 1 and "Traceback" not in err


# ----------------------------------------------------------------------------------------------
# End to end: run a model over the benchmark, resumably, then score and chart


def make_images(root: Path, items, indices) -> Path:
    """Small random pictures at the annotation's own relative paths (the real images are not shipped)."""
    rng = np.random.default_rng(0)
    for index in indices:
        for relative in items[index].images:
            path = root / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(path)
    return root


class FakeGrounder:
    """Answers every item with its ground truth, and records what it was asked."""

    syntax = "ref_tokens"

    def __init__(self, items):
        self.items, self.calls = items, []

    def answer(self, images, query, max_new_tokens):
        self.calls.append((list(images), query, max_new_tokens))
        item = next(i for i in self.items if official_prompt(i) == query)
        return eval_cli.ModelAnswer(as_qwen2_box(item.answer), [])


def test_end_to_end_sends_the_official_prompt_resumes_and_writes_table_and_chart(items, tmp_path, monkeypatch,
                                                                                   capsys):
    root = make_images(tmp_path / "images", items, range(3))
    fake = FakeGrounder(items)
    monkeypatch.setattr(eval_cli, "open_grounder", lambda args: fake)
    out = tmp_path / "run" / "preds.jsonl"
    argv = ["mig-bench", "--annotations", str(MIG_DATA), "--image-root", str(root), "--bundle", "unused",
            "--predictions", str(out), "--json"]
    assert eval_cli.main(argv + ["--limit", "2"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert [(call[1], call[2]) for call in fake.calls] == [(official_prompt(items[i]), 128) for i in (0, 1)]
    assert fake.calls[0][0] == [root / p for p in items[0].images]  # "./MIG-Bench/..." under the root
    assert first["overall"]["micro"] == {"IOU@0.7": 100.0, "IOU@0.5": 100.0, "IOU@0.3": 100.0, "AVE_IOU": 100.0,
                                         "TOTAL": 2}
    assert [json.loads(line)["index"] for line in out.read_text().splitlines()] == [0, 1]
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "common_object" in out.with_suffix(".table.txt").read_text()
    assert json.loads(out.with_suffix(".scores.json").read_text()) == first

    # A run killed mid-write leaves half a line: the rerun drops it, skips what is done, and does the rest.
    with out.open("a") as handle:
        handle.write('{"index": 2, "respo')
    assert eval_cli.main(argv + ["--limit", "3"]) == 0
    capsys.readouterr()
    assert [call[1] for call in fake.calls[2:]] == [official_prompt(items[2])]
    assert [json.loads(line)["index"] for line in out.read_text().splitlines()] == [0, 1, 2]


def test_end_to_end_reports_a_missing_image_before_running_anything(items, tmp_path, monkeypatch, capsys):
    fake = FakeGrounder(items)
    monkeypatch.setattr(eval_cli, "open_grounder", lambda args: fake)
    code = eval_cli.main(["mig-bench", "--annotations", str(MIG_DATA), "--image-root", str(tmp_path),
                          "--bundle", "unused", "--predictions", str(tmp_path / "p.jsonl"), "--limit", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "not found under --image-root" in err and fake.calls == []


def test_end_to_end_needs_an_image_root(capsys):
    code = eval_cli.main(["mig-bench", "--annotations", str(MIG_DATA), "--bundle", "b"])
    assert code == 2 and "--image-root is required" in capsys.readouterr().err


def test_end_to_end_with_the_tiny_bundle_and_the_same_checkpoint_through_transformers(
        items, tiny_bundle, tiny_checkpoints, tmp_path, capsys):
    # The bundle is exported from tiny_checkpoints["qwen2_vl"], and the runtime is token-exact with
    # transformers: the --hf path must write the very same responses as the --bundle path.
    root = make_images(tmp_path / "images", items, [0])
    outputs = {}
    for source, flag in ((tiny_bundle, "--bundle"), (tiny_checkpoints["qwen2_vl"], "--hf")):
        out = tmp_path / flag.strip("-") / "preds.jsonl"
        code = eval_cli.main(["mig-bench", "--annotations", str(MIG_DATA), "--image-root", str(root), flag,
                              str(source), "--predictions", str(out), "--limit", "1", "--max-new-tokens", "12"])
        assert code == 0, capsys.readouterr().err
        assert "overall (micro)" in capsys.readouterr().out
        outputs[flag] = [json.loads(line) for line in out.read_text().splitlines()]
        assert out.with_suffix(".png").is_file()
    assert [r["index"] for r in outputs["--bundle"]] == [0] and outputs["--bundle"][0]["response"]
    assert outputs["--hf"] == outputs["--bundle"]
