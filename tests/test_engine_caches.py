"""Follow-up queries on the same images reuse vision features and the cached prompt prefix, exactly."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from gemvg.runtime import Engine

from .conftest import FAMILIES


@pytest.fixture(params=FAMILIES)
def bundle(request, tiny_bundles):
    return tiny_bundles[request.param]


def counting_engine(bundle):
    engine = Engine.load(bundle)
    engine.vision_runs = 0
    encode = engine.encode_image

    def counted(image):
        engine.vision_runs += 1
        return encode(image)

    engine.encode_image = counted
    return engine


def test_follow_up_reuses_prefix_and_matches_a_fresh_engine(bundle, image_files):
    images = [image_files["rgb.jpg"], image_files["palette.png"]]
    engine = counting_engine(bundle)
    first = engine.ground(images, "the first question", mode="raw", max_new_tokens=12)
    assert first.reused_prefix_tokens == 0 and engine.vision_runs == 2
    follow_up = engine.ground(images, "a different, longer second question", mode="raw", max_new_tokens=12)
    assert engine.vision_runs == 2, "vision must not run again for the same images"
    spans_end = max(end for _, end in engine.prepare(images, "x", "raw").prompt.image_spans)
    assert follow_up.reused_prefix_tokens > spans_end  # system prompt and both images came from the cache

    fresh = Engine.load(bundle).ground(images, "a different, longer second question", mode="raw", max_new_tokens=12)
    assert follow_up.token_ids == fresh.token_ids
    assert follow_up.text == fresh.text


def test_changed_second_image_cuts_the_prefix_at_that_image(bundle, image_files, tmp_path):
    first_images = [image_files["rgb.jpg"], image_files["gray.png"]]
    # Same size and mode as gray.png, other content: equal token ids, different image.
    other = Image.fromarray(255 - np.asarray(Image.open(image_files["gray.png"])))
    engine = counting_engine(bundle)
    engine.ground(first_images, "where", mode="raw", max_new_tokens=6)
    second_images = [image_files["rgb.jpg"], other]
    result = engine.ground(second_images, "where", mode="raw", max_new_tokens=6)
    spans = engine.prepare(second_images, "where", "raw").prompt.image_spans
    assert result.reused_prefix_tokens == spans[1][0]
    assert engine.vision_runs == 3  # only the changed image is encoded again
    fresh = Engine.load(bundle).ground(second_images, "where", mode="raw", max_new_tokens=6)
    assert result.token_ids == fresh.token_ids


def test_identical_request_and_growing_budget(bundle, image_files):
    images = [image_files["wide.jpg"]]
    engine = Engine.load(bundle)
    short = engine.ground(images, "same", mode="raw", max_new_tokens=3)
    again = engine.ground(images, "same", mode="raw", max_new_tokens=20)  # the cache must grow
    fresh = Engine.load(bundle).ground(images, "same", mode="raw", max_new_tokens=20)
    assert again.token_ids == fresh.token_ids
    assert again.token_ids[:3] == short.token_ids
    assert again.reused_prefix_tokens == len(engine.prepare(images, "same", "raw").prompt.input_ids) - 1


def test_min_new_tokens_holds_eos(bundle, image_files):
    engine = Engine.load(bundle)
    eos = engine.manifest.tokens.eos
    result = engine.ground([image_files["rgb.jpg"]], "q", mode="raw", max_new_tokens=16, min_new_tokens=16)
    assert len(result.token_ids) == 16
    assert not any(token in eos for token in result.token_ids[:-1])
