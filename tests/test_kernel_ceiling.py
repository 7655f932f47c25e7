"""The kernel-ceiling benchmark: a graph of exactly the step decoder's matrix nodes, timed like a step."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from gemvg.benchmarks.kernel_ceiling import MatrixKernels, main, measure


def test_matrix_nodes_graph_holds_the_decoders_matrix_products(tiny_bundles, tmp_path):
    bundle = tiny_bundles["qwen2_5_vl"]
    decoder = onnx.load(str(bundle / "decoder.onnx"))
    weights = {init.name: numpy_helper.to_array(init) for init in decoder.graph.initializer}
    matmuls = [node for node in decoder.graph.node if node.op_type == "MatMul" and node.input[1] in weights]

    kernels = MatrixKernels(bundle, tmp_path, threads=1)
    assert kernels.nodes == len(matmuls)
    weight_bytes = sum(weights[node.input[1]].nbytes for node in matmuls)
    assert weight_bytes <= kernels.weight_bytes < weight_bytes + 1024 * len(matmuls)  # + external-data alignment
    # Each output is the node's own product of the constant activation with its weight.
    outputs = kernels.outputs()
    for node in matmuls:
        weight = weights[node.input[1]]
        x = kernels._inputs[f"x{weight.shape[0]}"]
        np.testing.assert_allclose(outputs[f"{node.name}_out"], x @ weight, rtol=1e-4, atol=1e-5)
    assert kernels.median_ms(runs=3) > 0


def test_measure_reports_bandwidth_against_the_probe(tiny_bundles, capsys):
    (row,) = measure([tiny_bundles["qwen2_vl"]], runs=3, threads=1)
    (ceiling,) = row
    assert ceiling.matrix_nodes > 0 and ceiling.gbs > 0 and all(b > 0 for b in ceiling.read_bandwidth_gbs)
    assert np.isclose(ceiling.gbs, ceiling.weight_bytes / ceiling.ms_per_run / 1e6)


def test_cli_error_is_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2  # bad input: one line, exit 2 (runtime.command)
    err = capsys.readouterr().err.strip()
    assert err.startswith("kernel_ceiling: error:") and "\n" not in err
