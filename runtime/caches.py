"""What an engine keeps between requests: vision features by image content, and the last prompt's prefix.

Both are shared by every thread that uses the engine, so each guards itself with a lock, and both are
bounded: the feature cache in entries and in bytes, the prefix store to one request's KV cache.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from .decoding import KVCache

FEATURE_CACHE_ENTRIES = 32
FEATURE_CACHE_BYTES = 256 << 20


class FeatureCache:
    """LRU of vision features keyed by image content, bounded in entries and bytes: a follow-up on the
    same frames skips vision. Entries are read-only arrays, shared by the requests that use them."""

    def __init__(self, capacity: int = FEATURE_CACHE_ENTRIES, max_bytes: int = FEATURE_CACHE_BYTES):
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, np.ndarray] = OrderedDict()
        self.bytes = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> np.ndarray | None:
        with self._lock:
            if key in self.entries:
                self.entries.move_to_end(key)
                return self.entries[key]
            return None

    def put(self, key: str, features: np.ndarray) -> None:
        if features.nbytes > self.max_bytes:
            return  # larger than the whole cache: keeping it would only evict everything else
        features.flags.writeable = False
        with self._lock:
            old = self.entries.pop(key, None)
            if old is not None:
                self.bytes -= old.nbytes
            self.entries[key] = features
            self.bytes += features.nbytes
            while len(self.entries) > self.capacity or self.bytes > self.max_bytes:
                self.bytes -= self.entries.popitem(last=False)[1].nbytes

    def clear(self) -> None:
        with self._lock:
            self.entries.clear()
            self.bytes = 0


@dataclass
class PrefixState:
    """A finished request's prompt and cache: a request that starts the same way reuses its keys/values."""

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


class PrefixStore:
    """The last finished request's prefix, handed to at most one request at a time.

    A request *takes* the stored prefix (its cache is then that request's alone: it overwrites the
    positions after the shared part) and *puts* its own back when it has finished. A concurrent request
    that finds the store empty starts from a new cache, so no two requests ever write one cache, and a
    request that fails midway leaves no half-written cache behind. Memory: one stored cache at most.
    """

    def __init__(self):
        self._last: PrefixState | None = None
        self._lock = threading.Lock()

    def take(self) -> PrefixState | None:
        with self._lock:
            last, self._last = self._last, None
            return last

    def put(self, state: PrefixState) -> None:
        with self._lock:
            self._last = state

    def clear(self) -> None:
        with self._lock:
            self._last = None
