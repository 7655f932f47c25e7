"""ONNX Runtime sessions for a bundle's graphs: execution providers per device, TensorRT options, threads.

Sessions are shared by every request of an engine: ONNX Runtime's `run` may be called from several
threads at once. What is per request (the KV cache and its IO bindings) lives in `decoding`.
"""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from .errors import BundleError, InputError, ProviderError
from .manifest import Manifest

DEVICES = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}

TENSORRT_CACHE_DIR = "trt_cache"

# What ONNX Runtime raises on a graph it cannot open (a corrupt or hand-made file whose checksum matches).
_OPEN_ERRORS = (ort_errors.Fail, ort_errors.InvalidGraph, ort_errors.InvalidProtobuf, ort_errors.InvalidArgument,
                ort_errors.NoSuchFile, ort_errors.NotImplemented, ort_errors.RuntimeException)

# Engine.load's session names, in the order they are opened, and the manifest entry of each.
GRAPHS = (("vision", "vision_graph"), ("embed", "embed_graph"), ("decoder", "decoder_graph"),
          ("step_decoder", "step_decoder_graph"))


def providers_for(device: str) -> list[str]:
    """The execution providers for a device, or a ProviderError naming what is missing."""
    if device not in DEVICES:
        raise InputError(f"unknown device {device!r}; expected one of {', '.join(DEVICES)}")
    wanted = DEVICES[device]
    available = set(ort.get_available_providers())
    if wanted[0] not in available:
        raise ProviderError(f"device {device!r} needs onnxruntime's {wanted[0]}, which this onnxruntime lacks "
                            f"(available: {', '.join(sorted(available))}); install onnxruntime-gpu with "
                            "CUDA/TensorRT, or use device='cpu'")
    return [p for p in wanted if p in available]


def tensorrt_options(bundle: Path, manifest: Manifest, graph: str) -> dict[str, str]:
    """TensorRT EP options for one of the bundle's graphs: engines and timing cache kept in the bundle's
    trt_cache/, INT8 enabled for Q/DQ graphs, and the optimization profile that
    `gemvg-export --target tensorrt` recorded from the manifest's limits, when there is one."""
    cache = str(bundle / TENSORRT_CACHE_DIR)
    options = {"trt_engine_cache_enable": "True", "trt_engine_cache_path": cache,
               "trt_timing_cache_enable": "True", "trt_timing_cache_path": cache}
    if getattr(manifest, f"{graph}_graph").precision == "int8":
        options["trt_int8_enable"] = "True"
    profile = manifest.extra.get("tensorrt", {}).get("ort_profiles", {}).get(graph)
    if profile:
        for which in ("min", "opt", "max"):
            options[f"trt_profile_{which}_shapes"] = profile[which]
    return options


def session_providers(providers: list[str], bundle: Path, manifest: Manifest, graph: str) -> list:
    """`providers` with the TensorRT EP's options attached for `graph`."""
    return [(p, tensorrt_options(bundle, manifest, graph)) if p == "TensorrtExecutionProvider" else p
            for p in providers]


def session_options(threads: int | None) -> ort.SessionOptions:
    """Options of every session: full graph optimization, `threads` intra-op threads (None: every core),
    and no memory patterns.

    A memory pattern is ONNX Runtime's plan of a run's intermediate buffers for one set of input shapes,
    traced by the first run with those shapes and kept for the session's lifetime; a later run with the
    same shapes takes all its intermediates from the arena as one block of the plan's size. Our graphs
    see different shapes from request to request (prompt length, KV capacity, image size), so those
    blocks come in ever different sizes, and with requests running at once the arena's resident part
    climbed in steps with the number of requests (benchmarks/RESULTS.md, memory over long runs).
    Without patterns each intermediate is an arena allocation of its own, reused whatever the shapes.
    """
    if threads is not None and threads < 1:
        raise InputError(f"threads must be at least 1 (or None for every core), not {threads}")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_mem_pattern = False
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


def open_sessions(bundle: Path, manifest: Manifest, device: str, threads: int | None
                  ) -> dict[str, ort.InferenceSession]:
    """One session per graph the manifest names (the step decoder only when the bundle has one)."""
    providers = providers_for(device)
    options = session_options(threads)
    if "TensorrtExecutionProvider" in providers:
        (bundle / TENSORRT_CACHE_DIR).mkdir(exist_ok=True)
    sessions = {}
    for name, entry in GRAPHS:
        graph = getattr(manifest, entry)
        if graph is None:
            continue
        try:
            sessions[name] = ort.InferenceSession(str(bundle / graph.path), options,
                                                  providers=session_providers(providers, bundle, manifest, name))
        except _OPEN_ERRORS as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise BundleError(f"bundle {bundle}: onnxruntime cannot open {graph.path}: {reason}") from None
    return sessions
