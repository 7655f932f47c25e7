"""Soak: many requests with fresh images on one engine, the process's RSS sampled as they run.

    python -m gemvg.benchmarks.soak --bundle B --requests 1000 [--warmup 100] [--threads 2] [--every 100]
                                    [--json out.json]

Every request has new random images (sizes cycle through a few shapes, so prompt lengths and ONNX
Runtime's buffer shapes vary); every fourth is a follow-up query on the previous request's images, so
the feature cache and prefix reuse are exercised too. With --threads N the requests come from N threads
at once. The figure of merit is the RSS growth from the end of the warm-up (the first --warmup requests
done) to the end (the last request done; both taken as a request finishes, with the request threads
alive): what would grow with the number of requests (feature cache, prefix state, KV buffers,
ONNX Runtime's arenas) shows there. The RSS is also sampled every --every requests and printed as a table
of checkpoints, with two more figures to tell a plateau from a trend: the peak growth (the highest
checkpoint after the warm-up) and the growth over the second half (the end against the checkpoint halfway
between the warm-up and the end; about zero on a plateau, positive while RSS still climbs). The same
figures are given for the anonymous part of the RSS (heap, arenas, buffers), which is where a leak
would show: the file-backed rest (the libraries' code) is dropped by the kernel under memory pressure
and read back when it runs again, so on a busy machine it moves the RSS both ways.
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
    rss_end_mb: float  # the checkpoint at the last request, taken as the warm-up's was (request threads alive)
    rss_peak_mb: float
    rss_idle_mb: float  # once the request threads have exited (their stacks and caches gone)
    growth_percent: float  # end against after warm-up
    peak_growth_percent: float  # the highest checkpoint after the warm-up against after warm-up
    second_half_growth_percent: float  # end against the checkpoint halfway from the warm-up to the end
    anon_growth_percent: float  # the same three for the anonymous part of the RSS
    anon_peak_growth_percent: float
    anon_second_half_growth_percent: float
    feature_cache_entries: int
    feature_cache_mb: float
    samples: list[tuple[int, float, float]] = field(default_factory=list)  # (requests done, RSS MB, anon MB)

    def checkpoints(self) -> str:
        """The RSS and its anonymous part at each checkpoint, each against its value after the warm-up."""
        reference = next((rss, anon) for count, rss, anon in self.samples if count == self.warmup)
        lines = ["requests done   RSS MB  vs warm-up   anon MB  vs warm-up"]
        for count, rss, anon in self.samples:
            where = " (warm-up)" if count < self.warmup else " (reference)" if count == self.warmup else ""
            lines.append(f"{count:13d} {rss:8.1f}  {_percent(rss, reference[0]):+8.2f}%  {anon:8.1f}  "
                         f"{_percent(anon, reference[1]):+8.2f}%{where}")
        return "\n".join(lines)


def _memory_mb() -> tuple[float, float]:
    """The process's RSS and its anonymous part (heap, arenas, buffers: without the file-backed pages of
    its libraries, which the kernel drops under memory pressure and reads back when they run again)."""
    import psutil

    info = psutil.Process().memory_info()
    return info.rss / 2 ** 20, (info.rss - getattr(info, "shared", 0)) / 2 ** 20


def request(index: int, seed: int) -> dict:
    """Request `index`: new images, or (every fourth) the previous request's images with another query."""
    base = index - 1 if index % 4 == 3 else index
    rng = np.random.default_rng((seed, base))
    count = 1 + base % 2
    images = [rng.integers(0, 256, (*SIZES[(base + i) % len(SIZES)], 3), dtype=np.uint8) for i in range(count)]
    return {"images": images, "query": QUERIES[index % len(QUERIES)], "max_new_tokens": 8 + index % 9}


def soak(bundle: str | Path, requests: int, warmup: int, threads: int = 1, seed: int = 0, every: int = 100,
         intra_op_threads: int | None = None, progress=None) -> SoakResult:
    if warmup >= requests:
        raise InputError(f"--warmup {warmup} must be below --requests {requests}")
    engine = Engine.load(bundle, threads=intra_op_threads)
    done, lock = 0, threading.Lock()
    samples: list[tuple[int, float, float]] = []  # (requests done, RSS MB, anon MB), the warm-up's end among them

    def one(index: int) -> None:
        nonlocal done
        r = request(index, seed)
        engine.ground(r["images"], r["query"], max_new_tokens=r["max_new_tokens"])
        with lock:
            done += 1
            if done == warmup or done % every == 0 or done == requests:
                samples.append((done, *_memory_mb()))
                if progress:
                    progress(f"{done}/{requests} requests, RSS {samples[-1][1]:.1f} MB "
                             f"(anonymous {samples[-1][2]:.1f} MB)")

    start = time.perf_counter()
    if threads == 1:
        for index in range(requests):
            one(index)
    else:
        with ThreadPoolExecutor(threads) as pool:
            for future in [pool.submit(one, index) for index in range(requests)]:
                future.result()
    seconds = time.perf_counter() - start
    idle = _memory_mb()[0]
    cache = engine.feature_cache
    samples.sort()
    rss = [(count, mb) for count, mb, _ in samples]
    anon = [(count, mb) for count, _, mb in samples]
    after_warmup = next(mb for count, mb in rss if count == warmup)
    return SoakResult(requests, warmup, threads, round(seconds, 1), round(after_warmup, 1), round(rss[-1][1], 1),
                      round(max(mb for _, mb in rss), 1), round(idle, 1), *growth(rss, warmup, requests),
                      *growth(anon, warmup, requests), len(cache.entries), round(cache.bytes / 2 ** 20, 2),
                      [(count, round(a, 1), round(b, 1)) for count, a, b in samples])


def growth(samples: list[tuple[int, float]], warmup: int, requests: int) -> tuple[float, float, float]:
    """Growth in percent against the checkpoint after the warm-up (at `warmup` requests done): of the end
    (the checkpoint at `requests`), of the highest checkpoint after the warm-up, and over the second half
    (the end against the checkpoint nearest halfway between the warm-up and the end)."""
    samples = sorted(samples)
    reference = next(mb for count, mb in samples if count == warmup)
    end = next(mb for count, mb in samples if count == requests)
    late = [(count, mb) for count, mb in samples if count >= warmup]
    halfway = min(late, key=lambda sample: abs(sample[0] - (warmup + requests) / 2))[1]
    return _percent(end, reference), _percent(max(mb for _, mb in late), reference), _percent(end, halfway)


def _percent(value: float, reference: float) -> float:
    return round(100 * (value / reference - 1), 2)


def main(argv: list[str] | None = None) -> int:
    return run_command("soak", lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    parser = ArgumentParser(prog="python -m gemvg.benchmarks.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--requests", type=positive_int, default=1000)
    parser.add_argument("--warmup", type=positive_int, default=100,
                        help="requests done before the reference RSS is taken")
    parser.add_argument("--threads", type=positive_int, default=1, help="request threads")
    parser.add_argument("--intra-op-threads", type=positive_int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every", type=positive_int, default=100, help="an RSS checkpoint every N requests")
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args(argv)
    result = soak(args.bundle, args.requests, args.warmup, args.threads, args.seed, args.every,
                  args.intra_op_threads, progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(result.checkpoints())
    print(f"{result.requests} requests ({result.threads} threads) in {result.seconds} s: RSS "
          f"{result.rss_after_warmup_mb} MB after the warm-up (the first {result.warmup} requests) -> "
          f"{result.rss_end_mb} MB at the end ({result.growth_percent:+.2f}%), peak after the warm-up "
          f"{result.peak_growth_percent:+.2f}%, second half {result.second_half_growth_percent:+.2f}%; anonymous "
          f"part {result.anon_growth_percent:+.2f}% (peak {result.anon_peak_growth_percent:+.2f}%, second half "
          f"{result.anon_second_half_growth_percent:+.2f}%); peak RSS {result.rss_peak_mb} MB; "
          f"{result.rss_idle_mb} MB once the request threads had exited; feature cache "
          f"{result.feature_cache_entries} entries, {result.feature_cache_mb} MB")
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(result), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
