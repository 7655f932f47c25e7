"""`gemvg`: ground queries over images with a bundle, inspect model inputs, run the demo.

    gemvg ground --bundle B --image a.jpg --image b.jpg --query "the red cup" [--json] [--draw out.png]
    gemvg inspect --bundle B --image a.jpg --query "..." --out dump.npz
    gemvg demo
    gemvg eval mig-bench|mc-bench|coco ...   (needs the eval extra)

Bad input gives one line on stderr and exit code 2; never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import numpy as np

from .command import ArgumentParser, positive_int, run_command
from .errors import InputError
from .grounding import MODES


def _add_request_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", required=True, help="bundle folder written by gemvg-export")
    parser.add_argument("--image", action="append", default=[], help="an image path; repeat for several")
    parser.add_argument("--query", required=True, help="what to find")
    parser.add_argument("--mode", default="direct", choices=MODES,
                        help="direct: boxes only; cot: think then answer; raw: the query verbatim")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "tensorrt"])
    parser.add_argument("--threads", type=positive_int, default=None, help="intra-op threads (default: all cores)")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="gemvg", description="Multi-image visual grounding on the edge.")
    commands = parser.add_subparsers(dest="command", required=True)

    ground = commands.add_parser("ground", help="find every target of a query in one or more images")
    _add_request_args(ground)
    ground.add_argument("--max-new-tokens", type=positive_int, default=256)
    ground.add_argument("--jump-forward", action="store_true",
                        help="feed the text the box syntax forces in one decoder pass (fewer passes per box)")
    ground.add_argument("--json", action="store_true", help="print the result as JSON")
    ground.add_argument("--draw", metavar="OUT.png", help="write the images tiled with their boxes")

    inspect = commands.add_parser("inspect", help="dump every stage (pixels, vision feeds and features, ids, "
                                  "positions, rotary rows, logits) as golden vectors")
    _add_request_args(inspect)
    inspect.add_argument("--out", required=True, help="the .npz file to write")

    demo = commands.add_parser("demo", help="ground a query over the embedded demo images")
    demo.add_argument("--home", default=None, help="where the demo bundle is kept (default ~/.cache/gemvg)")

    commands.add_parser("eval", help="score MIG-Bench / MC-Bench / COCO predictions (gemvg eval -h)",
                        add_help=False)
    commands.add_parser("bench", help="per-stage latency benchmarks (gemvg bench -h)", add_help=False)
    return parser


def _engine(args):
    from .engine import Engine

    return Engine.load(args.bundle, device=args.device, threads=args.threads)


def _print_result(result, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    print(f"text: {result.text!r}")
    if not result.boxes:
        print("no targets found")
    for box in result.boxes:
        label = f" {box.label}" if box.label else ""
        print(f"image {box.image}: ({box.x1:.1f}, {box.y1:.1f}, {box.x2:.1f}, {box.y2:.1f}){label}")
    stages = ", ".join(f"{k} {v:.1f} ms" for k, v in result.timings_ms.items())
    print(f"timings: {stages}")


def cmd_ground(args) -> int:
    if not args.image:
        raise InputError("no images: give at least one --image")
    engine = _engine(args)
    result = engine.ground(args.image, args.query, mode=args.mode, max_new_tokens=args.max_new_tokens,
                           jump_forward=args.jump_forward)
    _print_result(result, args.json)
    if args.draw:
        _draw(engine, args.image, result, args.draw)
    return 0


def _draw(engine, images, result, out_path) -> None:
    from .draw import draw_boxes
    from .preprocess import load_image

    loaded = [load_image(image, engine.manifest.preprocess.max_image_pixels) for image in images]
    path = draw_boxes(loaded, result.boxes, out_path)
    print(f"drawn: {path}", file=sys.stderr)


def cmd_inspect(args) -> int:
    if not args.image:
        raise InputError("no images: give at least one --image")
    engine = _engine(args)
    inputs = engine.prepare(args.image, args.query, args.mode)
    prompt = inputs.prompt
    engine.check_context(len(prompt.input_ids), 1)
    # Every stage as golden vectors for other runtimes (BUNDLE.md names each): per image the vision
    # encoder's feeds and its features, then the prompt, the decoder's per-slot rotary rows and logits.
    stages, features = {}, []
    for index, image in enumerate(inputs.images):
        feeds, _ = engine.vision_inputs(image)
        stages.update({f"image_{index}_vision_{name}": value for name, value in feeds.items()})
        features.append(engine.encode_image(image))
        stages[f"image_{index}_features"] = features[-1][0]
        if len(features[-1]) > 1:  # DeepStack
            stages[f"image_{index}_deepstack_features"] = features[-1][1:]
    cache = engine.new_cache(len(prompt.input_ids))
    logits = engine.prefill(prompt, features, cache)
    np.savez(args.out, pixel_values=inputs.pixel_values, image_grid_thw=inputs.image_grid_thw,
             input_ids=prompt.input_ids[None], position_ids=prompt.position_ids[:, None, :], logits=logits,
             image_spans=np.asarray(prompt.image_spans, np.int64).reshape(-1, 2),
             next_position=np.asarray(prompt.next_position, np.int64),
             decoder_rotary_cos=cache.rotary_cos[:cache.length], decoder_rotary_sin=cache.rotary_sin[:cache.length],
             **stages)
    print(f"wrote {args.out}: {len(prompt.input_ids)} prompt tokens, {len(inputs.pixel_values)} patches, "
          f"next token {int(np.argmax(logits))}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(Path(args.home) if args.home else None)


def _forward(module: str, extra: str, argv: list[str]) -> int:
    """Subcommands that live in other gemvg parts (installed with their extras)."""
    try:
        target = importlib.import_module(module)
    except ImportError as err:
        raise InputError(f"this command needs gemvg[{extra}] ({err}); pip install 'gemvg[{extra}]'") from None
    return target.main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_command("gemvg", lambda: _main(argv))


def _main(argv: list[str]) -> int:
    if argv and argv[0] == "eval":
        return _forward("gemvg.benchmarks.eval_cli", "eval", argv[1:])
    if argv and argv[0] == "bench":
        return _forward("gemvg.benchmarks.bench", "export", argv[1:])
    args = build_parser().parse_args(argv)
    handler = {"ground": cmd_ground, "inspect": cmd_inspect, "demo": cmd_demo}[args.command]
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
