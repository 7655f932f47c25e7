"""`gemvg eval`: score benchmark predictions, or run a model over a benchmark and score it.

    gemvg eval mig-bench --annotations MIG_data.json --predictions preds.jsonl [--json] [--strict]
    gemvg eval mig-bench --annotations MIG_data.json --image-root DIR (--bundle B | --hf CKPT)
                         [--predictions OUT.jsonl] [--limit N]
    gemvg eval mc-bench --annotations MC-Bench_coco_format.json --predictions results.json [--json]
    gemvg eval mc-bench --annotations MC-Bench_coco_format.json --image-root DIR (--bundle B | --hf CKPT)
                        [--pairs mc-bench_v0.2_val.json] [--predictions OUT.jsonl] [--limit N]
    gemvg eval coco --annotations gt.json --predictions results.json [--json]

Bad input gives one line on stderr and exit code 2, never a traceback. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from gemvg.benchmarks import coco_ap, mc_bench, mig_bench
from gemvg.benchmarks.coco_ap import BenchmarkInputError
from gemvg.runtime.command import ArgumentParser, positive_int, run_command
from gemvg.runtime.grounding import ImageGeometry

PROG = "gemvg eval"


# ----------------------------------------------------------------------------------------------
# Arguments


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=PROG, description="Score grounding benchmarks the official way.")
    commands = parser.add_subparsers(dest="benchmark", required=True)

    mig = commands.add_parser("mig-bench", help="MIG-Bench: per-task IoU accuracy (Migician's protocol)")
    mig.add_argument("--annotations", required=True, help="MIG_data.json")
    mig.add_argument("--predictions", help='JSON lines {"index": i, "response": "..."}; with a model: where '
                                           "its answers are appended (default mig-bench-predictions.jsonl)")
    mig.add_argument("--strict", action="store_true",
                     help="also check the image each box is placed in, and score every box (Hungarian matching)")
    _add_model_args(mig, default_tokens=mig_bench.OFFICIAL_MAX_NEW_TOKENS)
    _add_output_args(mig)

    mc = commands.add_parser("mc-bench", help="MC-Bench: weighted AP50 and image-level accuracy")
    mc.add_argument("--annotations", required=True, help="MC-Bench_coco_format.json")
    mc.add_argument("--predictions", help="COCO results list; with a model: JSON lines of its answers "
                                          "(default mc-bench-predictions.jsonl)")
    mc.add_argument("--pairs", help="mc-bench_v0.2_val.json, the descriptions (default: next to --annotations)")
    _add_model_args(mc, default_tokens=256)
    _add_output_args(mc)

    coco = commands.add_parser("coco", help="COCO box AP (ODinW / RefCOCO-style single-image grounding)")
    coco.add_argument("--annotations", required=True, help="COCO ground truth")
    coco.add_argument("--predictions", required=True, help="COCO results list")
    _add_output_args(coco)
    return parser


def _add_model_args(parser: argparse.ArgumentParser, default_tokens: int) -> None:
    model = parser.add_argument_group("running a model (instead of reading --predictions)")
    source = model.add_mutually_exclusive_group()
    source.add_argument("--bundle", help="a bundle folder written by gemvg-export")
    source.add_argument("--hf", metavar="CKPT", help="a transformers checkpoint (needs torch and transformers)")
    model.add_argument("--image-root", help="folder the annotation files' image paths are relative to")
    model.add_argument("--limit", type=positive_int, help="only the first N items")
    model.add_argument("--max-new-tokens", type=positive_int, default=default_tokens)
    model.add_argument("--device", default="cpu", choices=["cpu", "cuda", "tensorrt"], help="bundle only")
    model.add_argument("--threads", type=positive_int, default=None, help="bundle only: intra-op threads")


def _add_output_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the scores as JSON")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_command(PROG, lambda: _main(argv))


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"mig-bench": cmd_mig_bench, "mc-bench": cmd_mc_bench, "coco": cmd_coco}
    return handlers[args.benchmark](args)


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _wants_model(args: argparse.Namespace) -> bool:
    return bool(args.bundle or args.hf)


def _require_predictions(args: argparse.Namespace) -> str:
    if not args.predictions:
        raise BenchmarkInputError("--predictions is required (or --bundle/--hf with --image-root to run a model)")
    return args.predictions


# ----------------------------------------------------------------------------------------------
# Scoring existing predictions


def cmd_mig_bench(args: argparse.Namespace) -> int:
    items = mig_bench.load_annotations(args.annotations)
    if _wants_model(args):
        return run_mig_bench(args, items)
    predictions = mig_bench.load_predictions(_require_predictions(args), len(items))
    result = mig_bench.score(items, predictions, strict=args.strict)
    print(json.dumps(result, indent=2) if args.json else mig_bench.format_table(result))
    return 0


def cmd_mc_bench(args: argparse.Namespace) -> int:
    coco_gt = mc_bench.load_ground_truth(args.annotations)
    if _wants_model(args):
        return run_mc_bench(args, coco_gt)
    results = mc_bench.load_predictions(_require_predictions(args), coco_gt)
    scored = mc_bench.score(coco_gt, results, progress=_progress)
    print(json.dumps(scored.as_dict(), indent=2) if args.json else mc_bench.format_report(scored, coco_gt))
    return 0


def cmd_coco(args: argparse.Namespace) -> int:
    ground_truth = coco_ap.read_json(args.annotations, "COCO ground truth")
    if not isinstance(ground_truth, dict):
        raise BenchmarkInputError(f"COCO ground truth {args.annotations!r} must be a JSON object")
    results = coco_ap.read_json(args.predictions, "COCO results")
    scores = coco_ap.coco_box_ap(ground_truth, results)
    if args.json:
        print(json.dumps(scores.as_dict(), indent=2))
    else:
        print(f"AP {100 * scores.ap:.2f}   AP50 {100 * scores.ap50:.2f}   AP75 {100 * scores.ap75:.2f}")
    return 0


# ----------------------------------------------------------------------------------------------
# Running a model


@dataclass(frozen=True)
class ModelAnswer:
    """A model's raw text and the geometry of each image it saw (to map its boxes back to pixels)."""

    text: str
    geometries: list[ImageGeometry]


class Grounder(Protocol):
    syntax: str  # the model's box syntax (gemvg.runtime.grounding.SYNTAXES)

    def answer(self, images: Sequence[Path], query: str, max_new_tokens: int) -> ModelAnswer: ...


class BundleGrounder:
    """A gemvg bundle, through the runtime Engine, with the query sent verbatim (mode "raw")."""

    def __init__(self, bundle: str | Path, device: str = "cpu", threads: int | None = None) -> None:
        from gemvg.runtime import Engine
        self.engine = Engine.load(bundle, device=device, threads=threads)
        self.syntax = self.engine.manifest.box_syntax

    def answer(self, images: Sequence[Path], query: str, max_new_tokens: int) -> ModelAnswer:
        result = self.engine.ground([str(p) for p in images], query, mode="raw", max_new_tokens=max_new_tokens)
        return ModelAnswer(result.text, list(result.images))


def hf_grounder(checkpoint: str | Path) -> Grounder:
    """A transformers checkpoint run with greedy decoding; torch and transformers are imported only here.

    Inputs and generation are gemvg.export.reference's (the pipeline the parity tests check against).
    """
    try:
        from gemvg.export.reference import Reference
    except ImportError as err:
        raise BenchmarkInputError(f"--hf needs torch and transformers ({err})") from None
    from PIL import Image

    path = str(checkpoint)
    if not Path(path, "config.json").is_file():
        raise BenchmarkInputError(f"--hf {path!r} is not a transformers checkpoint (no config.json)")
    reference = Reference(path)
    tokenizer = reference.tokenizer
    stop_ids = {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}

    class _HFGrounder:
        syntax = reference.family.box_syntax

        def answer(self, images: Sequence[Path], query: str, max_new_tokens: int) -> ModelAnswer:
            pictures = [Image.open(p).convert("RGB") for p in images]
            inputs = reference.inputs(pictures, query)
            tokens = reference.generate(inputs, max_new_tokens)
            while tokens and tokens[-1] in stop_ids:
                tokens.pop()
            return ModelAnswer(tokenizer.decode(tokens, skip_special_tokens=False),
                               reference.geometries(pictures, inputs))

    return _HFGrounder()


def open_grounder(args: argparse.Namespace) -> Grounder:
    if not args.image_root:
        raise BenchmarkInputError("--image-root is required to run a model")
    if args.limit is not None and args.limit < 1:
        raise BenchmarkInputError("--limit must be at least 1")
    _progress(f"{PROG}: loading {'bundle ' + args.bundle if args.bundle else 'checkpoint ' + args.hf}")
    if args.bundle:
        return BundleGrounder(args.bundle, args.device, args.threads)
    return hf_grounder(args.hf)


def resolve_image(root: Path, relative: str) -> Path:
    """An annotation's image path under --image-root; the path's leading folders may be left out of the root.

    MIG-Bench writes "./MIG-Bench/images/common/...": DIR may be the folder holding MIG-Bench or MIG-Bench itself.
    """
    parts = [p for p in PurePosixPath(relative).parts if p not in (".", "")]
    for skip in range(len(parts)):
        candidate = root.joinpath(*parts[skip:])
        if candidate.is_file():
            return candidate
    raise BenchmarkInputError(f"image {relative!r} not found under --image-root {str(root)!r}")


class ResponseLog:
    """An append-only JSON-lines file of model answers, resumable: answered indices are skipped on rerun."""

    def __init__(self, path: Path, item_count: int) -> None:
        self.path = path
        self._drop_partial_last_line()
        self.records = self._read(item_count)

    def _drop_partial_last_line(self) -> None:
        # A run killed mid-write leaves a last line without its newline; it is redone rather than rejected.
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            self.path.write_bytes(data[: data.rfind(b"\n") + 1])
            _progress(f"{PROG}: dropped an unfinished last line of {self.path}")

    def _read(self, item_count: int) -> dict[int, dict]:
        if not self.path.is_file():
            return {}
        records = {}
        for number, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            index, _ = mig_bench.parse_prediction_line(line, f"{self.path}:{number}")
            if not 0 <= index < item_count:
                raise BenchmarkInputError(f"{self.path}:{number}: index {index} is out of range")
            records[index] = json.loads(line)
        return records

    def append(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.records[record["index"]] = record


def _report_progress(done: int, total: int, started: float, label: str) -> None:
    elapsed = time.perf_counter() - started
    per_item = elapsed / done
    _progress(f"{PROG}: {done}/{total} {label}  {per_item:.1f} s/item  eta {per_item * (total - done):.0f} s")


def run_mig_bench(args: argparse.Namespace, items: list[mig_bench.MigItem]) -> int:
    """Answer each chosen item with the official prompt (resumably), then score and chart the results."""
    root = Path(args.image_root or "")
    chosen = list(range(min(args.limit, len(items)) if args.limit else len(items)))
    grounder = open_grounder(args)
    log = ResponseLog(Path(args.predictions or "mig-bench-predictions.jsonl"), len(items))
    todo = [i for i in chosen if i not in log.records]
    images = {i: [resolve_image(root, p) for p in items[i].images] for i in todo}  # fail before the first run
    started = time.perf_counter()
    for done, index in enumerate(todo, start=1):
        answer = grounder.answer(images[index], mig_bench.official_prompt(items[index]), args.max_new_tokens)
        log.append({"index": index, "response": answer.text})
        _report_progress(done, len(todo), started, items[index].task)
    responses = {i: r["response"] for i, r in log.records.items()}
    result = mig_bench.score(items, responses, strict=args.strict, indices=chosen)
    table = mig_bench.format_table(result)
    write_outputs(log.path, result, table, _mig_chart_series(result), "MIG-Bench (AVE_IOU and IOU@0.5, %)")
    print(json.dumps(result, indent=2) if args.json else table)
    return 0


def run_mc_bench(args: argparse.Namespace, coco_gt: Any) -> int:
    """Answer each chosen pair (resumably), convert the boxes to COCO results, then score and chart."""
    root = Path(args.image_root or "")
    pairs = mc_bench.load_pairs(args.pairs or Path(args.annotations).with_name("mc-bench_v0.2_val.json"))
    chosen = list(range(min(args.limit, len(pairs)) if args.limit else len(pairs)))
    grounder = open_grounder(args)
    log = ResponseLog(Path(args.predictions or "mc-bench-predictions.jsonl"), len(pairs))
    todo = [i for i in chosen if i not in log.records]
    images = {i: [resolve_image(root, name) for name in pairs[i].file_names] for i in todo}
    category_count = len(coco_gt.getCatIds())
    started = time.perf_counter()
    for done, index in enumerate(todo, start=1):
        pair = pairs[index]
        answer = grounder.answer(images[index], mc_bench.build_prompt(pair.text, grounder.syntax), args.max_new_tokens)
        results = mc_bench.response_to_results(answer.text, grounder.syntax, answer.geometries, pair.image_ids,
                                               category_count)
        log.append({"index": index, "response": answer.text, "results": results})
        _report_progress(done, len(todo), started, pair.style)
    results = [r for i in chosen for r in log.records[i].get("results", [])]
    scored_gt = coco_gt if len(chosen) == len(pairs) else mc_bench.subset_ground_truth(
        coco_gt, [image for i in chosen for image in pairs[i].image_ids])
    log.path.with_suffix(".coco.json").write_text(json.dumps(results))
    scored = mc_bench.score(scored_gt, results, progress=_progress)
    report = mc_bench.format_report(scored, scored_gt)
    series = {"AP50": {coco_gt.cats[c]["name"]: 100 * ap for c, ap in scored.category_ap50.items()}}
    write_outputs(log.path, scored.as_dict(), report, series, "MC-Bench AP50 per group (%)")
    print(json.dumps(scored.as_dict(), indent=2) if args.json else report)
    return 0


def _mig_chart_series(result: dict) -> dict[str, dict[str, float]]:
    tasks = result["tasks"]
    return {metric: {task: row[metric] for task, row in tasks.items()} for metric in ("AVE_IOU", "IOU@0.5")}


def write_outputs(predictions: Path, scores: dict, table: str, series: dict[str, dict[str, float]],
                  title: str) -> None:
    """Next to the predictions: <stem>.scores.json, <stem>.table.txt and a bar chart <stem>.png."""
    predictions.with_suffix(".scores.json").write_text(json.dumps(scores, indent=2))
    predictions.with_suffix(".table.txt").write_text(table + "\n")
    chart = predictions.with_suffix(".png")
    bar_chart(series, title, chart)
    _progress(f"{PROG}: wrote {predictions.with_suffix('.table.txt')} and {chart}")


def bar_chart(series: dict[str, dict[str, float]], title: str, out: Path) -> None:
    """Grouped bars: one group per category (x), one bar per series."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in tests
    import matplotlib.pyplot as plt

    names = list(next(iter(series.values())).keys()) if series else []
    width = 0.8 / max(1, len(series))
    figure, axes = plt.subplots(figsize=(max(6.0, 0.9 * len(names) + 2), 4.5))
    for offset, (label, values) in enumerate(series.items()):
        positions = [i + offset * width for i in range(len(names))]
        axes.bar(positions, [values[n] for n in names], width, label=label)
    axes.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(names))])
    axes.set_xticklabels(names, rotation=30, ha="right")
    axes.set_ylim(0, 100)
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())
