"""DINO self-distillation (Caron et al., 2021) as an extra training signal for a student.

A *teacher* — an exponential moving average (EMA) of the student, never trained by gradient —
sees two global views of each image; the student sees those and some smaller local views. Both
map their image embeddings through a projection head to ``K`` "prototype" logits, and the student
learns to predict the teacher's sharpened, centred distribution of another view of the same
image. Centring (subtracting an EMA of the teacher's mean output) and sharpening (a low teacher
temperature) together keep the teacher from collapsing to a constant or a one-hot output.

Notation: ``s_v`` the student's head output for view ``v`` (``[B, K]``), ``t_i`` the teacher's
for global view ``i``, ``c`` the centre (``[1, K]``), ``τ_s``/``τ_t`` the temperatures.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from vlexport.errors import UsageError

if TYPE_CHECKING:
    from vlexport.models.kdeov.model import KDEOVModel

__all__ = [
    "DINOLoss",
    "DINOHead",
    "MomentumTeacher",
    "ema_update",
    "cosine_schedule",
    "MultiCropViews",
    "DINODistillation",
]


class DINOLoss(nn.Module):
    """Cross-entropy from the centred, sharpened teacher to the student, over pairs of views.

    ``P_t(i) = softmax((t_i − c) / τ_t)`` (no gradient), ``log P_s(v) = log_softmax(s_v / τ_s)``;
    ``loss = mean over pairs (i, v) with v ≠ i of mean_b Σ_k −P_t(i)[b, k] · log P_s(v)[b, k]``.
    Teacher view ``i`` is the same image crop as student view ``i`` (the global views come first
    in the student's list), so those pairs are skipped. After every call the centre moves towards
    the teacher batch mean: ``c ← m · c + (1 − m) · mean_{i, b} t_i[b]`` (no gradient).
    """

    center: torch.Tensor

    def __init__(
        self, out_dim: int, teacher_temp: float = 0.04, student_temp: float = 0.1, center_momentum: float = 0.9
    ) -> None:
        super().__init__()
        if int(out_dim) < 1:
            raise UsageError(f"out_dim must be >= 1, got {out_dim}")
        if not (teacher_temp > 0 and student_temp > 0):
            raise UsageError(f"temperatures must be > 0, got teacher {teacher_temp}, student {student_temp}")
        if not 0.0 <= center_momentum <= 1.0:
            raise UsageError(f"center_momentum must be in [0, 1], got {center_momentum}")
        self.out_dim = int(out_dim)
        self.teacher_temp = float(teacher_temp)
        self.student_temp = float(student_temp)
        self.center_momentum = float(center_momentum)
        self.register_buffer("center", torch.zeros(1, self.out_dim))

    def forward(self, student_out: Sequence[torch.Tensor], teacher_out: Sequence[torch.Tensor]) -> torch.Tensor:
        """``student_out``: one ``[B, K]`` per view (global views first); ``teacher_out``: one per global view."""
        student_out, teacher_out = list(student_out), list(teacher_out)
        if not teacher_out or len(teacher_out) > len(student_out):
            raise UsageError(
                f"DINOLoss: need 1..{len(student_out)} teacher views for {len(student_out)} student views, "
                f"got {len(teacher_out)}"
            )
        shape = tuple(teacher_out[0].shape)
        if len(shape) != 2 or shape[1] != self.out_dim or any(
            tuple(x.shape) != shape for x in (*student_out, *teacher_out)
        ):
            raise UsageError(
                f"DINOLoss: every view must be [B, {self.out_dim}], got student "
                f"{[tuple(s.shape) for s in student_out]} and teacher {[tuple(t.shape) for t in teacher_out]}"
            )
        if len(student_out) < 2:
            raise UsageError("DINOLoss: need at least 2 views (a teacher view and a different student view)")
        teacher_out = [t.detach() for t in teacher_out]
        targets = [F.softmax((t - self.center) / self.teacher_temp, dim=-1) for t in teacher_out]
        log_probs = [F.log_softmax(s / self.student_temp, dim=-1) for s in student_out]
        total, pairs = 0.0, 0
        for i, p_t in enumerate(targets):
            for v, log_p_s in enumerate(log_probs):
                if v == i:
                    continue
                total = total + (-p_t * log_p_s).sum(dim=-1).mean()
                pairs += 1
        self.update_center(teacher_out)
        return total / pairs

    @torch.no_grad()
    def update_center(self, teacher_out: Sequence[torch.Tensor]) -> None:
        """``c ← m · c + (1 − m) · (mean of the teacher outputs over views and batch)``."""
        batch_mean = torch.cat(list(teacher_out), dim=0).mean(dim=0, keepdim=True)
        self.center.mul_(self.center_momentum).add_(batch_mean.to(self.center.dtype), alpha=1 - self.center_momentum)

    def extra_repr(self) -> str:
        return (
            f"out_dim={self.out_dim}, teacher_temp={self.teacher_temp}, student_temp={self.student_temp}, "
            f"center_momentum={self.center_momentum}"
        )


class DINOHead(nn.Module):
    """MLP (``in → hidden → hidden → bottleneck``, GELU), L2 normalisation, then a linear layer to
    ``out_dim`` prototypes whose weight rows are L2-normalised (weight normalisation with the gain
    fixed to 1, as DINO does to stabilise training): outputs are cosines in ``[-1, 1]``."""

    def __init__(self, in_dim: int, out_dim: int = 1024, hidden_dim: int = 256, bottleneck_dim: int = 64) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        return F.linear(x, F.normalize(self.prototypes, dim=-1))


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``θ_t ← m · θ_t + (1 − m) · θ_s`` for every parameter; buffers (e.g. BatchNorm running
    statistics) are copied from the student. Both modules must have the same names and shapes."""
    if not 0.0 <= momentum <= 1.0:
        raise UsageError(f"EMA momentum must be in [0, 1], got {momentum}")
    t_params, s_params = dict(teacher.named_parameters()), dict(student.named_parameters())
    t_bufs, s_bufs = dict(teacher.named_buffers()), dict(student.named_buffers())
    if t_params.keys() != s_params.keys() or t_bufs.keys() != s_bufs.keys():
        diff = sorted((t_params.keys() ^ s_params.keys()) | (t_bufs.keys() ^ s_bufs.keys()))
        raise UsageError(f"ema_update: teacher and student differ in: {', '.join(diff[:10])}")
    for name, t in t_params.items():
        s = s_params[name]
        if t.shape != s.shape:
            raise UsageError(
                f"ema_update: {name} has shape {tuple(t.shape)} in the teacher, {tuple(s.shape)} in the student"
            )
        t.mul_(momentum).add_(s.detach().to(t.dtype), alpha=1.0 - momentum)
    for name, t in t_bufs.items():
        t.copy_(s_bufs[name])


def cosine_schedule(step: int, total_steps: int, start: float, end: float) -> float:
    """Cosine ramp from ``start`` (step 0) to ``end`` (step ``total_steps`` and after):
    ``end − (end − start) · (1 + cos(π · step / total_steps)) / 2``. DINO ramps the teacher
    momentum from 0.996 to 1 this way."""
    if int(total_steps) < 1:
        raise UsageError(f"total_steps must be >= 1, got {total_steps}")
    progress = min(max(step, 0), total_steps) / total_steps
    return end - (end - start) * (1.0 + math.cos(math.pi * progress)) / 2.0


class MomentumTeacher(nn.Module):
    """A frozen deep copy of a student module, updated only by :func:`ema_update`.

    Its parameters never require gradients and ``forward`` runs without autograd.
    """

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.module = copy.deepcopy(student)
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def update(self, student: nn.Module, momentum: float) -> None:
        """EMA step towards ``student`` (see :func:`ema_update`)."""
        ema_update(self.module, student, momentum)


class MultiCropViews:
    """Random multi-crop views of a batch ``[B, 3, H, W]`` (RGB in [0, 1]), on its device.

    Each view is a random resized crop (area fraction in ``scale``, aspect ratio log-uniform in
    [3/4, 4/3]) with a random horizontal flip, sampled by an affine grid (bilinear), then a
    random brightness and contrast jitter. Global views are ``global_size``, local views
    ``local_size`` (square).
    """

    def __init__(
        self,
        global_size: int,
        local_size: int,
        num_global: int = 2,
        num_local: int = 2,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.1, 0.4),
        jitter: float = 0.3,
    ) -> None:
        if int(num_global) < 1 or int(num_local) < 0 or int(num_global) + int(num_local) < 2:
            raise UsageError(f"need >= 1 global view and >= 2 views in all, got {num_global} global, {num_local} local")
        for name, (lo, hi) in (("global_scale", global_scale), ("local_scale", local_scale)):
            if not 0.0 < lo <= hi <= 1.0:
                raise UsageError(f"{name} must satisfy 0 < min <= max <= 1, got {(lo, hi)}")
        self.global_size, self.local_size = int(global_size), int(local_size)
        self.num_global, self.num_local = int(num_global), int(num_local)
        self.global_scale, self.local_scale = tuple(global_scale), tuple(local_scale)
        self.jitter = float(jitter)

    def _crop(self, images: torch.Tensor, size: int, scale: tuple[float, float], gen: torch.Generator | None):
        b = images.shape[0]
        opts = {"device": "cpu", "generator": gen}
        area = torch.empty(b).uniform_(*scale, generator=gen)
        log_ratio = torch.empty(b).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen)
        ratio = log_ratio.exp()
        cw = (area * ratio).sqrt().clamp(max=1.0)  # crop width / image width
        ch = (area / ratio).sqrt().clamp(max=1.0)
        # Centre in normalised [-1, 1] coordinates, keeping the crop inside the image.
        cx = (torch.rand(b, **opts) * 2 - 1) * (1 - cw)
        cy = (torch.rand(b, **opts) * 2 - 1) * (1 - ch)
        flip = torch.where(torch.rand(b, **opts) < 0.5, -1.0, 1.0)
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2] = cw * flip, cx
        theta[:, 1, 1], theta[:, 1, 2] = ch, cy
        theta = theta.to(images.device, images.dtype)
        grid = F.affine_grid(theta, [b, images.shape[1], size, size], align_corners=False)
        view = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if self.jitter > 0:
            lo, hi = 1 - self.jitter, 1 + self.jitter
            bright = torch.empty(b, 1, 1, 1).uniform_(lo, hi, generator=gen).to(view)
            contrast = torch.empty(b, 1, 1, 1).uniform_(lo, hi, generator=gen).to(view)
            mean = view.mean(dim=(1, 2, 3), keepdim=True)
            view = ((view * bright - mean * bright) * contrast + mean * bright).clamp(0.0, 1.0)
        return view

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """Global views first, then local views."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise UsageError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
        views = [self._crop(images, self.global_size, self.global_scale, generator) for _ in range(self.num_global)]
        views += [self._crop(images, self.local_size, self.local_scale, generator) for _ in range(self.num_local)]
        return views


class _EmbeddingBranch(nn.Module):
    """KDEOV's image-embedding path (backbone, last level, pooled projection) with a DINO head.

    ``embed`` is :meth:`KDEOVModel.encode_image`; built from the student's own modules it shares
    their weights, so the student branch and its EMA copy have identical parameter names."""

    def __init__(self, backbone: nn.Module, projection: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.projection, self.head = backbone, projection, head

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.projection(self.backbone(images)[-1])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(images))


class DINODistillation(nn.Module):
    """DINO self-distillation for a KDEOV student, an option of ``train_feature_alignment``.

    The student branch is the model's image embedding (``encode_image``) followed by a trainable
    :class:`DINOHead`; the teacher is an EMA copy of backbone, projection and head
    (:class:`MomentumTeacher`). Each call makes :class:`MultiCropViews` of the batch, runs the
    teacher on the global views and the student on all views and returns the :class:`DINOLoss`.
    After each optimiser step call :meth:`update_teacher`; the EMA momentum follows
    :func:`cosine_schedule` from ``momentum`` to ``final_momentum`` over the run.

    The teacher runs in the same train/eval mode as this module (BatchNorm uses batch statistics
    in training, as in DINO); its running statistics are copied from the student at each update.

    Args:
        model: the student (anything with ``backbone``, ``projection`` and ``config.embed_dim``).
        weight: the factor of the DINO loss in the training total.
        image_size: size of the global views (default: the model's ``config.image_size``);
            local views are half of it, rounded down to a multiple of 32 (at least 32).
    """

    def __init__(
        self,
        model: KDEOVModel,
        *,
        weight: float = 1.0,
        out_dim: int = 1024,
        hidden_dim: int = 256,
        bottleneck_dim: int = 64,
        num_local: int = 2,
        image_size: int | None = None,
        teacher_temp: float = 0.04,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        momentum: float = 0.996,
        final_momentum: float = 1.0,
    ) -> None:
        super().__init__()
        if not weight >= 0:
            raise UsageError(f"DINO weight must be >= 0, got {weight}")
        if not 0.0 <= momentum <= final_momentum <= 1.0:
            raise UsageError(f"need 0 <= momentum <= final_momentum <= 1, got {momentum}, {final_momentum}")
        self.weight = float(weight)
        self.momentum, self.final_momentum = float(momentum), float(final_momentum)
        size = int(image_size if image_size is not None else model.config.image_size)
        self.views = MultiCropViews(size, max(32, size // 2 // 32 * 32), num_local=num_local)
        self.student_head = DINOHead(model.config.embed_dim, out_dim, hidden_dim, bottleneck_dim)
        self.teacher = MomentumTeacher(self.student_branch(model))
        self.loss = DINOLoss(out_dim, teacher_temp, student_temp, center_momentum)

    def student_branch(self, model: KDEOVModel) -> _EmbeddingBranch:
        """The student's embedding path plus its head, sharing the model's modules."""
        return _EmbeddingBranch(model.backbone, model.projection, self.student_head)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimiser must train besides the model: the student head."""
        return list(self.student_head.parameters())

    def forward(
        self, model: KDEOVModel, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The DINO loss of one batch ``[B, 3, H, W]`` (unweighted)."""
        views = self.views(images, generator)
        student = self.student_branch(model)
        teacher_out = [self.teacher(v) for v in views[: self.views.num_global]]
        student_out = [student(v) for v in views]
        return self.loss(student_out, teacher_out)

    def update_teacher(self, model: KDEOVModel, step: int, total_steps: int) -> float:
        """EMA step of the teacher after optimiser step ``step`` of ``total_steps``; returns the momentum used."""
        m = cosine_schedule(step, total_steps, self.momentum, self.final_momentum)
        self.teacher.update(self.student_branch(model), m)
        return m
