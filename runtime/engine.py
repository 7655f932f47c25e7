"""The engine: ground a query over N images with a bundle's ONNX graphs.

    engine = Engine.load("bundle/")
    result = engine.ground(["left.jpg", "right.jpg"], "the red cup")
    for box in result.boxes: print(box.image, box.x1, box.y1, box.x2, box.y2, box.label)

The stages read like the algorithm: preprocess -> encode_images -> prefill -> decode_one_token until
EOS or max_new_tokens (greedy), all in numpy + onnxruntime + tokenizers.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnxruntime as ort
from PIL import Image as PILImage
from tokenizers import Tokenizer

from . import bundle_io as io
from .errors import BundleError, InputError, PromptTooLongError, ProviderError
from .grounding import MODES, Box, ImageGeometry, build_instruction, forced_continuation, parse_answer
from .manifest import Manifest, load_manifest
from .preprocess import ImageInput, PreparedImage, load_image, preprocess_image
from .prompt import Prompt, build_prompt
from .rotary import MRopeAngles
from .vision import vision_feeds

# Tokens of generated text re-tokenized with the forced text (the longest forced ending, Qwen2-VL's
# "<|box_start|>(x,y),(x,y)", is under 20 tokens even one byte per token).
FORCING_CONTEXT = 32


DEVICES = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


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


class KVCache:
    """Preallocated key/value buffers, [1, kv_heads, capacity, head_dim] per layer, and the rotary tables
    [capacity, head_dim / 2]: cos and sin of the angles of the token in each slot.

    The decoder's attention reads the first `length` positions and writes the new ones in place (its
    past and present tensors are the same buffer), so nothing is concatenated or reallocated per token.
    """

    def __init__(self, num_layers: int, capacity: int, kv_heads: int, head_dim: int):
        self.keys = [np.zeros((1, kv_heads, capacity, head_dim), np.float32) for _ in range(num_layers)]
        self.values = [np.zeros((1, kv_heads, capacity, head_dim), np.float32) for _ in range(num_layers)]
        self.rotary_cos = np.zeros((capacity, head_dim // 2), np.float32)
        self.rotary_sin = np.zeros((capacity, head_dim // 2), np.float32)
        self.length = 0
        self.capacity = capacity
        self.generation = 0  # bumped when the buffers are reallocated (bindings to the old ones are stale)

    def ensure_capacity(self, capacity: int) -> None:
        """Grow (keeping the filled prefix) when a reused cache must hold a longer request."""
        if capacity <= self.capacity:
            return
        for buffers in (self.keys, self.values):
            for layer, old in enumerate(buffers):
                grown = np.zeros((*old.shape[:2], capacity, old.shape[3]), np.float32)
                grown[:, :, :self.length] = old[:, :, :self.length]
                buffers[layer] = grown
        for name in ("rotary_cos", "rotary_sin"):
            old = getattr(self, name)
            grown = np.zeros((capacity, old.shape[1]), np.float32)
            grown[:self.length] = old[:self.length]
            setattr(self, name, grown)
        self.capacity = capacity
        self.generation += 1


class FeatureCache:
    """Bounded LRU of vision features keyed by image content: a follow-up on the same frames skips vision."""

    def __init__(self, capacity: int = 32):
        self.capacity = capacity
        self.entries: OrderedDict[str, np.ndarray] = OrderedDict()

    def get(self, key: str) -> np.ndarray | None:
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        return None

    def put(self, key: str, features: np.ndarray) -> None:
        self.entries[key] = features
        self.entries.move_to_end(key)
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)


@dataclass
class PrefixState:
    """The last request's prompt and cache: a request that starts the same way reuses its keys/values."""

    input_ids: np.ndarray
    image_keys: list[str]
    image_spans: list[tuple[int, int]]
    cache: KVCache

    def reusable_length(self, input_ids: np.ndarray, image_keys: list[str], spans: list[tuple[int, int]]) -> int:
        """How many leading tokens have the same ids *and* the same images as the stored prompt.

        Image tokens share one id, so equal ids are not enough: a prefix may only cover images whose
        content keys match. At least one token is always left to recompute, for its logits.
        """
        limit = min(len(input_ids), len(self.input_ids), self.cache.length) - 1
        if limit <= 0:
            return 0
        differs = np.flatnonzero(input_ids[:limit] != self.input_ids[:limit])
        common = int(differs[0]) if len(differs) else limit
        for index, (start, end) in enumerate(spans):
            if start >= common:
                break
            same = index < len(self.image_keys) and self.image_keys[index] == image_keys[index] \
                and self.image_spans[index] == (start, end)
            if not same:
                return start
        return common


def _session_options(threads: int | None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


def providers_for(device: str) -> list[str]:
    """The execution providers for a device, or a ProviderError naming what is missing."""
    if device not in DEVICES:
        raise InputError(f"unknown device {device!r}; expected one of {', '.join(DEVICES)}")
    wanted = DEVICES[device]
    available = set(ort.get_available_providers())
    if wanted[0] not in available:
        raise ProviderError(f"device {device!r} needs onnxruntime's {wanted[0]}, which this onnxruntime lacks "
                            f"(available: {', '.join(sorted(available))}); install onnxruntime-gpu with "
                            "CUDA/TensorRT, or use device='cpu'")
    return [p for p in wanted if p in available]


TENSORRT_CACHE_DIR = "trt_cache"


def tensorrt_options(bundle: Path, manifest: Manifest, graph: str) -> dict[str, str]:
    """TensorRT EP options for one of the bundle's graphs: engines and timing cache kept in the bundle's
    trt_cache/, INT8 enabled for Q/DQ graphs, and the optimization profile that
    `gemvg-export --target tensorrt` recorded from the manifest's limits, when there is one."""
    cache = str(bundle / TENSORRT_CACHE_DIR)
    options = {"trt_engine_cache_enable": "True", "trt_engine_cache_path": cache,
               "trt_timing_cache_enable": "True", "trt_timing_cache_path": cache}
    if getattr(manifest, f"{graph}_graph").precision == "int8":
        options["trt_int8_enable"] = "True"
    profile = manifest.extra.get("tensorrt", {}).get("ort_profiles", {}).get(graph)
    if profile:
        for which in ("min", "opt", "max"):
            options[f"trt_profile_{which}_shapes"] = profile[which]
    return options


def session_providers(providers: list[str], bundle: Path, manifest: Manifest, graph: str) -> list:
    """`providers` with the TensorRT EP's options attached for `graph`."""
    return [(p, tensorrt_options(bundle, manifest, graph)) if p == "TensorrtExecutionProvider" else p
            for p in providers]


@dataclass
class _BoundSession:
    """A decoder session, its IO binding, and the cache (with its generation) whose buffers are bound."""
    session: ort.InferenceSession
    binding: ort.IOBinding
    cache: tuple[KVCache, int] | None = None


class Engine:
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
        layers = range(manifest.text.num_layers)
        # The bundle's decoder I/O naming convention (bundle_io; the native runtime uses the same).
        self._past_key_names = [io.past_key(i) for i in layers]
        self._past_value_names = [io.past_value(i) for i in layers]
        self._present_key_names = [io.present_key(i) for i in layers]
        self._present_value_names = [io.present_value(i) for i in layers]
        names = self._past_key_names + self._past_value_names + self._present_key_names + self._present_value_names
        declared = set(manifest.decoder_graph.inputs) | set(manifest.decoder_graph.outputs)
        missing = [n for n in names + list(io.DECODER_STEP_INPUTS)
                   + [io.DECODER_ROTARY_COS, io.DECODER_ROTARY_SIN, io.DECODER_LOGITS] if n not in declared]
        if missing:
            raise BundleError(f"{bundle_dir}: decoder graph lacks {missing[0]} (manifest and graph disagree)")
        self._vision_inputs = {i.name for i in self.vision.get_inputs()}
        # Reused across steps and requests: no per-token allocation in the decode loop.
        self._passes = {session: _BoundSession(session, session.io_binding())
                        for session in dict.fromkeys((self.decoder, self.step_decoder))}
        self._logits = np.zeros((1, 1, manifest.text.vocab_size), np.float32)
        self._token = np.zeros((1, 1), np.int64)
        self._position = np.zeros((3, 1, 1), np.int64)
        self._rotary = MRopeAngles(manifest.text)
        self.feature_cache = FeatureCache()
        self._last_prefix: PrefixState | None = None

    @classmethod
    def load(cls, bundle_dir: str | Path, device: str = "cpu", threads: int | None = None,
             verify: bool = True) -> "Engine":
        """Open a bundle (checking every file's sha256 unless verify=False) and create its sessions."""
        start = time.perf_counter()
        bundle = Path(bundle_dir)
        manifest = load_manifest(bundle, verify=verify)
        providers = providers_for(device)
        options = _session_options(threads)
        if "TensorrtExecutionProvider" in providers:
            (bundle / TENSORRT_CACHE_DIR).mkdir(exist_ok=True)
        graphs = [("vision", manifest.vision_graph), ("embed", manifest.embed_graph),
                  ("decoder", manifest.decoder_graph), ("step_decoder", manifest.step_decoder_graph)]
        sessions = {
            name: ort.InferenceSession(str(bundle / graph.path), options,
                                       providers=session_providers(providers, bundle, manifest, name))
            for name, graph in graphs if graph is not None
        }
        tokenizer = Tokenizer.from_file(str(bundle / manifest.tokenizer.path))
        return cls(bundle, manifest, sessions, tokenizer, (time.perf_counter() - start) * 1e3)

    def reset(self) -> None:
        """Forget cached image features and the cached prompt prefix (the next request starts cold)."""
        self.feature_cache = FeatureCache(self.feature_cache.capacity)
        self._last_prefix = None

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
        text = build_instruction(query, self.manifest.family, mode)
        prompt = build_prompt(self.tokenizer, self.manifest, text, [image.grid_thw for image in prepared])
        return ModelInputs(prepared, prompt)

    def encode_images(self, images: list[PreparedImage]) -> list[np.ndarray]:
        """Vision features per image, [tokens, hidden] in raster order; one encoder run per new image."""
        features = []
        for image in images:
            cached = self.feature_cache.get(image.key)
            if cached is None:
                cached = self.encode_image(image)
                self.feature_cache.put(image.key, cached)
            features.append(cached)
        return features

    def vision_inputs(self, image: PreparedImage) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """The vision encoder's feed for one image (the inputs its graph declares) and the order that
        restores its merged features to raster order (None without window attention)."""
        feeds = vision_feeds(image.pixel_values, image.grid_thw, self.manifest.vision)
        inputs = {io.VISION_PIXEL_VALUES: feeds.pixel_values, io.VISION_ROTARY_COS: feeds.rotary_cos,
                  io.VISION_ROTARY_SIN: feeds.rotary_sin, io.VISION_WINDOW_GATHER: feeds.window_gather,
                  io.VISION_WINDOW_BIAS: feeds.window_bias, io.VISION_WINDOW_SCATTER: feeds.window_scatter}
        inputs = {k: v for k, v in inputs.items() if k in self._vision_inputs and v is not None}
        missing = sorted(self._vision_inputs - inputs.keys())
        if missing:  # e.g. window_ids: a bundle exported before windowed attention
            raise BundleError(f"{self.bundle_dir}: the vision graph takes {', '.join(missing)}, which this gemvg "
                              "does not feed; re-export the bundle")
        return inputs, feeds.restore_order

    def encode_image(self, image: PreparedImage) -> np.ndarray:
        inputs, restore_order = self.vision_inputs(image)
        (merged,) = self.vision.run(None, inputs)
        return merged if restore_order is None else merged[restore_order]

    def embed_prompt(self, prompt: Prompt, features: list[np.ndarray | None], start: int = 0) -> np.ndarray:
        """Embeddings of prompt tokens from `start` on, image tokens replaced by their features."""
        (embeds,) = self.embed.run(None, {io.EMBED_INPUT_IDS: prompt.input_ids[None, start:]})
        for (span_start, span_end), image_features in zip(prompt.image_spans, features):
            if span_end > start:
                embeds[0, span_start - start:span_end - start] = image_features
        return embeds

    def step_feeds(self, embeds: np.ndarray, positions: np.ndarray, cache: KVCache) -> dict[str, np.ndarray]:
        """The decoder's inputs other than the cache buffers and rotary tables, for `embeds` (at M-RoPE
        `positions`, [3, 1, S]) following the cache's filled prefix; writes the new slots' rotary rows."""
        start, count = cache.length, embeds.shape[1]
        total = start + count
        if total > cache.capacity:
            raise InputError(f"KV cache of {cache.capacity} positions cannot hold {total}")
        self._rotary.fill(positions[:, 0], cache.rotary_cos[start:total], cache.rotary_sin[start:total])
        return {io.DECODER_INPUTS_EMBEDS: embeds,
                io.DECODER_CACHE_POSITIONS: np.arange(start, total, dtype=np.int64)[None],
                io.DECODER_SEQLENS_K: np.asarray([total - 1], np.int32),
                io.DECODER_TOTAL_SEQUENCE_LENGTH: np.asarray(total, np.int32)}

    def decoder_feeds(self, embeds: np.ndarray, positions: np.ndarray, cache: KVCache) -> dict[str, np.ndarray]:
        """All of the decoder's inputs for `embeds` following the cache's filled prefix."""
        feeds = self.step_feeds(embeds, positions, cache)
        for layer in range(len(cache.keys)):
            feeds[self._past_key_names[layer]] = cache.keys[layer]
            feeds[self._past_value_names[layer]] = cache.values[layer]
        feeds[io.DECODER_ROTARY_COS], feeds[io.DECODER_ROTARY_SIN] = cache.rotary_cos, cache.rotary_sin
        return feeds

    def run_decoder(self, embeds: np.ndarray, positions: np.ndarray, cache: KVCache) -> np.ndarray:
        """One decoder pass over `embeds` after the cached prefix; returns the last position's logits
        (a view of a reused buffer, valid until the next pass).

        The cache buffers are bound as both past inputs and present outputs (the attention op writes the
        new positions in place), and the logits go to a reused buffer: a step allocates no arrays. Those
        bindings are made once per cache (its 4 x layers buffers cost about 0.25 ms to bind, 2% of an int4
        step); a step binds only its embeddings and positions. One-token passes run on the bundle's step
        decoder when it has one (a weight-only graph; prompts stay on the static-INT8 one).
        """
        feeds = self.step_feeds(embeds, positions, cache)
        bound = self._passes[self.step_decoder if embeds.shape[1] == 1 else self.decoder]
        if bound.cache is None or bound.cache[0] is not cache or bound.cache[1] != cache.generation:
            self._bind_cache(bound, cache)
        for name, value in feeds.items():
            bound.binding.bind_cpu_input(name, value)
        bound.session.run_with_iobinding(bound.binding)
        cache.length += embeds.shape[1]
        return self._logits[0, -1]

    def _bind_cache(self, bound: "_BoundSession", cache: KVCache) -> None:
        """Bind the cache's buffers and rotary tables (by address: ONNX Runtime reads and writes them in
        place) and the logits. The binding keeps a reference to the cache, so the buffers outlive it."""
        binding = bound.binding
        for layer in range(len(cache.keys)):
            for past, present, array in ((self._past_key_names, self._present_key_names, cache.keys[layer]),
                                         (self._past_value_names, self._present_value_names, cache.values[layer])):
                binding.bind_input(past[layer], "cpu", 0, np.float32, list(array.shape), array.ctypes.data)
                _bind_output(binding, present[layer], array)
        for name, table in ((io.DECODER_ROTARY_COS, cache.rotary_cos), (io.DECODER_ROTARY_SIN, cache.rotary_sin)):
            binding.bind_input(name, "cpu", 0, np.float32, list(table.shape), table.ctypes.data)
        _bind_output(binding, io.DECODER_LOGITS, self._logits)
        bound.cache = (cache, cache.generation)

    def prefill(self, prompt: Prompt, features: list[np.ndarray | None], cache: KVCache) -> np.ndarray:
        """Run the prompt tokens the cache does not hold yet (all of them for a fresh cache)."""
        start = cache.length
        embeds = self.embed_prompt(prompt, features, start)
        return self.run_decoder(embeds, prompt.position_ids[:, None, start:], cache)

    def decode_one_token(self, token: int, position: int, cache: KVCache) -> np.ndarray:
        self._token[0, 0] = token
        self._position[:] = position
        (embeds,) = self.embed.run(None, {io.EMBED_INPUT_IDS: self._token})
        return self.run_decoder(embeds, self._position, cache)

    def new_cache(self, capacity: int) -> KVCache:
        text = self.manifest.text
        return KVCache(text.num_layers, capacity, text.num_kv_heads, text.head_dim)

    def cache_for(self, inputs: ModelInputs, capacity: int) -> KVCache:
        """A cache for this request: the last request's, cut to the prefix they share, or a new one."""
        prompt, keys = inputs.prompt, [image.key for image in inputs.images]
        last = self._last_prefix
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
        # Only images the reused prefix does not cover need features.
        needed = [end > cache.length for _, end in prompt.image_spans]
        fresh = self.encode_images([image for image, need in zip(inputs.images, needed) if need])
        features = [fresh.pop(0) if need else None for need in needed]
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
        self._last_prefix = PrefixState(prompt.input_ids, [image.key for image in inputs.images],
                                        prompt.image_spans, cache)

        text = self.decode_text(tokens)
        geometries = [image.geometry for image in inputs.images]
        boxes = parse_answer(text, self.manifest.family, geometries)
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
        forced = forced_continuation(self.decode_text(tokens), self.manifest.family, mode)
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


def _bind_output(binding: ort.IOBinding, name: str, array: np.ndarray) -> None:
    binding.bind_output(name, "cpu", 0, np.float32, list(array.shape), array.ctypes.data)


def _lap(start: float) -> float:
    return (time.perf_counter() - start) * 1e3
