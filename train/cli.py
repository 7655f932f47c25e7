"""gemvg-train: synth | convert | sft | grpo.

    gemvg-train synth --out DIR --num-samples N --seed S
    gemvg-train convert --format mig-bench --input MIG_data.json --out data.jsonl [--image-root DIR]
    gemvg-train sft  --model CKPT --data data.jsonl --output DIR [--max-steps N] [--config YAML] [--lora]
    gemvg-train grpo --model CKPT --data data.jsonl --output DIR [--max-steps N] [--config YAML] [--lora]

Bad input (missing files, bad config, data that is not a sample) is one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .loaders import FORMATS, load_samples
from .schema import DataError, write_jsonl

EXIT_BAD_INPUT = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemvg-train", description="Data and fine-tuning for multi-image grounding.")
    commands = parser.add_subparsers(dest="command", required=True)

    synth = commands.add_parser("synth", help="write procedural multi-image grounding samples (images + data.jsonl)")
    synth.add_argument("--out", required=True, type=Path)
    synth.add_argument("--num-samples", required=True, type=int)
    synth.add_argument("--seed", type=int, default=0)

    convert = commands.add_parser("convert", help="convert a public grounding dataset to our JSONL")
    convert.add_argument("--format", required=True, choices=[f for f in FORMATS if f != "jsonl"])
    convert.add_argument("--input", required=True, type=Path)
    convert.add_argument("--out", required=True, type=Path, help="JSONL to write")
    convert.add_argument("--image-root", type=Path, help="folder the dataset's image paths are relative to")
    convert.add_argument("--annotations", type=Path, help="MC-Bench: mc-bench_v0.2_val.json, for the prompt styles")

    for name, what in (("sft", "supervised fine-tuning (TRL SFTTrainer)"), ("grpo", "GRPO (TRL GRPOTrainer)")):
        command = commands.add_parser(name, help=what)
        command.add_argument("--model", required=True, type=Path, help="Hugging Face checkpoint directory")
        command.add_argument("--data", required=True, type=Path, help="our JSONL (see gemvg-train synth / convert)")
        command.add_argument("--output", required=True, type=Path, help="where the merged, export-ready model goes")
        command.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "synth":
            from .synth import write_dataset

            if args.num_samples < 1:
                raise DataError("--num-samples must be at least 1")
            path = write_dataset(args.out, args.num_samples, args.seed)
            print(f"gemvg-train synth: wrote {args.num_samples} samples to {path}")
            return 0
        if args.command == "convert":
            samples = load_samples(args.input, args.format, args.image_root, args.annotations)
            write_jsonl(samples, args.out)
            print(f"gemvg-train convert: wrote {len(samples)} samples to {args.out}")
            return 0
        return _train(args)
    except DataError as err:
        print(f"gemvg-train: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
