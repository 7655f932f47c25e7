"""Hybrid prompting: each sample is asked for a chain of thought or a direct answer (GeM-VG, UniVG-R1).

The choice is a pure function of the sample and the seed (a hash, not a random stream), so it does not
depend on dataset order, shuffling or worker count, and SFT and GRPO agree on a sample's mode.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from .schema import Sample

MODES = ("cot", "direct")


@dataclass(frozen=True)
class HybridPolicy:
    """`task_modes` fixes the mode of some task types; every other sample is CoT with probability `cot_ratio`,
    else `plain_mode`: "direct" (the query and the box-syntax instructions) or "raw" (the query alone:
    a model trained from scratch needs no instructions, and the short prompt makes each step cheaper)."""

    cot_ratio: float = 0.5
    task_modes: dict[str, str] = field(default_factory=dict)
    seed: int = 0
    plain_mode: str = "direct"

    def __post_init__(self) -> None:
        if not 0.0 <= self.cot_ratio <= 1.0:
            raise ValueError(f"cot_ratio must be within 0..1, got {self.cot_ratio}")
        if self.plain_mode not in ("direct", "raw"):
            raise ValueError(f"plain_mode must be direct or raw, got {self.plain_mode!r}")
        for task, mode in self.task_modes.items():
            if mode not in MODES:
                raise ValueError(f"task_modes[{task!r}] must be one of {', '.join(MODES)}, got {mode!r}")

    @classmethod
    def from_config(cls, config: dict | None, seed: int = 0) -> "HybridPolicy":
        config = dict(config or {})
        return cls(cot_ratio=float(config.get("cot_ratio", 0.5)), task_modes=dict(config.get("task_modes") or {}),
                   seed=int(config.get("seed", seed)), plain_mode=str(config.get("plain_mode", "direct")))

    def mode_for(self, sample: Sample) -> str:
        if sample.task in self.task_modes:
            return self.task_modes[sample.task]
        key = "\x1f".join([str(self.seed), sample.task, sample.query, *sample.images]).encode()
        draw = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64
        return "cot" if draw < self.cot_ratio else self.plain_mode
