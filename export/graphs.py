"""The three exportable graphs, written plainly over a transformers Qwen-VL model's own weights.

* VisionEncoder: one image's patches -> merged features. Rotary cos/sin and window ids come in as
  inputs (computed on the host by gemvg.runtime.vision), so the graph has no data-dependent control flow.
* TokenEmbedding: ids -> embeddings.
* Decoder: embeddings + 3-D M-RoPE positions + the cached prefix's keys/values -> last-position
  logits and the new positions' keys/values. The causal mask is built in the graph from the shapes.

Each forward calls the HF submodules (linears, norms, MLPs) and spells out only what HF does with
data-dependent Python (attention splits, rotary tables, caches), so the numerics are HF's.
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


class Decoder(nn.Module):
    """Text decoder over a KV cache laid out [1, positions, kv_heads, head_dim] per layer."""

    def __init__(self, language_model: nn.Module, lm_head: nn.Linear, head_dim: int, rope_theta: float,
                 mrope_section: tuple[int, int, int]):
        super().__init__()
        self.layers = language_model.layers
        self.norm = language_model.norm
        self.lm_head = lm_head
        self.head_dim = head_dim
        self.mrope_section = list(mrope_section)
        inv_freq = 1.0 / (rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def rotary(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """M-RoPE: frequencies split in sections, section i rotated by axis i % 3 (temporal, height, width)."""
        freqs = position_ids[..., None].float() * self.inv_freq  # [3, 1, seq, head_dim/2]

        def recompose(table: torch.Tensor) -> torch.Tensor:
            parts = [part[i % 3] for i, part in enumerate(table.split(self.mrope_section, dim=-1))]
            table = torch.cat(parts, dim=-1)
            return torch.cat((table, table), dim=-1)  # [1, seq, head_dim]

        return recompose(freqs.cos()), recompose(freqs.sin())

    def forward(self, inputs_embeds, position_ids, past_keys: list[torch.Tensor], past_values: list[torch.Tensor]):
        seq = inputs_embeds.shape[1]
        past_len = past_keys[0].shape[1]
        cos, sin = self.rotary(position_ids)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
        key_pos = torch.arange(past_len + seq, device=inputs_embeds.device)
        query_pos = key_pos[past_len:]
        causal = torch.where(key_pos[None, :] > query_pos[:, None], float("-inf"), 0.0)

        hidden = inputs_embeds
        new_keys, new_values = [], []
        for index, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(1, seq, -1, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(1, seq, -1, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(1, seq, -1, self.head_dim).transpose(1, 2)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            new_k, new_v = k.transpose(1, 2), v.transpose(1, 2)  # [1, seq, kv_heads, head_dim]
            new_keys.append(new_k)
            new_values.append(new_v)
            keys = torch.cat([past_keys[index], new_k], dim=1).transpose(1, 2)
            values = torch.cat([past_values[index], new_v], dim=1).transpose(1, 2)
            groups = q.shape[1] // keys.shape[1]
            keys = keys.repeat_interleave(groups, dim=1)
            values = values.repeat_interleave(groups, dim=1)
            scores = torch.matmul(q, keys.transpose(2, 3)) * attn.scaling + causal
            weights = torch.softmax(scores, dim=-1, dtype=torch.float32)
            out = torch.matmul(weights, values).transpose(1, 2).reshape(1, seq, -1)
            hidden = hidden + attn.o_proj(out)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        # Only the last position's logits: generation needs nothing else, and the lm_head is large.
        logits = self.lm_head(self.norm(hidden[:, -1:, :]))
        return logits, new_keys, new_values
