"""One engine from many threads: every request gets exactly the answer it gets alone.

The requests share images (so the feature cache and prefix reuse are hit while other threads run),
differ in budget (a reused cache must grow) and in mode; several engines also run side by side.
"""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from gemvg.runtime import Engine
from gemvg.runtime.caches import FeatureCache

from .conftest import FAMILIES

THREADS = 4
REQUESTS_PER_THREAD = 8


def scenes(seed: int, count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    sizes = [(56, 84), (90, 60), (64, 64), (40, 120)]
    return [rng.integers(0, 256, (*sizes[i % len(sizes)], 3), dtype=np.uint8) for i in range(count)]


def requests(seed: int) -> list[dict]:
    """Requests over a few shared scenes: follow-ups on the same images, changed second images, budgets."""
    images = scenes(seed, 5)
    rng = random.Random(seed)
    out = []
    for index in range(THREADS * REQUESTS_PER_THREAD):
        picked = [images[rng.randrange(3)]] + ([images[rng.randrange(5)]] if rng.random() < 0.6 else [])
        out.append({"images": picked, "query": rng.choice(["the cup", "a red box on the left", "where"]),
                    "mode": rng.choice(["raw", "direct"]), "max_new_tokens": rng.choice([4, 9, 16]),
                    "min_new_tokens": rng.choice([0, 4])})
    return out


def answer(result) -> tuple:
    return tuple(result.token_ids), result.text, tuple(box.as_tuple() for box in result.boxes)


def run_concurrently(engine_for, batch: list[dict], threads: int) -> list[tuple]:
    """Run `batch` from `threads` threads that start together; the answers in request order."""
    results: list[tuple | None] = [None] * len(batch)
    barrier = threading.Barrier(threads)

    def worker(offset: int) -> None:
        barrier.wait()
        for index in range(offset, len(batch), threads):
            request = batch[index]
            results[index] = answer(engine_for(index).ground(request["images"], request["query"],
                                                             mode=request["mode"],
                                                             max_new_tokens=request["max_new_tokens"],
                                                             min_new_tokens=request["min_new_tokens"]))

    with ThreadPoolExecutor(threads) as pool:
        for future in [pool.submit(worker, offset) for offset in range(threads)]:
            future.result()  # re-raises a worker's error
    return results


@pytest.mark.parametrize("family", FAMILIES)
def test_one_engine_many_threads_answers_as_alone(family, tiny_bundles):
    batch = requests(seed=3)
    alone = []
    for request in batch:  # each request on a cold engine: no cache of any other request involved
        engine = Engine.load(tiny_bundles[family], verify=False)
        alone.append(answer(engine.ground(request["images"], request["query"], mode=request["mode"],
                                          max_new_tokens=request["max_new_tokens"],
                                          min_new_tokens=request["min_new_tokens"])))
    shared = Engine.load(tiny_bundles[family], threads=1)
    for round_ in range(2):  # the second round starts with warm feature and prefix caches
        concurrent = run_concurrently(lambda index: shared, batch, THREADS)
        mismatches = [i for i, (a, b) in enumerate(zip(alone, concurrent)) if a != b]
        assert not mismatches, f"round {round_}: requests {mismatches} differ from their answers alone"
    assert shared.feature_cache.entries, "the requests share images: the feature cache was used"


def test_several_engines_in_one_process(tiny_bundles):
    engines = [Engine.load(tiny_bundles[family], threads=1) for family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")]
    batch = requests(seed=5)[:12]
    alone = [answer(engines[i % 3].ground(r["images"], r["query"], mode=r["mode"], max_new_tokens=r["max_new_tokens"],
                                          min_new_tokens=r["min_new_tokens"])) for i, r in enumerate(batch)]
    for engine in engines:
        engine.reset()
    assert run_concurrently(lambda index: engines[index % 3], batch, 3) == alone


def test_feature_cache_is_bounded_in_bytes_and_entries():
    cache = FeatureCache(capacity=10, max_bytes=1000)
    for index in range(6):
        cache.put(str(index), np.zeros(50, np.float32))  # 200 bytes each: 5 fit
    assert list(cache.entries) == ["1", "2", "3", "4", "5"] and cache.bytes == 1000
    cache.put("big", np.zeros(300, np.float32))  # over the whole budget: not kept, nothing evicted
    assert "big" not in cache.entries and len(cache.entries) == 5
    assert cache.get("1") is not None  # now the most recent
    cache.put("6", np.zeros(100, np.float32))  # 400 bytes: evicts the two least recent ("2", "3")
    assert list(cache.entries) == ["4", "5", "1", "6"] and cache.bytes == 1000
    with pytest.raises(ValueError):
        cache.get("6")[0] = 1.0  # shared between requests: read-only
    small = FeatureCache(capacity=2, max_bytes=10**6)
    for index in range(4):
        small.put(str(index), np.zeros(1, np.float32))
    assert list(small.entries) == ["2", "3"]


def test_a_stored_prefix_goes_to_one_request_at_a_time(tiny_bundle, image_files):
    engine = Engine.load(tiny_bundle, threads=1)
    images = [image_files["rgb.jpg"]]
    engine.ground(images, "first", mode="raw", max_new_tokens=3)
    inputs = engine.prepare(images, "second", "raw")
    capacity = len(inputs.prompt.input_ids) + 3
    taken = engine.cache_for(inputs, capacity)
    assert taken.length > 0  # the first request's prefix, reused
    assert engine.cache_for(inputs, capacity).length == 0  # meanwhile another request gets a cache of its own
    assert engine.cache_for(inputs, capacity) is not taken


def test_a_failed_request_leaves_no_half_written_prefix(tiny_bundle, image_files, monkeypatch):
    engine = Engine.load(tiny_bundle, threads=1)
    images = [image_files["rgb.jpg"]]
    engine.ground(images, "first", mode="raw", max_new_tokens=3)

    def broken(*args, **kwargs):
        raise RuntimeError("decoding failed")

    monkeypatch.setattr(engine, "generate", broken)
    with pytest.raises(RuntimeError):
        engine.ground(images, "second", mode="raw", max_new_tokens=3)  # took the prefix and overwrote its tail
    monkeypatch.undo()
    again = engine.ground(images, "second", mode="raw", max_new_tokens=3)
    assert again.reused_prefix_tokens == 0
    assert again.token_ids == Engine.load(tiny_bundle).ground(images, "second", mode="raw", max_new_tokens=3).token_ids
