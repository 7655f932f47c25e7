"""`gemvg bench` end to end on the tiny model: both systems measured, every report written."""

from __future__ import annotations

import json

import pytest

from gemvg.benchmarks.bench import BandwidthAroundRuns, read_bandwidth_now
from gemvg.runtime.cli import main as gemvg


def test_bench_tiny_against_transformers(tiny_bundles, tiny_checkpoints, tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["bench", "--bundle", str(tiny_bundles["qwen2_5_vl"]), "--checkpoint", str(tiny_checkpoints["qwen2_5_vl"]),
            "--baseline", "hf", "--runs", "2", "--warmup", "0", "--new-tokens", "4", "--image-size", "64",
            "--out", str(out)]
    assert gemvg(argv) == 0
    report = json.loads((out / "results.json").read_text())
    names = [system["name"] for system in report["systems"]]
    assert names == ["transformers fp32", "gemvg fp32"]
    for system in report["systems"]:
        stages = system["stages_ms"]
        for stage in ("preprocess", "vision", "prefill", "time_to_first_token", "decode_per_token", "total",
                      "follow_up_ttft"):
            assert stages[stage]["median"] > 0 and stages[stage]["p90"] >= stages[stage]["median"]
        assert system["peak_rss_mb"] > 0 and system["weight_bytes_per_token"] > 0
        pairs = system["read_bandwidth_around_runs_gbs"]  # [before, after] each timed run
        assert len(pairs) == 2 and all(b > 0 for pair in pairs for b in pair)
        assert system["decode_bandwidth_fraction"] > 0
    gemvg_system = report["systems"][1]
    assert gemvg_system["extra"]["follow_up_reused_tokens"] > 0
    assert report["read_bandwidth_gbs"] > 0 and len(report["read_bandwidth_samples_gbs"]) == 3  # before, after each
    table = (out / "results.md").read_text()
    assert "| gemvg fp32 |" in table and "| transformers fp32 |" in table
    assert (out / "stages.png").stat().st_size > 1000
    assert "gemvg fp32" in capsys.readouterr().out


def test_decode_bandwidth_is_compared_with_the_reads_around_each_run():
    around = BandwidthAroundRuns(threads=2)
    around.pairs = [[40.0, 60.0], [30.0, 30.0], [60.0, 65.0]]
    # 1 GB per token: 25 ms -> 40 GB/s against 50 (0.8); 40 ms -> 25 against 30 (0.83); 20 ms -> 50 against 62.5 (0.8)
    assert around.fraction(10**9, [25.0, 40.0, 20.0]) == pytest.approx(0.8)
    with pytest.raises(ValueError):
        around.fraction(10**9, [25.0])
    assert read_bandwidth_now(1) > 0  # the probe's own process


def test_make_model(tmp_path, capsys):
    assert gemvg(["bench", "--make-model", "tiny", "--family", "qwen2_vl", "--out", str(tmp_path / "m")]) == 0
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "qwen2_vl"


def test_bench_needs_something_to_measure(capsys):
    assert gemvg(["bench"]) == 2
    assert "give --bundle" in capsys.readouterr().err
