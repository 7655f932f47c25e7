"""`gemvg-export`: a Qwen2-VL / Qwen2.5-VL checkpoint becomes a bundle."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gemvg.runtime.command import ArgumentParser, fraction, non_negative_int, positive_int, run_command

from .exporter import ExportOptions, export_bundle
from .quantize import UPGRADE_BUDGET


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="gemvg-export", description=__doc__)
    parser.add_argument("--model", help="checkpoint: a folder in HF layout (config.json, safetensors, ...) or a model "
                        "id (Org/Name) already in the local Hugging Face cache; required unless --fp32-bundle is given")
    parser.add_argument("--out", required=True, help="bundle folder to write")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "int8", "int4", "int8w"],
                        help="fp32; int8: static INT8 (Q/DQ) vision and decoder, calibrated; int4 / int8w: "
                             "weight-only 4/8-bit decoder MatMuls (MatMulNBits)")
    parser.add_argument("--max-context", type=positive_int, default=None, help="prompt + generated tokens limit")
    parser.add_argument("--max-images", type=positive_int, default=16, help="images per request limit")
    parser.add_argument("--no-verify", action="store_true", help="skip the check against PyTorch")
    parser.add_argument("--verify-layers", type=int, nargs="+", metavar="I",
                        help="decoder layers of the check against PyTorch (default: the first, middle and last)")
    quant = parser.add_argument_group("quantization")
    quant.add_argument("--calibration", metavar="CALIB.jsonl",
                       help='calibration requests, one {"images": [...], "query": "..."} per line (relative '
                            "paths from the file's folder); the last fifth is held back for the report")
    quant.add_argument("--calibration-method", default="minmax", choices=["minmax", "entropy", "percentile"])
    quant.add_argument("--calibration-samples", type=positive_int, default=None, metavar="N",
                       help="use at most N calibration requests")
    quant.add_argument("--vision-precision", choices=["fp32", "int8", "int8w"], default=None,
                       help="vision encoder precision (default: int8 with --precision int8, else fp32; int8 needs "
                            "--calibration; int8w: its linear layers weight-only 8-bit, a quarter of the bytes)")
    quant.add_argument("--block-size", type=positive_int, default=32, help="int4/int8w: weights per quantization block")
    quant.add_argument("--accuracy-level", type=non_negative_int, default=4,
                       help="int4/int8w: MatMulNBits accuracy_level (4 = int8 compute on CPU)")
    quant.add_argument("--target-cosine", type=fraction, default=None,
                       help="min output cosine vs fp32 per component on calibration requests (default 0.99; "
                            "0.97 for an int4 decoder): the layer groups whose quantization costs most stay "
                            "float (int8) or get 8 bits (int4) until it is met")
    quant.add_argument("--upgrade-budget", type=fraction, default=UPGRADE_BUDGET, metavar="FRACTION",
                       help="int4/int8w: at most this fraction of the decoder's weights may get 8 bits (int4) or "
                            "stay float (int8w) to meet the target cosine (e.g. 0.25; measured on whole graphs, so "
                            "it holds an fp32 decoder in memory); default 0: every MatMul at the precision's bits, "
                            "as ORT GenAI's int4, quantized while streaming from the checkpoint")
    quant.add_argument("--step-decoder", choices=["int8w", "int4"],
                       help="int8: also write a weight-only decoder (MatMulNBits, --block-size) that the engine "
                            "uses for one-token decode steps; static INT8 stays for prompts (faster per token, "
                            "one more decoder in the bundle)")
    quant.add_argument("--fp32-bundle", metavar="DIR",
                       help="quantize this fp32 bundle instead of exporting --model (its limits are kept)")
    parser.add_argument("--target", default="onnxruntime", choices=["onnxruntime", "tensorrt"],
                        help="tensorrt: also build TensorRT engines (needs the tensorrt package and a GPU)")
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command("gemvg-export", lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.model and not args.fp32_bundle:
        parser.error("--model is required (or --fp32-bundle with a quantized --precision)")
    options = ExportOptions(precision=args.precision, max_context=args.max_context, max_images=args.max_images,
                            verify=not args.no_verify, vision_precision=args.vision_precision,
                            calibration=args.calibration, calibration_method=args.calibration_method,
                            calibration_samples=args.calibration_samples, block_size=args.block_size,
                            accuracy_level=args.accuracy_level, target_cosine=args.target_cosine,
                            upgrade_budget=args.upgrade_budget, step_decoder=args.step_decoder,
                            fp32_bundle=args.fp32_bundle, target=args.target)
    manifest = export_bundle(args.model, args.out, options)
    report = manifest.extra.get("quantization", {}).get("report")
    if report:
        from .report import format_report

        print(format_report(json.loads((Path(args.out) / report["path"]).read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
