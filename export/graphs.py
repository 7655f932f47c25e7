"""The exportable graphs, written plainly over a transformers Qwen-VL model's own weights.

* VisionEncoder: one image's patches -> merged features. Rotary cos/sin and Qwen2.5-VL's window layout
  (gather / bias / scatter indices) come in as inputs (computed on the host by gemvg.runtime.vision), so
  the graph has no data-dependent control flow. Windowed blocks attend within each window as one batch
  of windows padded to the longest, not as full attention under a mask.
* DeepStackVisionEncoder: Qwen3-VL's tower, one image's patches -> merged features and the DeepStack
  features of intermediate blocks. Besides the rotary cos/sin it takes the bilinear taps and weights into
  its learned position table as inputs (gemvg.runtime.vision as well).
* TokenEmbedding: ids -> embeddings.

For ONNX Runtime targets the vision rotary is one com.microsoft RotaryEmbedding node per q and k
(`fused_rotary`) instead of HF's q * cos + rotate_half(q) * sin, seven small memory-bound nodes each.
TensorRT targets keep the standard ops, which its parser takes whole.

The text decoder is not traced: export/decoder_builder.py writes it with ONNX Runtime's fused ops.
Each forward here calls the HF submodules (linears, norms, MLPs) and spells out only what HF does
with data-dependent Python (attention splits, rotary tables), so the numerics are HF's.
"""

from __future__ import annotations

import torch
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's vision rotary: x [n, heads, head_dim], cos / sin [n, head_dim] (two equal halves)."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return x * cos + rotate_half(x) * sin


@torch.library.custom_op("gemvg::vision_rotary", mutates_args=())
def vision_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rotary as one op, so that the ONNX export can write it as one RotaryEmbedding node."""
    return apply_rotary(x, cos, sin)


@vision_rotary.register_fake
def _(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def rotary_translation(heads: int, head_dim: int):
    """The ONNX for gemvg::vision_rotary: ONNX Runtime's RotaryEmbedding (non-interleaved, i.e. HF's
    rotate_half convention) over [1, n, heads * head_dim], positions 0..n-1 given as offset 0 and the
    per-patch cos / sin as the tables: row p of the table is patch p's angles."""
    import onnxscript
    from onnx.defs import OpSchema
    from onnxscript import opset18 as op

    formal = OpSchema.FormalParameter
    schema = OpSchema(
        "RotaryEmbedding", "com.microsoft", 1,
        inputs=[formal("input", "T"), formal("position_ids", "M"), formal("cos_cache", "T"), formal("sin_cache", "T")],
        outputs=[formal("output", "T")],
        type_constraints=[("T", ["tensor(float)"], ""), ("M", ["tensor(int64)"], "")],
        attributes=[OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, ""),
                    OpSchema.Attribute("interleaved", OpSchema.AttrType.INT, "")])
    rotary = onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "RotaryEmbedding", schema)

    def translate(x, cos, sin):
        zero, half, one = (op.Constant(value_ints=[v]) for v in (0, head_dim // 2, 1))
        flat = op.Reshape(x, op.Constant(value_ints=[1, -1, heads * head_dim]))
        out = rotary(flat, zero, op.Slice(cos, zero, half, one), op.Slice(sin, zero, half, one),
                     num_heads=heads, interleaved=0)
        return op.Reshape(out, op.Shape(x))

    return translate


class VisionTowerGraph(nn.Module):
    """What the exported Qwen-VL vision towers share: the patch embedding as a MatMul, the rotary op
    (`fused_rotary`: one com.microsoft RotaryEmbedding per q and k, see rotary_translation), attention
    with a float32 softmax over the whole image or within windows, and the residual block around it."""

    def __init__(self, visual: nn.Module, fused_rotary: bool = False):
        super().__init__()
        self.visual = visual
        self.rotary = torch.ops.gemvg.vision_rotary if fused_rotary else apply_rotary

    def patch_embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """HF's patch embedding is a Conv3d whose kernel equals its stride over one flattened patch: the
        same numbers as one MatMul, which (unlike a Conv) static INT8 turns into an integer GEMM."""
        conv = self.visual.patch_embed.proj
        hidden = pixel_values.to(conv.weight.dtype) @ conv.weight.reshape(conv.out_channels, -1).T
        return hidden if conv.bias is None else hidden + conv.bias

    @staticmethod
    def norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Qwen2.5-VL's RMSNorm written as x / sqrt(mean(x^2) + eps) * weight, the pattern ONNX Runtime fuses
        into one SimplifiedLayerNormalization (HF's rsqrt exports as Sqrt + Reciprocal, which it leaves as
        seven nodes). Qwen2-VL's and Qwen3-VL's LayerNorms are called as they are."""
        if not hasattr(module, "variance_epsilon"):
            return module(x)
        return module.weight * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + module.variance_epsilon))

    def qkv(self, block: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q, k, v [n, heads, head_dim], rotary applied to q and k."""
        attn = block.attn
        n = x.shape[0]
        q, k, v = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        return self.rotary(q, cos, sin), self.rotary(k, cos, sin), v

    @staticmethod
    def core(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             bias: torch.Tensor | None) -> torch.Tensor:
        """softmax(q k^T * scaling + bias) v over [..., heads, len, head_dim], the softmax in float32."""
        scores = torch.matmul(q, k.transpose(-1, -2)) * attn.scaling
        if bias is not None:
            scores = scores + bias.to(scores.dtype)
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32)
        return torch.matmul(weights, v)

    def attention(self, block: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Every patch attends to every patch of the image."""
        n = x.shape[0]
        q, k, v = (t.transpose(0, 1) for t in self.qkv(block, x, cos, sin))  # [heads, n, head_dim]
        out = self.core(block.attn, q, k, v, None).transpose(0, 1).reshape(n, -1)
        return block.attn.proj(out)

    def window_attention(self, block: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         gather: torch.Tensor, bias: torch.Tensor, scatter: torch.Tensor) -> torch.Tensor:
        """Patches attend within their window: q/k/v gathered into [windows, L, ...] (padding slots repeat a
        patch of their window), padding keys masked by `bias`, results scattered back to patch order."""
        windows, longest = gather.shape
        flat = gather.reshape(-1)
        q, k, v = (t.index_select(0, flat).reshape(windows, longest, t.shape[1], t.shape[2]).transpose(1, 2)
                   for t in self.qkv(block, x, cos, sin))  # [windows, heads, L, head_dim]
        out = self.core(block.attn, q, k, v, bias).transpose(1, 2).reshape(windows * longest, -1)
        return block.attn.proj(out.index_select(0, scatter))

    def block(self, block: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              windows: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """One vision block: attention (over the image, or within `windows` = (gather, bias, scatter)) and
        MLP, each on the normed hidden state and added to it."""
        x = self.norm(block.norm1, hidden)
        attended = (self.attention(block, x, cos, sin) if windows is None
                    else self.window_attention(block, x, cos, sin, *windows))
        hidden = hidden + attended
        return hidden + block.mlp(self.norm(block.norm2, hidden))


class VisionEncoder(VisionTowerGraph):
    """Qwen2-VL's and Qwen2.5-VL's towers: patches -> merged features."""

    def __init__(self, visual: nn.Module, fullatt_block_indexes: tuple[int, ...] | None, fused_rotary: bool = False):
        super().__init__(visual, fused_rotary)
        # None: Qwen2-VL, every block attends to the whole image; else Qwen2.5-VL window attention.
        self.full_blocks = None if fullatt_block_indexes is None else set(fullatt_block_indexes)

    def forward(self, pixel_values, rotary_cos, rotary_sin, window_gather=None, window_bias=None,
                window_scatter=None):
        hidden = self.patch_embed(pixel_values)
        for index, block in enumerate(self.visual.blocks):
            full = self.full_blocks is None or index in self.full_blocks
            hidden = self.block(block, hidden, rotary_cos, rotary_sin,
                                None if full else (window_gather, window_bias, window_scatter))
        merger = self.visual.merger
        return merger.mlp(self.norm(merger.ln_q, hidden).view(-1, merger.hidden_size))


class DeepStackVisionEncoder(VisionTowerGraph):
    """Qwen3-VL's tower (transformers' Qwen3VLVisionModel): patches -> merged features and DeepStack features.

    A separate class because the tower differs in what goes around the blocks: a learned position table
    resampled to the image's grid is added after the patch embedding, and after each block in
    `deepstack_visual_indexes` a merger of its own turns the hidden state into an extra feature map (the
    decoder adds it into one of its first layers). The resampling's taps and weights come in as inputs
    (gemvg.runtime.vision.position_interpolation); the graph gathers the table's rows and sums them
    (Gather, Mul, ReduceSum), so the table stays a weight. Every block attends to the whole image."""

    def __init__(self, visual: nn.Module, fused_rotary: bool = False):
        super().__init__(visual, fused_rotary)
        self.deepstack_layers = tuple(int(i) for i in visual.deepstack_visual_indexes)
        if not self.deepstack_layers:
            raise ValueError("a DeepStack vision tower needs at least one deepstack_visual_indexes layer")

    def position_embed(self, taps: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum_k weights[:, k] * table[taps[:, k]], HF's expression: [patches, hidden]."""
        return (self.visual.pos_embed(taps) * weights.unsqueeze(-1)).sum(1)

    def forward(self, pixel_values, rotary_cos, rotary_sin, position_taps, position_weights):
        visual = self.visual
        hidden = self.patch_embed(pixel_values)
        hidden = hidden + self.position_embed(position_taps, position_weights).to(hidden.dtype)
        deepstack = []
        for index, block in enumerate(visual.blocks):
            hidden = self.block(block, hidden, rotary_cos, rotary_sin)
            if index in self.deepstack_layers:
                deepstack.append(visual.deepstack_merger_list[self.deepstack_layers.index(index)](hidden))
        return visual.merger(hidden), torch.stack(deepstack)


class TokenEmbedding(nn.Module):
    def __init__(self, embed_tokens: nn.Embedding):
        super().__init__()
        self.embed_tokens = embed_tokens

    def forward(self, input_ids):
        return self.embed_tokens(input_ids)
