"""fp32 bundle -> quantized bundle: static INT8 (Q/DQ, calibrated) and weight-only INT4/INT8 (MatMulNBits).

Precisions (the bundle format is the same for all; only the graphs' contents differ):

* ``int8``: the vision encoder and the decoder get static INT8 with explicit QuantizeLinear /
  DequantizeLinear nodes (onnxruntime.quantization.quantize_static, QDQ format): weights int8
  symmetric per output channel, activations int8 symmetric per tensor (zero point 0, as TensorRT's
  explicit quantization requires), Q/DQ on the inputs of MatMul and Gemm only. Activation ranges come
  from calibration requests run through the runtime's own preprocessing (gemvg.export.calibration).
  Which layer groups stay float is decided by measurement: every group is restored to float on its
  own to measure what its quantization costs in output cosine against fp32, then the costliest
  groups are restored one by one until the target cosine is met on the calibration samples. Before
  quantization, contrib-op tensors get types (or their activations would stay float) and sibling
  linears reading one activation are merged (onnxruntime's CPU kernels are 10x slower otherwise).
* ``int4`` / ``int8w``: weight-only block quantization of every decoder MatMul with a constant weight
  (the lm_head included) to com.microsoft MatMulNBits (MatMulNBitsQuantizer, 4 or 8 bits, symmetric,
  block size and accuracy level configurable); the vision encoder stays fp32 or gets static INT8. The
  same measured pass decides which layer groups get 8 bits instead of 4 (int4) or stay float (int8w),
  ranked by gain per weight and within a budget (`--upgrade-budget`, e.g. a quarter of the weights).
  With no budget (the default) a checkpoint's weight-only decoder is quantized as it is streamed
  (gemvg.export.decoder_builder) and this module only quantizes existing fp32 bundles.
* ``int8`` with ``step_decoder`` (``--step-decoder int8w|int4``): a second, weight-only decoder
  (decoder_step.onnx, same I/O) that the engine uses for one-token decode steps. Static INT8 is the
  fastest for prompts (integer GEMMs), but per token its MatMulIntegerToFloat reads weights far below
  memory bandwidth: on bench-0.5b an 8-bit block-128 MatMulNBits step took 13.4 ms against 20.8 ms in
  an A/B, 19.3 against 21.6 in a bench run (its prefill: 1342 ms against 974). The cost is the second
  graph's bytes on disk and in memory.

The token embedding (a Gather) stays fp32 in every precision.
"""

from __future__ import annotations

import ast
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from gemvg.runtime.errors import GemvgError
from gemvg.runtime.manifest import GraphFile, Manifest, graph_file, load_manifest

from .memory import trim_heap
from .onnx_files import LARGE_GRAPH_BYTES, graph_bytes, save_graph, weights_file

PRECISIONS = ("fp32", "int8", "int4", "int8w")
# int8w: the vision tower's linear layers weight-only 8-bit (MatMulNBits), no calibration needed.
VISION_PRECISIONS = ("fp32", "int8", "int8w")
STEP_DECODER_FILE = "decoder_step.onnx"
WEIGHT_ONLY_BITS = {"int4": 4, "int8w": 8}
# Output cosine against fp32 that the sensitivity pass must meet on its samples, by precision: 4-bit
# weights cost more, and a higher bar would give too many groups 8 bits.
DEFAULT_TARGETS = {"int8": 0.99, "int8w": 0.99, "int4": 0.97}
# Weight-only: by default every MatMul gets the precision's bits (as ORT GenAI's builder does), written
# while streaming from the checkpoint. A budget > 0 asks for the measured pass: at most that fraction of
# the decoder's weights gets the upgrade (8 bits for int4) where it buys the most output cosine; it
# compares whole graphs, so it needs an fp32 decoder in memory (MEASURED_UPGRADE_BUDGET is a good value).
UPGRADE_BUDGET = 0.0
MEASURED_UPGRADE_BUDGET = 0.25
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
QUANTIZED_OPS = ("MatMul", "Gemm")  # Q/DQ on the inputs of these; their outputs stay float
SCOPE_KEY = "pkg.torch.onnx.name_scopes"
FLOAT_BY_DESIGN = {
    "vision": "norms, softmax, rotary and activation functions: only MatMul/Gemm inputs are quantized",
    "decoder": "GroupQueryAttention (scores, softmax, weighted values), norms, rotary, activation functions "
               "and the residual stream: only MatMul inputs are quantized; the cached keys/values stay fp32",
}
WEIGHT_ONLY_FLOAT = ("MatMuls without a constant weight (if any) and every other op: GroupQueryAttention, norms, "
                     "rotary, activation functions; activations stay fp32 (accuracy_level 4 quantizes them on "
                     "the fly inside MatMulNBits); the embedding Gather stays fp32")


class QuantizeError(GemvgError):
    """Quantization cannot proceed (bad options, missing calibration, unsupported graph)."""


@dataclass
class QuantizeOptions:
    precision: str = "int8"
    vision_precision: str | None = None  # fp32 | int8 | int8w; default int8 for int8, fp32 for weight-only
    calibration: str | Path | None = None
    calibration_method: str = "minmax"
    calibration_samples: int | None = None  # cap on calibration requests (held-back ones excluded)
    block_size: int = 32
    accuracy_level: int = 4  # MatMulNBits: 4 = int8 compute on CPU
    upgrade_budget: float = UPGRADE_BUDGET  # weight-only: fraction of weights that may get 8 bits / stay float
    target_cosine: float | None = None  # per component, min over the sensitivity samples; default by precision
    sensitivity_samples: int = 2  # calibration requests used to measure output cosines
    report_samples: int = 3  # held-back requests for the report when the calibration file has none
    report_tokens: int = 8
    step_decoder: str | None = None  # int8 only: int8w | int4, a weight-only decoder for one-token steps

    def target(self, component: str) -> float:
        if self.target_cosine is not None:
            return self.target_cosine
        if component == "step_decoder":
            return DEFAULT_TARGETS[self.step_decoder]
        return DEFAULT_TARGETS["int8" if component == "vision" else self.precision]

    @property
    def vision(self) -> str:
        return self.vision_precision or ("int8" if self.precision == "int8" else "fp32")


def check_options(options: QuantizeOptions) -> None:
    """Fail fast, before any export work, on options that cannot work."""
    if options.precision not in PRECISIONS or options.precision == "fp32":
        raise QuantizeError(f"unknown quantized precision {options.precision!r}; expected int8, int4 or int8w")
    if options.vision not in VISION_PRECISIONS:
        raise QuantizeError(f"--vision-precision must be one of {', '.join(VISION_PRECISIONS)}, not {options.vision!r}")
    needs_calibration = options.precision == "int8" or options.vision == "int8"
    if needs_calibration and not options.calibration:
        what = "--precision int8" if options.precision == "int8" else "--vision-precision int8"
        raise QuantizeError(f"{what} needs calibration requests: --calibration CALIB.jsonl "
                            '(one {"images": [...], "query": "..."} per line)')
    if options.calibration_method not in CALIBRATION_METHODS:
        raise QuantizeError(f"unknown calibration method {options.calibration_method!r}; expected "
                            f"{', '.join(CALIBRATION_METHODS)}")
    if options.calibration_samples is not None and options.calibration_samples < 1:
        raise QuantizeError("--calibration-samples must be at least 1")
    if options.block_size < 16 or options.block_size & (options.block_size - 1):
        raise QuantizeError(f"--block-size must be a power of two, at least 16 (got {options.block_size})")
    if options.accuracy_level not in (0, 1, 2, 3, 4):
        raise QuantizeError(f"--accuracy-level must be 0-4 (got {options.accuracy_level})")
    if not 0.0 <= options.upgrade_budget <= 1.0:
        raise QuantizeError(f"--upgrade-budget must be in [0, 1] (got {options.upgrade_budget})")
    if options.target_cosine is not None and not 0.0 < options.target_cosine <= 1.0:
        raise QuantizeError(f"the target cosine must be in (0, 1] (got {options.target_cosine})")
    if options.calibration and not Path(options.calibration).is_file():
        raise QuantizeError(f"calibration file not found: {options.calibration}")
    if options.step_decoder is not None:
        if options.precision != "int8":
            raise QuantizeError("--step-decoder goes with --precision int8 (other precisions decode with their "
                                "own weight-only decoder)")
        if options.step_decoder not in WEIGHT_ONLY_BITS:
            raise QuantizeError(f"--step-decoder must be one of {', '.join(WEIGHT_ONLY_BITS)} "
                                f"(got {options.step_decoder!r})")


# -- small helpers ---------------------------------------------------------------------------------


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    denominator = np.linalg.norm(a) * np.linalg.norm(b)
    if denominator == 0:
        return 1.0 if np.array_equal(a, b) else 0.0
    return float(np.dot(a, b) / denominator)


@contextmanager
def _quiet_quantizers():
    """quantize_static logs a "consider pre-processing" warning per call through the root logger (advice
    for CNNs) and MatMulNBitsQuantizer a line per node: silenced while they run, then restored."""
    import logging

    loggers = [logging.getLogger(name) for name in ("", "onnxruntime.quantization.matmul_nbits_quantizer")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _session(model_or_path, threads: int | None = None):
    """A CPU session from a ModelProto (in memory, or through a temp file past protobuf's limit) or a path."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if isinstance(model_or_path, (str, Path)):
        return ort.InferenceSession(str(model_or_path), options, providers=["CPUExecutionProvider"])
    if model_or_path.ByteSize() < LARGE_GRAPH_BYTES:
        return ort.InferenceSession(model_or_path.SerializeToString(), options, providers=["CPUExecutionProvider"])
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        onnx.save_model(model_or_path, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx.data")
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# -- layer groups ----------------------------------------------------------------------------------

_BLOCK = re.compile(r"(?:^|\.)(blocks|layers)\.(\d+)\.(attn|self_attn|mlp)(?:\.|$)")


def _scopes(node) -> list[str]:
    for prop in node.metadata_props:
        if prop.key == SCOPE_KEY:
            try:
                value = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return []
            return [str(v) for v in value] if isinstance(value, (list, tuple)) else []
    return []


def _group_of(scopes: list[str], component: str) -> str | None:
    for scope in reversed(scopes):
        match = _BLOCK.search(scope)
        if match:
            kind = "attn" if match.group(3) in ("attn", "self_attn") else "mlp"
            unit = "block" if match.group(1) == "blocks" else "layer"
            return f"{component}.{unit}{int(match.group(2))}.{kind}"
    for scope in reversed(scopes):
        for name in ("merger", "patch_embed", "lm_head"):
            if scope.endswith(name):
                return f"{component}.{name}"
    return None


_WEIGHT = re.compile(r"^l(\d+)_(qkv|o|gate_up|down)_weight$")


def _group_of_weight(node, initializers: set[str], component: str) -> str | None:
    """Groups of a graph built by name (gemvg's decoder builder): `l{i}_{qkv,o,gate_up,down}_weight`."""
    for name in node.input:
        if name not in initializers:
            continue
        match = _WEIGHT.match(name)
        if match:
            kind = "attn" if match.group(2) in ("qkv", "o") else "mlp"
            return f"{component}.layer{int(match.group(1))}.{kind}"
        if name.startswith("lm_head"):
            return f"{component}.lm_head"
    return None


def node_groups(model, component: str, op_types: Sequence[str] = QUANTIZED_OPS) -> dict[str, list[str]]:
    """Quantizable nodes by layer group (`vision.block3.mlp`, `decoder.layer0.attn`, `decoder.lm_head`...).

    Groups come from the exporter's module scopes, or for graphs built by name (the decoder) from the
    weights' names: a block's attention projections (`.attn`), its MLP (`.mlp`). Nodes without a scope
    are the attention products (scores, weighted values) that gemvg's vision forward writes itself:
    they form the `.attn_core` group of the block of the scoped node before them in graph order.
    Graphs without either get one group per node.
    """
    groups: dict[str, list[str]] = {}
    last: str | None = None
    initializers = {init.name for init in model.graph.initializer}
    for index, node in enumerate(model.graph.node):
        if node.op_type not in op_types:
            continue
        group = _group_of(_scopes(node), component) or _group_of_weight(node, initializers, component)
        if group is None:
            group = last.rsplit(".", 1)[0] + ".attn_core" if last else f"{component}.{node.name or index}"
        else:
            last = group
        groups.setdefault(group, []).append(node.name)
    return groups


def constant_weight_nodes(model, op_type: str = "MatMul") -> set[str]:
    """Nodes of `op_type` whose second input is an initializer (what weight-only quantization can take)."""
    initializers = {init.name for init in model.graph.initializer}
    return {node.name for node in model.graph.node
            if node.op_type == op_type and len(node.input) > 1 and node.input[1] in initializers}


# -- mixing two versions of a graph ----------------------------------------------------------------


def _origin(name: str) -> str:
    """The fp32 node a quantized node came from: MatMulNBitsQuantizer appends `_Q<bits>`, QDQ keeps names."""
    return re.sub(r"_Q\d+$", "", name)


class Mixer:
    """A graph made of `base` with chosen nodes (by fp32 name) taken from `alternative` instead.

    Every node of the alternative graph brings the initializers it reads (replacing same-named ones of
    the base: weight-only quantizers name scales after the weight whatever the bit width); its other
    inputs are activations both graphs compute under the same names. Nodes and initializers nothing
    reads any more (Q/DQ pairs, the base's quantized weights) are dropped. So one calibration and one
    quantization serve every trial of a sensitivity pass, and the base graph is otherwise untouched:
    with fp32 as the alternative this restores nodes of a Q/DQ graph to float, with an 8-bit
    MatMulNBits graph it gives chosen MatMuls of a 4-bit graph 8 bits.
    """

    def __init__(self, base, alternative):
        self.base = base
        self.nodes = {_origin(node.name): node for node in alternative.graph.node if node.name}
        self.initializers = {init.name: init for init in alternative.graph.initializer}

    def build(self, chosen: set[str]):
        import onnx

        model = onnx.ModelProto()
        model.CopyFrom(self.base)
        graph = model.graph
        taken: dict[str, object] = {}
        for node in graph.node:
            origin = _origin(node.name)
            if origin in chosen:
                if origin not in self.nodes:
                    raise QuantizeError(f"node {origin} is not in the alternative graph")
                node.CopyFrom(self.nodes[origin])
                taken.update({name: self.initializers[name] for name in node.input if name in self.initializers})
        if taken:
            kept = [init for init in graph.initializer if init.name not in taken]
            del graph.initializer[:]
            graph.initializer.extend(kept + list(taken.values()))
        _prune(graph)
        return model


def _prune(graph) -> None:
    """Drop nodes whose outputs nothing reads (transitively) and initializers nothing reads."""
    wanted = {output.name for output in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(out in wanted for out in node.output):
            keep.append(node)
            wanted.update(name for name in node.input if name)
    keep.reverse()
    if len(keep) != len(graph.node):
        del graph.node[:]
        graph.node.extend(keep)
    used = {name for node in graph.node for name in node.input}
    initializers = [init for init in graph.initializer if init.name in used]
    if len(initializers) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(initializers)


# -- measuring -------------------------------------------------------------------------------------


@dataclass
class Evaluator:
    """Output cosine of a candidate graph against fp32 on fixed feeds (the first output, flattened)."""

    feeds: list[dict[str, np.ndarray]]
    reference: list[np.ndarray] = field(default_factory=list)

    def set_reference(self, model_or_path) -> None:
        session = _session(model_or_path)
        self.reference = [session.run(None, feed)[0] for feed in self.feeds]

    def __call__(self, model) -> tuple[float, float]:
        session = _session(model)
        cosines, diffs = [], []
        for feed, reference in zip(self.feeds, self.reference):
            output = session.run(None, feed)[0]
            cosines.append(cosine(output, reference))
            diffs.append(float(np.abs(output - reference).max()))
        return min(cosines), max(diffs)


def select_groups(mixer: Mixer, groups: dict[str, list[str]], evaluate: Evaluator, target: float, label: str,
                  upgrade: str, progress: Callable[[str], None], sizes: dict[str, int] | None = None,
                  budget: float | None = None):
    """The sensitivity pass: measure the base graph, then each group upgraded on its own (what it gains
    is what its quantization costs), then upgrade the costliest groups one at a time until the output
    cosine meets `target`, measuring after each. When the base graph meets `target` (or `budget` is 0),
    no group is measured and the ranking is empty.

    With `sizes` (weights per group) and `budget` (a fraction of all of them), groups are ranked by gain
    per weight and the upgraded ones may hold at most that fraction: a 4-bit bundle stays mostly 4-bit
    even when the target is out of reach (the record then says so). Returns the chosen graph, the chosen
    groups and the record of every measurement."""
    base_cosine, base_diff = evaluate(mixer.base)
    progress(f"{label}: everything quantized: cosine {base_cosine:.5f} (max abs diff {base_diff:.4g}, "
             f"target {target})")
    measured = []
    # Nothing is worth measuring group by group when nothing will be upgraded: a zero budget, or a fully
    # quantized graph that already meets the target (that skips most of an int8 export's time).
    measure = budget != 0 and base_cosine < target
    if budget != 0 and not measure:
        progress(f"{label}: the target is met with everything quantized; no group is measured")
    for index, (group, names) in enumerate(groups.items() if measure else (), start=1):
        group_cosine, _ = evaluate(mixer.build(set(names)))
        entry = {"group": group, "nodes": names, f"cosine_with_group_{upgrade}": round(group_cosine, 6),
                 "cost": round(group_cosine - base_cosine, 6)}
        if sizes:
            entry["weights"] = sizes[group]
        measured.append(entry)
        progress(f"  {label} sensitivity {index}/{len(groups)}: {group} {upgrade} -> cosine {group_cosine:.5f}")
    if sizes:
        ranking = sorted(measured, key=lambda entry: -entry["cost"] / max(1, entry["weights"]))
        allowance = budget * sum(sizes.values()) if budget is not None else float("inf")
    else:
        ranking = sorted(measured, key=lambda entry: -entry["cost"])
        allowance = float("inf")
    chosen: list[str] = []
    steps = []
    used = 0
    current, current_diff, model = base_cosine, base_diff, mixer.base
    for entry in ranking:
        if current >= target:
            break
        if entry["cost"] <= 0 or used + entry.get("weights", 0) > allowance:
            continue
        chosen.append(entry["group"])
        used += entry.get("weights", 0)
        model = mixer.build({name for group in chosen for name in groups[group]})
        current, current_diff = evaluate(model)
        steps.append({"groups": len(chosen), "added": entry["group"], "cosine": round(current, 6)})
        progress(f"  {label}: {entry['group']} {upgrade} -> cosine {current:.5f}")
    if current < target:
        progress(f"{label}: the target cosine {target} is not met ({current:.5f})"
                 + (f" within the budget of {budget:.0%} of the weights {upgrade}" if budget is not None else ""))
    record = {
        "metric": f"min cosine of the first output against fp32 over {len(evaluate.feeds)} inputs",
        "target_cosine": target,
        "target_met": current >= target,
        "all_quantized": {"cosine": round(base_cosine, 6), "max_abs_diff": round(base_diff, 6)},
        "sensitivity": ranking,  # empty when nothing was measured (see the docstring)
        "steps": steps,
        "final": {"cosine": round(current, 6), "max_abs_diff": round(current_diff, 6)},
    }
    if budget is not None:
        record["budget"] = {"fraction_of_weights": budget, "used": round(used / max(1, sum(sizes.values())), 4)}
    return model, chosen, record


# -- static INT8 -----------------------------------------------------------------------------------


def add_missing_types(model) -> None:
    """Give every tensor a type, for quantize_static.

    onnx's shape inference stops at onnxruntime's contrib ops (the decoder's SimplifiedLayerNormalization,
    SkipSimplifiedLayerNormalization, GroupQueryAttention), and the quantizer skips any activation whose
    type it does not know: it would quantize the decoder's weights only. onnxruntime's symbolic shape
    inference knows those ops; it runs on a skeleton whose external weights are graph inputs (so nothing
    is read), and the types found are added to the graph."""
    import onnx
    from onnx import helper
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    graph = model.graph
    known = {vi.name for vi in graph.value_info} | {i.name for i in graph.input} | {o.name for o in graph.output} | \
        {init.name for init in graph.initializer}
    untyped = {name for node in graph.node for name in node.output if name and name not in known}
    if not untyped:
        return
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model)
    external = [init for init in skeleton.graph.initializer if init.data_location == onnx.TensorProto.EXTERNAL]
    for init in external:
        skeleton.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    kept = [init for init in skeleton.graph.initializer if init.data_location != onnx.TensorProto.EXTERNAL]
    del skeleton.graph.initializer[:]
    skeleton.graph.initializer.extend(kept)
    inferred = SymbolicShapeInference.infer_shapes(skeleton, auto_merge=True, guess_output_rank=True)
    graph.value_info.extend(vi for vi in inferred.graph.value_info if vi.name in untyped)


def _attributes(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def merge_sibling_linears(model) -> dict[str, list[str]]:
    """Merge MatMul / Gemm nodes that read the same activation with constant weights (Qwen2.5-VL's vision
    MLP gate and up projections) into one node whose output a Split divides: the same numbers, one
    GEMM. Returns {merged node: the nodes it replaces}.

    Measured reason: onnxruntime's CPU optimizer shares one QuantizeLinear between sibling consumers,
    which keeps their activations int8 instead of converting them to uint8, and the signed x signed
    QGemm kernel it then runs was 10x slower than the unsigned one here (33 ms against 3 ms for a
    1024x640x1712 GEMM). One consumer per quantized activation avoids that."""
    from onnx import helper, numpy_helper

    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    siblings: dict[tuple, list] = {}
    for node in graph.node:
        attrs = _attributes(node)
        if node.op_type == "Gemm":
            plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
            bias_ok = len(node.input) < 3 or not node.input[2] or (
                node.input[2] in initializers and len(initializers[node.input[2]].dims) == 1)
            if plain and node.input[1] in initializers and bias_ok:
                siblings.setdefault(("Gemm", node.input[0], attrs.get("transB", 0)), []).append(node)
        elif node.op_type == "MatMul" and node.input[1] in initializers and len(initializers[node.input[1]].dims) == 2:
            siblings.setdefault(("MatMul", node.input[0], 0), []).append(node)
    merged: dict[str, list[str]] = {}
    replacements: dict[str, list] = {}
    removed: set[str] = set()
    for (op_type, _, trans_b), nodes in siblings.items():
        if len(nodes) < 2:
            continue
        first = nodes[0]
        weights = [numpy_helper.to_array(initializers[n.input[1]]) for n in nodes]
        axis = 0 if trans_b else 1  # the output-column axis of each weight
        widths = [w.shape[axis] for w in weights]
        weight = numpy_helper.from_array(np.concatenate(weights, axis=axis), f"{first.name}_merged_weight")
        inputs = [first.input[0], weight.name]
        graph.initializer.append(weight)
        if op_type == "Gemm" and any(len(n.input) > 2 and n.input[2] for n in nodes):
            biases = [numpy_helper.to_array(initializers[n.input[2]]) if len(n.input) > 2 and n.input[2]
                      else np.zeros(width, np.float32) for n, width in zip(nodes, widths)]
            bias = numpy_helper.from_array(np.concatenate(biases), f"{first.name}_merged_bias")
            graph.initializer.append(bias)
            inputs.append(bias.name)
        split = numpy_helper.from_array(np.asarray(widths, np.int64), f"{first.name}_merged_split")
        graph.initializer.append(split)
        joint = helper.make_node(op_type, inputs, [f"{first.name}_merged_output"], name=first.name,
                                 **({"transB": trans_b} if op_type == "Gemm" else {}))
        joint.metadata_props.extend(first.metadata_props)
        divide = helper.make_node("Split", [joint.output[0], split.name], [n.output[0] for n in nodes],
                                  name=f"{first.name}_merged_split", axis=-1)
        replacements[first.name] = [joint, divide]
        removed.update(n.name for n in nodes[1:])
        merged[first.name] = [n.name for n in nodes]
    if merged:
        rebuilt = []
        for node in graph.node:
            if node.name in replacements:
                rebuilt.extend(replacements[node.name])
            elif node.name not in removed:
                rebuilt.append(node)
        del graph.node[:]
        graph.node.extend(rebuilt)
        del graph.value_info[:]  # stale for the merged nodes; inferred again
        _prune(graph)
    return merged


def prepare_graph(fp32_path: Path, workdir: Path) -> tuple[Path, dict[str, list[str]]]:
    """The fp32 graph as quantize_static gets it, written to `workdir`: sibling linears merged and every
    tensor typed. A graph under protobuf's limit is written whole; a larger one keeps its weights external
    and unmerged, its data file copied beside it (onnx refuses symbolic and hard links to external data)."""
    import onnx

    data = weights_file(fp32_path)
    large = graph_bytes(fp32_path) > LARGE_GRAPH_BYTES
    model = onnx.load(str(fp32_path), load_external_data=not large)
    merged = {} if large else merge_sibling_linears(model)
    if merged:
        model = onnx.shape_inference.infer_shapes(model)
    add_missing_types(model)
    path = workdir / fp32_path.name
    if large:
        shutil.copyfile(data, workdir / data.name)
    onnx.save_model(model, str(path))
    return path, merged


def static_int8(fp32_path: Path, out_path: Path, component: str, calibration_feeds: list[dict],
                eval_feeds: list[dict], method: str, target: float, workdir: Path,
                progress: Callable[[str], None]) -> dict:
    """Calibrate, quantize (QDQ), measure every layer group's cost, keep the costliest groups float until
    the target cosine is met; write the graph to `out_path`. Returns the record for the manifest."""
    import onnx
    import onnxruntime
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from .calibration import FeedReader

    started = time.perf_counter()
    large = graph_bytes(fp32_path) > LARGE_GRAPH_BYTES
    prepared, merged = prepare_graph(fp32_path, workdir)
    # The structure only while onnxruntime calibrates: quantize_static holds the model, its augmented copy and
    # a session of it, and our own float copy beside them took a 2B decoder past this machine's memory.
    groups = node_groups(onnx.load(str(prepared), load_external_data=False), component)
    if not groups:
        raise QuantizeError(f"{fp32_path.name}: no MatMul/Gemm nodes to quantize")
    quantizable = [name for names in groups.values() for name in names]
    progress(f"{component}: calibrating {len(quantizable)} MatMul/Gemm nodes in {len(groups)} groups on "
             f"{len(calibration_feeds)} inputs ({method})")
    qdq_path = workdir / f"{component}.qdq.onnx"
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    with _quiet_quantizers():
        quantize_static(
            str(prepared), str(qdq_path), FeedReader(calibration_feeds, component, progress),
            quant_format=QuantFormat.QDQ, op_types_to_quantize=list(QUANTIZED_OPS), nodes_to_quantize=quantizable,
            per_channel=True, reduce_range=False, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            use_external_data_format=large, calibrate_method=methods[method],
            extra_options={
                "ActivationSymmetric": True,  # zero point 0: TensorRT's explicit quantization needs it
                "WeightSymmetric": True,
                "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},  # [K, N] weights: one scale per output column
                "OpTypesToExcludeOutputQuantization": list(QUANTIZED_OPS),
                # Not CalibMaxIntermediateOutputs: onnxruntime 1.32 drops the collected outputs at that count
                # without merging them ("No data is collected"). MinMax keeps only each request's reduced
                # min/max per tensor (the augmented graph reduces them), so requests cost little memory.
            },
        )
    calibrated_s = time.perf_counter() - started
    progress(f"{component}: measuring against fp32 on {len(eval_feeds)} calibration inputs")
    evaluate = Evaluator(eval_feeds)
    evaluate.set_reference(fp32_path)
    mixer = Mixer(onnx.load(str(qdq_path)), onnx.load(str(prepared)))
    model, float_groups, record = select_groups(mixer, groups, evaluate, target, component, "float", progress)
    save_graph(model, out_path)
    float_nodes = [name for group in float_groups for name in groups[group]]
    progress(f"{component}: int8 with {len(float_groups)} of {len(groups)} groups float, cosine "
             f"{record['final']['cosine']:.5f} [{time.perf_counter() - started:.1f} s]")
    return {
        "scheme": "static int8, QDQ: weights int8 symmetric per output channel, activations int8 symmetric "
                  "per tensor (zero point 0), Q/DQ on MatMul/Gemm inputs",
        "onnxruntime": onnxruntime.__version__,
        "calibration_method": method,
        "calibration_inputs": len(calibration_feeds),
        "merged_siblings": merged,
        **record,
        "float_groups": float_groups,
        "float_nodes": float_nodes,
        "quantized_nodes": len(quantizable) - len(float_nodes),
        "float_by_design": FLOAT_BY_DESIGN[component],
        "seconds": round(time.perf_counter() - started, 1),
        "calibration_seconds": round(calibrated_s, 1),
    }


# -- weight-only -----------------------------------------------------------------------------------


def _nbits(fp32_path: Path, bits: int, block_size: int, accuracy_level: int):
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32_path)), bits=bits, block_size=block_size,
                                     is_symmetric=True, accuracy_level=accuracy_level,
                                     op_types_to_quantize=("MatMul",))
    with _quiet_quantizers():
        quantizer.process()
    return quantizer.model.model


def fold_bias_adds(graph) -> int:
    """MatMulNBits followed by an Add of a constant [N] vector (the qkv projection's bias) -> the bias
    input of MatMulNBits: one node fewer per layer in the decode step, where small nodes cost as much as
    their work. Returns how many were folded."""
    vectors = {init.name for init in graph.initializer if len(init.dims) == 1}
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {output.name for output in graph.output}
    folded = set()
    for node in graph.node:
        if node.op_type != "MatMulNBits" or len(node.input) > 5 or node.output[0] in outputs:
            continue
        (add, *others) = readers.get(node.output[0], [None])
        if others or add is None or add.op_type != "Add":
            continue
        bias = add.input[1] if add.input[0] == node.output[0] else add.input[0]
        if bias not in vectors:
            continue
        node.input.extend([""] * (5 - len(node.input)) + [bias])
        node.output[0] = add.output[0]
        folded.add(id(add))
    kept = [node for node in graph.node if id(node) not in folded]
    del graph.node[:]
    graph.node.extend(kept)
    return len(folded)


def _weight_count(model, node_name: str) -> int:
    node = next(n for n in model.graph.node if n.name == node_name)
    init = next(i for i in model.graph.initializer if i.name == node.input[1])
    return int(np.prod(init.dims))


def weight_only(fp32_path: Path, out_path: Path, bits: int, block_size: int, accuracy_level: int,
                eval_feeds: list[dict], target: float, progress: Callable[[str], None],
                budget: float = UPGRADE_BUDGET, label: str = "decoder") -> dict:
    """Every MatMul with a constant weight (the lm_head included) -> MatMulNBits with `bits` per weight;
    the layer groups whose quantization costs most per weight get 8 bits (or stay float, for 8-bit)
    until the output cosine meets `target` on `eval_feeds`, within `budget` (a fraction) of the weights.
    A budget of 0 gives every MatMul `bits` bits, as ORT GenAI's builder does."""
    import onnx
    import onnxruntime

    started = time.perf_counter()
    fp32 = onnx.load(str(fp32_path), load_external_data=False)  # the structure; weights are read below
    weighted = constant_weight_nodes(fp32)
    groups = {group: [n for n in names if n in weighted]
              for group, names in node_groups(fp32, "decoder", ("MatMul",)).items()}
    groups = {group: names for group, names in groups.items() if names}
    if not groups:
        raise QuantizeError(f"{fp32_path.name}: no MatMul with a constant weight to quantize")
    sizes = {group: sum(_weight_count(fp32, name) for name in names) for group, names in groups.items()}
    lm_head = set(groups.get("decoder.lm_head", []))
    progress(f"{label}: weight-only {bits}-bit quantization of {len(weighted)} MatMul weights (block {block_size}, "
             f"accuracy level {accuracy_level})")
    base = _nbits(fp32_path, bits, block_size, accuracy_level)
    upgrade = "8-bit" if bits < 8 else "float"
    if budget == 0:
        alternative = base  # never used: nothing is upgraded
    elif bits < 8:
        alternative = _nbits(fp32_path, 8, block_size, accuracy_level)
    else:
        alternative = onnx.load(str(fp32_path))
    del fp32
    progress(f"{label}: measuring against fp32 on {len(eval_feeds)} inputs")
    evaluate = Evaluator(eval_feeds)
    evaluate.set_reference(fp32_path)
    model, upgraded, record = select_groups(Mixer(base, alternative), groups, evaluate, target, label, upgrade,
                                            progress, sizes, budget)
    fold_bias_adds(model.graph)
    save_graph(model, out_path)
    upgraded_nodes = [name for group in upgraded for name in groups[group]]
    counts = {f"{b}-bit": sum(1 for n in model.graph.node if n.op_type == "MatMulNBits" and
                              any(a.name == "bits" and a.i == b for a in n.attribute)) for b in (4, 8)}
    progress(f"{label}: {counts[f'{bits}-bit']} MatMuls {bits}-bit, {len(upgraded_nodes)} {upgrade} "
             f"({len(upgraded)} of {len(groups)} groups), cosine {record['final']['cosine']:.5f} "
             f"[{time.perf_counter() - started:.1f} s]")
    return {
        "scheme": f"weight-only {bits}-bit MatMulNBits (com.microsoft), symmetric, block {block_size}, "
                  f"accuracy_level {accuracy_level}",
        "onnxruntime": onnxruntime.__version__,
        "bits": bits,
        "block_size": block_size,
        "accuracy_level": accuracy_level,
        **record,
        "upgrade": upgrade,
        "upgraded_groups": upgraded,
        "upgraded_nodes": upgraded_nodes,
        "matmulnbits_nodes": counts,
        "float_nodes": upgraded_nodes if upgrade == "float" else [],
        "lm_head_quantized": bool(lm_head) and not lm_head & set(upgraded_nodes if upgrade == "float" else []),
        "float_by_design": WEIGHT_ONLY_FLOAT,
        "seconds": round(time.perf_counter() - started, 1),
    }


def weight_only_linears(source: Path, out_path: Path, bits: int, block_size: int, accuracy_level: int) -> dict:
    """A traced graph's linear layers (Gemm with a constant [out, in] weight, as torch.onnx writes
    nn.Linear) -> MatMulNBits with `bits`, the Gemm's bias as its bias input: the vision tower's weights in
    a quarter of their bytes (8 bits), no calibration. Everything else is left as it is."""
    import onnx
    from onnx import helper, numpy_helper

    from .decoder_builder import quantize_rows

    started = time.perf_counter()
    model = onnx.load(str(source), load_external_data=False)
    initializers = {init.name: init for init in model.graph.initializer}
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    converted, kept, replaced = [], [], set()
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        weight = initializers.get(node.input[1]) if node.op_type == "Gemm" and len(node.input) > 1 else None
        plain = attrs.get("transB") == 1 and not attrs.get("transA") and attrs.get("alpha", 1.0) == 1.0 \
            and attrs.get("beta", 1.0) == 1.0 and readers.get(node.input[1]) == 1
        if weight is None or not plain or len(weight.dims) != 2:
            kept.append(node)
            continue
        rows = numpy_helper.to_array(weight, base_dir=str(source.parent)).astype(np.float32)
        packed, scales = quantize_rows(rows, bits, block_size)
        n, k = rows.shape
        name = weight.name
        model.graph.initializer.extend([numpy_helper.from_array(packed, f"{name}_Q{bits}"),
                                        numpy_helper.from_array(scales, f"{name}_scales")])
        replaced.add(name)
        bias = node.input[2] if len(node.input) > 2 else ""
        inputs = [node.input[0], f"{name}_Q{bits}", f"{name}_scales"] + (["", "", bias] if bias else [])
        kept.append(helper.make_node("MatMulNBits", inputs, list(node.output), name=f"{node.name}_Q{bits}",
                                     domain="com.microsoft", K=k, N=n, bits=bits, block_size=block_size,
                                     **({"accuracy_level": accuracy_level} if accuracy_level else {})))
        converted.append(node.name)
    remaining = [init for init in model.graph.initializer if init.name not in replaced]
    for init in remaining:  # the untouched weights still live in the source's data file: load them
        if init.data_location == onnx.TensorProto.EXTERNAL:
            onnx.external_data_helper.load_external_data_for_tensor(init, str(source.parent))
            init.data_location = onnx.TensorProto.DEFAULT
            del init.external_data[:]
    del model.graph.initializer[:]
    model.graph.initializer.extend(remaining)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    if not any(domain.domain == "com.microsoft" for domain in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    if out_path.resolve() == source.resolve():
        raise QuantizeError("weight_only_linears writes a new graph beside its source, not over it")
    save_graph(model, out_path)
    return {"scheme": f"weight-only {bits}-bit MatMulNBits on the linear layers (Gemm), symmetric, block "
                      f"{block_size}, accuracy_level {accuracy_level}; everything else fp32",
            "bits": bits, "block_size": block_size, "accuracy_level": accuracy_level,
            "quantized_nodes": len(converted), "seconds": round(time.perf_counter() - started, 1)}


# -- the bundle ------------------------------------------------------------------------------------


def _copy_graph(source: Path, target: Path, graph: GraphFile) -> None:
    for name in (graph.path, graph.data_path):
        if name:
            shutil.copyfile(source / name, target / name)


def quantize_bundle(fp32_dir: str | Path, out_dir: str | Path, options: QuantizeOptions,
                    progress: Callable[[str], None]) -> Manifest:
    """Write a quantized bundle next to an fp32 one, with its quantization record and report."""
    from dataclasses import replace

    from gemvg.runtime.engine import Engine

    from .calibration import PipelineFeeds, generated_samples, read_calibration, split_samples
    from .report import build_report, write_report

    check_options(options)
    fp32_dir, out = Path(fp32_dir), Path(out_dir)
    source = load_manifest(fp32_dir)
    if source.precision != "fp32":
        raise QuantizeError(f"{fp32_dir} is a {source.precision} bundle; quantize from an fp32 bundle")
    if out.resolve() == fp32_dir.resolve():
        raise QuantizeError("the quantized bundle must go to another folder than the fp32 bundle")
    out.mkdir(parents=True, exist_ok=True)

    calibration, held_back, calibration_record = [], [], {}
    if options.calibration:
        samples = read_calibration(options.calibration)
        calibration, held_back = split_samples(samples, options.calibration_samples)
        calibration_record = {"file": str(Path(options.calibration).resolve()), "method": options.calibration_method,
                              "requests": [s.origin for s in calibration],
                              "held_back": [s.origin for s in held_back]}
        progress(f"calibration: {len(calibration)} requests, {len(held_back)} held back for the report")
    if not held_back:
        held_back = generated_samples(options.report_samples)
        calibration_record["report_requests"] = "generated (the calibration file has no held-back requests)"

    # Every graph input first, then the fp32 engine is freed before the (memory-hungry) quantization.
    # Output cosines are measured on calibration requests; without any (int4/int8w alone), on generated
    # ones that differ from the report's.
    engine = Engine.load(fp32_dir, verify=False)
    pipeline = PipelineFeeds(engine, progress)
    sensitivity = calibration[:options.sensitivity_samples] or generated_samples(options.sensitivity_samples,
                                                                                 seed=2000)
    vision_feeds = (pipeline.vision(calibration), pipeline.vision(sensitivity)) if options.vision == "int8" else None
    decoder_feeds = (pipeline.decoder(calibration) if options.precision == "int8" else [],
                     pipeline.decoder(sensitivity))
    del pipeline, engine
    trim_heap()  # the fp32 engine's memory goes back before the quantizers load their copies
    records: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="gemvg-quant-") as temp:
        workdir = Path(temp)
        if options.vision == "int8w":
            records["vision"] = weight_only_linears(fp32_dir / source.vision_graph.path,
                                                    out / source.vision_graph.path, 8, options.block_size,
                                                    options.accuracy_level)
        elif vision_feeds:
            records["vision"] = static_int8(
                fp32_dir / source.vision_graph.path, out / source.vision_graph.path, "vision", *vision_feeds,
                options.calibration_method, options.target("vision"), workdir, progress)
        else:
            _copy_graph(fp32_dir, out, source.vision_graph)
            records["vision"] = {"scheme": "fp32"}
        if options.precision == "int8":
            records["decoder"] = static_int8(
                fp32_dir / source.decoder_graph.path, out / source.decoder_graph.path, "decoder", *decoder_feeds,
                options.calibration_method, options.target("decoder"), workdir, progress)
            if options.step_decoder:
                records["step_decoder"] = weight_only(
                    fp32_dir / source.decoder_graph.path, out / STEP_DECODER_FILE,
                    WEIGHT_ONLY_BITS[options.step_decoder], options.block_size, options.accuracy_level,
                    decoder_feeds[1], options.target("step_decoder"), progress, options.upgrade_budget,
                    label="step decoder")
        else:
            records["decoder"] = weight_only(fp32_dir / source.decoder_graph.path, out / source.decoder_graph.path,
                                             WEIGHT_ONLY_BITS[options.precision], options.block_size,
                                             options.accuracy_level, decoder_feeds[1],
                                             options.target("decoder"), progress, options.upgrade_budget)
    _copy_graph(fp32_dir, out, source.embed_graph)
    shutil.copyfile(fp32_dir / source.tokenizer.path, out / source.tokenizer.path)

    def regraph(graph: GraphFile, precision: str) -> GraphFile:
        return graph_file(out, graph.path, graph.inputs, graph.outputs, precision)

    quantization = {"precision": options.precision, "vision_precision": options.vision,
                    "embed_precision": "fp32", "calibration": calibration_record, **records}
    manifest = replace(
        source, precision=options.precision,
        vision_graph=regraph(source.vision_graph, options.vision),
        embed_graph=regraph(source.embed_graph, "fp32"),
        decoder_graph=regraph(source.decoder_graph, options.precision),
        tokenizer=graph_file(out, source.tokenizer.path),
        step_decoder_graph=(graph_file(out, STEP_DECODER_FILE, source.decoder_graph.inputs,
                                       source.decoder_graph.outputs, options.step_decoder)
                            if options.step_decoder else None),
        source={**source.source, "quantized_from": str(fp32_dir.resolve())},
        extra={**source.extra, "quantization": quantization},
    )
    manifest.write(out)

    progress(f"report: comparing against fp32 on {len(held_back)} held-back requests")
    report = build_report(fp32_dir, out, held_back, options.report_tokens, progress)
    entry = write_report(out, report)
    manifest = replace(manifest, extra={**manifest.extra, "quantization": {**quantization, "report": entry}})
    manifest.write(out)
    return manifest
