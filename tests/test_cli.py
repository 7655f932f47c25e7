"""The gemvg CLI as a user meets it: ground with --json and --draw, inspect, demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from gemvg.runtime.cli import main as gemvg
from gemvg.runtime.manifest import SCHEMA_VERSION


def test_ground_json_and_draw(tiny_bundle, image_files, tmp_path, capsys):
    drawing = tmp_path / "boxes.png"
    argv = ["ground", "--bundle", str(tiny_bundle), "--image", str(image_files["rgb.jpg"]), "--image",
            str(image_files["large.jpg"]), "--query", "the cup", "--json", "--draw", str(drawing),
            "--max-new-tokens", "8"]
    assert gemvg(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) >= {"boxes", "text", "token_ids", "timings_ms"}
    assert {"preprocess", "vision", "prefill", "decode", "time_to_first_token", "total"} <= set(result["timings_ms"])
    assert 1 <= len(result["token_ids"]) <= 8
    with Image.open(drawing) as image:
        assert image.height == 384 and image.width > 384  # two tiles side by side


def test_ground_plain_text_output(tiny_bundle, image_files, capsys):
    assert gemvg(["ground", "--bundle", str(tiny_bundle), "--image", str(image_files["gray.png"]), "--query", "q",
                  "--mode", "cot", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("text: ") and "timings:" in out


def test_inspect_writes_model_inputs(tiny_bundle, image_files, tmp_path):
    dump = tmp_path / "dump.npz"
    assert gemvg(["inspect", "--bundle", str(tiny_bundle), "--image", str(image_files["rgb.jpg"]), "--query", "q",
                  "--out", str(dump)]) == 0
    data = np.load(dump)
    assert set(data.files) == {"pixel_values", "image_grid_thw", "input_ids", "position_ids", "logits", "image_spans",
                               "next_position", "decoder_rotary_cos", "decoder_rotary_sin", "image_0_features",
                               "image_0_vision_pixel_values", "image_0_vision_rotary_cos", "image_0_vision_rotary_sin"}
    assert data["decoder_rotary_cos"].shape[0] == data["input_ids"].shape[1]
    start, end = data["image_spans"][0]
    assert data["image_0_features"].shape[0] == end - start
    assert data["position_ids"].shape == (3, 1, data["input_ids"].shape[1])
    assert data["logits"].ndim == 1


def test_demo_runs_from_nothing(tmp_path):
    """The README's first command's main job: `gemvg demo` builds its bundle at first use, then grounds."""
    env = dict(os.environ, GEMVG_HOME=str(tmp_path))
    done = subprocess.run([sys.executable, "-m", "gemvg.runtime.cli", "demo"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "meaningless" in done.stdout and "timings:" in done.stdout
    assert (Path(tmp_path) / "demo-tiny-qwen2_vl" / "demo_result.png").is_file()
    again = subprocess.run([sys.executable, "-m", "gemvg.runtime.cli", "demo"], capture_output=True, text=True,
                           env=env, timeout=120)
    assert again.returncode == 0 and "building the demo bundle" not in again.stderr

    # A demo cached by a gemvg with another bundle schema is rebuilt, not refused.
    manifest_path = Path(tmp_path) / "demo-tiny-qwen2_vl" / "bundle" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["schema_version"] = 1
    manifest_path.write_text(json.dumps(manifest))
    upgraded = subprocess.run([sys.executable, "-m", "gemvg.runtime.cli", "demo"], capture_output=True, text=True,
                              env=env, timeout=300)
    assert upgraded.returncode == 0, upgraded.stderr[-2000:]
    assert "rebuilding the demo bundle" in upgraded.stderr and "timings:" in upgraded.stdout
    assert json.loads(manifest_path.read_text())["schema_version"] == SCHEMA_VERSION
