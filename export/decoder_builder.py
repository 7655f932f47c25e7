"""The text decoder written directly as an ONNX graph of ONNX Runtime's fused operators.

Like ORT GenAI's model builder, the graph is built node by node from the checkpoint's weights rather
than traced, so it uses exactly the kernels that make CPU decoding fast:

* GroupQueryAttention over a KV cache that the caller preallocates and shares between the past and
  present inputs/outputs (BNSH, [1, kv_heads, capacity, head_dim]): no concat, no copy of the cache,
  no key/value repetition for grouped heads, and prefill after a reused prefix works the same way;
* SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization (RMSNorm with the residual add fused);
* one MatMul for q, k and v and one for gate and up, so weight-only quantization (MatMulNBits) and
  static INT8 see few, large matrices;
* GroupQueryAttention on the packed q|k|v projection, rotating q and k itself (do_rotary) from cos/sin
  tables the host fills per cache slot with the M-RoPE angles (gemvg.runtime.rotary): no Split and no
  rotary nodes per layer;
* the last position only after the last layer's attention: the other positions' outputs of that layer
  feed nothing (their keys and values are already cached), so its o_proj, MLP, the final norm and the
  lm_head see one row; exact, and it saves 1/num_layers of the prefill's MLP work.

I/O (the bundle's convention): inputs_embeds [1, S, hidden], cache_positions [1, S] int64 (the cache
slots of the S tokens), rotary_cos / rotary_sin [capacity, head_dim / 2] (row i: the angles of the token
in slot i), past_key_{i} / past_value_{i} [1, kv_heads, capacity, head_dim], seqlens_k [1] int32 (index
of the last valid position), total_sequence_length [] int32 -> logits [1, 1, vocab], present_key_{i} /
present_value_{i} (the same buffers as the past ones).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from gemvg.runtime.manifest import TextConfig

from .onnx_files import save_graph

OPSET = 17


class GraphBuilder:
    """Just enough structure to write a graph readably: unique names, constants, one call per node."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.count = 0

    def constant(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], outputs: int | list[str] = 1, domain: str = "", **attrs):
        self.count += 1
        names = outputs if isinstance(outputs, list) else [f"{op_type.lower()}_{self.count}_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=f"{op_type}_{self.count}", domain=domain,
                                           **attrs))
        return names[0] if len(names) == 1 else names


def _linear_weight(linear) -> np.ndarray:
    """HF Linear stores [out, in]; MatMul wants [in, out]."""
    return linear.weight.detach().float().numpy().T


def build_decoder(model, text: TextConfig, out_path: Path) -> tuple[list[str], list[str]]:
    """Write decoder.onnx (+ its weights, decoder.onnx.data) for a Qwen2-VL / Qwen2.5-VL model."""
    language_model = model.model.language_model
    g = GraphBuilder()
    heads, kv_heads, head_dim, hidden = text.num_heads, text.num_kv_heads, text.head_dim, text.hidden_size
    layers = range(text.num_layers)
    eps = float(language_model.config.rms_norm_eps)

    inputs = [helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, [1, "seq", hidden]),
              helper.make_tensor_value_info("cache_positions", TensorProto.INT64, [1, "seq"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1, text.vocab_size])]
    cache_shape = [1, kv_heads, "capacity", head_dim]
    for kind in ("key", "value"):
        for i in layers:
            inputs.append(helper.make_tensor_value_info(f"past_{kind}_{i}", TensorProto.FLOAT, cache_shape))
            outputs.append(helper.make_tensor_value_info(f"present_{kind}_{i}", TensorProto.FLOAT, cache_shape))
    inputs += [helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
               helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
               helper.make_tensor_value_info("rotary_cos", TensorProto.FLOAT, ["capacity", head_dim // 2]),
               helper.make_tensor_value_info("rotary_sin", TensorProto.FLOAT, ["capacity", head_dim // 2])]

    mlp_split = g.constant("mlp_split", np.array([text_intermediate(language_model)] * 2, np.int64))

    def last(name: str) -> str:
        return g.op("Slice", [name, g.constant(f"last_start_{name}", np.array([-1], np.int64)),
                              g.constant(f"last_end_{name}", np.array([np.iinfo(np.int64).max], np.int64)),
                              g.constant(f"last_axis_{name}", np.array([1], np.int64))])

    residual = "inputs_embeds"
    pending = None  # the previous sublayer's output, added to the residual by the next fused norm
    for i in layers:
        layer = language_model.layers[i]
        attn = layer.self_attn
        norm_in = g.constant(f"l{i}_input_norm", layer.input_layernorm.weight.detach().float().numpy())
        if pending is None:
            x = g.op("SimplifiedLayerNormalization", [residual, norm_in], axis=-1, epsilon=eps)
        else:
            x, _, _, residual = g.op("SkipSimplifiedLayerNormalization", [pending, residual, norm_in], outputs=4,
                                     domain="com.microsoft", epsilon=eps)
        qkv_w = np.concatenate([_linear_weight(attn.q_proj), _linear_weight(attn.k_proj), _linear_weight(attn.v_proj)], 1)
        qkv_b = np.concatenate([attn.q_proj.bias.detach().float().numpy(), attn.k_proj.bias.detach().float().numpy(),
                                attn.v_proj.bias.detach().float().numpy()])
        qkv = g.op("Add", [g.op("MatMul", [x, g.constant(f"l{i}_qkv_weight", qkv_w)]), g.constant(f"l{i}_qkv_bias", qkv_b)])
        attended, _, _ = g.op("GroupQueryAttention",
                              [qkv, "", "", f"past_key_{i}", f"past_value_{i}", "seqlens_k", "total_sequence_length",
                               "rotary_cos", "rotary_sin", "cache_positions"],
                              outputs=[f"l{i}_attention", f"present_key_{i}", f"present_value_{i}"],
                              domain="com.microsoft", num_heads=heads, kv_num_heads=kv_heads,
                              scale=float(attn.scaling), do_rotary=1, rotary_interleaved=0)
        if i == layers[-1]:  # from here on only the last position is needed
            attended, residual = last(attended), last(residual)
        attn_out = g.op("MatMul", [attended, g.constant(f"l{i}_o_weight", _linear_weight(attn.o_proj))])
        norm_post = g.constant(f"l{i}_post_norm", layer.post_attention_layernorm.weight.detach().float().numpy())
        x, _, _, residual = g.op("SkipSimplifiedLayerNormalization", [attn_out, residual, norm_post], outputs=4,
                                 domain="com.microsoft", epsilon=eps)
        mlp = layer.mlp
        gate_up_w = np.concatenate([_linear_weight(mlp.gate_proj), _linear_weight(mlp.up_proj)], 1)
        gate, up = g.op("Split", [g.op("MatMul", [x, g.constant(f"l{i}_gate_up_weight", gate_up_w)]), mlp_split],
                        outputs=2, axis=-1)
        activated = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])  # SiLU(gate) * up
        pending = g.op("MatMul", [activated, g.constant(f"l{i}_down_weight", _linear_weight(mlp.down_proj))])

    final, _, _, _ = g.op("SkipSimplifiedLayerNormalization",
                          [pending, residual, g.constant("final_norm", language_model.norm.weight.detach().float().numpy())],
                          outputs=4, domain="com.microsoft", epsilon=eps)
    g.op("MatMul", [final, g.constant("lm_head_weight", _linear_weight(model.lm_head))], outputs=["logits"])

    graph = helper.make_graph(g.nodes, "gemvg_decoder", inputs, outputs, g.initializers)
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                         helper.make_opsetid("com.microsoft", 1)],
                                   producer_name="gemvg")
    save_graph(onnx_model, out_path)
    return [v.name for v in inputs], [v.name for v in outputs]


def text_intermediate(language_model) -> int:
    return int(language_model.config.intermediate_size)
