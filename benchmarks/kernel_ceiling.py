"""The ceiling of a bundle's decode step: its matrix kernels alone, with nothing else in the graph.

    python -m gemvg.benchmarks.kernel_ceiling BUNDLE [BUNDLE ...] [--runs 40] [--threads 2] [--rounds 1]

A one-token decode step is the decoder's matrix-vector products (MatMul, or MatMulNBits for weight-only
bundles) plus attention and small nodes. This writes a graph of only the step decoder's matrix nodes -
the same weights, node types and attributes, each fed a constant one-token activation - and times it
the way a step runs (IO binding, the bundle's thread count). Its weight bytes per run over its time is
the most bandwidth any step built on those kernels can achieve; beside the read bandwidth measured just
before and after (as `gemvg bench` does), it tells whether a step that misses a bandwidth target is held
back by the kernels or by the rest of the step. Rounds alternate the bundles, so a change of the host's
bandwidth state hits them alike.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gemvg.export.onnx_files import save_graph, weights_file
from gemvg.runtime.command import ArgumentParser, positive_int, run_command
from gemvg.runtime.errors import BundleError
from gemvg.runtime.manifest import load_manifest

MATRIX_OPS = ("MatMul", "MatMulNBits")


@dataclass
class Ceiling:
    bundle: str
    matrix_nodes: int
    weight_bytes: int
    ms_per_run: float
    gbs: float
    read_bandwidth_gbs: tuple[float, float]  # just before and just after

    @property
    def fraction(self) -> float:
        return self.gbs / (sum(self.read_bandwidth_gbs) / 2)


def _inner_dim(node, initializers: dict) -> int:
    if node.op_type == "MatMulNBits":
        return next(a.i for a in node.attribute if a.name == "K")
    return int(initializers[node.input[1]].dims[0])


def matrix_nodes_graph(decoder: Path, out: Path) -> int:
    """Write the graph of `decoder`'s matrix nodes with a constant weight to `out`; returns their count.
    Inputs are one activation per inner dimension, `x{K}` [1, 1, K]; every node's output is a graph
    output, so none is pruned."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(decoder))
    initializers = {init.name: init for init in model.graph.initializer}
    nodes, outputs, used, dims = [], [], set(), set()
    for node in model.graph.node:
        if node.op_type not in MATRIX_OPS or node.input[1] not in initializers:
            continue
        inner = _inner_dim(node, initializers)
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.input[0] = f"x{inner}"
        copy.output[0] = f"{node.name}_out"
        nodes.append(copy)
        outputs.append(helper.make_tensor_value_info(copy.output[0], TensorProto.FLOAT, None))
        used.update(name for name in copy.input if name in initializers)
        dims.add(inner)
    if not nodes:
        raise BundleError(f"{decoder}: no matrix node with a constant weight")
    inputs = [helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, [1, 1, k]) for k in sorted(dims)]
    graph = helper.make_graph(nodes, "matrix_nodes", inputs, outputs,
                              [init for name, init in initializers.items() if name in used])
    save_graph(helper.make_model(graph, opset_imports=list(model.opset_import)), out)
    return len(nodes)


class MatrixKernels:
    """The matrix-nodes graph of one bundle's step decoder in a session, bound once and run in place."""

    def __init__(self, bundle: Path, workdir: Path, threads: int):
        import onnxruntime as ort

        manifest = load_manifest(bundle, verify=False)
        step = manifest.step_decoder_graph or manifest.decoder_graph
        self.bundle = bundle
        self.path = workdir / f"{bundle.name}-matrix-nodes.onnx"
        self.nodes = matrix_nodes_graph(bundle / step.path, self.path)
        self.weight_bytes = weights_file(self.path).stat().st_size
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        self._inputs = {i.name: rng.standard_normal((1, 1, int(i.name[1:])), dtype=np.float32)
                        for i in self.session.get_inputs()}
        self.binding = self.session.io_binding()
        for name, value in self._inputs.items():
            self.binding.bind_cpu_input(name, value)
        for output in self.session.get_outputs():
            self.binding.bind_output(output.name, "cpu")

    def outputs(self) -> dict[str, np.ndarray]:
        names = [output.name for output in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, self._inputs)))

    def median_ms(self, runs: int, warmup: int = 3) -> float:
        for _ in range(warmup):
            self.session.run_with_iobinding(self.binding)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            self.session.run_with_iobinding(self.binding)
            times.append(time.perf_counter() - start)
        return float(np.median(times) * 1e3)


def measure(bundles: list[Path], runs: int = 40, threads: int = 2, rounds: int = 1,
            workdir: Path | None = None) -> list[list[Ceiling]]:
    """Per round, one Ceiling per bundle, in order."""
    from .bench import read_bandwidth_now

    with tempfile.TemporaryDirectory() as scratch:
        folder = workdir or Path(scratch)
        results = []
        for _ in range(rounds):
            row = []
            for bundle in bundles:
                kernels = MatrixKernels(bundle, folder, threads)  # a fresh session: no warm cache between rounds
                before = read_bandwidth_now(threads)
                ms = kernels.median_ms(runs)
                after = read_bandwidth_now(threads)
                row.append(Ceiling(str(bundle), kernels.nodes, kernels.weight_bytes, ms,
                                   kernels.weight_bytes / (ms / 1e3) / 1e9, (before, after)))
                del kernels
            results.append(row)
        return results


def main(argv: list[str] | None = None) -> int:
    return run_command("kernel_ceiling", lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    parser = ArgumentParser(prog="python -m gemvg.benchmarks.kernel_ceiling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundles", nargs="+", type=Path)
    parser.add_argument("--runs", type=positive_int, default=40)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--rounds", type=positive_int, default=1)
    args = parser.parse_args(argv)
    results = measure(args.bundles, args.runs, args.threads, args.rounds)
    for number, row in enumerate(results, start=1):
        for c in row:
            before, after = c.read_bandwidth_gbs
            print(f"round {number}  {c.bundle}: {c.matrix_nodes} matrix nodes, {c.weight_bytes / 1e6:.0f} MB, "
                  f"{c.ms_per_run:.2f} ms, {c.gbs:.1f} GB/s = {100 * c.fraction:.0f}% of the read bandwidth "
                  f"({before:.0f}/{after:.0f} GB/s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
