"""The text decoder written directly as an ONNX graph of ONNX Runtime's fused operators (and the token
embedding as one Gather), streamed from the checkpoint one tensor at a time.

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
* Qwen3-VL's QK-norm as one SimplifiedLayerNormalization per head over q and over k (between the packed
  projection and GroupQueryAttention, which then takes q, k and v apart), and DeepStack as one Add per
  deepstack layer of the `deepstack_embeds` input (image positions carry the vision tower's intermediate
  features, the rest zeros) to that layer's output;
* the last position only after the last layer's attention: the other positions' outputs of that layer
  feed nothing (their keys and values are already cached), so its o_proj, MLP, the final norm and the
  lm_head see one row; exact, and it saves 1/num_layers of the prefill's MLP work.

Streaming: every weight is read from the checkpoint when its node is written, converted (transposed to
float32 [in, out] for MatMul, or block-quantized to MatMulNBits' layout with ONNX Runtime's own C++
quantizer, the same one MatMulNBitsQuantizer calls) and appended to `decoder.onnx.data`; the graph only
records its offset. What the builder holds is one weight in pieces, so its memory does not grow with
the number of layers, and a weight-only decoder is written without an fp32 one ever existing.

I/O (the bundle's convention, gemvg.runtime.bundle_io): inputs_embeds [1, S, hidden], cache_positions
[1, S] int64 (the cache slots of the S tokens), rotary_cos / rotary_sin [capacity, head_dim / 2] (row i:
the angles of the token in slot i), past_key_{i} / past_value_{i} [1, kv_heads, capacity, head_dim],
seqlens_k [1] int32 (index of the last valid position), total_sequence_length [] int32, with DeepStack
deepstack_embeds [deepstack layers, 1, S, hidden] -> logits
[1, 1, vocab], present_key_{i} / present_value_{i} (the same buffers as the past ones).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from gemvg.runtime import bundle_io as io
from gemvg.runtime.manifest import TextConfig

from .onnx_files import weights_file
from .safetensors_io import CheckpointTensors

OPSET = 17
ALIGNMENT = 4096  # every external tensor starts on a page: ONNX Runtime maps them in place
INLINE_BYTES = 1024  # smaller tensors stay in the graph
CHUNK_BYTES = 128 << 20  # a weight is converted in pieces of at most this many float32 bytes


@dataclass(frozen=True)
class WeightFormat:
    """How the decoder's MatMul weights are stored: float32 MatMul, or MatMulNBits with `bits`."""

    bits: int | None = None  # None: float32; 4 or 8: weight-only block quantization, symmetric
    block_size: int = 32
    accuracy_level: int = 4  # MatMulNBits: 4 = int8 compute on CPU

    @property
    def label(self) -> str:
        return "fp32" if self.bits is None else f"{self.bits}-bit block {self.block_size}"


class WeightFile:
    """Tensors appended to a graph's `<name>.data` as they are made; each TensorProto records its offset."""

    def __init__(self, path: Path):
        self.path = path
        self.handle = open(path, "wb")
        self.offset = 0
        self.written: dict[str, TensorProto] = {}

    def close(self) -> None:
        self.handle.close()

    def _external(self, name: str, data_type: int, shape: Sequence[int], length: int) -> TensorProto:
        tensor = TensorProto(name=name, data_type=data_type, dims=list(shape),
                             data_location=TensorProto.EXTERNAL)
        for key, value in (("location", self.path.name), ("offset", str(self.offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.written[name] = tensor
        return tensor

    def _pad(self) -> None:
        padding = -self.offset % ALIGNMENT
        if padding:
            self.handle.write(b"\0" * padding)
            self.offset += padding

    def array(self, name: str, array: np.ndarray) -> TensorProto:
        array = np.asarray(array, order="C")
        if array.nbytes < INLINE_BYTES:
            tensor = numpy_helper.from_array(array, name)
            self.written[name] = tensor
            return tensor
        self._pad()
        tensor = self._external(name, helper.np_dtype_to_tensor_dtype(array.dtype), array.shape, array.nbytes)
        self.handle.write(array.tobytes())
        self.offset += array.nbytes
        return tensor

    def rows(self, name: str, dtype: np.dtype, shape: Sequence[int], pieces: Iterable[np.ndarray]) -> TensorProto:
        """A tensor written as consecutive row blocks (its C order), none of them held together."""
        self._pad()
        length = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        tensor = self._external(name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), shape, length)
        written = 0
        for piece in pieces:
            data = np.ascontiguousarray(piece, dtype).tobytes()
            self.handle.write(data)
            written += len(data)
        if written != length:
            raise ValueError(f"{name}: wrote {written} bytes, expected {length}")
        self.offset += length
        return tensor

    def transposed(self, name: str, row_blocks: Iterable[tuple[int, np.ndarray]], rows: int, cols: int) -> TensorProto:
        """float32 [cols, rows] from blocks of the [rows, cols] matrix (HF's [out, in] -> MatMul's [in, out]):
        each block's columns go to their place in every output row, so the whole is never held."""
        self._pad()
        tensor = self._external(name, TensorProto.FLOAT, (cols, rows), rows * cols * 4)
        base = self.offset
        self.handle.flush()
        descriptor = self.handle.fileno()
        os.ftruncate(descriptor, base + rows * cols * 4)
        for first, block in row_blocks:
            transposed = np.ascontiguousarray(block.T, np.float32)  # [cols, block rows]
            for column, line in enumerate(transposed):
                os.pwrite(descriptor, line.tobytes(), base + (column * rows + first) * 4)
            del transposed
        self.offset += rows * cols * 4
        self.handle.seek(self.offset)
        return tensor


def quantize_rows(weight: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """HF rows [N, K] -> MatMulNBits' B [N, blocks, blob] (uint8) and scales [N, blocks], symmetric, with
    ONNX Runtime's C++ block quantizer (what MatMulNBitsQuantizer uses: byte-identical results)."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    n, k = weight.shape
    blocks = -(-k // block_size)
    kn = np.zeros((blocks * block_size, n), np.float32)
    kn[:k] = weight.T
    blob = block_size * bits // 8
    packed = np.zeros((n, blocks, blob), np.uint8)
    scales = np.zeros((n, blocks), np.float32)
    zero_points = np.zeros((n, (blocks + (8 // bits) - 1) // (8 // bits)), np.uint8)
    quantize = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    quantize(packed, kn, scales, zero_points, block_size, n, k, True)
    return packed, scales


class DecoderSource:
    """The decoder's weights from a checkpoint, each as row blocks of HF's [out, in] layout."""

    def __init__(self, tensors: CheckpointTensors, tied_embeddings: bool):
        self.tensors = tensors
        self.lm_head = "text.embed_tokens.weight" if tied_embeddings or "lm_head.weight" not in tensors \
            else "lm_head.weight"

    def vector(self, name: str) -> np.ndarray:
        return self.tensors.get(name)

    def rows_of(self, name: str) -> int:
        return self.tensors.shape(name)[0]

    def blocks(self, names: Sequence[str]) -> Iterable[tuple[int, np.ndarray]]:
        """(first row, rows) of the weights `names` stacked along their output axis."""
        offset = 0
        for name in names:
            rows, cols = self.tensors.shape(name)
            for first, block in self.tensors.row_chunks(name, CHUNK_BYTES // 2):
                yield offset + first, block
            offset += rows


class GraphBuilder:
    """Just enough structure to write a graph readably: unique names, constants, one call per node."""

    def __init__(self, weights: WeightFile | None = None, reused: dict[str, TensorProto] | None = None):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.count = 0
        self.weights = weights
        self.reused = reused  # a check graph: tensors by name from the written bundle
        self.constants: set[str] = set()

    def _known(self, name: str) -> str | None:
        if self.reused is not None:
            self.initializers.append(self.reused[name])
            return name
        return None

    def constant(self, name: str, make: Callable[[], np.ndarray]) -> str:
        """The initializer `name` made by `make()`, written once however often it is asked for."""
        if name in self.constants:
            return name
        self.constants.add(name)
        if self._known(name):
            return name
        array = np.asarray(make(), order="C")  # keeps a 0-d index 0-d (ascontiguousarray makes it 1-d)
        self.initializers.append(self.weights.array(name, array) if self.weights else
                                 numpy_helper.from_array(array, name))
        return name

    def op(self, op_type: str, inputs: list[str], outputs: int | list[str] = 1, domain: str = "", **attrs):
        self.count += 1
        names = outputs if isinstance(outputs, list) else [f"{op_type.lower()}_{self.count}_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=f"{op_type}_{self.count}", domain=domain,
                                           **attrs))
        return names[0] if len(names) == 1 else names

    def linear(self, x: str, name: str, source: DecoderSource, pieces: Sequence[str], fmt: WeightFormat,
               bias: Sequence[str] = (), output: str | None = None) -> str:
        """x @ W.T (+ bias) for the HF weights `pieces` stacked along their output axis: a MatMul over a
        float32 [in, out] weight, or a MatMulNBits over the block-quantized rows (the bias as its input)."""
        out_features = sum(source.rows_of(p) for p in pieces)
        in_features = source.tensors.shape(pieces[0])[1]
        bias_name = None
        if bias:
            bias_name = self.constant(f"{name}_bias",
                                      lambda: np.concatenate([source.vector(b) for b in bias]))
        if fmt.bits is None:
            if not self._known(name):
                self.initializers.append(self.weights.transposed(name, source.blocks(pieces), out_features,
                                                                 in_features))
            if bias_name:
                return self.op("Add", [self.op("MatMul", [x, name]), bias_name], outputs=[output] if output else 1)
            return self.op("MatMul", [x, name], outputs=[output] if output else 1)
        packed, scales = f"{name}_Q{fmt.bits}", f"{name}_scales"
        if not self._known(packed):
            scale_blocks: list[np.ndarray] = []

            def quantized() -> Iterable[np.ndarray]:
                for _, block in source.blocks(pieces):
                    q, s = quantize_rows(block, fmt.bits, fmt.block_size)
                    scale_blocks.append(s)
                    yield q

            blocks = -(-in_features // fmt.block_size)
            self.initializers.append(self.weights.rows(packed, np.uint8,
                                                       (out_features, blocks, fmt.block_size * fmt.bits // 8),
                                                       quantized()))
            self.initializers.append(self.weights.array(scales, np.concatenate(scale_blocks)))
        else:
            self._known(scales)
        attrs = {"K": in_features, "N": out_features, "bits": fmt.bits, "block_size": fmt.block_size}
        if fmt.accuracy_level:
            attrs["accuracy_level"] = fmt.accuracy_level
        inputs = [x, packed, scales] + (["", "", bias_name] if bias_name else [])
        self.count += 1
        node_name = f"MatMul_{self.count}_Q{fmt.bits}"
        output = output or f"matmulnbits_{self.count}_0"
        self.nodes.append(helper.make_node("MatMulNBits", inputs, [output], name=node_name, domain="com.microsoft",
                                           **attrs))
        return output


def build_decoder(source: DecoderSource, text: TextConfig, rms_norm_eps: float, intermediate_size: int,
                  out_path: Path, fmt: WeightFormat = WeightFormat(), layers: Sequence[int] | None = None,
                  reused: dict[str, TensorProto] | None = None,
                  progress: Callable[[str], None] | None = None,
                  deepstack_layers: int = 0) -> tuple[list[str], list[str], dict]:
    """Write `out_path` (+ `<name>.data`) for the decoder's `layers` (default all). With `reused`, the graph
    refers to tensors already written under those names (a check graph over part of a bundle's decoder)
    and writes no weights. `deepstack_layers`: how many first layers take DeepStack features (Qwen3-VL).
    Projection biases and QK-norm are written when the checkpoint has them. Returns the input names,
    output names and the written tensors by name."""
    import time

    layers = list(range(text.num_layers) if layers is None else layers)
    weights = None if reused is not None else WeightFile(weights_file(out_path))
    g = GraphBuilder(weights, reused)
    heads, kv_heads, head_dim, hidden = text.num_heads, text.num_kv_heads, text.head_dim, text.hidden_size
    started = time.perf_counter()

    inputs = [helper.make_tensor_value_info(io.DECODER_INPUTS_EMBEDS, TensorProto.FLOAT, [1, "seq", hidden]),
              helper.make_tensor_value_info(io.DECODER_CACHE_POSITIONS, TensorProto.INT64, [1, "seq"])]
    outputs = [helper.make_tensor_value_info(io.DECODER_LOGITS, TensorProto.FLOAT, [1, 1, text.vocab_size])]
    cache_shape = [1, kv_heads, "capacity", head_dim]
    for past, present in ((io.past_key, io.present_key), (io.past_value, io.present_value)):
        for i in layers:
            inputs.append(helper.make_tensor_value_info(past(i), TensorProto.FLOAT, cache_shape))
            outputs.append(helper.make_tensor_value_info(present(i), TensorProto.FLOAT, cache_shape))
    inputs += [helper.make_tensor_value_info(io.DECODER_SEQLENS_K, TensorProto.INT32, [1]),
               helper.make_tensor_value_info(io.DECODER_TOTAL_SEQUENCE_LENGTH, TensorProto.INT32, []),
               helper.make_tensor_value_info(io.DECODER_ROTARY_COS, TensorProto.FLOAT, ["capacity", head_dim // 2]),
               helper.make_tensor_value_info(io.DECODER_ROTARY_SIN, TensorProto.FLOAT, ["capacity", head_dim // 2])]
    if deepstack_layers:
        inputs.append(helper.make_tensor_value_info(io.DECODER_DEEPSTACK_EMBEDS, TensorProto.FLOAT,
                                                    [deepstack_layers, 1, "seq", hidden]))

    mlp_split = g.constant("mlp_split", lambda: np.array([intermediate_size] * 2, np.int64))
    last_start = g.constant("last_start", lambda: np.array([-1], np.int64))
    last_end = g.constant("last_end", lambda: np.array([np.iinfo(np.int64).max], np.int64))
    seq_axis = g.constant("seq_axis", lambda: np.array([1], np.int64))

    def last(name: str) -> str:
        return g.op("Slice", [name, last_start, last_end, seq_axis])

    def head_norm(x: str, count: int, name: str, weight: str) -> str:
        """RMSNorm over each of `count` heads of x [1, S, count * head_dim] (Qwen3's q_norm / k_norm)."""
        per_head = g.constant(f"heads_{count}", lambda: np.array([0, 0, count, head_dim], np.int64))
        flat = g.constant(f"flat_{count}", lambda: np.array([0, 0, count * head_dim], np.int64))
        scale = g.constant(name, lambda: source.vector(weight))
        normed = g.op("SimplifiedLayerNormalization", [g.op("Reshape", [x, per_head]), scale], axis=-1,
                      epsilon=rms_norm_eps)
        return g.op("Reshape", [normed, flat])

    residual = io.DECODER_INPUTS_EMBEDS
    pending = None  # the previous sublayer's output, added to the residual by the next fused norm
    for i in layers:
        prefix = f"text.layers.{i}."
        norm_in = g.constant(f"l{i}_input_norm", lambda: source.vector(prefix + "input_layernorm.weight"))
        if pending is None:
            x = g.op("SimplifiedLayerNormalization", [residual, norm_in], axis=-1, epsilon=rms_norm_eps)
        else:
            x, _, _, residual = g.op("SkipSimplifiedLayerNormalization", [pending, residual, norm_in], outputs=4,
                                     domain="com.microsoft", epsilon=rms_norm_eps)
        projections = [prefix + f"self_attn.{p}_proj" for p in "qkv"]
        biases = [p + ".bias" for p in projections] if projections[0] + ".bias" in source.tensors else []
        qkv = g.linear(x, f"l{i}_qkv_weight", source, [p + ".weight" for p in projections], fmt, bias=biases)
        attention_in = [qkv, "", ""]
        if prefix + "self_attn.q_norm.weight" in source.tensors:  # QK-norm: RMSNorm of each head's q and k
            qkv_split = g.constant("qkv_split", lambda: np.array([heads * head_dim] + [kv_heads * head_dim] * 2,
                                                                 np.int64))
            q, k, v = g.op("Split", [qkv, qkv_split], outputs=3, axis=-1)
            attention_in = [head_norm(q, heads, f"l{i}_q_norm", prefix + "self_attn.q_norm.weight"),
                            head_norm(k, kv_heads, f"l{i}_k_norm", prefix + "self_attn.k_norm.weight"), v]
        attended, _, _ = g.op("GroupQueryAttention",
                              attention_in + [io.past_key(i), io.past_value(i), io.DECODER_SEQLENS_K,
                               io.DECODER_TOTAL_SEQUENCE_LENGTH, io.DECODER_ROTARY_COS, io.DECODER_ROTARY_SIN,
                               io.DECODER_CACHE_POSITIONS],
                              outputs=[f"l{i}_attention", io.present_key(i), io.present_value(i)],
                              domain="com.microsoft", num_heads=heads, kv_num_heads=kv_heads,
                              scale=float(head_dim ** -0.5), do_rotary=1, rotary_interleaved=0)
        if i == layers[-1]:  # from here on only the last position is needed
            attended, residual = last(attended), last(residual)
        attn_out = g.linear(attended, f"l{i}_o_weight", source, [prefix + "self_attn.o_proj.weight"], fmt)
        norm_post = g.constant(f"l{i}_post_norm", lambda: source.vector(prefix + "post_attention_layernorm.weight"))
        x, _, _, residual = g.op("SkipSimplifiedLayerNormalization", [attn_out, residual, norm_post], outputs=4,
                                 domain="com.microsoft", epsilon=rms_norm_eps)
        gate_up = g.linear(x, f"l{i}_gate_up_weight", source,
                           [prefix + "mlp.gate_proj.weight", prefix + "mlp.up_proj.weight"], fmt)
        gate, up = g.op("Split", [gate_up, mlp_split], outputs=2, axis=-1)
        activated = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])  # SiLU(gate) * up
        pending = g.linear(activated, f"l{i}_down_weight", source, [prefix + "mlp.down_proj.weight"], fmt)
        if i < deepstack_layers:  # DeepStack: this layer's output gets the image's features of its vision layer
            index = g.constant(f"deepstack_{i}", lambda: np.array(i, np.int64))
            features = g.op("Gather", [io.DECODER_DEEPSTACK_EMBEDS, index], axis=0)  # [1, S, hidden]
            pending = g.op("Add", [pending, last(features) if i == layers[-1] else features])
        if progress and reused is None:
            progress(f"  decoder layer {i + 1}/{len(layers)} written ({fmt.label}, "
                     f"{time.perf_counter() - started:.1f} s)")

    final_norm = g.constant("final_norm", lambda: source.vector("text.norm.weight"))
    final, _, _, _ = g.op("SkipSimplifiedLayerNormalization", [pending, residual, final_norm],
                          outputs=4, domain="com.microsoft", epsilon=rms_norm_eps)
    g.linear(final, "lm_head_weight", source, [source.lm_head], fmt, output=io.DECODER_LOGITS)

    graph = helper.make_graph(g.nodes, "gemvg_decoder", inputs, outputs, g.initializers)
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                         helper.make_opsetid("com.microsoft", 1)],
                                   producer_name="gemvg")
    if weights is not None:
        weights.close()
    onnx.save_model(onnx_model, str(out_path))
    written = weights.written if weights is not None else reused
    return [v.name for v in inputs], [v.name for v in outputs], written


def build_embedding(tensors: CheckpointTensors, out_path: Path) -> tuple[list[str], list[str]]:
    """embed.onnx: one Gather over the token embedding, written from the checkpoint in row blocks."""
    vocab, hidden = tensors.shape("text.embed_tokens.weight")
    weights = WeightFile(weights_file(out_path))
    table = weights.rows("embed_tokens", np.float32, (vocab, hidden),
                         (block for _, block in tensors.row_chunks("text.embed_tokens.weight", CHUNK_BYTES // 2)))
    weights.close()
    graph = helper.make_graph(
        [helper.make_node("Gather", ["embed_tokens", io.EMBED_INPUT_IDS], [io.EMBED_OUTPUT], name="Gather_0", axis=0)],
        "gemvg_embed",
        [helper.make_tensor_value_info(io.EMBED_INPUT_IDS, TensorProto.INT64, [1, "seq"])],
        [helper.make_tensor_value_info(io.EMBED_OUTPUT, TensorProto.FLOAT, [1, "seq", hidden])], [table])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="gemvg"),
                    str(out_path))
    return [io.EMBED_INPUT_IDS], [io.EMBED_OUTPUT]
