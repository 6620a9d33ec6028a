"""KDEOV's building blocks: projections to the text space, text fusion and the folded similarity.

The folded functions compute a 1x1 projection + GroupNorm + cosine with the text embeddings in one
pass (the projection folded into the text side), as the exported detector graph does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlexport.errors import UsageError
from vlexport.models.kdeov.config import FUSION_MODES

__all__ = [
    "ProjectionNetwork",
    "SpatialProjection",
    "CrossModalFusionModule",
    "folded_similarity",
    "folded_projection",
    "best_folded_similarity",
    "soft_normalize",
]


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


class ProjectionNetwork(nn.Module):
    """Global average pooling → Linear → GELU → Linear → L2 normalisation: ``[B, C, H, W] → [B, D]``."""

    def __init__(self, in_channels: int, embed_dim: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or max(in_channels, embed_dim)
        self.fc1 = nn.Linear(in_channels, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean(dim=(2, 3))
        return F.normalize(self.fc2(self.act(self.fc1(pooled))), dim=-1)


class SpatialProjection(nn.Module):
    """1x1 convolution + GroupNorm: ``[B, C, H, W] → [B, D, H, W]`` (not normalised).

    The number of groups is ``gcd(groups, embed_dim)`` so that it always divides ``embed_dim``.
    """

    def __init__(self, in_channels: int, embed_dim: int, groups: int = 32) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, embed_dim, 1)
        self.norm = nn.GroupNorm(math.gcd(groups, embed_dim), embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class CrossModalFusionModule(nn.Module):
    """Condition a visual map ``[B, D, H, W]`` on text features; the output has the input's shape.

    Text features are ``[C, D]`` (one vocabulary shared by the batch) or ``[B, C, D]``.

    * ``"film"``: ``γ, β = W_γ t̄, W_β t̄`` from the mean text feature ``t̄``;
      ``out = v · (1 + γ) + β``. ``W_γ``, ``W_β`` start at zero, so the module starts as identity.
    * ``"cross_attention"``: the ``H·W`` visual tokens attend to the ``C`` text tokens
      (multi-head attention), ``out = LayerNorm(v + Attn(v, t, t))``.
    """

    def __init__(self, embed_dim: int, num_heads: int = 8, mode: str = "film") -> None:
        super().__init__()
        if mode not in FUSION_MODES:
            raise UsageError(f"unknown fusion mode {mode!r}; choose one of: {', '.join(FUSION_MODES)}")
        self.mode = mode
        self.embed_dim = embed_dim
        if mode == "film":
            self.gamma = nn.Linear(embed_dim, embed_dim)
            self.beta = nn.Linear(embed_dim, embed_dim)
            for layer in (self.gamma, self.beta):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
        else:
            if embed_dim % num_heads:
                raise UsageError(f"fusion: num_heads {num_heads} must divide embed_dim {embed_dim}")
            self.attn = nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)
            self.norm = nn.LayerNorm(embed_dim)

    def forward(self, visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        if visual.ndim != 4 or visual.shape[1] != self.embed_dim:
            raise UsageError(f"fusion: expected visual [B, {self.embed_dim}, H, W], got {tuple(visual.shape)}")
        if text.ndim not in (2, 3) or text.shape[-1] != self.embed_dim:
            raise UsageError(
                f"fusion: expected text [C, {self.embed_dim}] or [B, C, {self.embed_dim}], got {tuple(text.shape)}"
            )
        b, d, h, w = visual.shape
        if self.mode == "film":
            t = text.mean(dim=-2)  # [D] or [B, D]
            gamma = self.gamma(t).reshape(-1, d, 1, 1)
            beta = self.beta(t).reshape(-1, d, 1, 1)
            return visual * (1.0 + gamma) + beta
        tokens = visual.flatten(2).transpose(1, 2)  # [B, HW, D]
        keys = text.unsqueeze(0).expand(b, -1, -1) if text.ndim == 2 else text
        attended, _ = self.attn(tokens, keys, keys, need_weights=False)
        out = self.norm(tokens + attended)
        return out.transpose(1, 2).reshape(b, d, h, w)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


def soft_normalize(x: torch.Tensor, floor: torch.Tensor | float, dim: int = 1, eps: float = 1e-12) -> torch.Tensor:
    """``x / sqrt(|x|² + floor²)`` along ``dim``: :func:`F.normalize` when ``floor`` is zero."""
    sq = (x * x).sum(dim, keepdim=True) + floor * floor
    return x / sq.sqrt().clamp_min(eps)


def folded_projection(x: torch.Tensor, conv: nn.Conv2d, norm: nn.GroupNorm
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``GroupNorm(conv(x))`` as a per-sample affine map of ``x``: ``(x_flat, W', c)``.

    ``x`` [B, Cin, H, W] feeds a 1x1 ``conv`` (Cin → D) and a ``GroupNorm``. GroupNorm's
    statistics are linear/quadratic in ``x``: from the spatial mean x̄ and second moment
    S = X Xᵀ / HW (the statistics derived in float64, so E[y²] − E[y]² does not cancel badly) we
    get per-sample scales ``a`` and shifts ``b`` with ``GN(conv(x)) = W' x + c`` where
    ``W' = a ⊙ W`` [B, D, Cin] and ``c = a ⊙ bias + b`` [B, D]; ``x_flat`` is [B, Cin, HW].
    """
    b, cin = x.shape[0], x.shape[1]
    d, groups = conv.out_channels, norm.num_groups
    w = conv.weight.reshape(d, cin)
    bias = conv.bias if conv.bias is not None else torch.zeros(d, dtype=x.dtype, device=x.device)
    xf = x.flatten(2)  # [B, Cin, HW]
    hw = xf.shape[2]
    # The moments are sums over HW done in float32 GEMMs; everything derived from them (tiny
    # [Cin, Cin] matrices) is float64.
    mean_x = xf.mean(dim=2).double()  # [B, Cin]
    second = (torch.matmul(xf, xf.transpose(1, 2)) / hw).double()  # [B, Cin, Cin]
    w64, bias64 = w.double(), bias.double()
    mean_y = torch.matmul(mean_x, w64.t()) + bias64  # [B, D]: E[y_c]
    sq_y = ((torch.matmul(w64, second) * w64).sum(-1)  # [B, D]: E[y_c^2]
            + 2 * bias64 * torch.matmul(mean_x, w64.t()) + bias64 * bias64)
    mu = mean_y.reshape(b, groups, -1).mean(-1, keepdim=True)
    var = sq_y.reshape(b, groups, -1).mean(-1, keepdim=True) - mu * mu
    scale = (1.0 / torch.sqrt(var + norm.eps)).expand(-1, -1, d // groups).reshape(b, d)  # [B, D]
    shift = (-mu * (1.0 / torch.sqrt(var + norm.eps))).expand(-1, -1, d // groups).reshape(b, d)
    gamma = norm.weight.double() if norm.affine else torch.ones(d, dtype=torch.float64)
    beta = norm.bias.double() if norm.affine else torch.zeros(d, dtype=torch.float64)
    a = gamma * scale  # GN(y)_c = a_c y_c + (gamma_c shift_c + beta_c)
    w_eff = (a.unsqueeze(-1) * w64).to(x.dtype)  # [B, D, Cin]
    c_eff = (a * bias64 + gamma * shift + beta).to(x.dtype)  # [B, D]
    return xf, w_eff, c_eff


def _folded_norm(xf: torch.Tensor, w_eff: torch.Tensor, c_eff: torch.Tensor, floor: torch.Tensor | float
                 ) -> torch.Tensor:
    """``sqrt(|W' x + c|² + floor²)`` per location [B, 1, HW], as the quadratic form in ``x``."""
    q = torch.matmul(w_eff.transpose(1, 2), w_eff)  # [B, Cin, Cin]
    lin = 2.0 * torch.matmul(c_eff.unsqueeze(1), w_eff)  # [B, 1, Cin]
    qx = torch.matmul(q, xf)  # [B, Cin, HW]
    sq_norm = (torch.matmul(torch.ones_like(lin), qx * xf) + torch.matmul(lin, xf)
               + (c_eff * c_eff).sum(-1, keepdim=True).unsqueeze(-1))  # [B, 1, HW]
    return (sq_norm.clamp_min(0) + floor * floor).sqrt().clamp_min(1e-12)


def folded_similarity(x: torch.Tensor, conv: nn.Conv2d, norm: nn.GroupNorm, text: torch.Tensor,
                      floor: torch.Tensor | float = 0.0) -> torch.Tensor:
    """``text @ soft_normalize(GroupNorm(conv(x)), floor)`` per location, without the D-channel map.

    With :func:`folded_projection`'s ``GN(conv(x)) = W' x + c`` the similarities are
    ``(T W') x + T c`` and the squared norms the quadratic form ``xᵀ W'ᵀW' x + 2 cᵀW' x + |c|²``:
    GEMMs of width Cin (80 for YOLOv8n's class branch) instead of D (512). ``text`` is [C, D]
    (unit rows); returns [B, C, HW].
    """
    xf, w_eff, c_eff = folded_projection(x, conv, norm)
    sim = torch.matmul(torch.matmul(text, w_eff), xf) + torch.matmul(c_eff, text.t()).unsqueeze(-1)  # [B, C, HW]
    return sim / _folded_norm(xf, w_eff, c_eff, floor)


def best_folded_similarity(x: torch.Tensor, conv: nn.Conv2d, norm: nn.GroupNorm, text: torch.Tensor,
                           floor: torch.Tensor | float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The largest of :func:`folded_similarity` over the classes, and its class: ``([B, HW], [B, HW])``.

    Arranged for inference with large vocabularies: the denominator does not depend on the class,
    so the maximum is taken on the numerators; ``T c`` rides in the GEMM as one more input row of
    ones; and the GEMM writes [HW, C], so the maximum runs along contiguous memory (onnxruntime's
    reductions over a strided axis cost several times more). One TopK gives value and index.
    """
    xf, w_eff, c_eff = folded_projection(x, conv, norm)
    # The Concat also keeps onnxruntime from fusing the transpose into a slower transposed GEMM.
    rows = torch.cat([xf.transpose(1, 2), torch.ones_like(xf[:, :1]).transpose(1, 2)], 2)  # [B, HW, Cin+1]
    classes = torch.cat([torch.matmul(w_eff.transpose(1, 2), text.t()),
                         torch.matmul(c_eff, text.t()).unsqueeze(1)], 1)  # [B, Cin+1, C]
    top, idx = torch.matmul(rows, classes).topk(1, dim=2)  # [B, HW, 1]
    return top[..., 0] / _folded_norm(xf, w_eff, c_eff, floor)[:, 0], idx[..., 0]


