"""Procedural multi-image grounding scenes drawn with PIL, one sample per MG-Data task type.

Every sample has 1-6 small images (64-320 px a side) of coloured shapes on varied backgrounds with
clutter, a query, its targets (boxes of the drawn shapes) and a short chain of thought. The task types
follow GeM-VG's MG-Data: referential retrieval; cross-image association (common object, correspondence
across views, tracking across frames); difference; reasoning (counting, ordinal, comparison); plus
multi-target and no-target retrieval.

Deterministic by seed: sample i draws from its own `random.Random(f"{seed}:{i}")`, images are PNGs
written without metadata, so the same seed gives byte-identical images and JSONL.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from PIL import Image, ImageDraw

from gemvg.runtime.grounding import ORDINALS, Box

from .schema import Sample, write_jsonl

SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon", "cross", "ring")
COLORS = {
    "red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 119, 180), "yellow": (240, 200, 20),
    "purple": (148, 103, 189), "orange": (255, 127, 14), "cyan": (23, 190, 207), "pink": (247, 112, 186),
    "brown": (140, 86, 75),
}
MARKER_RGB = (0, 0, 0)  # the box drawn around a "marked" object; no shape is black, so it is unambiguous
TASKS = (
    "referential_retrieval", "multi_target", "no_target", "common_object", "correspondence", "tracking",
    "difference", "counting", "ordinal", "comparison",
)
MIN_SIDE, MAX_SIDE = 64, 320
PlainBox = tuple[int, int, int, int]


class _Retry(Exception):
    """A layout did not fit; the sample is drawn again from a fresh stream."""


@dataclass(frozen=True)
class Thing:
    kind: str
    color: str
    box: PlainBox

    @property
    def name(self) -> str:
        return f"{self.color} {self.kind}"


@dataclass
class Scene:
    """One image: its size, background, clutter and shapes; all randomness is drawn before rendering."""

    width: int
    height: int
    background: tuple
    clutter: list[tuple]
    things: list[Thing] = field(default_factory=list)
    marked: PlainBox | None = None

    def render(self) -> Image.Image:
        image = Image.new("RGB", (self.width, self.height))
        draw = ImageDraw.Draw(image)
        _draw_background(draw, self.width, self.height, self.background)
        for item in self.clutter:
            if item[0] == "line":
                draw.line(item[1], fill=item[2], width=1)
            else:
                draw.ellipse(item[1], fill=item[2])
        for thing in self.things:
            _draw_shape(draw, thing.kind, thing.box, COLORS[thing.color])
        if self.marked is not None:
            x1, y1, x2, y2 = self.marked
            draw.rectangle((x1 - 2, y1 - 2, x2 + 2, y2 + 2), outline=MARKER_RGB, width=2)
        return image

    def describe(self) -> str:
        return ", ".join(_a(t.name) for t in sorted(self.things, key=lambda t: (t.box[0], t.box[1]))) or "nothing"


# ----------------------------------------------------------------------------------------------
# Drawing


def _draw_background(draw: ImageDraw.ImageDraw, width: int, height: int, spec: tuple) -> None:
    style, base, other, step = spec
    if style == "solid":
        draw.rectangle((0, 0, width, height), fill=base)
    elif style == "gradient":
        for y in range(height):
            t = y / max(1, height - 1)
            draw.line((0, y, width, y), fill=tuple(round(a + (b - a) * t) for a, b in zip(base, other)))
    elif style == "stripes":
        draw.rectangle((0, 0, width, height), fill=base)
        for x in range(0, width, 2 * step):
            draw.rectangle((x, 0, x + step - 1, height), fill=other)
    else:  # checker
        for y in range(0, height, step):
            for x in range(0, width, step):
                draw.rectangle((x, y, x + step - 1, y + step - 1), fill=base if (x // step + y // step) % 2 else other)


def _regular_polygon(box: PlainBox, sides: int, rotation: float, inner: float | None = None) -> list[tuple[float, float]]:
    x1, y1, x2, y2 = box
    cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
    points = []
    count = sides * 2 if inner else sides
    for i in range(count):
        angle = rotation + 2 * math.pi * i / count
        scale = inner if inner and i % 2 else 1.0
        points.append((cx + rx * scale * math.cos(angle), cy + ry * scale * math.sin(angle)))
    return points


def _fit(points: list[tuple[float, float]], box: PlainBox) -> list[tuple[float, float]]:
    """Stretch a polygon so that its extent is exactly `box`: the target box is then tight."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x1, y1, x2, y2 = box
    sx, sy = (x2 - x1) / (max(xs) - min(xs)), (y2 - y1) / (max(ys) - min(ys))
    return [(x1 + (x - min(xs)) * sx, y1 + (y - min(ys)) * sy) for x, y in points]


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, box: PlainBox, rgb: tuple[int, int, int]) -> None:
    x1, y1, x2, y2 = box
    if kind == "circle":
        draw.ellipse(box, fill=rgb)
    elif kind == "ring":
        draw.ellipse(box, outline=rgb, width=max(2, (x2 - x1) // 5))
    elif kind == "square":
        draw.rectangle(box, fill=rgb)
    elif kind == "triangle":
        draw.polygon([((x1 + x2) / 2, y1), (x1, y2), (x2, y2)], fill=rgb)
    elif kind == "diamond":
        draw.polygon([((x1 + x2) / 2, y1), (x2, (y1 + y2) / 2), ((x1 + x2) / 2, y2), (x1, (y1 + y2) / 2)], fill=rgb)
    elif kind == "hexagon":
        draw.polygon(_fit(_regular_polygon(box, 6, 0.0), box), fill=rgb)
    elif kind == "star":
        draw.polygon(_fit(_regular_polygon(box, 5, -math.pi / 2, inner=0.45), box), fill=rgb)
    elif kind == "cross":
        w, h = (x2 - x1) / 3, (y2 - y1) / 3
        draw.rectangle((x1 + w, y1, x2 - w, y2), fill=rgb)
        draw.rectangle((x1, y1 + h, x2, y2 - h), fill=rgb)
    else:
        raise ValueError(f"unknown shape {kind!r}")


# ----------------------------------------------------------------------------------------------
# Layout


def _pale(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.randint(150, 250) for _ in range(3))


def _new_scene(rng: random.Random, width: int | None = None, height: int | None = None) -> Scene:
    width = width or rng.randint(MIN_SIDE, MAX_SIDE)
    height = height or rng.randint(MIN_SIDE, MAX_SIDE)
    background = (rng.choice(("solid", "gradient", "stripes", "checker")), _pale(rng), _pale(rng), rng.randint(6, 24))
    clutter = []
    for _ in range(rng.randint(0, 12)):
        shade = tuple(rng.randint(110, 200) for _ in range(3))
        if rng.random() < 0.5:
            clutter.append(("line", (rng.randrange(width), rng.randrange(height), rng.randrange(width),
                                     rng.randrange(height)), shade))
        else:
            x, y, r = rng.randrange(width), rng.randrange(height), rng.randint(1, 2)
            clutter.append(("dot", (x - r, y - r, x + r, y + r), shade))
    return Scene(width, height, background, clutter)


def _overlaps(a: PlainBox, b: PlainBox, gap: int = 3) -> bool:
    return not (a[2] + gap < b[0] or b[2] + gap < a[0] or a[3] + gap < b[1] or b[3] + gap < a[1])


def _place(rng: random.Random, scene: Scene, kind: str, color: str, size: float | None = None,
           avoid: list[PlainBox] = ()) -> Thing:
    """Put a shape where it overlaps nothing; `size` is its side as a fraction of the image's short side."""
    fraction = size if size is not None else rng.uniform(0.16, 0.34)
    short = min(scene.width, scene.height)
    for _ in range(60):
        side = max(10, round(short * fraction))
        w = max(10, round(side * rng.uniform(0.85, 1.15)))
        if side >= scene.width - 4 or side >= scene.height - 4:
            fraction *= 0.8
            continue
        x1 = rng.randint(2, scene.width - w - 3) if scene.width - w - 3 > 2 else 2
        y1 = rng.randint(2, scene.height - side - 3)
        box = (x1, y1, min(x1 + w, scene.width - 2), y1 + side)
        if not any(_overlaps(box, t.box) for t in scene.things) and not any(_overlaps(box, b) for b in avoid):
            thing = Thing(kind, color, box)
            scene.things.append(thing)
            return thing
        if size is None:
            fraction *= 0.95
    raise _Retry()


def _other_pair(rng: random.Random, avoid: set[tuple[str, str]]) -> tuple[str, str]:
    while True:
        pair = (rng.choice(SHAPES), rng.choice(list(COLORS)))
        if pair not in avoid:
            return pair


def _near_miss(rng: random.Random, kind: str, color: str) -> tuple[str, str]:
    """A distractor that shares one attribute with the target (same shape or same colour), never both."""
    if rng.random() < 0.5:
        return kind, rng.choice([c for c in COLORS if c != color])
    return rng.choice([s for s in SHAPES if s != kind]), color


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _plural(word: str) -> str:
    return word + ("es" if word.endswith(("s", "x", "sh", "ch")) else "s")


def _ordinal(index: int) -> str:
    return ORDINALS[index]


def _box(image: int, thing: Thing) -> Box:
    return Box(image, *map(float, thing.box), thing.name)


def _listing(scenes: list[Scene], word: str = "Image") -> str:
    return " ".join(f"{word} {i + 1} shows {scene.describe()}." for i, scene in enumerate(scenes))


# ----------------------------------------------------------------------------------------------
# Task generators: each returns (scenes, query, targets, reasoning)

Generated = tuple[list[Scene], str, list[Box], str]


def _referential_retrieval(rng: random.Random) -> Generated:
    scenes = [_new_scene(rng) for _ in range(rng.randint(2, 6))]
    kind, color = rng.choice(SHAPES), rng.choice(list(COLORS))
    home = rng.randrange(len(scenes))
    target = _place(rng, scenes[home], kind, color)
    for scene in scenes:
        for _ in range(rng.randint(1, 3) - (scene is scenes[home])):
            _place(rng, scene, *_near_miss(rng, kind, color))
    query = rng.choice(("Find the {n}.", "Where is the {n}?", "Locate the {n} among these images."))
    query = query.format(n=target.name)
    reasoning = f"{_listing(scenes)} Only image {home + 1} has {_a(target.name)}."
    return scenes, query, [_box(home, target)], reasoning


def _multi_target(rng: random.Random) -> Generated:
    scenes = [_new_scene(rng, rng.randint(96, MAX_SIDE), rng.randint(96, MAX_SIDE)) for _ in range(rng.randint(2, 5))]
    kind, color = rng.choice(SHAPES), rng.choice(list(COLORS))
    targets = []
    for _ in range(rng.randint(2, 4)):
        home = rng.randrange(len(scenes))
        targets.append(_box(home, _place(rng, scenes[home], kind, color, size=rng.uniform(0.14, 0.24))))
    for scene in scenes:
        for _ in range(rng.randint(0, 2)):
            _place(rng, scene, *_near_miss(rng, kind, color), size=rng.uniform(0.14, 0.24))
    targets.sort(key=lambda b: (b.image, b.x1, b.y1))
    name = f"{color} {kind}"
    query = rng.choice(("Find every {n} in these images.", "Locate all the {p}."))
    query = query.format(n=name, p=f"{color} {_plural(kind)}")
    counts = [sum(b.image == i for b in targets) for i in range(len(scenes))]
    found = ", ".join(f"{c} in image {i + 1}" for i, c in enumerate(counts) if c)
    reasoning = f"{_listing(scenes)} There are {len(targets)} {color} {_plural(kind)}: {found}."
    return scenes, query, targets, reasoning


def _no_target(rng: random.Random) -> Generated:
    scenes = [_new_scene(rng) for _ in range(rng.randint(1, 4))]
    kind, color = rng.choice(SHAPES), rng.choice(list(COLORS))
    for scene in scenes:
        for _ in range(rng.randint(1, 3)):
            _place(rng, scene, *_near_miss(rng, kind, color))
    query = rng.choice(("Find the {n}.", "Locate the {n} if there is one."))
    query = query.format(n=f"{color} {kind}")
    where = "the image" if len(scenes) == 1 else "any of the images"
    reasoning = f"{_listing(scenes)} There is no {color} {kind} in {where}."
    return scenes, query, [], reasoning


def _common_object(rng: random.Random) -> Generated:
    scenes = [_new_scene(rng) for _ in range(rng.randint(2, 4))]
    kind, color = rng.choice(SHAPES), rng.choice(list(COLORS))
    used = {(kind, color)}
    shared = [_place(rng, scene, kind, color) for scene in scenes]
    for scene in scenes:
        for _ in range(rng.randint(1, 2)):
            pair = _other_pair(rng, used)
            used.add(pair)  # every other object appears once, so exactly one object is common
            _place(rng, scene, *pair)
    name = f"{color} {kind}"
    if rng.random() < 0.5:
        which = rng.randrange(len(scenes))
        query = f"These images share one object in common. Locate it in the {_ordinal(which)} image."
        targets = [_box(which, shared[which])]
    else:
        query = "These images share one object in common. Locate it in every image."
        targets = [_box(i, thing) for i, thing in enumerate(shared)]
    reasoning = f"{_listing(scenes)} The {name} is the object all images share."
    return scenes, query, targets, reasoning


def _correspondence(rng: random.Random) -> Generated:
    """The same layout seen at several scales, some mirrored; the object marked in view 1 is sought in another."""
    base_w, base_h = rng.randint(96, 240), rng.randint(96, 240)
    base = _new_scene(rng, base_w, base_h)
    used: set[tuple[str, str]] = set()
    for _ in range(rng.randint(3, 4)):
        pair = _other_pair(rng, used)
        used.add(pair)
        _place(rng, base, *pair, size=rng.uniform(0.14, 0.22))
    marked = rng.randrange(len(base.things))
    scenes = []
    for view in range(rng.randint(2, 3)):
        scale = 1.0 if view == 0 else rng.uniform(0.6, 1.3)
        width = min(MAX_SIDE, max(MIN_SIDE, round(base_w * scale)))
        height = min(MAX_SIDE, max(MIN_SIDE, round(base_h * width / base_w)))
        mirrored = view > 0 and rng.random() < 0.5
        scene = _new_scene(rng, width, height)
        for thing in base.things:
            x1, y1, x2, y2 = (thing.box[0] / base_w, thing.box[1] / base_h, thing.box[2] / base_w, thing.box[3] / base_h)
            if mirrored:
                x1, x2 = 1 - x2, 1 - x1
            box = (round(x1 * width), round(y1 * height), round(x2 * width), round(y2 * height))
            scene.things.append(Thing(thing.kind, thing.color, box))
        scenes.append(scene)
    scenes[0].marked = scenes[0].things[marked].box
    which = rng.randrange(1, len(scenes))
    target = scenes[which].things[marked]
    query = (f"These images show the same objects from different views. The object marked with a box in the first "
             f"image: locate it in the {_ordinal(which)} image.")
    reasoning = f"The box in image 1 marks the {target.name}. In image {which + 1} the {target.name} is at the matching place."
    return scenes, query, [_box(which, target)], reasoning


def _tracking(rng: random.Random) -> Generated:
    """Frames of shapes moving along lines in separate bands; a look-alike decoy makes motion the only cue."""
    frames = rng.randint(3, 6)
    width, height = rng.randint(160, MAX_SIDE), rng.randint(120, 240)
    movers = rng.randint(2, 3)
    band = height // movers
    kind, color = rng.choice(SHAPES), rng.choice(list(COLORS))
    looks = [(kind, color)] + [(kind, color) if rng.random() < 0.5 else _other_pair(rng, {(kind, color)})
                               for _ in range(movers - 1)]
    paths = []
    for m in range(movers):
        side = max(12, min(band - 8, round(min(width, height) * rng.uniform(0.14, 0.22))))
        y_low, y_high = m * band + 2, (m + 1) * band - side - 2
        start = (rng.randint(2, width - side - 3), rng.randint(y_low, max(y_low, y_high)))
        end = (rng.randint(2, width - side - 3), rng.randint(y_low, max(y_low, y_high)))
        paths.append((side, start, end))
    order = list(range(movers))
    rng.shuffle(order)  # the target's band is random
    scenes = []
    for f in range(frames):
        scene = _new_scene(rng, width, height)
        t = f / (frames - 1)
        for m in order:
            side, (sx, sy), (ex, ey) = paths[m]
            x, y = round(sx + (ex - sx) * t), round(sy + (ey - sy) * t)
            scene.things.append(Thing(*looks[m], (x, y, x + side, y + side)))
        scenes.append(scene)
    target_index = order.index(0)
    scenes[0].marked = scenes[0].things[target_index].box
    which = rng.randrange(1, frames)
    target = scenes[which].things[target_index]
    query = (f"These are frames of a video. The object marked with a box in the first frame moves: "
             f"locate it in the {_ordinal(which)} frame.")
    reasoning = (f"The box in frame 1 marks {_a(target.name)} that moves along its own band. "
                 f"Following it, in frame {which + 1} it is at the position reached at that time.")
    return scenes, query, [_box(which, target)], reasoning


def _difference(rng: random.Random) -> Generated:
    first = _new_scene(rng)
    used: set[tuple[str, str]] = set()
    for _ in range(rng.randint(2, 4)):
        pair = _other_pair(rng, used)
        used.add(pair)
        _place(rng, first, *pair)
    second = replace(first, things=list(first.things))
    change = rng.choice(("added", "recoloured", "reshaped", "removed"))
    if change == "added":
        changed = _place(rng, second, *_other_pair(rng, used))
        what = f"{_a(changed.name)} was added"
    else:
        index = rng.randrange(len(second.things))
        old = second.things[index]
        if change == "removed":
            del second.things[index]
            changed, what = old, f"the {old.name} was removed"
        else:
            kind, color = (old.kind, rng.choice([c for c in COLORS if c != old.color])) if change == "recoloured" \
                else (rng.choice([s for s in SHAPES if s != old.kind]), old.color)
            changed = Thing(kind, color, old.box)
            second.things[index] = changed
            what = f"the {old.name} became {_a(changed.name)}"
    query = rng.choice(("Compare the two images and locate their difference in the second image.",
                        "What changed between these images? Locate it in the second image."))
    reasoning = f"Image 1 shows {first.describe()}. Image 2 shows {second.describe()}. In image 2, {what}."
    return [first, second], query, [Box(1, *map(float, changed.box), changed.name)], reasoning


def _counting(rng: random.Random) -> Generated:
    count = rng.randint(2, 4)
    kind = rng.choice(SHAPES)
    counts = rng.sample(range(1, 5), count)
    scenes = []
    for n in counts:
        scene = _new_scene(rng, rng.randint(128, MAX_SIDE), rng.randint(128, MAX_SIDE))
        for _ in range(n):
            _place(rng, scene, kind, rng.choice(list(COLORS)), size=rng.uniform(0.12, 0.2))
        for _ in range(rng.randint(0, 2)):
            _place(rng, scene, rng.choice([s for s in SHAPES if s != kind]), rng.choice(list(COLORS)),
                   size=rng.uniform(0.12, 0.2))
        scenes.append(scene)
    if rng.random() < 0.5:
        which = counts.index(max(counts))
        query = f"Which image has the most {_plural(kind)}? Locate all of them in that image."
    else:
        which = rng.randrange(count)
        query = f"Locate every {kind} in the image that has exactly {counts[which]} of them."
    targets = sorted((_box(which, t) for t in scenes[which].things if t.kind == kind), key=lambda b: (b.x1, b.y1))
    tally = ", ".join(f"image {i + 1} has {n}" for i, n in enumerate(counts))
    reasoning = f"Counting {_plural(kind)}: {tally}. So the answer is in image {which + 1}."
    return scenes, query, targets, reasoning


def _ordinal_task(rng: random.Random) -> Generated:
    scenes = [_new_scene(rng, rng.randint(160, MAX_SIDE), rng.randint(64, 200)) for _ in range(rng.randint(1, 3))]
    kind = rng.choice(SHAPES)
    which = rng.randrange(len(scenes))
    for i, scene in enumerate(scenes):
        for _ in range(rng.randint(2, 4) if i == which else rng.randint(0, 2)):
            _place(rng, scene, kind, rng.choice(list(COLORS)), size=rng.uniform(0.2, 0.3))
    row = sorted((t for t in scenes[which].things if t.kind == kind), key=lambda t: t.box[0])
    if any(b.box[0] - a.box[0] < 6 for a, b in zip(row, row[1:])):
        raise _Retry()  # left-to-right order must be unambiguous
    rank = rng.randrange(len(row))
    where = "" if len(scenes) == 1 else f" in the {_ordinal(which)} image"
    query = f"Locate the {_ordinal(rank)} {kind} from the left{where}."
    reasoning = (f"Image {which + 1} has {len(row)} {_plural(kind)}; from left to right: "
                 f"{', '.join(t.color for t in row)}. Number {rank + 1} is the {row[rank].color} one.")
    return scenes, query, [_box(which, row[rank])], reasoning


def _comparison(rng: random.Random) -> Generated:
    count = rng.randint(2, 4)
    width, height = rng.randint(128, MAX_SIDE), rng.randint(128, MAX_SIDE)  # one size, so sizes compare in pixels
    kind = rng.choice(SHAPES)
    fractions = sorted(rng.sample([0.12, 0.18, 0.26, 0.36, 0.48], count))
    rng.shuffle(fractions)
    scenes, mains = [], []
    for fraction in fractions:
        scene = _new_scene(rng, width, height)
        mains.append(_place(rng, scene, kind, rng.choice(list(COLORS)), size=fraction))
        for _ in range(rng.randint(0, 2)):
            _place(rng, scene, rng.choice([s for s in SHAPES if s != kind]), rng.choice(list(COLORS)), size=0.12)
        scenes.append(scene)
    areas = [(t.box[2] - t.box[0]) * (t.box[3] - t.box[1]) for t in mains]
    if len(set(areas)) != len(areas):
        raise _Retry()
    largest = rng.random() < 0.5
    which = areas.index(max(areas) if largest else min(areas))
    query = f"Locate the {'largest' if largest else 'smallest'} {kind} across all the images."
    sizes = ", ".join(f"image {i + 1}: {t.box[2] - t.box[0]}x{t.box[3] - t.box[1]}" for i, t in enumerate(mains))
    reasoning = f"Each image has one {kind}; sizes {sizes}. The {'largest' if largest else 'smallest'} is in image {which + 1}."
    return scenes, query, [_box(which, mains[which])], reasoning


GENERATORS = {
    "referential_retrieval": _referential_retrieval, "multi_target": _multi_target, "no_target": _no_target,
    "common_object": _common_object, "correspondence": _correspondence, "tracking": _tracking,
    "difference": _difference, "counting": _counting, "ordinal": _ordinal_task, "comparison": _comparison,
}


# ----------------------------------------------------------------------------------------------
# Entry points


@dataclass(frozen=True)
class SynthSample:
    sample: Sample  # image paths are file names relative to the output folder
    images: list[Image.Image]


def make_sample(index: int, seed: int = 0, task: str | None = None) -> SynthSample:
    """Sample `index` of the stream for `seed`; task types take turns unless `task` is given."""
    task = task or TASKS[index % len(TASKS)]
    for attempt in range(100):
        rng = random.Random(f"{seed}:{index}:{attempt}")
        try:
            scenes, query, targets, reasoning = GENERATORS[task](rng)
        except _Retry:
            continue
        names = [f"images/{index:06d}_{k}.png" for k in range(len(scenes))]
        sample = Sample(images=names, query=query, targets=targets, task=task, reasoning=reasoning,
                        image_sizes=[(s.width, s.height) for s in scenes], source=f"synth:{seed}:{index}")
        return SynthSample(sample, [scene.render() for scene in scenes])
    raise RuntimeError(f"synth: no layout fits for sample {index} ({task})")  # not reached with these sizes


def write_dataset(out_dir: str | Path, num_samples: int, seed: int = 0,
                  make: Callable[[int, int], SynthSample] = make_sample) -> Path:
    """Write `num_samples` samples of `make(index, seed)`: images under out_dir/images and out_dir/data.jsonl.
    Returns the JSONL path."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    samples = []
    for index in range(num_samples):
        made = make(index, seed)
        for name, image in zip(made.sample.images, made.images):
            image.save(out / name, format="PNG")
        samples.append(replace(made.sample, images=[str(out / name) for name in made.sample.images]))
    return write_jsonl(samples, out / "data.jsonl")
