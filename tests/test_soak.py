"""Long runs: hundreds of requests with fresh images on one engine, in a process of their own, and the RSS
after the warm-up does not grow with the number of requests (benchmarks/soak.py; its longer run is in
benchmarks/RESULTS.md)."""

from __future__ import annotations

import json
import subprocess
import sys

from gemvg.benchmarks.soak import SoakResult, growth, request
from gemvg.runtime.engine import Engine

REQUESTS, WARMUP = 300, 60
MAX_GROWTH_PERCENT = 5.0


def test_soak_rss_does_not_grow_with_requests(tiny_bundle, tmp_path):
    out = tmp_path / "soak.json"
    # A fresh process: the suite's own allocations (torch, other tests) must not hide or fake a leak.
    command = [sys.executable, "-m", "gemvg.benchmarks.soak", "--bundle", str(tiny_bundle), "--requests",
               str(REQUESTS), "--warmup", str(WARMUP), "--every", "30", "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["requests"] == REQUESTS
    assert result["growth_percent"] <= MAX_GROWTH_PERCENT, result["samples"]
    late = [mb for count, mb, _ in result["samples"] if count >= WARMUP]
    assert max(late) <= result["rss_after_warmup_mb"] * (1 + MAX_GROWTH_PERCENT / 100), result["samples"]
    assert result["feature_cache_entries"] <= 32  # bounded, although every request brought new images


def test_soak_requests_have_fresh_images_and_follow_ups():
    first, follow_up, next_ = request(2, 0), request(3, 0), request(4, 0)
    assert all((a == b).all() for a, b in zip(first["images"], follow_up["images"]))
    assert first["query"] != follow_up["query"]
    assert not any(a.shape == b.shape and (a == b).all() for a in first["images"] for b in next_["images"])


def test_sessions_keep_no_memory_patterns(tiny_bundle):
    # A run with a memory pattern takes its intermediates as one block of the pattern's size; with shapes
    # that change from request to request those blocks grew the two-thread soak's RSS in steps.
    engine = Engine.load(tiny_bundle)
    for session in (engine.vision, engine.embed, engine.decoder, engine.step_decoder):
        assert session.get_session_options().enable_mem_pattern is False


def test_soak_checkpoints_tell_a_plateau_from_a_trend():
    plateau = [(50, 98.0), (100, 100.0), (200, 103.0), (300, 104.0), (400, 104.0), (500, 104.0)]
    trend = [(50, 98.0), (100, 100.0), (200, 101.0), (300, 102.0), (400, 103.0), (500, 104.0)]
    assert growth(plateau, 100, 500) == (4.0, 4.0, 0.0)  # the end against 300 requests, halfway
    assert growth(trend, 100, 500) == (4.0, 4.0, 1.96)
    assert growth(plateau[:3] + [(300, 106.0)] + plateau[4:], 100, 500) == (4.0, 6.0, -1.89)
    samples = [(count, mb, mb / 2) for count, mb in plateau]
    table = SoakResult(500, 100, 2, 1.0, 100.0, 104.0, 106.0, 103.0, 4.0, 4.0, 0.0, 4.0, 4.0, 0.0, 32, 0.5, samples)
    lines = table.checkpoints().splitlines()
    assert len(lines) == 7 and "(warm-up)" in lines[1] and "(reference)" in lines[2]
    assert lines[-1].split() == ["500", "104.0", "+4.00%", "52.0", "+4.00%"]
