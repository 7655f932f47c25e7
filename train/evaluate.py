"""Held-out grounding accuracy of a checkpoint (transformers, greedy) or a bundle (the runtime Engine).

Both are prompted as training prompted them (`build_instruction(query, syntax, mode)`) and read by
the runtime's `parse_answer`. Scores, per sample with targets:

* Acc@0.5: the first predicted box lies in a target's image and has IoU >= 0.5 with that target;
* mean IoU: that first box's IoU with the target of its image (0 when no box or the wrong image);
* right image: the first predicted box names the image a target lies in;
* reward: GRPO's accuracy reward (Hungarian IoU over all boxes, `rewards.match_score`).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from gemvg.runtime.grounding import Box, ImageGeometry, build_instruction, parse_answer

from .rewards import iou, match_score
from .schema import Sample


@dataclass(frozen=True)
class EvalScores:
    samples: int
    acc_at_05: float
    mean_iou: float
    right_image: float
    parsed: float  # share of answers with at least one box
    reward: float

    def line(self) -> str:
        return (f"Acc@0.5 {100 * self.acc_at_05:.1f}%  mean IoU {self.mean_iou:.3f}  right image "
                f"{100 * self.right_image:.1f}%  parsed {100 * self.parsed:.1f}%  reward {self.reward:.3f}  "
                f"({self.samples} samples)")


def first_box_iou(boxes: list[Box], sample: Sample) -> tuple[bool, float]:
    """(right image, IoU) of the first predicted box against the target in its image."""
    if not boxes:
        return False, 0.0
    first = boxes[0]
    in_image = [t for t in sample.targets if t.image == first.image]
    if not in_image:
        return False, 0.0
    plain = (first.x1, first.y1, first.x2, first.y2)
    return True, max(iou(plain, (t.x1, t.y1, t.x2, t.y2)) for t in in_image)


def score(samples: list[Sample], predictions: list[list[Box]]) -> EvalScores:
    scored = [(s, p) for s, p in zip(samples, predictions, strict=True) if s.targets]
    if not scored:
        raise ValueError("no samples with targets to score")
    right, ious, rewards, parsed = [], [], [], []
    for sample, boxes in scored:
        in_right_image, overlap = first_box_iou(boxes, sample)
        right.append(in_right_image)
        ious.append(overlap)
        parsed.append(bool(boxes))
        rewards.append(match_score([b.as_tuple() for b in boxes], [t.as_tuple() for t in sample.targets]))
    count = len(scored)
    return EvalScores(count, sum(v >= 0.5 for v in ious) / count, sum(ious) / count, sum(right) / count,
                      sum(parsed) / count, sum(rewards) / count)


def _progress(done: int, total: int, started: float) -> None:
    if done % 25 == 0 or done == total:
        print(f"  evaluated {done}/{total} ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)


def predict_bundle(bundle: str | Path, samples: list[Sample], mode: str = "direct", max_new_tokens: int = 80,
                   threads: int | None = None) -> tuple[list[list[Box]], list[str]]:
    from gemvg.runtime import Engine

    engine = Engine.load(bundle, threads=threads)
    predictions, texts, started = [], [], time.perf_counter()
    for done, sample in enumerate(samples, 1):
        result = engine.ground(sample.images, sample.query, mode=mode, max_new_tokens=max_new_tokens)
        predictions.append(list(result.boxes))
        texts.append(result.text)
        _progress(done, len(samples), started)
    return predictions, texts


def predict_checkpoint(model_dir: str | Path, samples: list[Sample], mode: str = "direct",
                       max_new_tokens: int = 80) -> tuple[list[list[Box]], list[str]]:
    """Greedy answers of a transformers checkpoint, prompted exactly as training prompts it."""
    import torch
    from PIL import Image

    from .checkpoint import checkpoint_family, load_model, load_processor

    syntax = checkpoint_family(model_dir).box_syntax
    model = load_model(model_dir).eval()
    processor = load_processor(model_dir)
    tokenizer = processor.tokenizer
    stop_ids = {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
    patch = processor.image_processor.patch_size
    predictions, texts, started = [], [], time.perf_counter()
    for done, sample in enumerate(samples, 1):
        pictures = [Image.open(p).convert("RGB") for p in sample.images]
        content = [{"type": "image"} for _ in pictures]
        content.append({"type": "text", "text": build_instruction(sample.query, syntax, mode)})
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                               tokenize=False)
        inputs = processor(text=[prompt], images=pictures, return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens)
        tokens = output[0, inputs["input_ids"].shape[1]:].tolist()
        while tokens and tokens[-1] in stop_ids:
            tokens.pop()
        text = tokenizer.decode(tokens, skip_special_tokens=False)
        geometries = [ImageGeometry(p.width, p.height, int(grid[2]) * patch, int(grid[1]) * patch)
                      for p, grid in zip(pictures, inputs["image_grid_thw"])]
        predictions.append(parse_answer(text, syntax, geometries))
        texts.append(text)
        _progress(done, len(samples), started)
    return predictions, texts


def evaluate(samples: list[Sample], model_dir: str | Path | None = None, bundle: str | Path | None = None,
             mode: str = "direct", out_json: str | Path | None = None, threads: int | None = None) -> EvalScores:
    """Score a checkpoint or a bundle on `samples`; with `out_json`, also write the scores and every answer."""
    if (model_dir is None) == (bundle is None):
        raise ValueError("evaluate needs exactly one of model_dir and bundle")
    if bundle is not None:
        predictions, texts = predict_bundle(bundle, samples, mode, threads=threads)
    else:
        predictions, texts = predict_checkpoint(model_dir, samples, mode)
    scores = score(samples, predictions)
    if out_json is not None:
        answers = [{"source": s.source, "query": s.query, "text": t,
                    "target": [s.targets[0].image, s.targets[0].x1, s.targets[0].y1, s.targets[0].x2, s.targets[0].y2]
                    if s.targets else None}
                   for s, t in zip(samples, texts)]
        Path(out_json).write_text(json.dumps({"scores": asdict(scores), "answers": answers}, indent=1))
    return scores
