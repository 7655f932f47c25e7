"""Long runs: hundreds of requests with fresh images on one engine, in a process of their own, and the RSS
after the warm-up does not grow with the number of requests (benchmarks/soak.py; its longer run is in
benchmarks/RESULTS.md)."""

from __future__ import annotations

import json
import subprocess
import sys

from gemvg.benchmarks.soak import request

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
    late = [mb for count, mb in result["samples"] if count >= WARMUP]
    assert max(late) <= result["rss_after_warmup_mb"] * (1 + MAX_GROWTH_PERCENT / 100), result["samples"]
    assert result["feature_cache_entries"] <= 32  # bounded, although every request brought new images


def test_soak_requests_have_fresh_images_and_follow_ups():
    first, follow_up, next_ = request(2, 0), request(3, 0), request(4, 0)
    assert all((a == b).all() for a, b in zip(first["images"], follow_up["images"]))
    assert first["query"] != follow_up["query"]
    assert not any(a.shape == b.shape and (a == b).all() for a in first["images"] for b in next_["images"])
