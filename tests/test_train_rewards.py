"""GRPO rewards on hand-written completions, and the hybrid CoT/direct policy."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gemvg.runtime.grounding import Box, ImageGeometry, format_answer
from gemvg.train.hybrid import HybridPolicy
from gemvg.train.rewards import accuracy_reward, completion_text, format_reward, iou, match_score
from gemvg.train.schema import Sample

# Two images: 200x100 resized to 224x112, and 100x100 resized to 112x112.
GEOMETRIES = [[200, 100, 224, 112], [100, 100, 112, 112]]
GEOMS = [ImageGeometry(*g) for g in GEOMETRIES]
CAT = [1, 10.0, 10.0, 50.0, 50.0]  # in the second image
DOG = [0, 100.0, 20.0, 180.0, 80.0]  # in the first image


def q2(image_words: str, x1: int, y1: int, x2: int, y2: int, label: str = "x") -> str:
    return (f"{image_words}<|object_ref_start|>{label}<|object_ref_end|>"
            f"<|box_start|>({x1},{y1}),({x2},{y2})<|box_end|>")


def accuracy(completion, targets, syntax="ref_tokens", geometries=GEOMETRIES) -> float:
    return accuracy_reward([completion], [targets], [geometries], [syntax])[0]


def fmt(completion, mode, syntax="ref_tokens") -> float:
    return format_reward([completion], [mode], [syntax])[0]


# ----------------------------------------------------------------------------------------------
# match_score


def test_match_score_perfect_and_order_free():
    a, b = (0, (0.0, 0.0, 10.0, 10.0)), (1, (5.0, 5.0, 20.0, 20.0))
    assert match_score([a, b], [a, b]) == 1.0
    assert match_score([b, a], [a, b]) == 1.0


def test_match_score_empty_cases():
    box = (0, (0.0, 0.0, 10.0, 10.0))
    assert match_score([], []) == 1.0
    assert match_score([box], []) == 0.0
    assert match_score([], [box]) == 0.0


def test_match_score_other_image_counts_zero():
    assert match_score([(1, (0.0, 0.0, 10.0, 10.0))], [(0, (0.0, 0.0, 10.0, 10.0))]) == 0.0


def test_match_score_extra_and_missing_boxes_dilute():
    a, b = (0, (0.0, 0.0, 10.0, 10.0)), (0, (50.0, 50.0, 60.0, 60.0))
    assert match_score([a, b], [a]) == 0.5  # a false alarm
    assert match_score([a], [a, b]) == 0.5  # a miss


def test_match_score_is_hungarian_not_greedy():
    t1, t2 = (0, (0.0, 0.0, 10.0, 10.0)), (0, (10.0, 0.0, 20.0, 10.0))  # side by side
    p1 = (0, (4.0, 0.0, 14.0, 10.0))  # IoU 60/140 with t1, 40/160 with t2
    p2 = (0, (0.0, 0.0, 4.0, 10.0))  # IoU 0.4 with t1, 0 with t2
    # Greedy takes the best pair first (p1-t1) and leaves p2 with t2: (60/140 + 0) / 2.
    # The optimal assignment is p1-t2, p2-t1: (0.25 + 0.4) / 2.
    assert iou(p1[1], t1[1]) > iou(p2[1], t1[1]) > iou(p1[1], t2[1]) > iou(p2[1], t2[1]) == 0.0
    assert match_score([p1, p2], [t1, t2]) == pytest.approx((0.25 + 0.4) / 2)
    assert match_score([p2, p1], [t2, t1]) == pytest.approx((0.25 + 0.4) / 2)


def test_degenerate_boxes_score_zero():
    target = (0, (0.0, 0.0, 10.0, 10.0))
    assert iou((5.0, 5.0, 5.0, 9.0), (0.0, 0.0, 10.0, 10.0)) == 0.0  # zero width
    assert iou((9.0, 9.0, 1.0, 1.0), (0.0, 0.0, 10.0, 10.0)) == 0.0  # inverted corners
    assert match_score([(0, (5.0, 5.0, 5.0, 5.0))], [target]) == 0.0
    assert iou((0.0, 0.0, 10.0, 10.0), (5.0, 0.0, 15.0, 10.0)) == pytest.approx(50 / 150)


# ----------------------------------------------------------------------------------------------
# accuracy reward


def test_accuracy_exact_answer_from_formatter_scores_one_for_every_syntax():
    targets = [Box(1, *CAT[1:], "cat"), Box(0, *DOG[1:], "dog")]
    for syntax in ("ref_tokens", "json_pixels", "json_relative"):
        for mode in ("direct", "cot"):
            text = format_answer(targets, syntax, GEOMS, mode, reasoning="looking")
            assert accuracy(text, [CAT, DOG], syntax) == pytest.approx(1.0, abs=0.02)


def test_accuracy_wrong_image_scores_zero():
    right = q2("In the second image: ", 100, 100, 500, 500)  # 0-1000 of a 100x100 image = (10,10)-(50,50)
    wrong = q2("In the first image: ", 100, 100, 500, 500)
    assert accuracy(right, [CAT]) == pytest.approx(1.0)
    assert accuracy(wrong, [CAT]) == 0.0


def test_accuracy_multi_target_partial():
    both = q2("In the first image: ", 500, 200, 900, 800) + "\n" + q2("In the second image: ", 100, 100, 500, 500)
    only_cat = q2("In the second image: ", 100, 100, 500, 500)
    assert accuracy(both, [CAT, DOG]) == pytest.approx(1.0)
    assert accuracy(only_cat, [CAT, DOG]) == pytest.approx(0.5)


def test_accuracy_qwen2_5_maps_resized_pixels_back():
    # CAT is (10,10)-(50,50) in a 100x100 image resized to 112x112.
    text = '```json\n[{"bbox_2d": [11, 11, 56, 56], "label": "cat", "image": 2}]\n```'
    assert accuracy(text, [CAT], "json_pixels") == pytest.approx(1.0, abs=0.03)
    assert accuracy(text.replace('"image": 2', '"image": 1'), [CAT], "json_pixels") == 0.0


def test_accuracy_empty_and_malformed():
    assert accuracy("None", []) == 1.0  # correctly says there is nothing
    assert accuracy("", []) == 1.0
    assert accuracy("None", [CAT]) == 0.0
    assert accuracy("<|box_start|>(100,100),(5", [CAT]) == 0.0
    assert accuracy(q2("", 0, 0, 1000, 1000), []) == 0.0  # a box where there is none


def test_accuracy_reads_the_answer_part_of_cot():
    # A box in the thinking part must not count: only <answer> is parsed.
    text = "<think>" + q2("In the second image: ", 100, 100, 500, 500) + "</think><answer>None</answer>"
    assert accuracy(text, [CAT]) == 0.0
    assert accuracy(text, []) == 1.0


def test_conversational_completions_and_extra_columns():
    text = q2("In the second image: ", 100, 100, 500, 500)
    completion = [{"role": "assistant", "content": text}]
    parts = [{"role": "assistant", "content": [{"type": "text", "text": text}]}]
    assert completion_text(completion) == text == completion_text(parts)
    # TRL passes prompts, completion ids, the trainer state and every dataset column as keywords.
    scores = accuracy_reward([completion, parts], targets=[[CAT], [CAT]], geometries=[GEOMETRIES] * 2,
                             syntax=["ref_tokens"] * 2, prompts=[[], []], completion_ids=[[1], [2]],
                             trainer_state=None, images=[[], []], task=["t", "t"], mode=["direct"] * 2)
    assert scores == [pytest.approx(1.0), pytest.approx(1.0)]


# ----------------------------------------------------------------------------------------------
# format reward


def test_format_cot_and_direct():
    box = q2("In the second image: ", 100, 100, 500, 500)
    cot = f"<think>the cat sits left</think><answer>{box}</answer>"
    assert fmt(cot, "cot") == 1.0
    assert fmt(box, "direct") == 1.0
    assert fmt(box, "cot") == 0.0  # asked to think, did not
    assert fmt(cot, "direct") == 0.0  # asked for boxes only, wrote tags
    assert fmt(f"<answer>{box}</answer>", "cot") == 0.0  # no <think>
    assert fmt(f"<think>x</think><answer>{box}", "cot") == 0.0  # unterminated


def test_format_needs_a_parsable_answer():
    assert fmt("the cat is on the left", "direct") == 0.0
    assert fmt("<think>hm</think><answer>somewhere</answer>", "cot") == 0.0
    assert fmt("None", "direct") == 1.0  # explicit no-target answer
    assert fmt("<think>no cat</think><answer>None</answer>", "cot") == 1.0
    assert fmt("```json\n[]\n```", "direct", "json_pixels") == 1.0
    assert fmt('[{"bbox_2d": [1, 2, 30, 40], "label": "cat"}]', "direct", "json_pixels") == 1.0
    assert fmt("<|box_start|>(1,2),(3", "direct") == 0.0


def test_rewards_module_does_not_import_torch():
    code = "import sys, gemvg.train.rewards, gemvg.train.hybrid; print(json.dumps('torch' in sys.modules))"
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) is False


# ----------------------------------------------------------------------------------------------
# hybrid policy


def _samples(n: int, task: str = "referential_retrieval") -> list[Sample]:
    return [Sample(images=[f"img{i}.png"], query=f"find thing {i}", task=task) for i in range(n)]


def test_hybrid_policy_is_deterministic_and_follows_ratio():
    samples = _samples(400)
    policy = HybridPolicy(cot_ratio=0.3, seed=7)
    modes = [policy.mode_for(s) for s in samples]
    assert modes == [HybridPolicy(cot_ratio=0.3, seed=7).mode_for(s) for s in samples]
    assert modes == [policy.mode_for(s) for s in reversed(samples)][::-1]  # order-independent
    assert 0.22 < modes.count("cot") / len(modes) < 0.38
    other_seed = [HybridPolicy(cot_ratio=0.3, seed=8).mode_for(s) for s in samples]
    assert other_seed != modes
    assert {HybridPolicy(cot_ratio=0.0).mode_for(s) for s in samples} == {"direct"}
    assert {HybridPolicy(cot_ratio=1.0).mode_for(s) for s in samples} == {"cot"}


def test_hybrid_policy_task_modes_override_ratio():
    policy = HybridPolicy(cot_ratio=0.0, task_modes={"counting": "cot"})
    assert {policy.mode_for(s) for s in _samples(20, "counting")} == {"cot"}
    assert {policy.mode_for(s) for s in _samples(20, "difference")} == {"direct"}
    from_config = HybridPolicy.from_config({"cot_ratio": 1.0, "task_modes": {"difference": "direct"}})
    assert {from_config.mode_for(s) for s in _samples(20, "difference")} == {"direct"}
    with pytest.raises(ValueError):
        HybridPolicy(cot_ratio=1.5)
    with pytest.raises(ValueError):
        HybridPolicy(task_modes={"counting": "raw"})
