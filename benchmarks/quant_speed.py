"""fp32 against a quantized bundle, side by side in one process: vision (every image) + prefill.

    python -m gemvg.benchmarks.quant_speed --fp32 B32 --quant B8 [--image a.jpg --image b.jpg]
        [--runs 5] [--threads 2] [--decode-tokens 16] [--ops] [--json out.json]

Both bundles see the same request (by default two generated 448x448 images and a short query): the
same preprocessed pixels and prompt, so only the graphs differ. After one warm-up run each, runs
alternate between the bundles (so background load hits both alike) and medians are reported: vision
(one encoder run per image, no feature cache), prefill (the whole prompt, fresh cache), their sum and
its speed-up, and the cosine of the prefill's last-position logits; with --decode-tokens, the median
time of one decode step too. `--ops` prints the op types of
onnxruntime's optimized quantized graphs (SessionOptions.optimized_model_filepath): whether Q/DQ was
fused into integer kernels (QGemm, MatMulIntegerToFloat, QLinearMatMul, DynamicQuantizeMatMul) or
left as DequantizeLinear + float ops.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from gemvg.runtime.command import ArgumentParser, non_negative_int, positive_int, run_command
from gemvg.runtime.engine import Engine

QUERY = "Find the red cup in both images."
INTEGER_KERNELS = ("QGemm", "MatMulIntegerToFloat", "QLinearMatMul", "QLinearConv", "DynamicQuantizeMatMul",
                   "MatMulInteger", "MatMulNBits")


def generated_images(count: int = 2, size: int = 448, seed: int = 0) -> list[np.ndarray]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        small = rng.integers(0, 256, (size // 32, size // 32, 3), dtype=np.uint8)
        images.append(np.asarray(Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)))
    return images


def one_run(engine: Engine, inputs, decode_tokens: int = 0) -> tuple[float, float, float, np.ndarray]:
    """Vision, prefill and per-token decode milliseconds, and the prefill's last-position logits."""
    start = time.perf_counter()
    features = [engine.encode_image(image) for image in inputs.images]
    middle = time.perf_counter()
    cache = engine.new_cache(len(inputs.prompt.input_ids) + decode_tokens)
    logits = engine.prefill(inputs.prompt, features, cache).copy()
    end = time.perf_counter()
    token, position = int(np.argmax(logits)), inputs.prompt.next_position
    for _ in range(decode_tokens):  # greedy, EOS ignored: a fixed number of steps
        token = int(np.argmax(engine.decode_one_token(token, position, cache)))
        position += 1
    per_token = (time.perf_counter() - end) * 1e3 / decode_tokens if decode_tokens else 0.0
    return (middle - start) * 1e3, (end - middle) * 1e3, per_token, logits


def op_summary(bundle: Path, graph: str, threads: int) -> dict[str, int]:
    """Op-type counts of onnxruntime's optimized graph, as the runtime's session options produce it."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as folder:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        options.optimized_model_filepath = str(Path(folder) / "optimized.onnx")
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         "optimized.onnx.data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        ort.InferenceSession(str(bundle / graph), options, providers=["CPUExecutionProvider"])
        model = onnx.load(options.optimized_model_filepath, load_external_data=False)
        return dict(Counter(node.op_type for node in model.graph.node).most_common())


def main(argv: list[str] | None = None) -> int:
    return run_command("quant_speed", lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    parser = ArgumentParser(prog="quant_speed", description=__doc__.splitlines()[0])
    parser.add_argument("--fp32", required=True, help="the fp32 bundle")
    parser.add_argument("--quant", required=True, help="the quantized bundle")
    parser.add_argument("--image", action="append", default=[], help="image path (default: 2 generated 448x448)")
    parser.add_argument("--query", default=QUERY)
    parser.add_argument("--runs", type=positive_int, default=5, help="timed runs per bundle, after one warm-up")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--decode-tokens", type=non_negative_int, default=0,
                        help="also time this many decode steps after the prefill (per-token median)")
    parser.add_argument("--ops", action="store_true", help="print the optimized quantized graphs' op types")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    if args.runs < 3:
        parser.error("--runs must be at least 3 (medians)")

    engines = {"fp32": Engine.load(args.fp32, threads=args.threads),
               "quant": Engine.load(args.quant, threads=args.threads)}
    images = args.image or generated_images()
    inputs = engines["fp32"].prepare(images, args.query)
    print(f"request: {len(inputs.images)} images ({', '.join('x'.join(map(str, i.grid_thw)) for i in inputs.images)} "
          f"patch grids), {len(inputs.prompt.input_ids)} prompt tokens; {args.threads} threads; "
          f"quantized bundle: {engines['quant'].manifest.precision}", flush=True)

    times: dict[str, dict[str, list[float]]] = {name: {"vision": [], "prefill": [], "decode": []} for name in engines}
    logits = {}
    for name, engine in engines.items():  # warm-up
        *_, logits[name] = one_run(engine, inputs, args.decode_tokens)
    for run in range(args.runs):
        for name, engine in engines.items():
            vision, prefill, decode, _ = one_run(engine, inputs, args.decode_tokens)
            times[name]["vision"].append(vision)
            times[name]["prefill"].append(prefill)
            times[name]["decode"].append(decode)
        print(f"  run {run + 1}/{args.runs}: " + ", ".join(
            f"{name} {times[name]['vision'][-1]:.0f} + {times[name]['prefill'][-1]:.0f} ms" for name in engines),
            flush=True)

    figures: dict[str, object] = {"threads": args.threads, "runs": args.runs,
                                  "prompt_tokens": int(len(inputs.prompt.input_ids)),
                                  "precision": engines["quant"].manifest.precision}
    for name in engines:
        vision, prefill = (statistics.median(times[name][k]) for k in ("vision", "prefill"))
        total = statistics.median([v + p for v, p in zip(times[name]["vision"], times[name]["prefill"])])
        figures[name] = {"vision_ms": round(vision, 1), "prefill_ms": round(prefill, 1), "total_ms": round(total, 1)}
        if args.decode_tokens:
            figures[name]["decode_ms_per_token"] = round(statistics.median(times[name]["decode"]), 2)
    a, b = logits["fp32"].astype(np.float64), logits["quant"].astype(np.float64)
    figures["speedup"] = {k: round(figures["fp32"][f"{k}_ms"] / figures["quant"][f"{k}_ms"], 3)
                          for k in ("vision", "prefill", "total")}
    figures["logits_cosine"] = round(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))), 6)
    figures["same_next_token"] = bool(a.argmax() == b.argmax())

    print(f"{'':8}{'vision':>12}{'prefill':>12}{'total':>12}   (medians of {args.runs} runs)")
    for name in engines:
        f = figures[name]
        print(f"{name:8}{f['vision_ms']:>9.0f} ms{f['prefill_ms']:>9.0f} ms{f['total_ms']:>9.0f} ms")
    s = figures["speedup"]
    if args.decode_tokens:
        decode = {name: figures[name]["decode_ms_per_token"] for name in engines}
        figures["speedup"]["decode"] = round(decode["fp32"] / decode["quant"], 3)
        print(f"decode ({args.decode_tokens} steps): fp32 {decode['fp32']:.1f} ms/token, quant "
              f"{decode['quant']:.1f} ms/token ({figures['speedup']['decode']:.2f}x)")
    print(f"speed-up: vision {s['vision']:.2f}x, prefill {s['prefill']:.2f}x, vision + prefill {s['total']:.2f}x; "
          f"last-position logits cosine {figures['logits_cosine']:.5f}, same next token: {figures['same_next_token']}")
    if args.ops:
        quant = engines["quant"].manifest
        figures["optimized_ops"] = {}
        for graph in (quant.vision_graph.path, quant.decoder_graph.path):
            ops = op_summary(Path(args.quant), graph, args.threads)
            figures["optimized_ops"][graph] = ops
            integer = {op: n for op, n in ops.items() if op in INTEGER_KERNELS}
            float_mm = {op: n for op, n in ops.items() if op in ("MatMul", "Gemm", "FusedMatMul", "Conv")}
            print(f"{graph} optimized: integer kernels {integer}, float matmuls {float_mm}, "
                  f"DequantizeLinear {ops.get('DequantizeLinear', 0)}, QuantizeLinear {ops.get('QuantizeLinear', 0)}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
