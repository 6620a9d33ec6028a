"""DETR's encoder-decoder transformer, batch-first, with ``nn.MultiheadAttention``'s parameter names.

Post-norm by default (pre-norm optional); positions are re-added to queries and keys at every
layer, as in the official implementation, so its checkpoints load by name. With no padding mask
no attention mask is built at all, so the graph traces to ONNX with dynamic sizes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MultiheadAttention", "Transformer", "TransformerDecoder", "TransformerEncoder"]


# --------------------------------------------------------------------------------------------
# Transformer
# --------------------------------------------------------------------------------------------


class MultiheadAttention(nn.Module):
    """Batch-first multi-head attention with ``nn.MultiheadAttention``'s parameter names.

    ``in_proj_weight`` stacks W_q, W_k, W_v (rows ``[0:d]``, ``[d:2d]``, ``[2d:3d]``); q is scaled by
    ``head_dim ** -0.5`` after its projection; dropout applies to the attention weights.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``query`` ``[B, Lq, d]``, ``key``/``value`` ``[B, Lk, d]``; ``key_padding_mask`` ``[B, Lk]``, True = ignore."""
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        heads = (self.num_heads, self.head_dim)
        q = (F.linear(query, w_q, b_q) * self.head_dim**-0.5).unflatten(-1, heads).transpose(1, 2)
        k = F.linear(key, w_k, b_k).unflatten(-1, heads).transpose(1, 2)
        v = F.linear(value, w_v, b_v).unflatten(-1, heads).transpose(1, 2)
        scores = q @ k.transpose(-2, -1)  # [B, heads, Lq, Lk]
        if key_padding_mask is not None:
            # The dtype's lowest finite value rather than -inf: same softmax, no inf in FP16 graphs.
            scores = scores.masked_fill(key_padding_mask[:, None, None, :], torch.finfo(scores.dtype).min)
        weights = F.dropout(scores.softmax(-1), self.dropout, self.training)
        return self.out_proj((weights @ v).transpose(1, 2).flatten(2))


def _ffn_layers(layer: nn.Module, d_model: int, dim_feedforward: int, dropout: float) -> None:
    layer.linear1 = nn.Linear(d_model, dim_feedforward)
    layer.dropout = nn.Dropout(dropout)
    layer.linear2 = nn.Linear(dim_feedforward, d_model)


class TransformerEncoderLayer(nn.Module):
    """Self-attention (positions on q and k only) + ReLU FFN, post-norm or pre-norm."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, normalize_before: bool) -> None:
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout)
        _ffn_layers(self, d_model, dim_feedforward, dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.normalize_before = normalize_before

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))

    def forward(self, src: torch.Tensor, pos: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        if self.normalize_before:
            x = self.norm1(src)
            qk = x + pos
            src = src + self.dropout1(self.self_attn(qk, qk, x, key_padding_mask))
            return src + self.dropout2(self._ffn(self.norm2(src)))
        qk = src + pos
        src = self.norm1(src + self.dropout1(self.self_attn(qk, qk, src, key_padding_mask)))
        return self.norm2(src + self.dropout2(self._ffn(src)))


class TransformerDecoderLayer(nn.Module):
    """Query self-attention, cross-attention to the memory, FFN; post-norm or pre-norm."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, normalize_before: bool) -> None:
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout)
        self.multihead_attn = MultiheadAttention(d_model, nhead, dropout)
        _ffn_layers(self, d_model, dim_feedforward, dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.normalize_before = normalize_before

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor, query_pos: torch.Tensor,
                memory_key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        if self.normalize_before:
            x = self.norm1(tgt)
            qk = x + query_pos
            tgt = tgt + self.dropout1(self.self_attn(qk, qk, x))
            x = self.norm2(tgt)
            tgt = tgt + self.dropout2(self.multihead_attn(x + query_pos, memory + pos, memory, memory_key_padding_mask))
            return tgt + self.dropout3(self._ffn(self.norm3(tgt)))
        qk = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(qk, qk, tgt)))
        cross = self.multihead_attn(tgt + query_pos, memory + pos, memory, memory_key_padding_mask)
        tgt = self.norm2(tgt + self.dropout2(cross))
        return self.norm3(tgt + self.dropout3(self._ffn(tgt)))


class TransformerEncoder(nn.Module):
    def __init__(self, layers: list[nn.Module], norm: nn.Module | None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = norm  # only pre-norm models have a final encoder LayerNorm

    def forward(self, src: torch.Tensor, pos: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layers:
            src = layer(src, pos, key_padding_mask)
        return self.norm(src) if self.norm is not None else src


class TransformerDecoder(nn.Module):
    def __init__(self, layers: list[nn.Module], norm: nn.Module) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = norm

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor, query_pos: torch.Tensor,
                memory_key_padding_mask: torch.Tensor | None) -> list[torch.Tensor]:
        """Every layer's output after the shared final LayerNorm (the next layer gets it un-normalised)."""
        outputs = []
        for layer in self.layers:
            tgt = layer(tgt, memory, pos, query_pos, memory_key_padding_mask)
            outputs.append(self.norm(tgt))
        return outputs


class Transformer(nn.Module):
    """DETR's encoder-decoder; ``forward`` returns (per-layer decoder outputs, memory ``[B, d, h, w]``)."""

    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6, num_decoder_layers: int = 6,
                 dim_feedforward: int = 2048, dropout: float = 0.1, normalize_before: bool = False) -> None:
        super().__init__()
        args = (d_model, nhead, dim_feedforward, dropout, normalize_before)
        self.encoder = TransformerEncoder(
            [TransformerEncoderLayer(*args) for _ in range(num_encoder_layers)],
            nn.LayerNorm(d_model) if normalize_before else None,
        )
        self.decoder = TransformerDecoder(
            [TransformerDecoderLayer(*args) for _ in range(num_decoder_layers)], nn.LayerNorm(d_model)
        )
        self.d_model = d_model
        self.nhead = nhead
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src: torch.Tensor, mask: torch.Tensor | None, query_embed: torch.Tensor,
                pos: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``src``/``pos`` ``[B, d, h, w]``, ``mask`` ``[B, h, w]`` or None, ``query_embed`` ``[Q, d]``."""
        # Row-major flattening: sequence index = y * w + x.
        memory = src.flatten(2).transpose(1, 2)
        pos = pos.flatten(2).transpose(1, 2)
        key_padding_mask = mask.flatten(1) if mask is not None else None
        memory = self.encoder(memory, pos, key_padding_mask)
        query_pos = query_embed.unsqueeze(0).expand(src.shape[0], -1, -1)
        tgt = torch.zeros_like(query_pos)
        hs = self.decoder(tgt, memory, pos, query_pos, key_padding_mask)
        return hs, memory.transpose(1, 2).reshape(src.shape)
