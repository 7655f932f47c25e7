"""ONNX Runtime GenAI baseline for `gemvg bench --baseline ortgenai` (fp32 and int4, same checkpoint).

What a user of ORT GenAI 0.18 does with a Qwen2.5-VL checkpoint:

* the text decoder comes from ORT GenAI's own builder, with the embedding left out (the
  multimodal pipeline feeds `inputs_embeds`) and `prune_lm_head` (logits of the last position only)::

      python -m onnxruntime_genai.models.builder -i CKPT -o OUT/decoder -p fp32|int4 -e cpu \\
          -c OUT/.builder-cache --extra_options exclude_embeds=true prune_lm_head=true \\
          [block_size=32 accuracy_level=4]            # int4: MatMulNBits, int8 compute on CPU

* the vision encoder and the embedding (token embedding + image-feature scatter) come from mobius::

      python -m mobius build --config CKPT --ep cpu --dtype f32 --component vision_encoder OUT/vision_encoder
      python -m mobius build --config CKPT --ep cpu --dtype f32 --component embedding OUT/embedding

* genai_config.json joins them (model type `qwen2_5_vl`: ORT GenAI computes the M-RoPE positions),
  and processor_config.json describes ORT Extensions' image pipeline (smart resize, rescale,
  normalise, Qwen patching). Both are written here from the checkpoint's config.json,
  generation_config.json (through the builder) and preprocessor_config.json. mobius's own
  `--runtime ort-genai` config is not usable as is: from a local folder it misnames the model type
  and drops the patching step, and it leaves out `vision_start_token_id`, without which ORT GenAI
  finds no image for the M-RoPE positions unless the tokenizer uses Qwen's ids, and silently runs
  1-D text positions (wrong output, no error). The tokenizer files are the checkpoint's, with the
  chat template also copied into tokenizer_config.json, where ORT GenAI looks for it.

ORT GenAI encodes images of one size in one vision run, and images of different sizes one run each
(its processor pads their patches to one count; the padding is dropped before the encoder).

The vision encoder and embedding stay fp32 in both systems; only the decoder changes precision.
Built folders are cached (see `default_cache_dir`): one per checkpoint path and precision, plus the
shared vision/embedding one, each complete once its `BUILD_MARKER` is written.

`bench_ortgenai` measures like `bench_gemvg`: preprocess (chat template, image decoding and the
multimodal processor), first token (generator, vision, embedding, prefill, first sampling), decode
at a fixed length (`min_length` = `max_length` for the first query: no early EOS), and a follow-up
query on the same images through a new generator: what ORT GenAI gives without manual work. ORT
GenAI runs the vision encoder inside the first `generate_next_token`; its time is read from
onnxruntime's profiler, enabled on the vision session only, and prefill is first token minus vision.
`extra` also holds the hand-rewound follow-up (`rewind_to` the end of the images + `append_tokens`).
"""

from __future__ import annotations

import glob
import gc
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gemvg.runtime.families import family
from gemvg.runtime.preprocess import PreprocessConfig

PRECISIONS = ("fp32", "int4")
BUILD_MARKER = "gemvg_ortgenai.json"
ORT_GENAI_VERSION = "0.18.0"
MOBIUS_VERSION = "0.1.0"
INSTALL_HINT = (f"pip install onnxruntime-genai=={ORT_GENAI_VERSION} mobius-onnx=={MOBIUS_VERSION} "
                "(both are in gemvg's dev extra)")
# Spare room in the first generator's KV buffer, so the follow-up can be appended after a rewind.
REWIND_MARGIN_TOKENS = 64
# PIL resample codes (preprocessor_config.json "resample") -> ORT Extensions Resize interpolation.
_INTERPOLATION = {0: "NEAREST", 2: "LINEAR", 3: "CUBIC"}


def require_ortgenai():
    """onnxruntime_genai, or a one-line RuntimeError saying what to install."""
    try:
        import onnxruntime_genai
    except ImportError as err:
        raise RuntimeError(f"--baseline ortgenai needs onnxruntime_genai ({err}); {INSTALL_HINT}") from None
    try:
        import mobius  # noqa: F401
    except ImportError as err:
        raise RuntimeError(f"--baseline ortgenai needs mobius ({err}); {INSTALL_HINT}") from None
    return onnxruntime_genai


def default_cache_dir(checkpoint: Path) -> Path:
    """$GEMVG_ORTGENAI_CACHE, else an `ortgenai` folder beside the checkpoint."""
    env = os.environ.get("GEMVG_ORTGENAI_CACHE")
    return Path(env) if env else Path(checkpoint).resolve().parent / "ortgenai"


def model_dir_name(checkpoint: Path, precision: str) -> str:
    resolved = str(Path(checkpoint).resolve())
    return f"{Path(resolved).name}-{hashlib.sha1(resolved.encode()).hexdigest()[:8]}-{precision}"


COMPONENTS = ("vision_encoder", "embedding")


def decoder_command(checkpoint: Path, precision: str, out: Path, cache: Path) -> list[str]:
    """ORT GenAI's builder: the text decoder alone (inputs_embeds in), last-position logits."""
    extra = ["exclude_embeds=true", "prune_lm_head=true"]
    if precision == "int4":
        extra += ["block_size=32", "accuracy_level=4"]
    return [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(Path(checkpoint).resolve()),
            "-o", str(out), "-p", precision, "-e", "cpu", "-c", str(cache), "--extra_options", *extra]


def mobius_commands(checkpoint: Path, out: Path) -> list[list[str]]:
    """mobius: the vision encoder and the embedding, fp32, one folder each under `out`."""
    return [[sys.executable, "-m", "mobius", "build", "--config", str(Path(checkpoint).resolve()), "--ep", "cpu",
             "--dtype", "f32", "--component", component, str(out / component)] for component in COMPONENTS]


def _run(command: list[str], progress) -> None:
    progress("running " + " ".join(command[1:4]))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")  # everything is local
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        lines = (done.stderr.strip() or done.stdout.strip()).splitlines() or ["no output"]
        raise RuntimeError(f"ORT GenAI model build failed ({' '.join(command[1:4])}): {lines[-1]}")


def _cached(out: Path, build) -> Path:
    """`out`, built by `build(work_dir) -> marker dict` into a temporary folder and renamed when done."""
    if (out / BUILD_MARKER).exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=out.name + ".building-", dir=out.parent))
    try:
        marker = build(work)
        (work / BUILD_MARKER).write_text(json.dumps(marker, indent=2))
        if out.exists():  # an unfinished folder from an earlier, interrupted build
            shutil.rmtree(out)
        work.rename(out)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return out


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _shown(command: list[str], work: Path, final: Path) -> str:
    """The command as it would be typed, with the temporary build folder named by its final name."""
    return " ".join(["python", *command[1:]]).replace(str(work), str(final))


def build_ortgenai_model(checkpoint: Path, precision: str, cache_dir: Path | None = None,
                         progress=lambda message: None) -> Path:
    """Build (once) the ORT GenAI model folder for `checkpoint` at `precision`; return its path.

    The vision encoder and embedding do not depend on the decoder's precision: they are built once
    per checkpoint (folder `<name>-vision-embedding`) and hard-linked into each precision's folder.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    require_ortgenai()
    checkpoint = Path(checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    if config.get("model_type") != "qwen2_5_vl":
        raise ValueError(f"ORT GenAI {ORT_GENAI_VERSION}'s builder has no {config.get('model_type')!r} decoder: "
                         "the ortgenai baseline runs Qwen2.5-VL checkpoints only")
    if not config.get("architectures"):
        raise ValueError(f"{checkpoint / 'config.json'} has no top-level 'architectures', "
                         "which ORT GenAI's builder needs")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir(checkpoint)
    source = {"checkpoint": str(checkpoint.resolve()), "onnxruntime_genai": ORT_GENAI_VERSION, "mobius": MOBIUS_VERSION}

    shared_dir = cache_dir / model_dir_name(checkpoint, "vision-embedding")
    model_dir = cache_dir / model_dir_name(checkpoint, precision)

    def build_vision(work: Path) -> dict:
        commands = mobius_commands(checkpoint, work)
        for command in commands:
            _run(command, progress)
        return {**source, "commands": [_shown(c, work, shared_dir) for c in commands]}

    shared = _cached(shared_dir, build_vision)

    def build_model(work: Path) -> dict:
        command = decoder_command(checkpoint, precision, work / "decoder", work / ".builder-cache")
        _run(command, progress)
        shutil.rmtree(work / ".builder-cache", ignore_errors=True)
        for component in COMPONENTS:
            shutil.copytree(shared / component, work / component, copy_function=_link_or_copy)
        _assemble(checkpoint, work)
        vision_commands = json.loads((shared / BUILD_MARKER).read_text())["commands"]
        return {**source, "precision": precision, "commands": [_shown(command, work, model_dir), *vision_commands]}

    return _cached(model_dir, build_model)


def _graph_io(path: Path) -> tuple[list[str], list[str]]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return [v.name for v in graph.input], [v.name for v in graph.output]


def _assemble(checkpoint: Path, out: Path) -> None:
    """genai_config.json, processor_config.json and tokenizer files for the three built graphs."""
    decoder = out / "decoder"
    built = json.loads((decoder / "genai_config.json").read_text())
    for path in decoder.iterdir():  # the builder's config, tokenizer and template copies: kept at the top
        if path.suffix in (".json", ".jinja", ".txt"):
            path.unlink()
    # The mobius folders hold one graph each, saved as model.onnx (+ model.onnx.data).
    vision_in, vision_out = _graph_io(out / "vision_encoder" / "model.onnx")
    embed_in, embed_out = _graph_io(out / "embedding" / "model.onnx")
    hf_config = json.loads((checkpoint / "config.json").read_text())
    processor = json.loads((checkpoint / "preprocessor_config.json").read_text())
    preprocess = family(hf_config["model_type"]).preprocess_config(processor)
    session = {"log_id": "onnxruntime-genai", "provider_options": []}
    model = built["model"]
    model["decoder"]["filename"] = "decoder/model.onnx"
    model["vision"] = {
        "filename": "vision_encoder/model.onnx",
        "config_filename": "processor_config.json",
        "inputs": {name: name for name in vision_in},
        "outputs": {name: name for name in vision_out},
        "session_options": dict(session),
        "spatial_merge_size": preprocess.merge_size,
        "patch_size": preprocess.patch_size,
    }
    model["embedding"] = {
        "filename": "embedding/model.onnx",
        "inputs": {name: name for name in embed_in},
        "outputs": {name: name for name in embed_out},
        "session_options": dict(session),
    }
    # ORT GenAI finds each image for the M-RoPE positions by its start token; without the key it assumes
    # Qwen's own id and silently falls back to 1-D text positions on any other tokenizer.
    for key in ("image_token_id", "video_token_id", "vision_start_token_id"):
        if key in hf_config:
            model[key] = hf_config[key]
    (out / "genai_config.json").write_text(json.dumps(built, indent=2))
    (out / "processor_config.json").write_text(json.dumps(processor_config(processor, preprocess), indent=2))
    for name in ("tokenizer.json", "chat_template.jinja"):
        shutil.copy2(checkpoint / name, out / name)
    tokenizer_config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    tokenizer_config.setdefault("chat_template", (checkpoint / "chat_template.jinja").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False))


def processor_config(pre: dict, config: PreprocessConfig) -> dict:
    """ORT Extensions' Qwen2.5-VL image pipeline from an HF preprocessor_config.json `pre`, as gemvg's family
    reader read it into `config` (either form of the pixel bounds: min_pixels / max_pixels or
    size {shortest_edge, longest_edge})."""
    def op(name: str, kind: str, **attrs) -> dict:
        return {"operation": {"name": name, "type": kind, **({"attrs": attrs} if attrs else {})}}

    return {"processor": {"name": "qwen2_5_image_processor", "transforms": [
        op("decode_image", "DecodeImage", color_space="RGB"),
        op("convert_to_rgb", "ConvertRGB"),
        # height/width are ignored under smart_resize; min/max pixels and the 28-pixel factor rule.
        op("resize", "Resize", height=448, width=448, smart_resize=1, min_pixels=config.min_pixels,
           max_pixels=config.max_pixels, patch_size=config.patch_size, merge_size=config.merge_size,
           interpolation=_INTERPOLATION.get(pre.get("resample", 3), "CUBIC")),
        op("rescale", "Rescale", rescale_factor=config.rescale_factor),
        op("normalize", "Normalize", mean=list(config.image_mean), std=list(config.image_std), qwen2_5_vl=1),
        op("patch_image", "PatchImage", patch_size=config.patch_size,
           temporal_patch_size=config.temporal_patch_size, merge_size=config.merge_size),
    ]}}


# -- running -----------------------------------------------------------------------------------------


class OrtGenaiVL:
    """A loaded ORT GenAI Qwen2.5-VL folder: the prompt as gemvg writes it, greedy generation."""

    def __init__(self, model_dir: Path, threads: int, profile_vision: str | None = None):
        og = require_ortgenai()
        self.og = og
        self.model_dir = Path(model_dir)
        session = {"intra_op_num_threads": threads}
        overlay = {"model": {"decoder": {"session_options": session},
                             "vision": {"session_options": dict(session)},
                             "embedding": {"session_options": session}}}
        if profile_vision:
            overlay["model"]["vision"]["session_options"]["enable_profiling"] = profile_vision
        config = og.Config(str(self.model_dir))
        config.overlay(json.dumps(overlay))
        self.model = og.Model(config)
        self.tokenizer = og.Tokenizer(self.model)
        self.processor = self.model.create_multimodal_processor()
        self.template = (self.model_dir / "chat_template.jinja").read_text()
        self.vision_end = "<|vision_end|>"

    def prompt(self, text: str, n_images: int) -> str:
        content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
        return self.tokenizer.apply_chat_template(json.dumps([{"role": "user", "content": content}]),
                                                  template_str=self.template, add_generation_prompt=True)

    def inputs(self, text: str, images: list[Path]):
        return self.processor(self.prompt(text, len(images)), images=self.og.Images.open(*[str(p) for p in images]))

    def generator(self, prompt_tokens: int, new_tokens: int, spare: int = 0):
        """Greedy; exactly `new_tokens` before EOS may stop it (min_length), `spare` more of KV room."""
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, min_length=prompt_tokens + new_tokens,
                                  max_length=prompt_tokens + new_tokens + spare)
        return self.og.Generator(self.model, params)

    def generate(self, text: str, images: list[Path], new_tokens: int) -> tuple[list[int], list[int]]:
        """(prompt ids, `new_tokens` greedy ids)."""
        inputs = self.inputs(text, images)
        ids = inputs["input_ids"].as_numpy()[0].tolist()
        generator = self.generator(len(ids), new_tokens)
        generator.set_inputs(inputs)
        for _ in range(new_tokens):
            generator.generate_next_token()
        return ids, generator.get_sequence(0)[len(ids):].tolist()

    def suffix_ids(self, text: str, n_images: int):
        """The prompt's tokens after the last image (what a rewound generator appends)."""
        import numpy as np

        prompt = self.prompt(text, n_images)
        suffix = prompt[prompt.rindex(self.vision_end) + len(self.vision_end):]
        return np.asarray(self.tokenizer.encode(suffix), dtype=np.int32)

    def images_end(self, ids) -> int:
        """Length of the prompt prefix through the last image's end token."""
        end = self.tokenizer.to_token_id(self.vision_end)
        return max(i for i, token in enumerate(ids) if token == end) + 1


def _vision_run_ms(profile_dir: Path) -> list[float]:
    """Durations of the vision session's runs, in order, from onnxruntime's profile."""
    events = []
    for path in glob.glob(str(profile_dir / "*.json")):
        events += [e for e in json.loads(Path(path).read_text())
                   if e.get("cat") == "Session" and e.get("name") == "model_run"]
    return [e["dur"] / 1e3 for e in sorted(events, key=lambda e: e["ts"])]


def bench_ortgenai(checkpoint: Path, images: list[Path], workload, precision: str = "fp32",
                   cache_dir: Path | None = None):
    """Per-stage latency of ORT GenAI on `checkpoint` at `precision` (a bench.SystemResult)."""
    from gemvg.runtime.grounding import build_instruction

    from . import bench
    from .bench import FOLLOW_UP, QUERY, STAGES, BandwidthAroundRuns, SystemResult, peak_rss_mb, summarize

    og = require_ortgenai()
    model_dir = build_ortgenai_model(checkpoint, precision, cache_dir)
    syntax = family(json.loads((Path(checkpoint) / "config.json").read_text())["model_type"]).box_syntax
    mode = getattr(bench, "MODE", "direct")  # the prompt mode gemvg and transformers get in bench.py
    first_text = build_instruction(QUERY, syntax, mode)
    follow_text = build_instruction(FOLLOW_UP, syntax, mode)
    n = workload.new_tokens
    profile_dir = Path(tempfile.mkdtemp(prefix="gemvg-ortgenai-profile-"))
    samples: dict[str, list[float]] = {stage: [] for stage in STAGES}
    first_token_ms: list[float] = []
    rewind_ms: list[float] = []
    rewind_matches: list[bool] = []
    try:
        start = time.perf_counter()
        vl = OrtGenaiVL(model_dir, workload.threads, profile_vision=str(profile_dir / "vision"))
        samples["load"].append((time.perf_counter() - start) * 1e3)
        prompt_tokens = 0
        around = BandwidthAroundRuns(workload.threads)
        for run in range(workload.warmup + workload.runs):
            timed = run >= workload.warmup
            if timed:
                around.before()
            # First query: n tokens, no early stop.
            clock = time.perf_counter()
            inputs = vl.inputs(first_text, images)
            preprocess = (time.perf_counter() - clock) * 1e3
            clock = time.perf_counter()
            ids = inputs["input_ids"].as_numpy()[0]
            generator = vl.generator(len(ids), n, spare=REWIND_MARGIN_TOKENS)
            generator.set_inputs(inputs)
            generator.generate_next_token()
            first = (time.perf_counter() - clock) * 1e3
            for _ in range(n - 1):
                generator.generate_next_token()
            full = (time.perf_counter() - clock) * 1e3
            if timed:
                around.after()
            prompt_tokens = len(ids)
            # Follow-up, as ORT GenAI offers it: a new generator, the images processed again.
            clock = time.perf_counter()
            follow_inputs = vl.inputs(follow_text, images)
            follow_ids = follow_inputs["input_ids"].as_numpy()[0]
            follower = vl.generator(len(follow_ids), n)
            follower.set_inputs(follow_inputs)
            follower.generate_next_token()
            follow_ttft = (time.perf_counter() - clock) * 1e3
            fresh_token = int(follower.get_next_tokens()[0])
            del follower
            # Follow-up by hand: rewind the first generator to the end of the images, append the new text.
            clock = time.perf_counter()
            suffix = vl.suffix_ids(follow_text, len(images))
            generator.rewind_to(vl.images_end(ids))
            generator.append_tokens(suffix)
            generator.generate_next_token()
            rewind = (time.perf_counter() - clock) * 1e3
            rewind_matches.append(int(generator.get_next_tokens()[0]) == fresh_token)
            del generator
            if run < workload.warmup:
                continue
            samples["preprocess"].append(preprocess)
            first_token_ms.append(first)
            samples["time_to_first_token"].append(preprocess + first)
            samples["decode_per_token"].append((full - first) / max(n - 1, 1))
            samples["total"].append(preprocess + full)
            samples["follow_up_ttft"].append(follow_ttft)
            rewind_ms.append(rewind)
        peak = peak_rss_mb()
        del inputs, follow_inputs, vl
        gc.collect()  # the vision session writes its profile when it is destroyed
        vision_runs = _vision_run_ms(profile_dir)
    finally:
        shutil.rmtree(profile_dir, ignore_errors=True)
    queries = 2 * (workload.warmup + workload.runs)  # the first and the fresh follow-up run the vision encoder
    if not vision_runs or len(vision_runs) % queries:
        raise RuntimeError(f"expected the vision encoder to run a whole number of times per query, "
                           f"got {len(vision_runs)} runs for {queries} queries")
    per_query = len(vision_runs) // queries
    first_query_vision = [sum(vision_runs[(2 * r) * per_query:(2 * r + 1) * per_query])
                          for r in range(workload.warmup, workload.warmup + workload.runs)]
    samples["vision"] = first_query_vision
    samples["prefill"] = [f - v for f, v in zip(first_token_ms, first_query_vision)]
    stages = summarize(samples)
    weight_bytes = sum(p.stat().st_size for p in (model_dir / "decoder").iterdir() if p.name.startswith("model.onnx"))
    size = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())
    per_token_s = stages["decode_per_token"]["median"] / 1e3
    return SystemResult(
        f"ORT GenAI {og.__version__} {precision}", stages, peak, weight_bytes, weight_bytes / per_token_s / 1e9,
        prompt_tokens, size / 1e6, around.pairs, around.fraction(weight_bytes, samples["decode_per_token"]),
        {"model_dir": str(model_dir), "vision_runs_per_query": per_query,
         "rewind_follow_up_ttft_ms": summarize({"r": rewind_ms})["r"],
         "rewind_first_token_matches_fresh": all(rewind_matches)})
