"""Jump-forward: the text the box syntax forces goes through the decoder in one pass, with the numbers of
passing it token by token."""

from __future__ import annotations

import numpy as np
import pytest

from gemvg.runtime import Engine
from gemvg.runtime.grounding import Box, format_answer, forced_continuation

from .conftest import FAMILIES


def _geometries(engine, images):
    return [image.geometry for image in engine.prepare(images, "q", "direct").images]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("images", [1, 2])
def test_forced_text_is_what_the_formatter_writes(family, images, tiny_bundles, image_files):
    """At every point of a trained answer where the syntax forces text, the answer continues with it."""
    engine = Engine.load(tiny_bundles[family])
    syntax = engine.manifest.box_syntax
    paths = [image_files["rgb.jpg"], image_files["palette.png"]][:images]
    boxes = [Box(images - 1, 3, 4, 30, 40, "red cup"), Box(0, 10, 12, 50, 44, "the lid")]
    for mode in ("direct", "cot"):
        answer = format_answer(boxes, syntax, _geometries(engine, paths), mode, reasoning="two {\"things")
        forced_at = 0
        for end in range(1, len(answer)):
            forced = forced_continuation(answer[:end], syntax, mode)
            if forced:
                assert answer[end:].startswith(forced), (answer[:end], forced)
                forced_at += 1
        assert forced_at == (3 if syntax == "ref_tokens" else 2) * len(boxes)  # every box, nothing else
    assert forced_continuation('{"', "json_pixels", "raw") == ""  # raw prompts are the caller's format


def _run(engine, images, script, forcing):
    """Prefill a direct-mode request, then generate with a chooser that follows `script` (standing in
    for a trained model's choices) and records the logits it was given at each point."""
    inputs = engine.prepare(images, "find the cups", "direct")
    cache = engine.new_cache(len(inputs.prompt.input_ids) + len(script) + 4)
    logits = engine.prefill(inputs.prompt, engine.encode_images(inputs.images), cache)
    seen = {}

    def choose(step_logits, tokens):
        seen[len(tokens)] = step_logits.copy()
        return script[len(tokens)]

    tokens = engine.generate(logits, inputs.prompt.next_position, cache, len(script), forcing=forcing,
                             choose=choose)
    return tokens, seen


@pytest.mark.parametrize("family", FAMILIES)
def test_jump_forward_skips_forced_tokens_with_the_same_logits(family, tiny_bundles, image_files):
    engine = Engine.load(tiny_bundles[family])
    images = [image_files["rgb.jpg"], image_files["palette.png"]]
    boxes = [Box(1, 3, 4, 30, 40, "cup"), Box(0, 10, 12, 50, 44, "lid")]
    answer = format_answer(boxes, engine.manifest.box_syntax, _geometries(engine, images), "direct")
    script = engine.tokenizer.encode(answer, add_special_tokens=False).ids + [sorted(engine.eos)[0]]

    plain, plain_logits = _run(engine, images, script, forcing=None)
    jumped, jumped_logits = _run(engine, images, script, forcing="direct")
    assert plain == jumped == script
    # Fewer choices (decoder passes): the forced tokens were never chosen one by one...
    forced = [len(engine.forced_tokens(script[:i], "direct")) for i in range(1, len(script))]
    assert sum(forced) > 0 and len(jumped_logits) < len(plain_logits)
    assert set(jumped_logits) < set(plain_logits)
    # ...and where both chose, the decoder saw the same prefix, one pass or several: the same logits.
    for position, logits in jumped_logits.items():
        np.testing.assert_allclose(logits, plain_logits[position], rtol=1e-4, atol=1e-4)


def test_ground_with_jump_forward_on_random_weights_matches_without(tiny_bundles, image_files):
    """Where the model never writes the syntax (random weights) nothing is forced: the same answer."""
    engine = Engine.load(tiny_bundles["qwen2_5_vl"])
    images = [image_files["rgb.jpg"]]
    plain = engine.ground(images, "the cup", max_new_tokens=12)
    engine.reset()
    jumped = engine.ground(images, "the cup", max_new_tokens=12, jump_forward=True)
    assert plain.token_ids == jumped.token_ids


def test_cli_jump_forward(tiny_bundles, image_files, capsys):
    import json

    from gemvg.runtime.cli import main as gemvg

    argv = ["ground", "--bundle", str(tiny_bundles["qwen2_vl"]), "--image", str(image_files["rgb.jpg"]), "--query",
            "the cup", "--max-new-tokens", "6", "--json"]
    assert gemvg(argv) == 0
    plain = json.loads(capsys.readouterr().out)
    assert gemvg(argv + ["--jump-forward"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == plain["token_ids"]
