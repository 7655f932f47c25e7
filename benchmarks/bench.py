"""`gemvg bench`: per-stage latency of gemvg bundles side by side with transformers (and ORT GenAI).

    gemvg bench --make-model bench-0.5b --out ckpt/            # a random-weight checkpoint, real architecture
    gemvg bench --bundle fp32/ --bundle int4/ --checkpoint ckpt/ --baseline hf --out results/

Every system runs in its own worker process (clean peak RSS, no shared thread pools), one after the
other in the same invocation, on the same generated images and query, with a fixed output length.
Reported: medians and p90 over the runs after warm-up; time to first token of a follow-up query on
the same images; decode bandwidth (weight bytes read per token / time per token) against the read
bandwidth measured with all threads just before and just after each timed run (this host's bandwidth
drifts between two states minutes apart, about 35 and 64 GB/s, so a ratio is only meaningful between
measurements taken at the same time).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from gemvg.export.checkpoints import PRESETS
from gemvg.runtime.command import ArgumentParser, run_command
from gemvg.runtime.families import FAMILIES

# Sent verbatim (mode "raw") so that every system sees the same short prompt: with the bench model's
# byte-level tokenizer, 2 images of 448x448 and this query make about 590 tokens.
MODE = "raw"
QUERY = "Find the red cup."
FOLLOW_UP = "And the blue one?"
STAGES = ("load", "preprocess", "vision", "prefill", "time_to_first_token", "decode_per_token", "total",
          "follow_up_ttft")


@dataclass
class Workload:
    images: int = 2
    image_size: int = 448
    new_tokens: int = 32
    runs: int = 3
    warmup: int = 1
    threads: int = 2


@dataclass
class SystemResult:
    name: str
    stages_ms: dict[str, dict[str, float]]  # stage -> {"median", "p90"}
    peak_rss_mb: float
    weight_bytes_per_token: int
    decode_bandwidth_gbs: float
    prompt_tokens: int
    size_mb: float
    # [before, after] each timed run, and the median over runs of the run's decode bandwidth divided by
    # the mean of its two reads.
    read_bandwidth_around_runs_gbs: list[list[float]]
    decode_bandwidth_fraction: float
    extra: dict = field(default_factory=dict)


def make_images(workload: Workload, folder: Path) -> list[Path]:
    """Deterministic smooth random images (PNG), the same for every system."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for index in range(workload.images):
        coarse = rng.integers(0, 256, (workload.image_size // 16, workload.image_size // 16, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((workload.image_size, workload.image_size), Image.Resampling.BICUBIC)
        path = folder / f"bench_{index}.png"
        image.save(path)
        paths.append(path)
    return paths


def summarize(samples: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    return {stage: {"median": float(np.median(values)), "p90": float(np.percentile(values, 90))}
            for stage, values in samples.items() if values}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def read_bandwidth_gbs(threads: int, megabytes: int = 1024, repeats: int = 7) -> float:
    """Memory read bandwidth: `threads` threads each reading a disjoint chunk of a buffer far larger than cache.

    The kernel is a BLAS dot of a chunk with itself (SIMD, one read of each byte; numpy releases the
    GIL), and the best of the repeats is kept, so the figure is what this machine can read at most.
    """
    data = np.ones(megabytes * (1 << 20) // 4, dtype=np.float32)
    chunks = np.array_split(data, threads)
    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(lambda chunk: chunk.dot(chunk), chunks))
            best = max(best, data.nbytes / (time.perf_counter() - start) / 1e9)
    return best


def read_bandwidth_now(threads: int) -> float:
    """read_bandwidth_gbs in a child process: its buffer stays out of the measured system's peak RSS, and
    the system's own threads are idle (past their spin-wait) while it reads."""
    done = subprocess.run([sys.executable, "-m", "gemvg.benchmarks.bench", "--read-bandwidth", str(threads)],
                          capture_output=True, text=True, check=True)
    return float(done.stdout.split()[-1])


class BandwidthAroundRuns:
    """The read bandwidth just before and just after each timed run's first query."""

    def __init__(self, threads: int):
        self.threads = threads
        self.pairs: list[list[float]] = []
        self._before = 0.0

    def before(self) -> None:
        self._before = read_bandwidth_now(self.threads)

    def after(self) -> None:
        self.pairs.append([self._before, read_bandwidth_now(self.threads)])

    def fraction(self, weight_bytes: int, decode_ms_per_token: list[float]) -> float:
        """Median over runs of the run's decode bandwidth divided by the mean of the reads around it."""
        if len(decode_ms_per_token) != len(self.pairs):
            raise ValueError(f"{len(decode_ms_per_token)} decode timings for {len(self.pairs)} bandwidth pairs")
        return float(np.median([weight_bytes / (ms / 1e3) / 1e9 / ((before + after) / 2)
                                for ms, (before, after) in zip(decode_ms_per_token, self.pairs)]))


# -- workers ---------------------------------------------------------------------------------------


def bench_gemvg(bundle: Path, images: list[Path], workload: Workload) -> SystemResult:
    from gemvg.runtime import Engine

    load_ms = []
    start = time.perf_counter()
    engine = Engine.load(bundle, threads=workload.threads)
    load_ms.append((time.perf_counter() - start) * 1e3)
    samples: dict[str, list[float]] = {stage: [] for stage in STAGES}
    samples["load"] = load_ms
    prompt_tokens = 0
    around = BandwidthAroundRuns(workload.threads)
    for run in range(workload.warmup + workload.runs):
        engine.reset()
        timed = run >= workload.warmup
        if timed:
            around.before()
        first = engine.ground(images, QUERY, mode=MODE, max_new_tokens=workload.new_tokens,
                              min_new_tokens=workload.new_tokens)
        first_tokens = first.token_ids
        if timed:
            around.after()
        follow = engine.ground(images, FOLLOW_UP, mode=MODE, max_new_tokens=workload.new_tokens,
                               min_new_tokens=workload.new_tokens)
        if run < workload.warmup:
            continue
        for stage in ("preprocess", "vision", "prefill", "time_to_first_token", "decode_per_token", "total"):
            samples[stage].append(first.timings_ms[stage])
        samples["follow_up_ttft"].append(follow.timings_ms["time_to_first_token"])
        prompt_tokens = len(engine.prepare(images, QUERY, MODE).prompt.input_ids)
    manifest = engine.manifest
    weight_bytes = (manifest.step_decoder_graph or manifest.decoder_graph).disk_bytes(bundle)  # what a step reads
    stages = summarize(samples)
    per_token_s = stages["decode_per_token"]["median"] / 1e3
    size = sum(f.stat().st_size for f in bundle.iterdir() if f.is_file())
    return SystemResult(f"gemvg {_label(manifest)}", stages, peak_rss_mb(), weight_bytes,
                        weight_bytes / per_token_s / 1e9, prompt_tokens, size / 1e6, around.pairs,
                        around.fraction(weight_bytes, samples["decode_per_token"]),
                        {"follow_up_reused_tokens": follow.reused_prefix_tokens, "first_tokens": first_tokens})


def _label(manifest) -> str:
    """The precision, with what tells two bundles of one precision apart (vision precision, block size,
    pure or mixed bits)."""
    record = manifest.extra.get("quantization", {})
    decoder = record.get("decoder", {})
    details = []
    if record and record.get("vision_precision") != manifest.precision:
        details.append(f"vision {record.get('vision_precision')}")
    if "block_size" in decoder:
        upgraded = len(decoder.get("upgraded_groups", []))
        details.append(f"block {decoder['block_size']}" + (f", {upgraded} groups 8-bit" if upgraded else ""))
    if manifest.step_decoder_graph:
        step = record.get("step_decoder", {})
        details.append(f"steps {manifest.step_decoder_graph.precision}, block {step.get('block_size')}")
    return manifest.precision + (f" ({'; '.join(details)})" if details else "")


def bench_hf(checkpoint: Path, images: list[Path], workload: Workload) -> SystemResult:
    """transformers fp32 (default attention), the same prompt as gemvg's direct mode."""
    import torch

    from gemvg.export.reference import Reference, load_model
    from gemvg.runtime.grounding import build_instruction

    torch.set_num_threads(workload.threads)
    start = time.perf_counter()
    model = load_model(checkpoint)  # transformers' default attention
    reference = Reference(checkpoint, model)
    load_ms = (time.perf_counter() - start) * 1e3

    def prepare(query: str) -> dict:
        return reference.inputs(images, build_instruction(query, reference.family.box_syntax, MODE))

    # Every stage of a run is read from one generate call: hooks stamp the vision tower's and each forward
    # pass's start and end, so no stage is a difference of two separately timed calls (which noise can
    # make negative).
    stamps: dict[str, list[float]] = {"vision": [], "forward": []}

    def stamp(key: str):
        return (lambda *_: stamps[key].append(time.perf_counter()),
                lambda *_: stamps[key].append(time.perf_counter()))

    for key, module in (("vision", model.model.visual), ("forward", model)):
        before, after = stamp(key)
        module.register_forward_pre_hook(before)
        module.register_forward_hook(after)

    samples: dict[str, list[float]] = {stage: [] for stage in STAGES}
    samples["load"] = [load_ms]
    n = workload.new_tokens
    around = BandwidthAroundRuns(workload.threads)
    with torch.no_grad():
        for run in range(workload.warmup + workload.runs):
            timed = run >= workload.warmup
            if timed:
                around.before()
            clock = time.perf_counter()
            inputs = prepare(QUERY)
            preprocess = (time.perf_counter() - clock) * 1e3
            stamps["vision"].clear()
            stamps["forward"].clear()
            started = time.perf_counter()
            generated = model.generate(**inputs, do_sample=False, max_new_tokens=n, min_new_tokens=n)
            done = time.perf_counter()
            first_tokens = generated[0, inputs["input_ids"].shape[1]:].tolist()
            if timed:
                around.after()
            vision_start, vision_end = stamps["vision"][:2]
            first_token = (stamps["forward"][1] - started) * 1e3  # the first forward: vision + prefill
            clock = time.perf_counter()
            follow = prepare(FOLLOW_UP)
            model.generate(**follow, do_sample=False, max_new_tokens=1, min_new_tokens=1)
            follow_ttft = (time.perf_counter() - clock) * 1e3
            if run < workload.warmup:
                continue
            vision = (vision_end - vision_start) * 1e3
            samples["preprocess"].append(preprocess)
            samples["vision"].append(vision)
            samples["prefill"].append(first_token - vision)
            samples["time_to_first_token"].append(preprocess + first_token)
            samples["decode_per_token"].append((done - stamps["forward"][1]) * 1e3 / (n - 1))
            samples["total"].append(preprocess + (done - started) * 1e3)
            samples["follow_up_ttft"].append(follow_ttft)
    text_params = sum(p.numel() * p.element_size() for name, p in model.named_parameters()
                      if "visual" not in name and "embed_tokens" not in name)
    if model.config.tie_word_embeddings:
        text_params += model.lm_head.weight.numel() * 4
    stages = summarize(samples)
    size = sum(f.stat().st_size for f in checkpoint.iterdir() if f.is_file())
    return SystemResult("transformers fp32", stages, peak_rss_mb(), text_params,
                        text_params / (stages["decode_per_token"]["median"] / 1e3) / 1e9,
                        int(inputs["input_ids"].shape[1]), size / 1e6, around.pairs,
                        around.fraction(text_params, samples["decode_per_token"]), {"first_tokens": first_tokens})


def worker(spec: dict) -> dict:
    workload = Workload(**spec["workload"])
    images = [Path(p) for p in spec["images"]]
    if spec["kind"] == "gemvg":
        result = bench_gemvg(Path(spec["path"]), images, workload)
    elif spec["kind"] == "hf":
        result = bench_hf(Path(spec["path"]), images, workload)
    elif spec["kind"].startswith("ortgenai"):
        from .ortgenai_baseline import bench_ortgenai

        result = bench_ortgenai(Path(spec["path"]), images, workload, precision=spec["kind"].split("-", 1)[1])
    else:
        raise ValueError(f"unknown system kind {spec['kind']}")
    return asdict(result)


def run_worker(spec: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["workload"]["threads"]))
    done = subprocess.run([sys.executable, "-m", "gemvg.benchmarks.bench", "--worker", json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"{spec['kind']} {spec['path']}: worker failed: {tail[0]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- report ----------------------------------------------------------------------------------------


def markdown_table(results: list[dict], workload: Workload) -> str:
    lines = [
        f"Workload: {workload.images} images of {workload.image_size}x{workload.image_size}, "
        f"{results[0]['prompt_tokens']} prompt tokens, {workload.new_tokens} new tokens, {workload.threads} threads; "
        f"medians of {workload.runs} runs after {workload.warmup} warm-up (p90 in brackets). "
        "Decode bandwidth is weight bytes per token / time per token; its percentage is of the read bandwidth "
        "measured just before and after each run (median over runs), the read bandwidth column shows those reads.",
        "",
        "| system | end to end | time to first token | vision | prefill | decode / token | follow-up TTFT | "
        "load | decode GB/s (% of read bw) | read bw around runs | peak RSS | size |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = results[0]["stages_ms"]["total"]["median"]
    for result in results:
        s = result["stages_ms"]
        cell = lambda k: f"{s[k]['median']:.0f} ms ({s[k]['p90']:.0f})" if k in s else "-"  # noqa: E731
        ratio = base / s["total"]["median"]
        reads = " ".join(f"{a:.0f}/{b:.0f}" for a, b in result["read_bandwidth_around_runs_gbs"])
        lines.append(
            f"| {result['name']} | {s['total']['median'] / 1e3:.2f} s ({ratio:.2f}x) | {cell('time_to_first_token')} | "
            f"{cell('vision')} | {cell('prefill')} | {s['decode_per_token']['median']:.1f} ms | "
            f"{cell('follow_up_ttft')} | {s['load']['median']:.0f} ms | {result['decode_bandwidth_gbs']:.1f} "
            f"({100 * result['decode_bandwidth_fraction']:.0f}%) | {reads} GB/s | {result['peak_rss_mb']:.0f} MB | "
            f"{result['size_mb']:.0f} MB |")
    agreement = token_agreement(results)
    if agreement:
        lines += ["", agreement]
    return "\n".join(lines)


def token_agreement(results: list[dict]) -> str:
    """How many of each system's greedy tokens (first query) equal transformers' generate, when it ran."""
    reference = next((r["extra"]["first_tokens"] for r in results
                      if r["name"].startswith("transformers") and "first_tokens" in r.get("extra", {})), None)
    if reference is None:
        return ""
    parts = []
    for result in results:
        tokens = result.get("extra", {}).get("first_tokens")
        if tokens is None or result["name"].startswith("transformers"):
            continue
        same = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference)))
        exact = tokens == reference
        parts.append(f"{result['name']} {'identical' if exact else f'first {same} of {len(reference)} equal'}")
    return "Greedy tokens of the first query against transformers' generate: " + "; ".join(parts) + "."


def chart(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [("preprocess", "#999999"), ("vision", "#4363d8"), ("prefill", "#f58231"), ("decode", "#3cb44b")]
    fig, ax = plt.subplots(figsize=(8, 0.6 + 0.6 * len(results)))
    for row, result in enumerate(results):
        s = result["stages_ms"]
        decode = s["total"]["median"] - s["time_to_first_token"]["median"]
        values = [s["preprocess"]["median"], s["vision"]["median"], s["prefill"]["median"], decode]
        left = 0.0
        for (label, colour), value in zip(parts, values):
            ax.barh(row, value / 1e3, left=left, color=colour, label=label if row == 0 else None)
            left += value / 1e3
    ax.set_yticks(range(len(results)), [r["name"] for r in results])
    ax.invert_yaxis()
    ax.set_xlabel("seconds (median, first query)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="gemvg bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--make-model", metavar="NAME", choices=list(PRESETS),
                        help="write a random-weight checkpoint: real shapes (qwen2-vl-2b, qwen2-vl-7b, qwen2.5-vl-3b, qwen3-vl-2b: "
                             "bf16 shards, written one tensor at a time), bench-0.5b, tiny")
    parser.add_argument("--family", default=None, choices=list(FAMILIES),
                        help="for presets of no fixed family (default qwen2_5_vl); real shapes have their own")
    parser.add_argument("--bundle", action="append", default=[], help="a gemvg bundle to measure; repeat")
    parser.add_argument("--checkpoint", help="the checkpoint the bundles came from (for baselines)")
    parser.add_argument("--baseline", action="append", default=[], choices=["hf", "ortgenai"],
                        help="baselines to run (ortgenai: ONNX Runtime GenAI fp32 and int4)")
    parser.add_argument("--out", help="output folder (results.json, results.md, stages.png) or model folder")
    for name, default in asdict(Workload()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--read-bandwidth", type=int, metavar="THREADS", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command("gemvg bench", lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.read_bandwidth:
        print(read_bandwidth_gbs(args.read_bandwidth))
        return 0
    if args.make_model:
        from gemvg.export.checkpoints import make_checkpoint

        if not args.out:
            print("gemvg bench: error: --make-model needs --out", file=sys.stderr)
            return 2
        family = args.family or PRESETS[args.make_model].family or "qwen2_5_vl"
        path = make_checkpoint(args.out, family=family, preset=args.make_model,
                               progress=lambda message: print(f"[gemvg bench] {message}", file=sys.stderr, flush=True))
        print(f"wrote {args.make_model} ({family}) to {path}")
        return 0
    if not args.bundle and not args.baseline:
        print("gemvg bench: error: give --bundle and/or --baseline (see gemvg bench -h)", file=sys.stderr)
        return 2
    if args.baseline and not args.checkpoint:
        print("gemvg bench: error: baselines need --checkpoint", file=sys.stderr)
        return 2
    workload = Workload(**{name: getattr(args, name) for name in asdict(Workload())})
    out = Path(args.out or "bench-results")
    images = make_images(workload, out / "images")
    kinds = [k for b in args.baseline for k in (("ortgenai-fp32", "ortgenai-int4") if b == "ortgenai" else (b,))]
    specs = [{"kind": k, "path": args.checkpoint} for k in kinds] + [{"kind": "gemvg", "path": b} for b in args.bundle]
    results = []
    # Also measured between systems, for the record (each system's percentage uses the reads around its runs).
    bandwidths = [read_bandwidth_gbs(workload.threads)]
    for spec in specs:
        print(f"[gemvg bench] measuring {spec['kind']} {spec['path']} ...", file=sys.stderr, flush=True)
        spec.update(images=[str(p) for p in images], workload=asdict(workload))
        try:
            results.append(run_worker(spec))
        except RuntimeError as err:
            print(f"gemvg bench: error: {err}", file=sys.stderr)
            return 1
        bandwidths.append(read_bandwidth_gbs(workload.threads))
    bandwidth = float(np.median(bandwidths))
    table = markdown_table(results, workload)
    table += (f"\n\nRead bandwidth measured between systems (before the first and after each): "
              f"{', '.join(f'{b:.1f}' for b in bandwidths)} GB/s (median {bandwidth:.1f} GB/s).")
    (out / "results.json").write_text(json.dumps({"workload": asdict(workload), "read_bandwidth_gbs": bandwidth,
                                                  "read_bandwidth_samples_gbs": bandwidths,
                                                  "systems": results}, indent=2))
    (out / "results.md").write_text(table + "\n")
    chart(results, out / "stages.png")
    print(table)
    print(f"\nwrote {out / 'results.json'}, {out / 'results.md'}, {out / 'stages.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
