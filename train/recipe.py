"""The demo model's recipe in one command: base model, curriculum SFT stages, GRPO, held-out scores.

    gemvg-train recipe --out runs/demo [--scale 0.1]

Every step is resumable: a stage whose merged model is already in its folder is skipped, and a stage
that was stopped resumes from its newest `checkpoint-N`. Data is written once per stage (training
seed 0) plus a held-out set per stage (seed 1000, never trained on); each finished stage writes
`eval.json` with its held-out scores. `--scale` multiplies every step and sample count (tests, dry runs).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

TRAIN_SEED, HELD_OUT_SEED = 0, 1000
CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class StagePlan:
    stage: str  # a curriculum.STAGES name
    samples: int
    steps: int


# Not yet run to the end (train/README.md): at the 0.8-2 s a step measured on two shared cores, its
# 3800 SFT steps are one to two hours. Its first stage, run alone, did not learn to localize.
SFT_PLAN = (
    StagePlan("single", 8000, 1200),
    StagePlan("distractors", 8000, 600),
    StagePlan("multi", 16000, 2000),
)
GRPO_PLAN = StagePlan("multi", 16000, 30)
HELD_OUT_SAMPLES = 200
STAGE_EVAL_SAMPLES = 100  # the stages before the last are checked on fewer samples (progress, not the result)
PROMPT_MODE = "raw"  # demo_sft.yaml's hybrid.plain_mode: the model is asked with the query alone


def _done(folder: Path) -> bool:
    return (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()


def _data(out: Path, stage: str, samples: int, seed: int) -> Path:
    from .curriculum import write_stage

    folder = out / "data" / f"{stage}-seed{seed}"
    jsonl = folder / "data.jsonl"
    if not jsonl.is_file():
        print(f"[recipe] writing {samples} {stage} samples (seed {seed}) to {folder}", flush=True)
        write_stage(folder, stage, samples, seed)
    return jsonl


def _evaluate(model_dir: Path, held_out: Path, limit: int) -> None:
    from .evaluate import evaluate
    from .schema import read_jsonl

    target = model_dir / "eval.json"
    if target.is_file():
        return
    scores = evaluate(read_jsonl(held_out)[:limit], model_dir=model_dir, mode=PROMPT_MODE, out_json=target)
    print(f"[recipe] {model_dir.name} held out: {scores.line()}", flush=True)


def run_recipe(out: str | Path, scale: float = 1.0) -> Path:
    """Train the demo model into `out`; returns the folder of the final (GRPO) model."""
    from .config import load_config
    from .curriculum import make_base_model
    from .grpo import run_grpo
    from .sft import run_sft

    out = Path(out)
    sized = lambda n: max(1, round(n * scale))  # noqa: E731
    model = out / "base"
    if not _done(model):
        print(f"[recipe] building the from-scratch base model in {model}", flush=True)
        make_base_model(model)
    for plan in SFT_PLAN:
        data = _data(out, plan.stage, sized(plan.samples), TRAIN_SEED)
        held_out = _data(out, plan.stage, sized(HELD_OUT_SAMPLES), HELD_OUT_SEED)
        stage_dir = out / f"sft-{plan.stage}"
        if not _done(stage_dir):
            print(f"[recipe] SFT stage {plan.stage}: {sized(plan.steps)} steps from {model}", flush=True)
            run_sft(model, data, stage_dir, load_config(CONFIG_DIR / "demo_sft.yaml"), sized(plan.steps), resume=True)
        last = plan is SFT_PLAN[-1]
        _evaluate(stage_dir, held_out, sized(HELD_OUT_SAMPLES if last else STAGE_EVAL_SAMPLES))
        model = stage_dir
    data = _data(out, GRPO_PLAN.stage, sized(GRPO_PLAN.samples), TRAIN_SEED)
    held_out = _data(out, GRPO_PLAN.stage, sized(HELD_OUT_SAMPLES), HELD_OUT_SEED)
    grpo_dir = out / "grpo"
    if not _done(grpo_dir):
        print(f"[recipe] GRPO: {sized(GRPO_PLAN.steps)} steps from {model}", flush=True)
        run_grpo(model, data, grpo_dir, load_config(CONFIG_DIR / "demo_grpo.yaml"), sized(GRPO_PLAN.steps),
                 resume=True)
    _evaluate(grpo_dir, held_out, sized(HELD_OUT_SAMPLES))
    (out / "recipe.json").write_text(json.dumps({"scale": scale, "sft": [asdict(p) for p in SFT_PLAN],
                                                 "grpo": asdict(GRPO_PLAN)}, indent=1))
    print(f"[recipe] done: {grpo_dir}", file=sys.stderr, flush=True)
    return grpo_dir

