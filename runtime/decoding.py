"""Decoder passes over a KV cache: the cache's buffers, their IO bindings, and one pass's feeds.

Everything a pass writes belongs to its `KVCache` (keys, values, rotary tables, logits and the IO
bindings that point at them), so requests with their own caches run passes concurrently on one shared
session: ONNX Runtime's `run_with_iobinding` is thread-safe across bindings, an IOBinding is not.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from . import bundle_io as io
from .errors import BundleError, InputError
from .manifest import Manifest
from .rotary import MRopeAngles


class KVCache:
    """Preallocated key/value buffers, [1, kv_heads, capacity, head_dim] per layer, the rotary tables
    [capacity, head_dim / 2] (cos and sin of the angles of the token in each slot), and the logits of the
    last pass [1, 1, vocab].

    The decoder's attention reads the first `length` positions and writes the new ones in place (its
    past and present tensors are the same buffer), so nothing is concatenated or reallocated per token.
    One request uses a cache at a time.
    """

    def __init__(self, num_layers: int, capacity: int, kv_heads: int, head_dim: int, vocab_size: int):
        self.keys = [np.zeros((1, kv_heads, capacity, head_dim), np.float32) for _ in range(num_layers)]
        self.values = [np.zeros((1, kv_heads, capacity, head_dim), np.float32) for _ in range(num_layers)]
        self.rotary_cos = np.zeros((capacity, head_dim // 2), np.float32)
        self.rotary_sin = np.zeros((capacity, head_dim // 2), np.float32)
        self.logits = np.zeros((1, 1, vocab_size), np.float32)
        self.length = 0
        self.capacity = capacity
        # IO bindings of these buffers, one per decoder session, made at the cache's first pass on it.
        self.bindings: dict[ort.InferenceSession, ort.IOBinding] = {}

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.keys + self.values) + self.rotary_cos.nbytes * 2 + self.logits.nbytes

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
        self.bindings.clear()  # they point at the old buffers


class DecoderPasses:
    """Feeds and runs one decoder pass over new tokens after a cache's filled prefix."""

    def __init__(self, manifest: Manifest, where: str):
        layers = range(manifest.text.num_layers)
        # The bundle's decoder I/O naming convention (bundle_io; the native runtime uses the same).
        self.past_key_names = [io.past_key(i) for i in layers]
        self.past_value_names = [io.past_value(i) for i in layers]
        self.present_key_names = [io.present_key(i) for i in layers]
        self.present_value_names = [io.present_value(i) for i in layers]
        names = self.past_key_names + self.past_value_names + self.present_key_names + self.present_value_names
        declared = set(manifest.decoder_graph.inputs) | set(manifest.decoder_graph.outputs)
        missing = [n for n in names + list(io.DECODER_STEP_INPUTS)
                   + [io.DECODER_ROTARY_COS, io.DECODER_ROTARY_SIN, io.DECODER_LOGITS] if n not in declared]
        self.deepstack_layers = len(manifest.vision.deepstack_layers)
        # DeepStack's input of a one-token step (generated text: zeros), made once, never written.
        self.no_deepstack = np.zeros((self.deepstack_layers, 1, 1, manifest.text.hidden_size), np.float32)
        self.no_deepstack.flags.writeable = False
        if self.deepstack_layers and io.DECODER_DEEPSTACK_EMBEDS not in declared:
            missing.append(io.DECODER_DEEPSTACK_EMBEDS)
        if missing:
            raise BundleError(f"{where}: decoder graph lacks {missing[0]} (manifest and graph disagree)")
        self.text = manifest.text
        self.rotary = MRopeAngles(manifest.text)

    def new_cache(self, capacity: int) -> KVCache:
        text = self.text
        return KVCache(text.num_layers, capacity, text.num_kv_heads, text.head_dim, text.vocab_size)

    def step_feeds(self, embeds: np.ndarray, positions: np.ndarray, cache: KVCache,
                   deepstack: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The decoder's inputs other than the cache buffers and rotary tables, for `embeds` (at M-RoPE
        `positions`, [3, 1, S]) following the cache's filled prefix; writes the new slots' rotary rows.
        A DeepStack decoder gets `deepstack` ([layers, 1, S, hidden]), zeros when None (text tokens)."""
        start, count = cache.length, embeds.shape[1]
        total = start + count
        if total > cache.capacity:
            raise InputError(f"KV cache of {cache.capacity} positions cannot hold {total}")
        self.rotary.fill(positions[:, 0], cache.rotary_cos[start:total], cache.rotary_sin[start:total])
        feeds = {io.DECODER_INPUTS_EMBEDS: embeds,
                 io.DECODER_CACHE_POSITIONS: np.arange(start, total, dtype=np.int64)[None],
                 io.DECODER_SEQLENS_K: np.asarray([total - 1], np.int32),
                 io.DECODER_TOTAL_SEQUENCE_LENGTH: np.asarray(total, np.int32)}
        if self.deepstack_layers:
            if deepstack is None:
                deepstack = self.no_deepstack if count == 1 else \
                    np.zeros((self.deepstack_layers, 1, count, embeds.shape[2]), np.float32)
            feeds[io.DECODER_DEEPSTACK_EMBEDS] = deepstack
        return feeds

    def decoder_feeds(self, embeds: np.ndarray, positions: np.ndarray, cache: KVCache,
                      deepstack: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """All of the decoder's inputs for `embeds` following the cache's filled prefix."""
        feeds = self.step_feeds(embeds, positions, cache, deepstack)
        for layer in range(len(cache.keys)):
            feeds[self.past_key_names[layer]] = cache.keys[layer]
            feeds[self.past_value_names[layer]] = cache.values[layer]
        feeds[io.DECODER_ROTARY_COS], feeds[io.DECODER_ROTARY_SIN] = cache.rotary_cos, cache.rotary_sin
        return feeds

    def run(self, session: ort.InferenceSession, embeds: np.ndarray, positions: np.ndarray,
            cache: KVCache, deepstack: np.ndarray | None = None) -> np.ndarray:
        """One pass of `session` over `embeds` after the cached prefix; returns the last position's logits
        (a view of the cache's logits buffer, valid until its next pass).

        The cache buffers are bound as both past inputs and present outputs (the attention op writes the
        new positions in place), and the logits go to the cache's buffer: a step allocates no arrays.
        Those bindings are made once per cache and session (its 4 x layers buffers cost about 0.25 ms to
        bind, 2% of an int4 step); a step binds only its embeddings and positions.
        """
        feeds = self.step_feeds(embeds, positions, cache, deepstack)
        binding = cache.bindings.get(session)
        if binding is None:
            binding = cache.bindings[session] = self._bind_cache(session, cache)
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        session.run_with_iobinding(binding)
        cache.length += embeds.shape[1]
        return cache.logits[0, -1]

    def _bind_cache(self, session: ort.InferenceSession, cache: KVCache) -> ort.IOBinding:
        """A binding of the cache's buffers, rotary tables and logits (by address: ONNX Runtime reads and
        writes them in place). The cache keeps the binding, so the buffers outlive it."""
        binding = session.io_binding()
        for layer in range(len(cache.keys)):
            for past, present, array in ((self.past_key_names, self.present_key_names, cache.keys[layer]),
                                         (self.past_value_names, self.present_value_names, cache.values[layer])):
                binding.bind_input(past[layer], "cpu", 0, np.float32, list(array.shape), array.ctypes.data)
                _bind_output(binding, present[layer], array)
        for name, table in ((io.DECODER_ROTARY_COS, cache.rotary_cos), (io.DECODER_ROTARY_SIN, cache.rotary_sin)):
            binding.bind_input(name, "cpu", 0, np.float32, list(table.shape), table.ctypes.data)
        _bind_output(binding, io.DECODER_LOGITS, cache.logits)
        return binding


def _bind_output(binding: ort.IOBinding, name: str, array: np.ndarray) -> None:
    binding.bind_output(name, "cpu", 0, np.float32, list(array.shape), array.ctypes.data)
