"""The engine: ground a query over N images with a bundle's ONNX graphs.

    engine = Engine.load("bundle/")
    result = engine.ground(["left.jpg", "right.jpg"], "the red cup")
    for box in result.boxes: print(box.image, box.x1, box.y1, box.x2, box.y2, box.label)

The stages read like the algorithm: preprocess -> encode_images -> prefill -> decode_one_token until
EOS or max_new_tokens (greedy), all in numpy + onnxruntime + tokenizers. The parts it is made of:
`sessions` (providers, ONNX Runtime sessions), `decoding` (a request's KV cache, its IO bindings and the
decoder passes), `caches` (the feature cache and the prefix store shared between requests).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnxruntime as ort
from PIL import Image as PILImage
from tokenizers import Tokenizer

from . import bundle_io as io
from .caches import FeatureCache, PrefixState, PrefixStore
from .decoding import DecoderPasses, KVCache
from .errors import BundleError, InputError, PromptTooLongError
from .grounding import MODES, Box, ImageGeometry, build_instruction, forced_continuation, parse_answer
from .manifest import Manifest, load_manifest
from .preprocess import ImageInput, PreparedImage, load_image, preprocess_image
from .prompt import Prompt, build_prompt, deepstack_embeds
from .sessions import open_sessions, providers_for, tensorrt_options  # noqa: F401 (the engine's public names)
from .vision import stack_vision_outputs, vision_feeds

# Tokens of generated text re-tokenized with the forced text (the longest forced ending, Qwen2-VL's
# "<|box_start|>(x,y),(x,y)", is under 20 tokens even one byte per token).
FORCING_CONTEXT = 32


@dataclass
class GroundingResult:
    boxes: list[Box]
    text: str
    token_ids: list[int]
    timings_ms: dict[str, float]
    images: list[ImageGeometry] = field(default_factory=list)
    reused_prefix_tokens: int = 0  # prompt tokens whose keys/values came from the previous request

    def to_dict(self) -> dict:
        return {
            "boxes": [{"image": b.image, "x1": b.x1, "y1": b.y1, "x2": b.x2, "y2": b.y2, "label": b.label}
                      for b in self.boxes],
            "text": self.text,
            "token_ids": self.token_ids,
            "timings_ms": self.timings_ms,
            "images": [{"width": g.width, "height": g.height} for g in self.images],
            "reused_prefix_tokens": self.reused_prefix_tokens,
        }


@dataclass
class ModelInputs:
    """Exactly what the model sees for a request: the `gemvg inspect` dump."""

    images: list[PreparedImage]
    prompt: Prompt

    @property
    def pixel_values(self) -> np.ndarray:
        return np.concatenate([image.pixel_values for image in self.images])

    @property
    def image_grid_thw(self) -> np.ndarray:
        return np.asarray([image.grid_thw for image in self.images], dtype=np.int64)


class Engine:
    """A bundle's graphs, ready to ground queries.

    Thread-safe: one engine may serve requests from several threads, each getting exactly the answer it
    gets alone. The sessions are shared (ONNX Runtime runs them concurrently); each request decodes in
    a KV cache of its own (`decoding.KVCache`, with its IO bindings and logits); the feature cache and
    the prefix store (`caches`) lock themselves, and a stored prefix is reused by one request at a time.
    """

    def __init__(self, bundle_dir: Path, manifest: Manifest, sessions: dict[str, ort.InferenceSession],
                 tokenizer: Tokenizer, load_ms: float):
        self.bundle_dir = bundle_dir
        self.manifest = manifest
        self.vision = sessions["vision"]
        self.embed = sessions["embed"]
        self.decoder = sessions["decoder"]
        self.step_decoder = sessions.get("step_decoder", self.decoder)  # one-token passes
        self.tokenizer = tokenizer
        self.load_ms = load_ms
        self.eos = set(manifest.tokens.eos)
        self.passes = DecoderPasses(manifest, str(bundle_dir))
        self._vision_inputs = {i.name for i in self.vision.get_inputs()}
        self.feature_cache = FeatureCache()
        self.prefixes = PrefixStore()

    @classmethod
    def load(cls, bundle_dir: str | Path, device: str = "cpu", threads: int | None = None,
             verify: bool = True) -> "Engine":
        """Open a bundle (checking every file's sha256 unless verify=False) and create its sessions."""
        start = time.perf_counter()
        bundle = Path(bundle_dir)
        manifest = load_manifest(bundle, verify=verify)
        sessions = open_sessions(bundle, manifest, device, threads)
        tokenizer = Tokenizer.from_file(str(bundle / manifest.tokenizer.path))
        return cls(bundle, manifest, sessions, tokenizer, (time.perf_counter() - start) * 1e3)

    def reset(self) -> None:
        """Forget cached image features and the cached prompt prefix (the next request starts cold)."""
        self.feature_cache.clear()
        self.prefixes.clear()

    # -- stages --------------------------------------------------------------------------------

    def preprocess(self, images: Sequence[ImageInput]) -> list[PreparedImage]:
        if isinstance(images, (str, Path, bytes, np.ndarray, PILImage.Image)):
            images = [images]  # a single image, not a list of them
        if len(images) == 0:
            raise InputError("no images: give at least one image to ground the query in")
        limits = self.manifest.limits
        if len(images) > limits.max_images:
            raise InputError(f"{len(images)} images is over this bundle's limit of {limits.max_images}")
        config = self.manifest.preprocess
        prepared = [preprocess_image(load_image(image, config.max_image_pixels), config) for image in images]
        for index, image in enumerate(prepared):
            if len(image.pixel_values) > limits.max_patches_per_image:
                raise InputError(f"image {index} needs {len(image.pixel_values)} patches, over this bundle's "
                                 f"limit of {limits.max_patches_per_image}")
        return prepared

    def prepare(self, images: Sequence[ImageInput], query: str, mode: str = "direct") -> ModelInputs:
        """Preprocess images and build the prompt: the exact model inputs of a request."""
        if mode not in MODES:
            raise InputError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
        if not isinstance(query, str) or not query.strip():
            raise InputError("the query is empty")
        prepared = self.preprocess(images)
        text = build_instruction(query, self.manifest.box_syntax, mode)
        prompt = build_prompt(self.tokenizer, self.manifest, text, [image.grid_thw for image in prepared])
        return ModelInputs(prepared, prompt)

    def encode_images(self, images: list[PreparedImage]) -> list[np.ndarray]:
        """Vision features per image, [1 + deepstack layers, tokens, hidden] in raster order (the image
        features, then DeepStack's for a model that has it); one encoder run per new image."""
        features = []
        for image in images:
            cached = self.feature_cache.get(image.key)
            if cached is None:
                cached = self.encode_image(image)
                self.feature_cache.put(image.key, cached)
            features.append(cached)
        return features

    def features_after(self, inputs: ModelInputs, start: int) -> list[np.ndarray | None]:
        """Features of the images that the first `start` prompt tokens (a reused prefix) do not cover;
        None for those they do."""
        needed = [end > start for _, end in inputs.prompt.image_spans]
        fresh = iter(self.encode_images([image for image, need in zip(inputs.images, needed) if need]))
        return [next(fresh) if need else None for need in needed]

    def vision_inputs(self, image: PreparedImage) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """The vision encoder's feed for one image (the inputs its graph declares) and the order that
        restores its merged features to raster order (None without window attention)."""
        feeds = vision_feeds(image.pixel_values, image.grid_thw, self.manifest.vision)
        inputs = {name: getattr(feeds, name) for name in io.VISION_INPUTS}
        inputs = {k: v for k, v in inputs.items() if k in self._vision_inputs and v is not None}
        missing = sorted(self._vision_inputs - inputs.keys())
        if missing:  # e.g. window_ids: a bundle exported before windowed attention
            raise BundleError(f"{self.bundle_dir}: the vision graph takes {', '.join(missing)}, which this gemvg "
                              "does not feed; re-export the bundle")
        return inputs, feeds.restore_order

    def encode_image(self, image: PreparedImage) -> np.ndarray:
        inputs, restore_order = self.vision_inputs(image)
        return stack_vision_outputs(self.vision.run(None, inputs), restore_order)

    def embed_prompt(self, prompt: Prompt, features: list[np.ndarray | None], start: int = 0) -> np.ndarray:
        """Embeddings of prompt tokens from `start` on, image tokens replaced by their features."""
        (embeds,) = self.embed.run(None, {io.EMBED_INPUT_IDS: prompt.input_ids[None, start:]})
        for (span_start, span_end), image_features in zip(prompt.image_spans, features):
            if span_end > start:
                embeds[0, span_start - start:span_end - start] = image_features[0]
        return embeds

    def prompt_inputs(self, prompt: Prompt, features: list[np.ndarray | None],
                      start: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
        """The decoder's inputs for prompt tokens from `start` on: their embeddings (image features spliced
        in) and, for a DeepStack model, DeepStack's input (else None)."""
        deepstack = deepstack_embeds(prompt, features, start, len(self.manifest.vision.deepstack_layers),
                                     self.manifest.text.hidden_size)
        return self.embed_prompt(prompt, features, start), deepstack

    def decoder_feeds(self, embeds: np.ndarray, positions: np.ndarray, cache: KVCache,
                      deepstack: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """All of the decoder's inputs for `embeds` following the cache's filled prefix."""
        return self.passes.decoder_feeds(embeds, positions, cache, deepstack)

    def run_decoder(self, embeds: np.ndarray, positions: np.ndarray, cache: KVCache,
                    deepstack: np.ndarray | None = None) -> np.ndarray:
        """One decoder pass over `embeds` after the cached prefix; the last position's logits (a view of
        the cache's logits buffer, valid until its next pass). One-token passes run on the bundle's step
        decoder when it has one (a weight-only graph; prompts stay on the static-INT8 one). `deepstack`:
        DeepStack's input for these tokens (zeros when not given: generated tokens are text)."""
        session = self.step_decoder if embeds.shape[1] == 1 else self.decoder
        return self.passes.run(session, embeds, positions, cache, deepstack)

    def prefill(self, prompt: Prompt, features: list[np.ndarray | None], cache: KVCache) -> np.ndarray:
        """Run the prompt tokens the cache does not hold yet (all of them for a fresh cache)."""
        start = cache.length
        embeds, deepstack = self.prompt_inputs(prompt, features, start)
        return self.run_decoder(embeds, prompt.position_ids[:, None, start:], cache, deepstack)

    def decode_one_token(self, token: int, position: int, cache: KVCache) -> np.ndarray:
        (embeds,) = self.embed.run(None, {io.EMBED_INPUT_IDS: np.full((1, 1), token, np.int64)})
        return self.run_decoder(embeds, np.full((3, 1, 1), position, np.int64), cache)

    def new_cache(self, capacity: int) -> KVCache:
        return self.passes.new_cache(capacity)

    def cache_for(self, inputs: ModelInputs, capacity: int) -> KVCache:
        """A cache for this request alone: the stored prefix's (taken from the store), cut to the prefix
        they share, or a new one."""
        prompt, keys = inputs.prompt, [image.key for image in inputs.images]
        last = self.prefixes.take()
        reusable = last.reusable_length(prompt.input_ids, keys, prompt.image_spans) if last else 0
        if reusable == 0:
            return self.new_cache(capacity)
        cache = last.cache
        cache.length = reusable  # positions after the shared prefix are simply overwritten
        cache.ensure_capacity(capacity)
        return cache

    def check_context(self, prompt_length: int, max_new_tokens: int) -> None:
        limit = self.manifest.limits.max_context
        if prompt_length + max_new_tokens > limit:
            raise PromptTooLongError(f"prompt of {prompt_length} tokens (images included) + {max_new_tokens} new "
                                     f"tokens exceeds the model's context of {limit} tokens; use fewer or "
                                     "smaller images, a shorter query or fewer new tokens")

    # -- the main job --------------------------------------------------------------------------

    def ground(self, images: Sequence[ImageInput], query: str, mode: str = "direct",
               max_new_tokens: int = 256, min_new_tokens: int = 0, jump_forward: bool = False) -> GroundingResult:
        """Every target of `query` in `images`: boxes in each image's original pixels, greedy decoding.

        A follow-up on the same images reuses their vision features and the prompt's cached prefix
        (system + images), so only the new query is prefilled. `min_new_tokens` holds EOS back as
        transformers' option of that name does (benchmarks use it for a fixed output length).
        `jump_forward` appends the text the box syntax forces (`forced_continuation`) in one decoder pass
        instead of one pass per token: fewer passes, and the same answer whenever the model would have
        written that text itself, as a model trained on the syntax does.
        """
        if max_new_tokens < 1:
            raise InputError("max_new_tokens must be at least 1")
        timings: dict[str, float] = {}
        clock = time.perf_counter()
        inputs = self.prepare(images, query, mode)
        prompt = inputs.prompt
        self.check_context(len(prompt.input_ids), max_new_tokens)
        timings["preprocess"] = _lap(clock)

        clock = time.perf_counter()
        cache = self.cache_for(inputs, len(prompt.input_ids) + max_new_tokens)
        features = self.features_after(inputs, cache.length)
        timings["vision"] = _lap(clock)

        clock = time.perf_counter()
        reused = cache.length
        logits = self.prefill(prompt, features, cache)
        timings["prefill"] = _lap(clock)
        timings["time_to_first_token"] = timings["preprocess"] + timings["vision"] + timings["prefill"]

        clock = time.perf_counter()
        tokens = self.generate(logits, prompt.next_position, cache, max_new_tokens, min_new_tokens,
                               forcing=mode if jump_forward else None)
        timings["decode"] = _lap(clock)
        timings["decode_per_token"] = timings["decode"] / max(1, len(tokens) - 1)
        timings["total"] = timings["time_to_first_token"] + timings["decode"]
        self.prefixes.put(PrefixState(prompt.input_ids, [image.key for image in inputs.images],
                                      prompt.image_spans, cache))

        text = self.decode_text(tokens)
        geometries = [image.geometry for image in inputs.images]
        boxes = parse_answer(text, self.manifest.box_syntax, geometries)
        return GroundingResult(boxes, text, tokens, timings, geometries, reused)

    def generate(self, logits: np.ndarray, position: int, cache: KVCache, max_new_tokens: int,
                 min_new_tokens: int = 0, forcing: str | None = None,
                 choose: Callable[[np.ndarray, list[int]], int] | None = None) -> list[int]:
        """Tokens from the prefill's logits until EOS (kept, as transformers does) or the budget.

        `choose(logits, tokens so far)` picks each token (default: greedy). With `forcing` (a prompt mode),
        the tokens the box syntax forces after a pick are appended at once and go through the decoder
        together with it, in one pass."""
        choose = choose or (lambda step_logits, tokens: int(np.argmax(step_logits)))
        tokens: list[int] = []
        tokens.append(self._choose(choose, logits, tokens, min_new_tokens))
        while tokens[-1] not in self.eos and len(tokens) < max_new_tokens:
            fed = [tokens[-1]]
            if forcing is not None:
                forced = self.forced_tokens(tokens, forcing)[:max_new_tokens - len(tokens)]
                tokens += forced
                fed += forced
                if len(tokens) >= max_new_tokens:
                    break
            logits = self.decode_tokens(fed, position, cache)
            position += len(fed)
            tokens.append(self._choose(choose, logits, tokens, min_new_tokens))
        return tokens

    def _choose(self, choose, logits: np.ndarray, tokens: list[int], min_new_tokens: int) -> int:
        if len(tokens) < min_new_tokens:
            logits = logits.copy()
            logits[list(self.eos)] = -np.inf
        return choose(logits, tokens)

    def forced_tokens(self, tokens: list[int], mode: str) -> list[int]:
        """The token ids of the text the box syntax forces after `tokens`, or [] when nothing is forced
        or the forced text would not tokenize as a continuation (then nothing is skipped)."""
        forced = forced_continuation(self.decode_text(tokens), self.manifest.box_syntax, mode)
        if not forced:
            return []
        tail = tokens[-FORCING_CONTEXT:]  # the forced endings are local: a few tokens of text to tokenize
        text = self.tokenizer.decode(tail, skip_special_tokens=False)
        # The forced ids are what tokenizing the text with them adds to tokenizing it alone, provided
        # the forced text does not merge with the text's last token (then it would not be a continuation).
        alone = self.tokenizer.encode(text, add_special_tokens=False).ids
        ids = self.tokenizer.encode(text + forced, add_special_tokens=False).ids
        return ids[len(alone):] if ids[:len(alone)] == alone else []

    def decode_tokens(self, token_ids: list[int], position: int, cache: KVCache) -> np.ndarray:
        """One decoder pass over `token_ids` at `position` onwards; the last one's logits."""
        if len(token_ids) == 1:
            return self.decode_one_token(token_ids[0], position, cache)
        ids = np.asarray([token_ids], np.int64)
        (embeds,) = self.embed.run(None, {io.EMBED_INPUT_IDS: ids})
        positions = np.broadcast_to(np.arange(position, position + len(token_ids)), (3, 1, len(token_ids)))
        return self.run_decoder(embeds, np.ascontiguousarray(positions), cache)

    def decode_text(self, tokens: list[int]) -> str:
        body = tokens[:-1] if tokens and tokens[-1] in self.eos else tokens
        # Special tokens stay: Qwen2-VL's box syntax is written with them.
        return self.tokenizer.decode(body, skip_special_tokens=False)


def _lap(start: float) -> float:
    return (time.perf_counter() - start) * 1e3
