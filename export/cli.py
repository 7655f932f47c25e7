"""`gemvg-export`: a Qwen2-VL / Qwen2.5-VL checkpoint becomes a bundle."""

from __future__ import annotations

import argparse
import sys

from gemvg.runtime.errors import GemvgError

from .exporter import ExportOptions, export_bundle


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemvg-export", description=__doc__)
    parser.add_argument("--model", required=True, help="checkpoint folder in HF layout (config.json, safetensors, ...)")
    parser.add_argument("--out", required=True, help="bundle folder to write")
    parser.add_argument("--precision", default="fp32", choices=["fp32"], help="weights and compute precision")
    parser.add_argument("--max-context", type=int, default=None, help="prompt + generated tokens limit")
    parser.add_argument("--max-images", type=int, default=16, help="images per request limit")
    parser.add_argument("--no-verify", action="store_true", help="skip the check against PyTorch")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = ExportOptions(precision=args.precision, max_context=args.max_context, max_images=args.max_images,
                            verify=not args.no_verify)
    try:
        export_bundle(args.model, args.out, options)
    except GemvgError as err:
        print(f"gemvg-export: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gemvg-export: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
