"""`gemvg-export --target tensorrt`: TensorRT engines built from the bundle's fp32 or Q/DQ INT8 graphs.

TensorRT 10+ takes INT8 as explicit Q/DQ nodes in a strongly typed network (implicit calibrators
are deprecated, and removed in 11), which is what `--precision int8` writes: the same ONNX serves
onnxruntime on CPU and TensorRT. Engines are built with the Python API: Builder -> strongly typed
network -> OnnxParser -> optimization profiles -> build_serialized_network, with one timing cache
shared by the three graphs. Profile shapes come from the manifest's limits (patches per image for the
vision encoder; sequence and past lengths for the decoder) through `optimization_profiles`, a pure
function. Engines and the cache go to `<bundle>/tensorrt/`, recorded in the manifest's
`extra["tensorrt"]` with the onnxruntime TensorRT EP's profile strings (which the runtime passes as
`trt_profile_*_shapes` with `Engine.load(device="tensorrt")`).

Weight-only bundles (int4 / int8w) use onnxruntime's MatMulNBits contrib op, which TensorRT's ONNX
parser does not know: they are refused up front. Any other graph with onnxruntime contrib ops (the
decoder's GroupQueryAttention and fused norms) gets no engine; the manifest says why, and the
runtime's TensorRT EP still runs it, partitioned between TensorRT and CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from gemvg.runtime import bundle_io as io
from gemvg.runtime.errors import GemvgError
from gemvg.runtime.manifest import Manifest, sha256_of

ENGINE_DIR = "tensorrt"
TIMING_CACHE = "timing.cache"
TENSORRT_PRECISIONS = ("fp32", "int8")
OPT_IMAGES = 2  # the optimization point: a request of two images...
OPT_IMAGE_PATCHES = 1024  # ...of 448x448 pixels (32x32 patches) each...
OPT_TEXT_TOKENS = 64  # ...and the chat template with a short query...
OPT_NEW_TOKENS = 256  # ...with a cache for the engine's default number of new tokens


class TensorRTError(GemvgError):
    """TensorRT is missing, or cannot parse or build a graph."""


@dataclass(frozen=True)
class ShapeRange:
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def __post_init__(self):
        if not (len(self.min) == len(self.opt) == len(self.max)):
            raise ValueError("min, opt and max shapes must have the same rank")
        if any(not lo <= mid <= hi for lo, mid, hi in zip(self.min, self.opt, self.max)):
            raise ValueError(f"shape range {self.min} <= {self.opt} <= {self.max} does not hold")


Profile = dict[str, ShapeRange]


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(value, high))


def _windows(rows: int, cols: int, side: int) -> tuple[int, int]:
    """Number of windows and patches in the largest one, for a grid of rows x cols patches."""
    return -(-rows // side) * -(-cols // side), min(rows, side) * min(cols, side)


def window_shapes(min_patches: int, opt_patches: int, max_patches: int, merge: int,
                  side: int) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """(windows, longest window) at min / opt / max for Qwen2.5-VL window attention, over every image
    grid (sides multiple of `merge`) of `min_patches` to `max_patches` patches, windows `side` patches
    square: min is one window and the shortest longest-window (a thin image), max the most windows (a
    thin image: windows of merge x side patches) and the longest window (side x side); opt is the
    square grid of `opt_patches`."""
    def whole(patches: int) -> int:  # a side of at least `patches`, in whole merge groups
        return max(merge, -(-patches // merge) * merge)

    shapes = []
    for rows in range(merge, max_patches // merge + 1, merge):
        fewest, most = whole(-(-min_patches // rows)), max_patches // rows // merge * merge
        if fewest <= most:  # the window count and the longest window grow with the columns
            shapes += [_windows(rows, fewest, side), _windows(rows, most, side)]
    if not shapes:
        raise TensorRTError(f"no image grid has {min_patches} to {max_patches} patches")
    low = (1, min(longest for _, longest in shapes))
    high = (max(count for count, _ in shapes), max(longest for _, longest in shapes))
    rows = max(merge, round(opt_patches ** 0.5 / merge) * merge)
    count, longest = _windows(rows, max(merge, opt_patches // rows // merge * merge), side)
    return low, (_clamp(count, low[0], high[0]), _clamp(longest, low[1], high[1])), high


def optimization_profiles(manifest: Manifest, opt_images: int = OPT_IMAGES,
                          opt_image_patches: int = OPT_IMAGE_PATCHES) -> dict[str, list[Profile]]:
    """Min/opt/max input shapes per graph, from the manifest's limits. Pure: no TensorRT needed.

    * vision (one image per run): patches from the fewest an image can have (min_pixels after
      smart_resize, whole 2x2 merge groups) to `limits.max_patches_per_image`; with window attention,
      the window layout's windows and longest window over those images (`window_shapes`);
    * embed: 1 to `limits.max_context` tokens;
    * decoder, two profiles over a KV cache of 1 to max_context positions: profile 0 (prefill) takes 1
      to max_context tokens per pass, optimized for a fresh prompt; profile 1 (decode) takes one token.
    The optimization point is `opt_images` images of `opt_image_patches` patches, a short query and a
    cache for 256 new tokens. Only dynamic inputs the graph has are listed (not the decoder's scalars
    seqlens_k / total_sequence_length, which have fixed shapes).
    """
    limits, pre, vision, text = manifest.limits, manifest.preprocess, manifest.vision, manifest.text
    unit = pre.merge_size ** 2
    patch_dim = 3 * pre.temporal_patch_size * pre.patch_size ** 2
    max_patches = limits.max_patches_per_image // unit * unit
    if max_patches < unit:
        raise TensorRTError(f"the bundle's max_patches_per_image ({limits.max_patches_per_image}) is under one "
                            f"merge group of {unit} patches")
    min_patches = _clamp(pre.min_pixels // pre.patch_size ** 2 // unit * unit, unit, max_patches)
    opt_patches = _clamp(opt_image_patches // unit * unit, min_patches, max_patches)

    def patches(*tail: int) -> ShapeRange:
        return ShapeRange((min_patches, *tail), (opt_patches, *tail), (max_patches, *tail))

    vision_profile = {io.VISION_PIXEL_VALUES: patches(patch_dim), io.VISION_ROTARY_COS: patches(vision.head_dim),
                      io.VISION_ROTARY_SIN: patches(vision.head_dim), io.VISION_WINDOW_SCATTER: patches()}
    if vision.window_size > 0:
        side = vision.window_size // pre.merge_size // pre.patch_size * pre.merge_size
        (w_min, l_min), (w_opt, l_opt), (w_max, l_max) = window_shapes(min_patches, opt_patches, max_patches,
                                                                         pre.merge_size, side)
        vision_profile[io.VISION_WINDOW_GATHER] = ShapeRange((w_min, l_min), (w_opt, l_opt), (w_max, l_max))
        vision_profile[io.VISION_WINDOW_BIAS] = ShapeRange((w_min, 1, 1, l_min), (w_opt, 1, 1, l_opt), (w_max, 1, 1, l_max))
    vision_profile = {name: shape for name, shape in vision_profile.items() if name in manifest.vision_graph.inputs}

    context = limits.max_context
    if context < 2:
        raise TensorRTError(f"the bundle's max_context ({context}) leaves no room for a generated token")
    prompt = _clamp(opt_images * opt_patches // unit + OPT_TEXT_TOKENS, 1, context)
    capacity = _clamp(prompt + OPT_NEW_TOKENS, 1, context)

    def decoder_profile(seq: tuple[int, int, int]) -> Profile:
        # The KV cache is one preallocated buffer per layer, [1, kv_heads, capacity, head_dim], past and
        # present alike; its capacity (prompt + new tokens) does not depend on how many tokens a pass takes.
        capacities = (1, capacity, context)
        profile = {io.DECODER_INPUTS_EMBEDS: ShapeRange(*((1, s, text.hidden_size) for s in seq)),
                   io.DECODER_CACHE_POSITIONS: ShapeRange(*((1, s) for s in seq)),
                   io.DECODER_ROTARY_COS: ShapeRange(*((c, text.head_dim // 2) for c in capacities)),
                   io.DECODER_ROTARY_SIN: ShapeRange(*((c, text.head_dim // 2) for c in capacities))}
        for past in (io.past_key, io.past_value):
            for layer in range(text.num_layers):
                profile[past(layer)] = ShapeRange(*((1, text.num_kv_heads, c, text.head_dim)
                                                               for c in capacities))
        return {name: shape for name, shape in profile.items() if name in manifest.decoder_graph.inputs}

    return {
        "vision": [vision_profile],
        "embed": [{io.EMBED_INPUT_IDS: ShapeRange((1, 1), (1, prompt), (1, context))}],
        "decoder": [decoder_profile((1, prompt, context)), decoder_profile((1, 1, 1))],
    }


def ort_profile_options(profile: Profile) -> dict[str, str]:
    """onnxruntime TensorRT EP's `trt_profile_{min,opt,max}_shapes` strings for one profile."""
    def spec(which: str) -> str:
        return ",".join(f"{name}:{'x'.join(str(d) for d in getattr(shape, which))}" for name, shape in profile.items())

    return {"min": spec("min"), "opt": spec("opt"), "max": spec("max")}


def check_target(precision: str) -> None:
    if precision not in TENSORRT_PRECISIONS:
        raise TensorRTError(f"--target tensorrt builds engines from fp32 or int8 (Q/DQ) graphs; --precision "
                            f"{precision} writes onnxruntime's MatMulNBits, which TensorRT cannot parse")


def require_tensorrt():
    """The tensorrt module, or a TensorRTError in one line."""
    try:
        import tensorrt
    except ImportError as err:
        raise TensorRTError(f"--target tensorrt needs the TensorRT Python package, which does not import here "
                            f"({err}); install TensorRT 10+ (pip install tensorrt, or JetPack's python3-libnvinfer) "
                            "on a machine with an NVIDIA GPU, or leave --target out") from None
    return tensorrt


def contrib_ops(path: Path) -> list[str]:
    """Op types outside the standard ONNX domains (onnxruntime's com.microsoft kernels): TensorRT's ONNX
    parser has no importer for them."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return sorted({node.op_type for node in model.graph.node if node.domain not in ("", "ai.onnx")})


def _describe(error) -> str:
    return error.desc() if hasattr(error, "desc") else str(error)


def _graphs(manifest: Manifest) -> dict[str, str]:
    graphs = {"vision": manifest.vision_graph.path, "embed": manifest.embed_graph.path,
              "decoder": manifest.decoder_graph.path}
    if manifest.step_decoder_graph:
        graphs["step_decoder"] = manifest.step_decoder_graph.path
    return graphs


def build_engines(bundle_dir: str | Path, manifest: Manifest, progress: Callable[[str], None],
                  workspace_bytes: int | None = None) -> Manifest:
    """Build a TensorRT engine per graph into `<bundle>/tensorrt/`; returns the manifest with them recorded."""
    check_target(manifest.precision)
    trt = require_tensorrt()
    bundle = Path(bundle_dir)
    out = bundle / ENGINE_DIR
    out.mkdir(exist_ok=True)
    cache_path = out / TIMING_CACHE
    profiles = optimization_profiles(manifest)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    engines = {}
    skipped = {}
    for name, graph in _graphs(manifest).items():
        unsupported = contrib_ops(bundle / graph)
        if unsupported:
            skipped[name] = (f"{graph} uses onnxruntime contrib ops TensorRT cannot parse ({', '.join(unsupported)}); "
                             "it runs through onnxruntime (Engine.load(device='tensorrt') places the rest of it "
                             "on TensorRT and those ops on CUDA)")
            progress(f"tensorrt: no {name} engine: {skipped[name]}")
            continue
        progress(f"tensorrt: building {name} engine from {graph} ({len(profiles[name])} profile(s))")
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(bundle / graph)):
            errors = [_describe(parser.get_error(i)) for i in range(parser.num_errors)]
            raise TensorRTError(f"TensorRT cannot parse {graph}: {errors[0] if errors else 'unknown error'}")
        config = builder.create_builder_config()
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
        config.set_timing_cache(cache, False)  # False: do not ignore a cache from another device
        if workspace_bytes:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
        for profile in profiles[name]:
            shapes = builder.create_optimization_profile()
            for tensor, shape in profile.items():
                shapes.set_shape(tensor, shape.min, shape.opt, shape.max)
            config.add_optimization_profile(shapes)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise TensorRTError(f"TensorRT could not build an engine for {graph} (its log above says why)")
        engine_path = out / f"{name}.engine"
        engine_path.write_bytes(bytes(serialized))
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
        engines[name] = {"path": f"{ENGINE_DIR}/{engine_path.name}", "sha256": sha256_of(engine_path),
                         "profiles": [{tensor: {"min": list(s.min), "opt": list(s.opt), "max": list(s.max)}
                                       for tensor, s in profile.items()} for profile in profiles[name]]}
        progress(f"  {engine_path.name} written ({engine_path.stat().st_size / 1e6:.1f} MB)")
    record = {
        "tensorrt": getattr(trt, "__version__", "unknown"),
        "strongly_typed": True,
        "engines": engines,
        "skipped": skipped,
        "timing_cache": f"{ENGINE_DIR}/{TIMING_CACHE}",
        # The runtime's TensorRT EP options for the graphs TensorRT takes whole: the covering profile 0.
        "ort_profiles": {name: ort_profile_options(profiles[name][0]) for name in engines},
    }
    updated = replace(manifest, extra={**manifest.extra, "tensorrt": record})
    updated.write(bundle)
    return updated
