"""gemvg-train: synth | convert | sft | grpo.

    gemvg-train synth --out DIR --num-samples N --seed S
    gemvg-train convert --format mig-bench --input MIG_data.json --out data.jsonl [--image-root DIR]
    gemvg-train sft  --model CKPT --data data.jsonl --output DIR [--max-steps N] [--config YAML] [--lora]
    gemvg-train grpo --model CKPT --data data.jsonl --output DIR [--max-steps N] [--config YAML] [--lora]
    gemvg-train curriculum --stage single|distractors|multi --out DIR --num-samples N --seed S
    gemvg-train recipe --out DIR [--scale F]          # the demo model: base, curriculum SFT, GRPO, held-out scores
    gemvg-train eval (--model CKPT | --bundle DIR) --data data.jsonl [--mode raw|direct] [--limit N] [--out J]

Bad input (missing files, bad config, data that is not a sample) is one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gemvg.runtime.command import ArgumentParser, positive_int, run_command

from .loaders import FORMATS, load_samples
from .schema import DataError, write_jsonl


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="gemvg-train", description="Data and fine-tuning for multi-image grounding.")
    commands = parser.add_subparsers(dest="command", required=True)

    synth = commands.add_parser("synth", help="write procedural multi-image grounding samples (images + data.jsonl)")
    synth.add_argument("--out", required=True, type=Path)
    synth.add_argument("--num-samples", required=True, type=positive_int)
    synth.add_argument("--seed", type=int, default=0)

    convert = commands.add_parser("convert", help="convert a public grounding dataset to our JSONL")
    convert.add_argument("--format", required=True, choices=[f for f in FORMATS if f != "jsonl"])
    convert.add_argument("--input", required=True, type=Path)
    convert.add_argument("--out", required=True, type=Path, help="JSONL to write")
    convert.add_argument("--image-root", type=Path, help="folder the dataset's image paths are relative to")
    convert.add_argument("--annotations", type=Path, help="MC-Bench: mc-bench_v0.2_val.json, for the prompt styles")

    curriculum = commands.add_parser("curriculum", help="write one stage of the demo model's curriculum")
    curriculum.add_argument("--stage", required=True, choices=["single", "distractors", "multi"])
    curriculum.add_argument("--out", required=True, type=Path)
    curriculum.add_argument("--num-samples", required=True, type=positive_int)
    curriculum.add_argument("--seed", type=int, default=0)

    recipe = commands.add_parser("recipe", help="train the demo model from scratch (resumable)")
    recipe.add_argument("--out", required=True, type=Path)
    recipe.add_argument("--scale", type=float, default=1.0, help="multiplies every step and sample count")

    evaluation = commands.add_parser("eval", help="held-out Acc@0.5 and mean IoU of a checkpoint or bundle")
    which = evaluation.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", type=Path, help="Hugging Face checkpoint directory")
    which.add_argument("--bundle", type=Path, help="gemvg bundle directory (run by the runtime Engine)")
    evaluation.add_argument("--data", required=True, type=Path, help="our JSONL with targets")
    evaluation.add_argument("--mode", choices=["raw", "direct"], default="direct", help="how the query is prompted")
    evaluation.add_argument("--limit", type=positive_int, help="score the first N samples only")
    evaluation.add_argument("--out", type=Path, help="JSON with the scores and every answer")

    for name, what in (("sft", "supervised fine-tuning (TRL SFTTrainer)"), ("grpo", "GRPO (TRL GRPOTrainer)")):
        command = commands.add_parser(name, help=what)
        command.add_argument("--model", required=True, type=Path, help="Hugging Face checkpoint directory")
        command.add_argument("--data", required=True, type=Path, help="our JSONL (see gemvg-train synth / convert)")
        command.add_argument("--output", required=True, type=Path, help="where the merged, export-ready model goes")
        command.add_argument("--max-steps", type=positive_int, help="stop after this many optimizer steps")
        command.add_argument("--config", type=Path, help="YAML run config (train/configs/*.yaml)")
        command.add_argument("--lora", action="store_true", help="train LoRA adapters (merged on save)")
        command.add_argument("--seed", type=int, help="overrides the config's seed")
    return parser


def _train(args: argparse.Namespace) -> int:
    from .common import check_inputs
    from .config import load_config

    config = load_config(args.config)
    if args.lora:
        config.lora.enabled = True
    if args.seed is not None:
        config.seed = args.seed
    if args.max_steps is not None and args.max_steps < 1:
        raise DataError("--max-steps must be at least 1")
    if args.output.resolve() == args.model.resolve():
        raise DataError("--output must not be the --model directory: the base checkpoint is read while saving")
    inputs = check_inputs(args.model, args.data, config)  # fail fast, before torch loads
    if args.command == "sft":
        from .sft import run_sft

        out = run_sft(args.model, args.data, args.output, config, args.max_steps, inputs)
    else:
        from .grpo import run_grpo

        out = run_grpo(args.model, args.data, args.output, config, args.max_steps, inputs)
    print(f"gemvg-train {args.command}: saved the merged model to {out}", flush=True)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .checkpoint import checkpoint_family
    from .evaluate import evaluate
    from .schema import read_jsonl

    if args.limit is not None and args.limit < 1:
        raise DataError("--limit must be at least 1")
    if args.model is not None:
        checkpoint_family(args.model)  # a clear error before torch loads
    elif not args.bundle.is_dir():
        raise DataError(f"bundle not found: {args.bundle}")
    samples = [s for s in read_jsonl(args.data) if s.targets][: args.limit]
    if not samples:
        raise DataError(f"{args.data}: no samples with targets")
    scores = evaluate(samples, model_dir=args.model, bundle=args.bundle, mode=args.mode, out_json=args.out)
    print(f"gemvg-train eval: {scores.line()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command("gemvg-train", lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "synth":
        from .synth import write_dataset

        path = write_dataset(args.out, args.num_samples, args.seed)
        print(f"gemvg-train synth: wrote {args.num_samples} samples to {path}")
        return 0
    if args.command == "curriculum":
        from .curriculum import write_stage

        path = write_stage(args.out, args.stage, args.num_samples, args.seed)
        print(f"gemvg-train curriculum: wrote {args.num_samples} {args.stage} samples to {path}")
        return 0
    if args.command == "recipe":
        from .recipe import run_recipe

        if args.scale <= 0:
            raise DataError("--scale must be above 0")
        print(f"gemvg-train recipe: final model in {run_recipe(args.out, args.scale)}")
        return 0
    if args.command == "eval":
        return _evaluate(args)
    if args.command == "convert":
        samples = load_samples(args.input, args.format, args.image_root, args.annotations)
        write_jsonl(samples, args.out)
        print(f"gemvg-train convert: wrote {len(samples)} samples to {args.out}")
        return 0
    return _train(args)


if __name__ == "__main__":
    sys.exit(main())
