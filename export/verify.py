"""Check an exported bundle against PyTorch, part by part, within the memory of a few layers.

A 7B model does not fit in float32 to compare against, so each part of the bundle is checked against the
same part in transformers, built from the checkpoint's own tensors:

* vision: the ONNX vision encoder against transformers' vision tower (its own forward: rotary, windows
  and merger included) on two generated images of different sizes and aspect ratios;
* embedding: the graph's rows against the checkpoint's, exactly;
* decoder: a truncated decoder made of the bundle's own written tensors (by default its first, middle
  and last layer, then the final norm and the lm_head) against transformers' text model built with the
  same layers, on the real prompt of those two images (token embeddings with the image features at the
  image tokens, M-RoPE positions): the prompt's last-position logits, and one cached decode step after it.

The whole model end to end is compared with transformers' `generate` by the test suite (tiny models)
and by the benchmarks (real shapes).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from gemvg.runtime import bundle_io as io
from gemvg.runtime.grounding import build_instruction
from gemvg.runtime.manifest import Manifest
from gemvg.runtime.preprocess import load_image, preprocess_image
from gemvg.runtime.prompt import build_prompt, deepstack_embeds
from gemvg.runtime.rotary import MRopeAngles
from gemvg.runtime.vision import stack_vision_outputs, vision_feeds

from .decoder_builder import DecoderSource, WeightFormat, build_decoder
from .safetensors_io import CheckpointTensors

CHECK_GRAPH = ".verify_decoder.onnx"  # written beside decoder.onnx (it reads decoder.onnx.data), then removed


@dataclass
class VerifyReport:
    layers: list[int]  # the decoder layers of the truncated check
    vision_diff: float  # max abs difference of the image features, relative to their largest magnitude
    vision_cosine: float
    embed_exact: bool
    prefill_diff: float  # max abs difference of the truncated decoder's last-position logits
    decode_diff: float  # same for one cached decode step after it
    prefill_cosine: float
    decode_cosine: float
    same_next_token: bool

    @property
    def max_abs_logit_diff(self) -> float:
        return float(np.max([self.prefill_diff, self.decode_diff]))  # NaN propagates (Python's max drops it)

    def to_dict(self) -> dict:
        return {**asdict(self), "max_abs_logit_diff": self.max_abs_logit_diff}


def sample_images(seed: int = 0) -> list[np.ndarray]:
    """Two random RGB images of different sizes and aspect ratios."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (90, 130, 3), dtype=np.uint8), rng.integers(0, 256, (150, 70, 3), dtype=np.uint8)]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    denominator = np.linalg.norm(a) * np.linalg.norm(b)
    return float(np.dot(a, b) / denominator) if denominator else float(np.array_equal(a, b))


def check_layers(num_layers: int) -> list[int]:
    return sorted({0, num_layers // 2, num_layers - 1})


def _session(path: Path):
    """A CPU session that computes from the memory-mapped weights as they are: prepacking would copy
    every weight of the graph once more, for a few runs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@dataclass
class VisionCheck:
    images: list  # the sample images, preprocessed
    features: list[np.ndarray]  # the bundle's features per image, [1 + deepstack layers, tokens, hidden], raster order
    diff: float  # largest difference against transformers, relative to the largest feature magnitude
    cosine: float  # lowest over the images


def check_vision(vision_graph: Path, preprocess, vision, visual, release: Callable[[], None]) -> VisionCheck:
    """The ONNX vision encoder against transformers' vision tower `visual` on the sample images. Run right
    after the vision export; `release()` is called once the tower's outputs are computed, so that its
    weights are gone before the ONNX session holds the graph's (and before the decoder is written)."""
    import torch

    images = [preprocess_image(load_image(image, preprocess.max_image_pixels), preprocess) for image in sample_images()]
    # transformers first, then the tower's weights can go before the ONNX session maps its own copy.
    references = []
    with torch.no_grad():
        for image in images:
            output = visual(torch.from_numpy(image.pixel_values), grid_thw=torch.tensor([image.grid_thw]))
            merged = getattr(output, "pooler_output", output)
            merged = merged[0] if isinstance(merged, tuple) else merged
            deepstack = list(getattr(output, "deepstack_features", None) or [])
            references.append(torch.stack([merged, *deepstack]).float().numpy())
            del output, merged, deepstack
    release()
    session = _session(vision_graph)
    declared = {i.name for i in session.get_inputs()}
    features, worst, lowest = [], 0.0, 1.0
    for image, reference in zip(images, references):
        feeds = vision_feeds(image.pixel_values, image.grid_thw, vision)
        inputs = {name: getattr(feeds, name) for name in io.VISION_INPUTS if name in declared}
        ours = stack_vision_outputs(session.run(None, inputs), feeds.restore_order)
        worst = float(np.max([worst, np.abs(ours - reference).max() / max(1.0, np.abs(reference).max())]))
        lowest = min(lowest, cosine(ours, reference))
        features.append(ours)
    return VisionCheck(images, features, worst, lowest)


def reference_text_model(family_text_class, text_config, tensors: CheckpointTensors, layers: Sequence[int]):
    """transformers' text model with only `layers` (renumbered 0..n-1) and the final norm, in float32."""
    import copy

    import torch
    from transformers.initialization import no_init_weights

    config = copy.deepcopy(text_config)
    config.num_hidden_layers = len(layers)
    config._attn_implementation = "eager"
    with no_init_weights(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = family_text_class._from_config(config, dtype=torch.float32)
    state = {"norm.weight": torch.from_numpy(tensors.get("text.norm.weight"))}
    for new, old in enumerate(layers):
        for name in tensors.names(f"text.layers.{old}."):
            state[f"layers.{new}." + name[len(f"text.layers.{old}."):]] = torch.from_numpy(tensors.get(name))
    model.load_state_dict(state, strict=False, assign=True)
    return model.eval()


def verify_bundle(bundle_dir: str | Path, manifest: Manifest, tensors: CheckpointTensors, vision: VisionCheck,
                  family_text_class, text_config, written: dict, fmt: WeightFormat,
                  layers: Sequence[int] | None = None, query: str = "Where is the red cup?",
                  progress: Callable[[str], None] = lambda message: None) -> VerifyReport:
    """Check `bundle_dir` part by part against transformers (see the module docstring), given the vision
    check made at export time; `written` holds the decoder's tensors by name."""
    import torch
    from tokenizers import Tokenizer

    bundle = Path(bundle_dir)
    layers = list(layers if layers is not None else check_layers(manifest.text.num_layers))
    tokenizer = Tokenizer.from_file(str(bundle / manifest.tokenizer.path))
    prompt = build_prompt(tokenizer, manifest, build_instruction(query, manifest.box_syntax, "direct"),
                          [image.grid_thw for image in vision.images])

    progress("  checking the token embedding against the checkpoint")
    ids = prompt.input_ids
    (embeds,) = _session(bundle / manifest.embed_graph.path).run(None, {io.EMBED_INPUT_IDS: ids[None]})
    table = "text.embed_tokens.weight"
    unique = np.unique(ids)
    rows = np.stack([tensors.rows(table, int(t), int(t) + 1)[0] for t in unique])
    embed_exact = bool(np.array_equal(embeds[0], rows[np.searchsorted(unique, ids)]))
    for (start, end), image_features in zip(prompt.image_spans, vision.features):
        embeds[0, start:end] = image_features[0]
    deepstack = deepstack_embeds(prompt, vision.features, 0, len(manifest.vision.deepstack_layers),
                                 manifest.text.hidden_size)

    progress(f"  checking decoder layers {', '.join(map(str, layers))} + final norm + lm_head against transformers")
    source = DecoderSource(tensors, tied_embeddings=text_config.tie_word_embeddings)
    check_path = bundle / CHECK_GRAPH
    try:
        build_decoder(source, manifest.text, float(text_config.rms_norm_eps), int(text_config.intermediate_size),
                      check_path, fmt, layers=layers, reused=written,
                      deepstack_layers=len(manifest.vision.deepstack_layers))
        session = _session(check_path)
        ours_prefill, ours_step, next_token = _run_truncated(session, manifest, layers, embeds, deepstack, prompt,
                                                             tensors)
        del session
    finally:
        check_path.unlink(missing_ok=True)

    model = reference_text_model(family_text_class, text_config, tensors, layers)
    next_embed = tensors.rows(table, next_token, next_token + 1)[None]
    positions = prompt.position_ids[:, None, :]
    step_positions = np.concatenate([positions, np.full((3, 1, 1), prompt.next_position)], axis=2)
    extra, step_extra = {}, {}
    if deepstack is not None:  # DeepStack of the checked layers that take it (the first ones, renumbered)
        fed = [i for i in layers if i < len(deepstack)]
        mask = torch.from_numpy(prompt.input_ids == manifest.tokens.image_pad)[None]
        step_mask = torch.cat([mask, torch.zeros((1, 1), dtype=torch.bool)], dim=1)
        visual = [torch.from_numpy(deepstack[i, 0][mask[0].numpy()]) for i in fed]
        extra = {"visual_pos_masks": mask, "deepstack_visual_embeds": visual}
        step_extra = {"visual_pos_masks": step_mask, "deepstack_visual_embeds": visual}
    with torch.no_grad():
        hidden = model(inputs_embeds=torch.from_numpy(embeds), position_ids=torch.from_numpy(positions),
                       use_cache=False, **extra).last_hidden_state[0, -1].numpy()
        step_hidden = model(inputs_embeds=torch.from_numpy(np.concatenate([embeds, next_embed], axis=1)),
                            position_ids=torch.from_numpy(step_positions),
                            use_cache=False, **step_extra).last_hidden_state[0, -1].numpy()
    del model
    # The head in row blocks: the float32 lm_head (2.2 GB at 7B) is never held whole.
    head = [(block @ hidden, block @ step_hidden) for _, block in tensors.row_chunks(source.lm_head)]
    ref_prefill, ref_step = (np.concatenate(parts) for parts in zip(*head))
    return VerifyReport(
        layers=layers, vision_diff=vision.diff, vision_cosine=vision.cosine, embed_exact=embed_exact,
        prefill_diff=float(np.abs(ours_prefill - ref_prefill).max()),
        decode_diff=float(np.abs(ours_step - ref_step).max()),
        prefill_cosine=cosine(ours_prefill, ref_prefill), decode_cosine=cosine(ours_step, ref_step),
        same_next_token=next_token == int(ref_prefill.argmax()))


def _run_truncated(session, manifest: Manifest, layers: Sequence[int], embeds: np.ndarray,
                   deepstack: np.ndarray | None, prompt,
                   tensors: CheckpointTensors) -> tuple[np.ndarray, np.ndarray, int]:
    """The truncated decoder's logits for the prompt, and for one decode step (its greedy token) after it."""
    text = manifest.text
    length = len(prompt.input_ids)
    capacity = length + 1
    cos = np.zeros((capacity, text.head_dim // 2), np.float32)
    sin = np.zeros_like(cos)
    rotary = MRopeAngles(text)
    caches = {name: np.zeros((1, text.num_kv_heads, capacity, text.head_dim), np.float32)
              for i in layers for name in (io.past_key(i), io.past_value(i))}

    def run(inputs: np.ndarray, positions: np.ndarray, start: int, deepstack: np.ndarray | None) -> np.ndarray:
        count = inputs.shape[1]
        rotary.fill(positions, cos[start:start + count], sin[start:start + count])
        feeds = {io.DECODER_INPUTS_EMBEDS: inputs,
                 io.DECODER_CACHE_POSITIONS: np.arange(start, start + count, dtype=np.int64)[None],
                 io.DECODER_SEQLENS_K: np.asarray([start + count - 1], np.int32),
                 io.DECODER_TOTAL_SEQUENCE_LENGTH: np.asarray(start + count, np.int32),
                 io.DECODER_ROTARY_COS: cos, io.DECODER_ROTARY_SIN: sin, **caches}
        if deepstack is not None:
            feeds[io.DECODER_DEEPSTACK_EMBEDS] = deepstack
        logits, *presents = session.run(None, feeds)
        names = [o.name for o in session.get_outputs()][1:]
        for name, present in zip(names, presents):  # keep what the pass wrote (present_* -> past_*)
            caches[name.replace("present_", "past_")] = present
        return logits[0, -1]

    prefill = run(embeds, prompt.position_ids, 0, deepstack)
    token = int(prefill.argmax())
    step_embeds = tensors.rows("text.embed_tokens.weight", token, token + 1)[None]
    step = run(step_embeds, np.full((3, 1), prompt.next_position, np.int64), length,
               None if deepstack is None else np.zeros((len(deepstack), 1, 1, deepstack.shape[-1]), np.float32))
    return prefill, step, token
