"""Training end to end on the tiny checkpoint: synth -> SFT -> GRPO -> gemvg-export -> gemvg ground.

Plus what the trainers are fed (TRL's own collator on our rows: multi-image, loss on the answer only),
the shipped configs, and bad input at the CLI.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gemvg.export.checkpoints import make_checkpoint
from gemvg.runtime.grounding import build_instruction, format_answer
from gemvg.train.cli import main
from gemvg.train.config import load_config
from gemvg.train.schema import read_jsonl

BIN = Path(sys.executable).parent
CONFIGS = Path(__file__).resolve().parents[1] / "train" / "configs"
TINY_CONFIG = """
trainer:
  per_device_train_batch_size: 2
  gradient_checkpointing: false
  save_strategy: "no"
  dataloader_pin_memory: false
{extra}
lora: {{r: 4, alpha: 8}}
hybrid:
  cot_ratio: 0.0
  task_modes: {{referential_retrieval: cot, multi_target: cot}}
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train")
    base = make_checkpoint(root / "base", "qwen2_vl", "tiny", seed=0)
    assert main(["synth", "--out", str(root / "data"), "--num-samples", "4", "--seed", "0"]) == 0
    sft_config = root / "sft.yaml"
    sft_config.write_text(TINY_CONFIG.format(extra=""))
    grpo_config = root / "grpo.yaml"
    # GRPO also saves a periodic checkpoint, which must come out export-ready too.
    grpo_config.write_text(TINY_CONFIG.format(extra="  num_generations: 2\n  max_completion_length: 8")
                           .replace('save_strategy: "no"', "save_strategy: steps\n  save_steps: 2"))
    return {"root": root, "base": base, "data": root / "data" / "data.jsonl", "sft_config": sft_config,
            "grpo_config": grpo_config}


def _series(path: Path) -> dict[str, list[list[float]]]:
    return json.loads(path.read_text())


def _weights(checkpoint: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(checkpoint / "model.safetensors")


EXPORT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                "preprocessor_config.json", "generation_config.json")


def test_trl_collator_on_our_rows_multi_image_answer_only_loss(workspace):
    """TRL's own vision collator on our SFT rows: every image's tokens present, labels = the answer only."""
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    from gemvg.train.checkpoint import load_processor
    from gemvg.train.common import check_inputs, dataset_for

    inputs = check_inputs(workspace["base"], workspace["data"], load_config(workspace["sft_config"]))
    dataset = dataset_for(inputs, with_completion=True)
    processor = load_processor(workspace["base"])
    rows = [dataset[i] for i in range(len(dataset))]
    assert [r["mode"] for r in rows] == ["cot", "cot", "direct", "direct"]  # task_modes; no_target etc. direct
    answers = [r["completion"][0]["content"] for r in rows]
    prompts = [r["prompt"][0]["content"] for r in rows]
    modes = [r["mode"] for r in rows]
    batch = DataCollatorForVisionLanguageModeling(processor, completion_only_loss=True)(rows)
    samples = read_jsonl(workspace["data"])
    assert batch["image_grid_thw"].shape[0] == sum(len(s.images) for s in samples)
    pads = batch["input_ids"] == processor.image_token_id
    assert (batch["mm_token_type_ids"] == pads.long()).all()
    assert int(pads.sum()) == int(batch["image_grid_thw"].prod(dim=1).sum()) // 4
    for i, sample in enumerate(samples):
        labelled = processor.tokenizer.decode(batch["input_ids"][i][batch["labels"][i] != -100])
        assert labelled == answers[i] + "<|im_end|>\n"  # the loss sees the answer and its end token, nothing else
        geometries = _geometries(sample, inputs.resize)
        assert answers[i] == format_answer(sample.targets, "ref_tokens", geometries, modes[i], sample.reasoning)
        assert prompts[i] == build_instruction(sample.query, "ref_tokens", modes[i])
        prompt = processor.tokenizer.decode(batch["input_ids"][i][batch["attention_mask"][i] == 1])
        assert prompt.count("<|vision_start|>") == len(sample.images)


def _geometries(sample, resize):
    from gemvg.train.dataset import sample_geometries

    return sample_geometries(sample, resize)


def test_synth_sft_grpo_export_ground(workspace, capsys):
    root, base = workspace["root"], workspace["base"]
    sft_out, grpo_out, bundle = root / "sft", root / "grpo", root / "bundle"

    assert main(["sft", "--model", str(base), "--data", str(workspace["data"]), "--output", str(sft_out),
                 "--max-steps", "2", "--config", str(workspace["sft_config"]), "--lora"]) == 0
    logs = capsys.readouterr()
    assert "4 samples" in logs.out and "cot 2, direct 2" in logs.out and "LoRA r=4" in logs.out
    assert "'loss'" in logs.out + logs.err  # TRL's per-step log lines
    for name in EXPORT_FILES + ("loss_curve.json", "loss_curve.png", "log_history.json"):
        assert (sft_out / name).is_file(), name
    assert not (sft_out / "adapter_config.json").exists() and not (sft_out / "processor_config.json").exists()
    assert [p[0] for p in _series(sft_out / "loss_curve.json")["loss"]] == [1, 2]
    for name in ("tokenizer.json", "chat_template.jinja", "preprocessor_config.json", "generation_config.json"):
        assert (sft_out / name).read_bytes() == (base / name).read_bytes(), name
    before, after = _weights(base), _weights(sft_out)
    assert before.keys() == after.keys()
    changed = {k for k in before if not (before[k] == after[k]).all()}
    # LoRA on the language model's projections, merged: exactly those weights moved, the vision tower did not.
    assert changed and all(".language_model." in k or k.startswith("model.layers.") for k in changed)
    assert all(k.rsplit(".", 2)[-2] in {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
               for k in changed)

    assert main(["grpo", "--model", str(sft_out), "--data", str(workspace["data"]), "--output", str(grpo_out),
                 "--max-steps", "2", "--config", str(workspace["grpo_config"])]) == 0
    logs = capsys.readouterr()
    assert "rewards/format_reward/mean" in logs.out + logs.err
    curves = _series(grpo_out / "reward_curves.json")
    for metric in ("reward", "rewards/format_reward/mean", "rewards/accuracy_reward/mean"):
        assert [p[0] for p in curves[metric]] == [1, 2], metric
        assert all(0.0 <= p[1] <= 2.0 for p in curves[metric])
    assert (grpo_out / "reward_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for folder in (grpo_out, grpo_out / "checkpoint-2"):
        for name in EXPORT_FILES:
            assert (folder / name).is_file(), (folder, name)
        assert not (folder / "processor_config.json").exists()
        assert (folder / "tokenizer_config.json").read_bytes() == (base / "tokenizer_config.json").read_bytes()
    assert not (grpo_out / "trainer-final").exists()

    export = subprocess.run([str(BIN / "gemvg-export"), "--model", str(grpo_out), "--out", str(bundle)],
                            capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stderr[-2000:]
    images = read_jsonl(workspace["data"])[0].images
    ground = subprocess.run([str(BIN / "gemvg"), "ground", "--bundle", str(bundle), *sum([["--image", p] for p in images], []),
                             "--query", "find the red circle", "--json", "--max-new-tokens", "8"],
                            capture_output=True, text=True, timeout=120)
    assert ground.returncode == 0, ground.stderr[-2000:]
    result = json.loads(ground.stdout)
    assert isinstance(result["boxes"], list) and isinstance(result["text"], str) and len(result["token_ids"]) >= 1


def test_qwen3_vl_trains_on_its_own_syntax_and_exports(workspace, tmp_path, capsys):
    """A Qwen3-VL checkpoint through TRL's SFT and GRPO trainers: rows in its JSON 0-1000 syntax (read from
    the family), rewards parsing it, and the trained checkpoint exports and grounds."""
    from gemvg.train.common import check_inputs, dataset_for

    base = make_checkpoint(tmp_path / "base", "qwen3_vl", "tiny", seed=0)
    inputs = check_inputs(base, workspace["data"], load_config(workspace["sft_config"]))
    rows = dataset_for(inputs, with_completion=True)
    assert set(rows["syntax"]) == {"json_relative"} and all("```json" in r[0]["content"] for r in rows["completion"])

    sft_out, grpo_out, bundle = tmp_path / "sft", tmp_path / "grpo", tmp_path / "bundle"
    assert main(["sft", "--model", str(base), "--data", str(workspace["data"]), "--output", str(sft_out),
                 "--max-steps", "1", "--config", str(workspace["sft_config"])]) == 0
    assert main(["grpo", "--model", str(sft_out), "--data", str(workspace["data"]), "--output", str(grpo_out),
                 "--max-steps", "1", "--config", str(workspace["grpo_config"])]) == 0
    logs = capsys.readouterr()
    assert "(qwen3_vl)" in logs.out and "rewards/accuracy_reward/mean" in logs.out + logs.err
    before, after = _weights(base), _weights(grpo_out)
    assert any(not (before[k] == after[k]).all() for k in before), "training changed no weight"
    export = subprocess.run([str(BIN / "gemvg-export"), "--model", str(grpo_out), "--out", str(bundle)],
                            capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stderr[-2000:]
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert (manifest["family"], manifest["box_syntax"]) == ("qwen3_vl", "json_relative")


@pytest.mark.parametrize("name,trl_config", [("sft", "SFTConfig"), ("cot_sft", "SFTConfig"), ("grpo", "GRPOConfig"),
                                             ("demo_sft", "SFTConfig"), ("demo_grpo", "GRPOConfig")])
def test_shipped_configs_build_trl_configs(tmp_path, name, trl_config):
    import trl

    from gemvg.train.common import trainer_args
    from gemvg.train.grpo import GRPO_DEFAULTS
    from gemvg.train.sft import SFT_DEFAULTS

    config = load_config(CONFIGS / f"{name}.yaml")
    defaults = SFT_DEFAULTS if trl_config == "SFTConfig" else GRPO_DEFAULTS
    args = trainer_args(getattr(trl, trl_config), tmp_path, config, 7, defaults)
    assert args.max_steps == 7 and args.learning_rate == config.trainer["learning_rate"]
    assert config.hybrid and config.lora.r > 0


def test_bad_input_is_one_line_and_exit_2(workspace, tmp_path, capsys):
    base, data = str(workspace["base"]), str(workspace["data"])
    cases = [
        (["sft", "--model", base, "--data", str(tmp_path / "none.jsonl"), "--output", str(tmp_path / "o")],
         f"data file not found: {tmp_path / 'none.jsonl'}"),
        (["grpo", "--model", str(tmp_path / "nomodel"), "--data", data, "--output", str(tmp_path / "o")],
         f"model directory not found: {tmp_path / 'nomodel'}"),
        (["grpo", "--model", str(tmp_path), "--data", data, "--output", str(tmp_path / "o")],
         "has no config.json"),
        (["sft", "--model", base, "--data", data, "--output", str(tmp_path / "o"), "--config", str(tmp_path / "c.yaml")],
         "config file not found"),
        (["sft", "--model", base, "--data", data, "--output", base], "--output must not be the --model directory"),
        (["sft", "--model", base, "--data", str(tmp_path / "lost.jsonl"), "--output", str(tmp_path / "o")],
         "image not found: /nowhere/x.png"),
    ]
    (tmp_path / "lost.jsonl").write_text('{"images": ["/nowhere/x.png"], "query": "q"}\n')
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("gemvg-train: error: ") and message in err, err
    (tmp_path / "typo.yaml").write_text("trainer: {learning_rat: 1}\n")
    assert main(["sft", "--model", base, "--data", data, "--output", str(tmp_path / "o"),
                 "--config", str(tmp_path / "typo.yaml"), "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad trainer section" in err and "learning_rat" in err
    (tmp_path / "keys.yaml").write_text("trainr: {}\n")
    assert main(["grpo", "--model", base, "--data", data, "--output", str(tmp_path / "o"),
                 "--config", str(tmp_path / "keys.yaml")]) == 2
    assert "unknown keys trainr" in capsys.readouterr().err
    # The console script: no traceback either.
    run = subprocess.run([str(BIN / "gemvg-train"), "grpo", "--model", str(tmp_path / "nomodel"), "--data", data,
                          "--output", str(tmp_path / "o")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
