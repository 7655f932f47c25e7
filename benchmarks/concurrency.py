"""Two requests at once against one after the other, on one engine.

    python -m gemvg.benchmarks.concurrency --bundle B [--pairs 8] [--new-tokens 32] [--json out.json]

A pair is two requests over different images with a fixed output length (EOS held back), both cold
(caches reset before each pair). Each way of running a pair is timed `--pairs` times, the ways
interleaved so that drift in the machine's speed spreads over all of them:

* serial, intra-op threads = all cores (ONNX Runtime's default)
* concurrent (two request threads), intra-op threads = all cores
* serial, one intra-op thread per session
* concurrent, one intra-op thread per session

Every concurrent answer is checked against the serial one.
"""

from __future__ import annotations

import json
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

from gemvg.runtime.command import ArgumentParser, positive_int, run_command
from gemvg.runtime.engine import Engine

QUERY = "the red cup on the left"


def pair_requests(seed: int = 0) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [[rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(2)] for _ in range(2)]


def run_pair(engine: Engine, pair, new_tokens: int, concurrent: bool) -> tuple[float, list[list[int]]]:
    engine.reset()
    answers: list[list[int] | None] = [None, None]

    def one(index: int) -> None:
        answers[index] = engine.ground(pair[index], QUERY, mode="raw", max_new_tokens=new_tokens,
                                       min_new_tokens=new_tokens).token_ids

    start = time.perf_counter()
    if concurrent:
        threads = [threading.Thread(target=one, args=(index,)) for index in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    else:
        one(0)
        one(1)
    return (time.perf_counter() - start) * 1e3, answers


def measure(bundle: str | Path, pairs: int, new_tokens: int, progress=None) -> dict:
    engines = {"all cores": Engine.load(bundle), "1 thread": Engine.load(bundle, threads=1)}
    pair = pair_requests()
    ways = [(threads, concurrent) for threads in engines for concurrent in (False, True)]
    times: dict[str, list[float]] = {}
    reference, mismatches = None, 0
    for engine in engines.values():  # warm-up: first runs allocate ONNX Runtime's buffers
        run_pair(engine, pair, new_tokens, concurrent=False)
    for number in range(pairs):
        for threads, concurrent in (ways if number % 2 == 0 else ways[::-1]):
            elapsed, answers = run_pair(engines[threads], pair, new_tokens, concurrent)
            times.setdefault(f"{'concurrent' if concurrent else 'serial'}, {threads}", []).append(elapsed)
            reference = reference or answers
            mismatches += answers != reference
        if progress:
            progress(f"pair {number + 1}/{pairs}: " + ", ".join(f"{k} {v[-1]:.0f} ms" for k, v in times.items()))
    medians = {way: round(statistics.median(values), 1) for way, values in times.items()}
    return {"pairs": pairs, "new_tokens": new_tokens, "median_pair_ms": medians,
            "concurrent_over_serial": {threads: round(medians[f"concurrent, {threads}"] / medians[f"serial, {threads}"], 3)
                                       for threads in engines},
            "mismatches": mismatches, "runs": times}


def main(argv: list[str] | None = None) -> int:
    return run_command("concurrency", lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    parser = ArgumentParser(prog="python -m gemvg.benchmarks.concurrency", description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--pairs", type=positive_int, default=8)
    parser.add_argument("--new-tokens", type=positive_int, default=32)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    figures = measure(args.bundle, args.pairs, args.new_tokens,
                      progress=lambda line: print(line, file=sys.stderr, flush=True))
    for way, ms in figures["median_pair_ms"].items():
        print(f"{way:>24}: {ms:8.1f} ms per pair (median of {args.pairs})")
    print("concurrent / serial: " + ", ".join(f"{k} {v:.2f}" for k, v in figures["concurrent_over_serial"].items())
          + f"; answers differing from serial: {figures['mismatches']}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
