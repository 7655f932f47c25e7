"""Loaders from public grounding formats into `Sample`s.

* MGrounding-630k (Migician's training set): conversation JSON, answers in Qwen2-VL box syntax (0-1000),
  the image named in words before the box. Parsed with the runtime's own parser.
* MIG-Bench: answer = one box normalised 0-1 to the target image, which only the question names.
* MC-Bench: COCO JSON of image pairs (`pair_image_id`), boxes [x, y, w, h] in pixels.
* COCO / ODinW detection JSON: one sample per (image, category) with all of that category's boxes.
* Our JSONL (`schema.read_jsonl`).

Sources whose images are absent here (MIG-Bench, MGrounding) keep normalised boxes; pass
`size_of=read_image_size` (or any `path -> (width, height)`) to get pixels at load time, or call
`Sample.in_pixels` later.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Callable

from gemvg.runtime.grounding import Box, ImageGeometry, last_image_mention, parse_answer

from .schema import DataError, ImageSize, Sample, read_jsonl

SizeLookup = Callable[[str], ImageSize]
FORMATS = ("jsonl", "mgrounding", "mig-bench", "mc-bench", "coco")


def _read_json(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        with path.open(encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON ({err.msg} at line {err.lineno})") from err


def _image_path(root: Path, name: str) -> str:
    return name if Path(name).is_absolute() else str(root / name)


def _finish(sample: Sample, size_of: SizeLookup | None) -> Sample:
    return sample.in_pixels(size_of) if size_of is not None and sample.units == "normalized" else sample


# ----------------------------------------------------------------------------------------------
# MGrounding-630k

_IMAGE_PLACEHOLDER = re.compile(r"\s*<image>\s*")
_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
# A unit square stand-in for unknown image sizes: the Qwen2-VL syntax (0-1000) then parses to 0-1000
# "pixels", i.e. thousandths of the image, whatever its real size.
_THOUSANDTHS = ImageGeometry(1000, 1000, 1000, 1000)


def _turns(item: dict, where: str) -> list[tuple[str, str]]:
    messages = item.get("conversations", item.get("messages"))
    if not isinstance(messages, list):
        raise DataError(f"{where}: no 'conversations' or 'messages' list")
    turns = []
    for message in messages:
        role = _ROLE_ALIASES.get(str(message.get("from", message.get("role", ""))).lower())
        text = message.get("value", message.get("content"))
        if role is None or not isinstance(text, str):
            raise DataError(f"{where}: a message needs from/role (human, gpt, user, assistant) and a text value")
        turns.append((role, text))
    return turns


def load_mgrounding(path: str | Path, image_root: str | Path | None = None,
                    size_of: SizeLookup | None = None) -> list[Sample]:
    """MGrounding-630k conversation JSON (a list, or JSON lines); one sample per (question, boxed answer) turn.

    Answers without any box are not grounding turns and are skipped, except an explicit "None".
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    if path.suffix == ".jsonl":
        if not path.is_file():
            raise DataError(f"data file not found: {path}")
        items = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        items = _read_json(path)
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a list of conversations")
    samples = []
    for index, item in enumerate(items):
        where = f"{path}:{item.get('id', index)}"
        images = item.get("images", item.get("image", []))
        images = [images] if isinstance(images, str) else list(images)
        turns = _turns(item, where)
        placeholders = sum(text.count("<image>") for role, text in turns if role == "user")
        if placeholders and placeholders != len(images):
            raise DataError(f"{where}: {placeholders} <image> placeholders for {len(images)} images")
        image_paths = [_image_path(root, name) for name in images]
        geometries = [_THOUSANDTHS] * len(images)
        question = None
        for role, text in turns:
            if role == "user":
                question = _IMAGE_PLACEHOLDER.sub(" ", text).strip()
                continue
            if role != "assistant" or question is None:
                continue
            thousandths = parse_answer(text, "ref_tokens", geometries)
            if not thousandths and text.strip() != "None":
                question = None
                continue
            think = _THINK.search(text)
            targets = [Box(b.image, b.x1 / 1000, b.y1 / 1000, b.x2 / 1000, b.y2 / 1000, b.label) for b in thousandths]
            samples.append(_finish(Sample(
                images=image_paths, query=question, targets=targets, task=str(item.get("task", "mgrounding")),
                reasoning=think.group(1).strip() if think else "", units="normalized", source=where,
            ), size_of))
            question = None
    return samples


# ----------------------------------------------------------------------------------------------
# MIG-Bench


def mig_bench_target_image(item: dict) -> int:
    """The 0-based image an MIG-Bench answer lies in; only the question (or additional_info) names it.

    Rules, checked on all 4,295 items: the last image the question names ("in the 2th image",
    "image-2"); "the source image" is the first; group_grounding names it in additional_info
    ("It is in the third image."); `diff` names none: its two images are aligned same-size
    before/after views, and like view_diff ("difference in the second image") we take the second.
    """
    question = item.get("question", "")
    named = last_image_mention(question)
    if named is not None:
        return named
    if "source image" in question:
        return 0
    named = last_image_mention(item.get("additional_info", "") or "")
    if named is not None:
        return named
    if item.get("task") == "diff" and len(item.get("images", [])) == 2:
        return 1
    raise DataError(f"MIG-Bench item names no target image: {question!r}")


def load_mig_bench(path: str | Path, image_root: str | Path | None = None,
                   size_of: SizeLookup | None = None) -> list[Sample]:
    """MIG-Bench's MIG_data.json: one target per item, normalised to its image until sizes are known.

    Boxes are kept exactly as the benchmark gives them, quirks included (5 common_object items have
    inverted corners, 2 answers go past 1.0): the official scorer scores them as given.
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    items = _read_json(path)
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a list of MIG-Bench items")
    samples = []
    for index, item in enumerate(items):
        where = f"mig-bench:{index}"
        try:
            images = [_image_path(root, name) for name in item["images"]]
            x1, y1, x2, y2 = (float(v) for v in item["answer"])
            target_image = mig_bench_target_image(item)
            question = item["question"].strip()
            task = item["task"]
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"{path}: item {index} is not an MIG-Bench item ({type(err).__name__}: {err})") from err
        if not 0 <= target_image < len(images):
            raise DataError(f"{path}: item {index} names image {target_image + 1} of {len(images)}")
        samples.append(_finish(Sample(
            images=images, query=question, targets=[Box(target_image, x1, y1, x2, y2)], task=task,
            units="normalized", source=where,
        ), size_of))
    return samples


# ----------------------------------------------------------------------------------------------
# MC-Bench


def load_mc_bench(coco_path: str | Path, annotations_path: str | Path | None = None,
                  image_root: str | Path | None = None) -> list[Sample]:
    """MC-Bench pairs from MC-Bench_coco_format.json; task = prompt style when mc-bench_v0.2_val.json is given.

    One sample per pair (images in `id_in_pair` order); every GT box of either image is a target,
    labelled with its group ("group 1"), which is what MC-Bench's scorer matches instance groups by.
    Pairs without any box (negative samples) are no-target samples.
    """
    coco_path = Path(coco_path)
    root = Path(image_root) if image_root is not None else coco_path.parent
    coco = _read_json(coco_path)
    try:
        categories = {c["id"]: c["name"] for c in coco["categories"]}
        pairs: dict[int, list[dict]] = defaultdict(list)
        for image in coco["images"]:
            pairs[image["pair_id"]].append(image)
        boxes: dict[int, list[dict]] = defaultdict(list)
        for ann in coco["annotations"]:
            boxes[ann["image_id"]].append(ann)
    except (KeyError, TypeError) as err:
        raise DataError(f"{coco_path}: not MC-Bench COCO JSON ({type(err).__name__}: {err})") from err
    styles: dict[int, str] = {}
    if annotations_path is not None:
        meta = _read_json(annotations_path)
        by_image = {image["id"]: image["text_id"] for image in meta.get("images", [])}
        text_style = {d["id"]: d.get("text_style", "") for d in meta.get("descriptions", [])}
        styles = {image_id: text_style.get(text_id, "") for image_id, text_id in by_image.items()}
    samples = []
    for pair_id in sorted(pairs):
        images = sorted(pairs[pair_id], key=lambda image: image["id_in_pair"])
        if len(images) != 2 or images[0]["pair_image_id"] != images[1]["id"]:
            raise DataError(f"{coco_path}: pair {pair_id} is not two images that name each other")
        targets = []
        for index, image in enumerate(images):
            for ann in sorted(boxes[image["id"]], key=lambda a: a["id"]):
                x, y, w, h = (float(v) for v in ann["bbox"])
                targets.append(Box(index, x, y, x + w, y + h, categories[ann["category_id"]]))
        style = styles.get(images[0]["id"], "")
        samples.append(Sample(
            images=[_image_path(root, image["file_name"]) for image in images],
            query=images[0]["description"],
            targets=targets,
            task=f"mc_bench_{style.lower()}" if style else "mc_bench",
            image_sizes=[(int(image["width"]), int(image["height"])) for image in images],
            source=f"mc-bench:{pair_id}",
        ))
    return samples


# ----------------------------------------------------------------------------------------------
# COCO / ODinW detection

DETECTION_QUERY = "Locate every {category} in the image."


def load_coco_detection(path: str | Path, image_root: str | Path | None = None, query: str = DETECTION_QUERY,
                        include_absent: bool = False, task: str = "detection") -> list[Sample]:
    """One single-image sample per (image, category) with all its boxes (crowd boxes left out).

    `include_absent` adds a no-target sample for every category an image lacks (negatives).
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    coco = _read_json(path)
    try:
        categories = {c["id"]: c["name"] for c in coco["categories"]}
        images = sorted(coco["images"], key=lambda image: image["id"])
        boxes: dict[tuple[int, int], list[dict]] = defaultdict(list)
        for ann in coco["annotations"]:
            if not ann.get("iscrowd", 0):
                boxes[(ann["image_id"], ann["category_id"])].append(ann)
    except (KeyError, TypeError) as err:
        raise DataError(f"{path}: not COCO detection JSON ({type(err).__name__}: {err})") from err
    samples = []
    for image in images:
        for category_id in sorted(categories):
            anns = sorted(boxes.get((image["id"], category_id), []), key=lambda a: a["id"])
            if not anns and not include_absent:
                continue
            name = categories[category_id]
            targets = [Box(0, float(a["bbox"][0]), float(a["bbox"][1]), float(a["bbox"][0]) + float(a["bbox"][2]),
                           float(a["bbox"][1]) + float(a["bbox"][3]), name) for a in anns]
            size = [(int(image["width"]), int(image["height"]))] if "width" in image and "height" in image else None
            samples.append(Sample(
                images=[_image_path(root, image["file_name"])], query=query.format(category=name), targets=targets,
                task=task, image_sizes=size, source=f"coco:{image['id']}:{category_id}",
            ))
    return samples


def load_samples(path: str | Path, data_format: str = "jsonl", image_root: str | Path | None = None,
                 annotations: str | Path | None = None) -> list[Sample]:
    """Any supported format by name (see FORMATS)."""
    if data_format == "jsonl":
        return read_jsonl(path)
    if data_format == "mgrounding":
        return load_mgrounding(path, image_root)
    if data_format == "mig-bench":
        return load_mig_bench(path, image_root)
    if data_format == "mc-bench":
        return load_mc_bench(path, annotations, image_root)
    if data_format == "coco":
        return load_coco_detection(path, image_root)
    raise DataError(f"unknown data format {data_format!r}; expected one of {', '.join(FORMATS)}")
