"""One error tree and one CLI runner: bad arguments and bad input are one line and exit 2 from every command
line; a bug is one line and exit 1 (the traceback with GEMVG_DEBUG=1)."""

from __future__ import annotations

import pytest

from gemvg.benchmarks.bench import main as gemvg_bench
from gemvg.benchmarks.coco_ap import BenchmarkInputError
from gemvg.benchmarks.eval_cli import main as gemvg_eval
from gemvg.benchmarks.quant_speed import main as quant_speed
from gemvg.export.cli import main as gemvg_export
from gemvg.runtime import Engine, GemvgError, InputError
from gemvg.runtime import cli as runtime_cli
from gemvg.runtime.cli import main as gemvg
from gemvg.runtime.command import run_command
from gemvg.train.cli import main as gemvg_train
from gemvg.train.schema import DataError


def one_line(code: int, capsys, expected_code: int, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert code == expected_code, err
    assert len(err.splitlines()) == 1, err
    assert all(needle in err for needle in needles), err
    return err


@pytest.mark.parametrize("argv, needles", [
    (["ground", "--bundle", "B", "--image", "a.jpg", "--query", "q", "--threads", "-3"], ["--threads", "less than 1"]),
    (["ground", "--bundle", "B", "--image", "a.jpg", "--query", "q", "--threads", "two"], ["--threads", "not an integer"]),
    (["ground", "--bundle", "B", "--image", "a.jpg", "--query", "q", "--max-new-tokens", "0"], ["--max-new-tokens"]),
    (["ground", "--bundle", "B", "--query", "q", "--mode", "fast"], ["--mode", "invalid choice"]),
    (["ground", "--bundle", "B"], ["--query"]),
    (["frobnicate"], ["invalid choice"]),
    (["eval", "mig-bench", "--annotations", "a.json", "--bogus"], ["unrecognized arguments: --bogus"]),
])
def test_gemvg_bad_arguments(argv, needles, capsys):
    err = one_line(gemvg(argv), capsys, 2, *needles)
    assert err.startswith("gemvg")


@pytest.mark.parametrize("argv, needles", [
    (["--model", "M", "--out", "O", "--max-images", "0"], ["--max-images"]),
    (["--model", "M", "--out", "O", "--block-size", "-32"], ["--block-size"]),
    (["--model", "M", "--out", "O", "--target-cosine", "2"], ["--target-cosine", "between 0 and 1"]),
    (["--model", "M", "--out", "O", "--upgrade-budget", "nan"], ["--upgrade-budget"]),
    (["--out", "O"], ["--model is required"]),
])
def test_export_bad_arguments(argv, needles, capsys):
    err = one_line(gemvg_export(argv), capsys, 2, *needles)
    assert err.startswith("gemvg-export: error:")


@pytest.mark.parametrize("argv, needles", [
    (["synth", "--out", "O", "--num-samples", "0"], ["--num-samples", "less than 1"]),
    (["eval", "--model", "M", "--data", "D", "--limit", "-2"], ["--limit"]),
    (["sft", "--model", "M", "--data", "D", "--output", "O", "--max-steps", "0"], ["--max-steps"]),
    (["teach"], ["invalid choice"]),
])
def test_train_bad_arguments(argv, needles, capsys):
    err = one_line(gemvg_train(argv), capsys, 2, *needles)
    assert err.startswith("gemvg-train: error:")


def test_benchmark_scripts_bad_arguments(capsys):
    one_line(gemvg_bench(["--threads", "x"]), capsys, 2, "gemvg bench: error:", "--threads")
    one_line(gemvg_bench([]), capsys, 2, "give --bundle")
    one_line(quant_speed(["--fp32", "A", "--quant", "B", "--threads", "0"]), capsys, 2, "--threads")
    one_line(quant_speed(["--fp32", "A", "--quant", "B", "--runs", "2"]), capsys, 2, "--runs must be at least 3")


def test_engine_refuses_a_bad_thread_count(tiny_bundle):
    with pytest.raises(InputError, match="threads"):
        Engine.load(tiny_bundle, threads=-3)


def test_every_input_error_is_in_the_tree():
    for error in (DataError, BenchmarkInputError):
        assert issubclass(error, GemvgError) and issubclass(error, ValueError)  # old `except ValueError` still works


def test_a_bug_is_one_line_and_exit_1_or_the_traceback_when_asked(monkeypatch, capsys):
    def broken(args):
        raise KeyError("oops\nsecond line")

    monkeypatch.setattr(runtime_cli, "cmd_demo", broken)
    one_line(gemvg(["demo"]), capsys, 1, "internal error", "KeyError", "GEMVG_DEBUG")
    monkeypatch.setenv("GEMVG_DEBUG", "1")
    with pytest.raises(KeyError):
        gemvg(["demo"])


def test_runner_turns_interrupts_and_multi_line_messages_into_one_line(capsys):
    def interrupted():
        raise KeyboardInterrupt

    assert run_command("x", interrupted) == 130
    capsys.readouterr()

    def bad():
        raise InputError("first\nsecond")

    one_line(run_command("x", bad), capsys, 2, "x: error: first second")
    assert run_command("x", lambda: 0) == 0
