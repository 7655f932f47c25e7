"""GRPO with TRL's GRPOTrainer, as it is, and the grounding rewards (format + Hungarian-IoU accuracy).

Each prompt is CoT or direct by the hybrid policy; the `mode` column tells the format reward which
shape to expect. Generation is TRL's (transformers `generate` by default; `use_vllm: true` in the
trainer section for scale, see train/README.md).
"""

from __future__ import annotations

from pathlib import Path

from .common import (RunInputs, check_inputs, dataset_for, describe_run, export_ready_callback, finish,
                     latest_checkpoint, trainer_args)
from .config import ConfigError, RunConfig
from .curves import is_reward_metric
from .rewards import REWARD_FUNCTIONS

GRPO_DEFAULTS = {
    "learning_rate": 1e-6,
    "max_completion_length": 256,
}


def reward_setup(weights: dict) -> tuple[list, list[float]]:
    """The reward functions with a non-zero weight, and their weights, in a fixed order."""
    unknown = set(weights) - set(REWARD_FUNCTIONS)
    if unknown:
        raise ConfigError(f"unknown rewards {', '.join(sorted(unknown))}; expected {', '.join(REWARD_FUNCTIONS)}")
    chosen = [(REWARD_FUNCTIONS[name], float(weights[name])) for name in REWARD_FUNCTIONS
              if float(weights.get(name, 0.0)) != 0.0]
    if not chosen:
        raise ConfigError("all reward weights are 0")
    return [func for func, _ in chosen], [weight for _, weight in chosen]


def run_grpo(model_dir: str | Path, data_path: str | Path, output_dir: str | Path, config: RunConfig,
             max_steps: int | None = None, inputs: RunInputs | None = None, resume: bool = False) -> Path:
    inputs = inputs or check_inputs(model_dir, data_path, config)
    funcs, weights = reward_setup(config.rewards)
    from trl import GRPOConfig, GRPOTrainer

    from .checkpoint import freeze_parameters, load_model, load_processor

    args = trainer_args(GRPOConfig, output_dir, config, max_steps, {**GRPO_DEFAULTS, "reward_weights": weights})
    dataset = dataset_for(inputs, with_completion=False)
    print(describe_run("grpo", model_dir, data_path, inputs, dataset, config), flush=True)
    model = load_model(model_dir, config.model_dtype)
    freeze_parameters(model, config.freeze)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=funcs,
        args=args,
        train_dataset=dataset,
        processing_class=load_processor(model_dir),
        peft_config=config.lora.peft_config(),
        callbacks=[export_ready_callback(model_dir)],
    )
    trainer.train(resume_from_checkpoint=latest_checkpoint(output_dir) if resume else None)
    return finish(trainer, model_dir, output_dir, "reward_curves", is_reward_metric)
