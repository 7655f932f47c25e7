"""Run configuration: a YAML file whose `trainer` section goes to TRL's SFTConfig / GRPOConfig unchanged.

    seed: 0
    model_dtype: float32          # weights as loaded; float32 | bfloat16 | float16 | auto
    trainer: {learning_rate: 1.0e-5, per_device_train_batch_size: 4, ...}   # any SFTConfig/GRPOConfig field
    lora: {enabled: true, r: 16, alpha: 32, dropout: 0.05, target_modules: ...}
    hybrid: {cot_ratio: 0.5, task_modes: {counting: cot, referential_retrieval: direct}}
    rewards: {format: 1.0, accuracy: 1.0}   # GRPO reward weights; 0 drops a reward
    freeze: ["^model\\.visual\\."]        # parameters (regex on their names) kept as loaded

Command-line flags (--max-steps, --lora, --seed) override the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .schema import DataError

# Only the language model's projections: the vision tower of Qwen2.5-VL uses the same MLP names.
DEFAULT_LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
TOP_LEVEL_KEYS = {"seed", "model_dtype", "trainer", "lora", "hybrid", "rewards", "freeze"}


class ConfigError(DataError):
    """A config file that is missing, not YAML, or has unknown keys."""


@dataclass
class LoraSettings:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str | list[str] = DEFAULT_LORA_TARGETS

    def peft_config(self):
        if not self.enabled:
            return None
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=self.target_modules, task_type="CAUSAL_LM")


@dataclass
class RunConfig:
    seed: int = 0
    model_dtype: str = "float32"
    trainer: dict = field(default_factory=dict)
    lora: LoraSettings = field(default_factory=LoraSettings)
    hybrid: dict = field(default_factory=dict)
    rewards: dict = field(default_factory=lambda: {"format": 1.0, "accuracy": 1.0})
    freeze: list[str] = field(default_factory=list)


def load_config(path: str | Path | None) -> RunConfig:
    if path is None:
        return RunConfig()
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML ({err})".replace("\n", " ")) from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    unknown = set(data) - TOP_LEVEL_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown keys {', '.join(sorted(unknown))}; expected {', '.join(sorted(TOP_LEVEL_KEYS))}")
    lora = data.get("lora") or {}
    try:
        lora_settings = LoraSettings(**lora)
    except TypeError as err:
        raise ConfigError(f"{path}: bad lora section ({err})") from err
    rewards = data.get("rewards")
    return RunConfig(
        seed=int(data.get("seed", 0)),
        model_dtype=str(data.get("model_dtype", "float32")),
        trainer=dict(data.get("trainer") or {}),
        lora=lora_settings,
        hybrid=dict(data.get("hybrid") or {}),
        rewards=dict(rewards) if rewards is not None else {"format": 1.0, "accuracy": 1.0},
        freeze=[str(pattern) for pattern in data.get("freeze") or []],
    )
