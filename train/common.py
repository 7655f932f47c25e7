"""What SFT and GRPO runs share: inputs checked up front, trainer defaults, export-ready saving, curves."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from gemvg.runtime.families import Family

from .checkpoint import ResizeSettings, build_export_checkpoint, checkpoint_family, copy_companion_files
from .config import ConfigError, RunConfig
from .curves import save_curves
from .dataset import RowOptions, build_dataset
from .hybrid import HybridPolicy
from .schema import DataError, read_jsonl


@dataclass
class RunInputs:
    family: Family
    resize: ResizeSettings
    policy: HybridPolicy
    samples: list


def check_inputs(model_dir: str | Path, data_path: str | Path, config: RunConfig) -> RunInputs:
    """Everything that can be wrong with the user's input, found before torch or a trainer starts."""
    family = checkpoint_family(model_dir)
    resize = ResizeSettings.from_checkpoint(model_dir)
    samples = read_jsonl(data_path)
    if not samples:
        raise DataError(f"{data_path}: no samples")
    for sample in samples:  # a missing image would otherwise surface as a traceback deep inside a batch
        for image in sample.images:
            if not os.path.isfile(image):
                raise DataError(f"{sample.source}: image not found: {image}")
    try:
        policy = HybridPolicy.from_config(config.hybrid, seed=config.seed)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"bad hybrid section: {err}") from err
    return RunInputs(family, resize, policy, samples)


def dataset_for(inputs: RunInputs, with_completion: bool):
    options = RowOptions(syntax=inputs.family.box_syntax, policy=inputs.policy, resize=inputs.resize,
                         with_completion=with_completion)
    return build_dataset(inputs.samples, options)


def describe_run(stage: str, model_dir, data_path, inputs: RunInputs, dataset, config: RunConfig) -> str:
    """One line on what is about to be trained; the modes are the effective ones (after SFT's fallbacks)."""
    modes = ", ".join(f"{mode} {count}" for mode, count in sorted(Counter(dataset["mode"]).items()))
    lora = f", LoRA r={config.lora.r}" if config.lora.enabled else ""
    return (f"gemvg-train {stage}: {len(dataset)} samples from {data_path} ({modes}), "
            f"model {model_dir} ({inputs.family.model_type}){lora}")


def trainer_args(config_cls, output_dir: str | Path, config: RunConfig, max_steps: int | None, defaults: dict):
    """TRL's config from our defaults, then the file's `trainer` section, then the command line."""
    import torch

    values = {
        "output_dir": str(output_dir),
        "seed": config.seed,
        "logging_steps": 1,  # reward curves want every step; GRPO logs are cheap
        "report_to": "none",
        "bf16": bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported()),
        **defaults,
        **config.trainer,
    }
    if max_steps is not None:
        values["max_steps"] = max_steps
    try:
        return config_cls(**values)
    except TypeError as err:
        raise ConfigError(f"bad trainer section: {err}") from err
    except ValueError as err:
        raise ConfigError(f"bad trainer settings: {err}".replace("\n", " ")) from err


def export_ready_callback(base_dir: str | Path):
    """Make each periodic checkpoint-N of a full fine-tune exportable too (the base's tokenizer/processor files)."""
    from transformers import TrainerCallback

    class ExportReadyCheckpoints(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if (checkpoint / "config.json").is_file():  # full weights, not a LoRA adapter
                copy_companion_files(base_dir, checkpoint)

    return ExportReadyCheckpoints()


def latest_checkpoint(output_dir: str | Path) -> str | None:
    """The newest `checkpoint-N` a stopped run left in `output_dir` (to resume from), or None."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    return str(max(found, key=lambda p: int(p.name.split("-")[-1]))) if found else None


def finish(trainer, base_dir: str | Path, output_dir: str | Path, curve_name: str, keep) -> Path:
    """Save the merged, export-ready model into `output_dir`, with the curves and the raw log history."""
    out = Path(output_dir)
    staging = out / "trainer-final"
    trainer.save_model(str(staging))
    trainer.accelerator.wait_for_everyone()
    if trainer.accelerator.is_main_process:
        build_export_checkpoint(staging, base_dir, out)
        shutil.rmtree(staging)
        history = trainer.state.log_history
        (out / "log_history.json").write_text(json.dumps(history, indent=1))
        save_curves(history, out, curve_name, keep)
    return out
