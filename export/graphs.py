"""The three exportable graphs, written plainly over a transformers Qwen-VL model's own weights.

* VisionEncoder: one image's patches -> merged features. Rotary cos/sin and window ids come in as
  inputs (computed on the host by gemvg.runtime.vision), so the graph has no data-dependent control flow.
* TokenEmbedding: ids -> embeddings.

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


class VisionEncoder(nn.Module):
    def __init__(self, visual: nn.Module, fullatt_block_indexes: tuple[int, ...] | None):
        super().__init__()
        self.visual = visual
        # None: Qwen2-VL, every block attends to the whole image; else Qwen2.5-VL window attention.
        self.full_blocks = None if fullatt_block_indexes is None else set(fullatt_block_indexes)

    def attention(self, block: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  mask: torch.Tensor | None) -> torch.Tensor:
        attn = block.attn
        n = x.shape[0]
        q, k, v = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [heads, n, head_dim]
        scores = torch.matmul(q, k.transpose(1, 2)) * attn.scaling
        if mask is not None:
            scores = scores + mask
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32)
        out = torch.matmul(weights, v).transpose(0, 1).reshape(n, -1)
        return attn.proj(out)

    def forward(self, pixel_values, rotary_cos, rotary_sin, window_ids=None):
        hidden = self.visual.patch_embed(pixel_values)
        window_mask = None
        if self.full_blocks is not None:
            same_window = window_ids.unsqueeze(0) == window_ids.unsqueeze(1)
            window_mask = torch.where(same_window, 0.0, float("-inf")).to(hidden.dtype)
        for index, block in enumerate(self.visual.blocks):
            mask = None if self.full_blocks is None or index in self.full_blocks else window_mask
            hidden = hidden + self.attention(block, block.norm1(hidden), rotary_cos, rotary_sin, mask)
            hidden = hidden + block.mlp(block.norm2(hidden))
        return self.visual.merger(hidden)


class TokenEmbedding(nn.Module):
    def __init__(self, embed_tokens: nn.Embedding):
        super().__init__()
        self.embed_tokens = embed_tokens

    def forward(self, input_ids):
        return self.embed_tokens(input_ids)
