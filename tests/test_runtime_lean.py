"""The runtime imports and grounds a bundle with torch and transformers absent."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

BLOCKED = ("torch", "transformers", "trl", "peft", "onnx", "gemvg.export", "gemvg.train")

SCRIPT = textwrap.dedent("""
    import importlib.abc, json, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Block())
    from gemvg.runtime import Engine
    from gemvg.runtime.cli import main
    engine = Engine.load(BUNDLE)
    result = engine.ground([IMAGE], "the object", max_new_tokens=5)
    code = main(["ground", "--bundle", BUNDLE, "--image", IMAGE, "--query", "q", "--max-new-tokens", "3", "--json"])
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "trl", "onnx"))
    print(json.dumps({"tokens": len(result.token_ids), "code": code, "loaded": loaded}))
""")


def test_runtime_without_torch_or_transformers(tiny_bundle, image_files):
    script = f"BLOCKED = {BLOCKED!r}\nBUNDLE = {str(tiny_bundle)!r}\nIMAGE = {str(image_files['rgb.jpg'])!r}\n" + SCRIPT
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["tokens"] >= 1 and report["code"] == 0
    assert report["loaded"] == []
