"""The native runtime (libgemvg) against the Python engine on one bundle: the same requests, each runtime
in its own process (so that peak RSS is its own).

    python -m gemvg.benchmarks.native_vs_python --bundle B --lib build/libgemvg.so [--repeats 5] [--threads N]

Per runtime: load time, a cold first request and follow-ups on the same two images (prefix reuse), time
to first token, decode per token, host-side overhead (request time outside ONNX Runtime's graph runs),
peak RSS; and whether both wrote the same token ids. Prints a Markdown table and, with --json, the
raw figures.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

QUERIES = ("the red cup on the table", "and the blue bowl?")
# Two photos-like images of different sizes (smooth random blobs, as in the tests).
IMAGE_SIZES = ((640, 480), (448, 336))


def make_images(folder: Path) -> list[Path]:
    rng = np.random.default_rng(11)
    paths = []
    for index, (width, height) in enumerate(IMAGE_SIZES):
        small = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
        path = folder / f"bench_{index}.jpg"
        Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC).save(path, quality=90)
        paths.append(path)
    return paths


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _SessionClock:
    """Time spent inside a session's run calls (the Python engine's ONNX Runtime share of a request)."""

    def __init__(self):
        self.ms = 0.0

    def wrap(self, session, method: str) -> None:
        inner = getattr(session, method)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.ms += (time.perf_counter() - start) * 1e3

        setattr(session, method, timed)


def run_python(bundle: Path, images: list[Path], max_new_tokens: int, repeats: int, threads: int | None) -> dict:
    from gemvg.runtime import Engine

    start = time.perf_counter()
    engine = Engine.load(bundle, threads=threads)
    load_ms = (time.perf_counter() - start) * 1e3
    clock = _SessionClock()
    sessions = {id(s): s for s in (engine.vision, engine.embed, engine.decoder, engine.step_decoder)}
    for session in sessions.values():
        clock.wrap(session, "run")
        clock.wrap(session, "run_with_iobinding")
    requests = []
    for repeat in range(repeats):
        engine.reset()  # every repeat starts cold, then asks its follow-ups
        for query in QUERIES:
            clock.ms = 0.0
            result = engine.ground(images, query, max_new_tokens=max_new_tokens)
            timings = dict(result.timings_ms, onnxruntime=clock.ms)
            requests.append({"query": query, "tokens": result.token_ids, "timings": timings,
                             "reused": result.reused_prefix_tokens})
    return {"load_ms": load_ms, "requests": requests, "peak_rss_mb": _peak_rss_mb()}


def run_native(lib_path: Path, bundle: Path, images: list[Path], max_new_tokens: int, repeats: int,
               threads: int | None) -> dict:
    lib = ctypes.CDLL(str(lib_path))
    lib.gemvg_engine_load.restype = ctypes.c_void_p
    lib.gemvg_engine_load.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int]
    lib.gemvg_ground_files.restype = ctypes.c_void_p
    lib.gemvg_ground_files.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_size_t,
                                       ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int]
    lib.gemvg_result_json.restype = ctypes.c_char_p
    lib.gemvg_result_json.argtypes = [ctypes.c_void_p]
    lib.gemvg_result_free.argtypes = [ctypes.c_void_p]
    lib.gemvg_engine_free.argtypes = [ctypes.c_void_p]
    lib.gemvg_engine_reset.argtypes = [ctypes.c_void_p]
    lib.gemvg_last_error.restype = ctypes.c_char_p
    paths = (ctypes.c_char_p * len(images))(*[str(p).encode() for p in images])
    requests = []
    start = time.perf_counter()
    engine = lib.gemvg_engine_load(str(bundle).encode(), b"cpu", threads or 0)
    if not engine:
        raise SystemExit(f"native: {lib.gemvg_last_error().decode()}")
    load_ms = (time.perf_counter() - start) * 1e3
    for repeat in range(repeats):
        lib.gemvg_engine_reset(engine)  # every repeat starts cold, then asks its follow-ups
        for query in QUERIES:
            result = lib.gemvg_ground_files(engine, paths, len(images), query.encode(), b"direct", max_new_tokens)
            if not result:
                raise SystemExit(f"native: {lib.gemvg_last_error().decode()}")
            data = json.loads(lib.gemvg_result_json(result).decode())
            lib.gemvg_result_free(result)
            requests.append({"query": query, "tokens": data["token_ids"], "timings": data["timings_ms"],
                             "reused": data["reused_prefix_tokens"]})
    lib.gemvg_engine_free(engine)
    return {"load_ms": load_ms, "requests": requests, "peak_rss_mb": _peak_rss_mb()}


def summarize(run: dict) -> dict:
    def median(query: str, key: str) -> float:
        return statistics.median(r["timings"][key] for r in run["requests"] if r["query"] == query)

    first, follow = QUERIES
    return {
        "load_ms": run["load_ms"],
        "first_ttft_ms": median(first, "time_to_first_token"),
        "follow_up_ttft_ms": median(follow, "time_to_first_token"),
        "preprocess_ms": median(first, "preprocess"),
        "decode_per_token_ms": statistics.median(r["timings"]["decode_per_token"] for r in run["requests"]),
        "host_overhead_first_ms": median(first, "total") - median(first, "onnxruntime"),
        "host_overhead_per_token_ms": statistics.median(
            (r["timings"]["total"] - r["timings"]["onnxruntime"] - r["timings"]["preprocess"])
            / max(1, len(r["tokens"])) for r in run["requests"]),
        "new_tokens": len(run["requests"][0]["tokens"]),
        "reused_follow_up": run["requests"][1]["reused"],
        "peak_rss_mb": run["peak_rss_mb"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True, type=Path)
    parser.add_argument("--lib", type=Path, default=Path("build/libgemvg.so"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    parser.add_argument("--runtime", choices=["python", "native"], help=argparse.SUPPRESS)  # one worker process
    parser.add_argument("--images", type=Path, nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.runtime:
        run = (run_python(args.bundle, args.images, args.max_new_tokens, args.repeats, args.threads)
               if args.runtime == "python" else
               run_native(args.lib, args.bundle, args.images, args.max_new_tokens, args.repeats, args.threads))
        print(json.dumps(run))
        return 0
    if not (args.bundle / "manifest.json").is_file() or not args.lib.is_file():
        print(f"native_vs_python: error: need a bundle ({args.bundle}) and a built libgemvg ({args.lib})",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as folder:
        images = make_images(Path(folder))
        runs = {}
        for runtime in ("python", "native"):
            print(f"[native_vs_python] {runtime}: {args.repeats} x (cold request + follow-up)", file=sys.stderr)
            command = [sys.executable, "-m", "gemvg.benchmarks.native_vs_python", "--runtime", runtime,
                       "--bundle", str(args.bundle), "--lib", str(args.lib), "--repeats", str(args.repeats),
                       "--max-new-tokens", str(args.max_new_tokens), "--images", *map(str, images)]
            if args.threads:
                command += ["--threads", str(args.threads)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                last = (done.stderr.strip().splitlines() or ["no message"])[-1]
                print(f"native_vs_python: error: the {runtime} run failed: {last}", file=sys.stderr)
                return 1
            runs[runtime] = json.loads(done.stdout)
    same = [a["tokens"] == b["tokens"] for a, b in zip(runs["python"]["requests"], runs["native"]["requests"])]
    summary = {runtime: summarize(run) for runtime, run in runs.items()}
    rows = [("load (ms)", "load_ms"), ("first request: time to first token (ms)", "first_ttft_ms"),
            ("  of which preprocess (ms)", "preprocess_ms"), ("follow-up: time to first token (ms)", "follow_up_ttft_ms"),
            ("decode per token (ms)", "decode_per_token_ms"),
            ("host-side overhead, first request (ms)", "host_overhead_first_ms"),
            ("host-side overhead per token, after preprocess (ms)", "host_overhead_per_token_ms"),
            ("peak RSS (MB)", "peak_rss_mb")]
    print("| | Python engine | native (libgemvg) |\n|---|---|---|")
    for label, key in rows:
        print(f"| {label} | {summary['python'][key]:.1f} | {summary['native'][key]:.1f} |")
    print(f"\nsame token ids in {sum(same)} of {len(same)} requests; {summary['native']['new_tokens']} new tokens; "
          f"follow-up reused {summary['native']['reused_follow_up']} prompt tokens")
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "runs": runs, "same_tokens": same}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
