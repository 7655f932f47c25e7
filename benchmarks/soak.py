"""Soak: many requests with fresh images on one engine, the process's RSS sampled as they run.

    python -m gemvg.benchmarks.soak --bundle B --requests 1000 [--warmup 100] [--threads 2] [--json out.json]

Every request has new random images (sizes cycle through a few shapes, so prompt lengths and ONNX
Runtime's buffer shapes vary); every fourth is a follow-up query on the previous request's images, so
the feature cache and prefix reuse are exercised too. With --threads N the requests come from N threads
at once. The figure of merit is the RSS growth from the end of the warm-up to the end: what would grow
with the number of requests (feature cache, prefix state, KV buffers, ONNX Runtime's arenas) shows there.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from gemvg.runtime.command import ArgumentParser, positive_int, run_command
from gemvg.runtime.engine import Engine
from gemvg.runtime.errors import InputError

SIZES = ((56, 84), (90, 60), (64, 64), (40, 120), (112, 112))
QUERIES = ("the cup", "a red box on the left", "where is the second person", "all chairs")


@dataclass
class SoakResult:
    requests: int
    warmup: int
    threads: int
    seconds: float
    rss_after_warmup_mb: float
    rss_end_mb: float
    rss_peak_mb: float
    growth_percent: float  # end against after warm-up
    feature_cache_entries: int
    feature_cache_mb: float
    samples: list[tuple[int, float]] = field(default_factory=list)  # (requests done, RSS MB)


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2 ** 20


def request(index: int, seed: int) -> dict:
    """Request `index`: new images, or (every fourth) the previous request's images with another query."""
    base = index - 1 if index % 4 == 3 else index
    rng = np.random.default_rng((seed, base))
    count = 1 + base % 2
    images = [rng.integers(0, 256, (*SIZES[(base + i) % len(SIZES)], 3), dtype=np.uint8) for i in range(count)]
    return {"images": images, "query": QUERIES[index % len(QUERIES)], "max_new_tokens": 8 + index % 9}


def soak(bundle: str | Path, requests: int, warmup: int, threads: int = 1, seed: int = 0, every: int = 50,
         intra_op_threads: int | None = None, progress=None) -> SoakResult:
    if warmup >= requests:
        raise InputError(f"--warmup {warmup} must be below --requests {requests}")
    engine = Engine.load(bundle, threads=intra_op_threads)
    done, lock = 0, threading.Lock()
    samples: list[tuple[int, float]] = []
    marks: dict[str, float] = {}

    def one(index: int) -> None:
        nonlocal done
        r = request(index, seed)
        engine.ground(r["images"], r["query"], max_new_tokens=r["max_new_tokens"])
        with lock:
            done += 1
            if done == warmup:
                marks["warmup"] = _rss_mb()
            if done % every == 0 or done == requests:
                samples.append((done, _rss_mb()))
                if progress:
                    progress(f"{done}/{requests} requests, RSS {samples[-1][1]:.1f} MB")

    start = time.perf_counter()
    if threads == 1:
        for index in range(requests):
            one(index)
    else:
        with ThreadPoolExecutor(threads) as pool:
            for future in [pool.submit(one, index) for index in range(requests)]:
                future.result()
    seconds = time.perf_counter() - start
    end = _rss_mb()
    cache = engine.feature_cache
    return SoakResult(requests, warmup, threads, round(seconds, 1), round(marks["warmup"], 1), round(end, 1),
                      round(max(mb for _, mb in samples), 1), round(100 * (end / marks["warmup"] - 1), 2),
                      len(cache.entries), round(cache.bytes / 2 ** 20, 2), [(n, round(mb, 1)) for n, mb in samples])


def main(argv: list[str] | None = None) -> int:
    return run_command("soak", lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    parser = ArgumentParser(prog="python -m gemvg.benchmarks.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--requests", type=positive_int, default=1000)
    parser.add_argument("--warmup", type=positive_int, default=100, help="requests before the reference RSS")
    parser.add_argument("--threads", type=positive_int, default=1, help="request threads")
    parser.add_argument("--intra-op-threads", type=positive_int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every", type=positive_int, default=50, help="sample RSS every N requests")
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args(argv)
    result = soak(args.bundle, args.requests, args.warmup, args.threads, args.seed, args.every,
                  args.intra_op_threads, progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(f"{result.requests} requests ({result.threads} threads) in {result.seconds} s: RSS "
          f"{result.rss_after_warmup_mb} MB after {result.warmup} -> {result.rss_end_mb} MB at the end "
          f"({result.growth_percent:+.2f}%), peak {result.rss_peak_mb} MB; feature cache "
          f"{result.feature_cache_entries} entries, {result.feature_cache_mb} MB")
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(result), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
