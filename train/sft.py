"""Supervised fine-tuning on grounding answers with TRL's SFTTrainer, as it is.

Prompt-completion rows (images + instruction -> answer in the family's box syntax), loss on the
completion only (`completion_only_loss`), CoT and direct answers mixed by the hybrid policy: GeM-VG's
short-answer SFT is `cot_ratio: 0`, its CoT-SFT stage a ratio above 0 on data with reasoning text.
"""

from __future__ import annotations

from pathlib import Path

from .common import (RunInputs, check_inputs, dataset_for, describe_run, export_ready_callback, finish,
                     latest_checkpoint, trainer_args)
from .config import RunConfig
from .curves import is_loss_metric

SFT_DEFAULTS = {
    "completion_only_loss": True,
    # Truncating a multimodal prompt cuts image tokens away from their pixels: never truncate silently.
    "max_length": None,
    "learning_rate": 1e-5,
}


def run_sft(model_dir: str | Path, data_path: str | Path, output_dir: str | Path, config: RunConfig,
            max_steps: int | None = None, inputs: RunInputs | None = None, resume: bool = False) -> Path:
    inputs = inputs or check_inputs(model_dir, data_path, config)
    from trl import SFTConfig, SFTTrainer

    from .checkpoint import freeze_parameters, load_model, load_processor

    args = trainer_args(SFTConfig, output_dir, config, max_steps, SFT_DEFAULTS)
    dataset = dataset_for(inputs, with_completion=True)
    print(describe_run("sft", model_dir, data_path, inputs, dataset, config), flush=True)
    model = load_model(model_dir, config.model_dtype)
    freeze_parameters(model, config.freeze)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=load_processor(model_dir),
        peft_config=config.lora.peft_config(),
        callbacks=[export_ready_callback(model_dir)],
    )
    trainer.train(resume_from_checkpoint=latest_checkpoint(output_dir) if resume else None)
    return finish(trainer, model_dir, output_dir, "loss_curve", is_loss_metric)
