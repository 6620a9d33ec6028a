"""Lightweight multi-scale visual backbones for the student models.

:class:`LightweightVisualBackbone` wraps either an Ultralytics YOLO detection model (built from
the YAML definitions Ultralytics ships, never downloaded) or a small built-in CNN, and returns
the three feature maps at strides 8, 16 and 32. For Ultralytics models the maps are exactly the
tensors that feed the ``Detect`` head, and :meth:`LightweightVisualBackbone.box_regression`
decodes that head's box branch into xyxy boxes, so a COCO-trained YOLO can localise objects
for an open-vocabulary classifier.

Checkpoints are read by :func:`load_checkpoint_file`: ``weights_only=True`` unless the caller
passes an explicit trust flag, which Ultralytics' own (pickled) checkpoints need.
"""

from __future__ import annotations

import logging
import pickletools
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlexport.errors import CheckpointError, DependencyError, UsageError

__all__ = [
    "BACKBONE_NAMES",
    "LightweightVisualBackbone",
    "SimpleConvBackbone",
    "check_state_dict",
    "load_checkpoint_file",
]

logger = logging.getLogger(__name__)

# name -> Ultralytics YAML (relative to ultralytics/cfg/models). Ultralytics' yolov5.yaml is the
# anchor-free "u" variant (v8 Detect head), so yolov5s has the same box head as yolov8n and
# yolov5su.pt weights load into it.
_ULTRALYTICS_YAML: dict[str, str] = {
    "yolov8n": "v8/yolov8n.yaml",
    "yolov5s": "v5/yolov5s.yaml",
    # The other scales of the same two families (Ultralytics derives the scale from the name).
    **{f"yolov8{s}": f"v8/yolov8{s}.yaml" for s in "smlx"},
    **{f"yolov5{s}": f"v5/yolov5{s}.yaml" for s in "nmlx"},
}
BACKBONE_NAMES: tuple[str, ...] = (*_ULTRALYTICS_YAML, "simple")


# --------------------------------------------------------------------------------------------
# Checkpoint files
# --------------------------------------------------------------------------------------------


def _pickle_strings(path: Path) -> set[str]:
    """Module/class names a zip-format torch file's pickle refers to, read without unpickling."""
    names: set[str] = set()
    with zipfile.ZipFile(path) as zf:
        for member in zf.namelist():
            if not member.endswith("data.pkl"):
                continue
            # genops only parses opcodes; nothing in the file is executed.
            for opcode, arg, _ in pickletools.genops(zf.read(member)):
                if isinstance(arg, str) and opcode.name in (
                    "GLOBAL", "SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"
                ):
                    names.add(arg)
    return names


def _first_line(exc: BaseException) -> str:
    """The first sentence of an exception's message: library messages can run for paragraphs."""
    lines = str(exc).strip().splitlines()
    if not lines:
        return type(exc).__name__
    first = lines[0].split(". ")[0].rstrip(".")
    return first if len(first) <= 200 else first[:200] + "…"


def load_checkpoint_file(path: str | Path, *, trust: bool = False, what: str = "checkpoint") -> Any:
    """Load a torch file safely and return its content.

    The file is read with ``torch.load(weights_only=True)``. A file that needs arbitrary Python
    objects to load (an Ultralytics ``.pt`` is one) is loaded with ``weights_only=False`` only when
    ``trust`` is True; otherwise a :class:`CheckpointError` says how to opt in.

    Raises:
        CheckpointError: the file is missing, unreadable, not a torch file, or untrusted.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{what} not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"{what} {path} is not a file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as safe_exc:  # noqa: BLE001 - classified below
        needs_code = False
        is_ultralytics = False
        if zipfile.is_zipfile(path):
            try:
                names = _pickle_strings(path)
            except Exception:  # noqa: BLE001 - an unreadable archive is simply "not a torch file"
                names = set()
            else:
                needs_code = "Weights only load failed" in str(safe_exc)
                is_ultralytics = any(n.startswith("ultralytics") for n in names)
        if not needs_code:
            # torch's weights-only message is about unpickling policy, misleading for a corrupt file.
            detail = (
                "corrupt or not a torch.save file"
                if "Weights only load failed" in str(safe_exc)
                else _first_line(safe_exc)
            )
            raise CheckpointError(f"{what} {path} is not a readable PyTorch file ({detail})") from None
        if not trust:
            kind = "an Ultralytics checkpoint (a pickle)" if is_ultralytics else "a pickle of Python objects"
            raise CheckpointError(
                f"{what} {path} is {kind}: loading it runs code from the file; "
                "pass --trust-checkpoint if you trust it"
            ) from None
        if is_ultralytics:
            _require_ultralytics(f"loading the Ultralytics checkpoint {path}")
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
            raise CheckpointError(f"{what} {path} could not be loaded ({_first_line(exc)})") from None


def check_state_dict(
    module: nn.Module, state_dict: Mapping[str, Any], *, source: str, prefix: str = ""
) -> None:
    """Load ``state_dict`` into ``module`` after checking every key and shape.

    All problems (missing keys, unexpected keys, shape mismatches) are reported together in one
    :class:`CheckpointError` naming ``source``. ``prefix`` is prepended to the module's own keys in
    the message, so a sub-module's mismatches read like the checkpoint's keys.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [
        f"{prefix}{k} (checkpoint {list(getattr(v, 'shape', ()))} vs model {list(own[k].shape)})"
        for k, v in state_dict.items()
        if k in own and (not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(own[k].shape))
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): " + ", ".join(prefix + k for k in missing))
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): " + ", ".join(prefix + k for k in unexpected))
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch(es): " + ", ".join(mismatched))
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(parts))
    module.load_state_dict(dict(state_dict), strict=True)


# --------------------------------------------------------------------------------------------
# Backbones
# --------------------------------------------------------------------------------------------


def _require_ultralytics(purpose: str) -> None:
    try:
        import ultralytics  # noqa: F401
    except ImportError as exc:
        raise DependencyError(
            f"{purpose} needs the 'ultralytics' package: pip install 'vlexport[export]'"
        ) from exc


def _ultralytics_available() -> bool:
    try:
        import ultralytics.nn.tasks  # noqa: F401
    except ImportError:
        return False
    return True


def _conv_bn_act(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.SiLU(inplace=True)
    )


class SimpleConvBackbone(nn.Module):
    """A small CNN: five stride-2 conv+BN+SiLU stages (each with one extra 3x3 conv at stride 1
    from stride 8 on), returning maps at strides 8, 16 and 32.

    Used by the ``tiny`` test presets and as the fallback when Ultralytics is not installed.
    """

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(_conv_bn_act(3, w, 2), _conv_bn_act(w, 2 * w, 2))  # stride 4
        self.stage3 = nn.Sequential(_conv_bn_act(2 * w, 4 * w, 2), _conv_bn_act(4 * w, 4 * w, 1))  # 8
        self.stage4 = nn.Sequential(_conv_bn_act(4 * w, 8 * w, 2), _conv_bn_act(8 * w, 8 * w, 1))  # 16
        self.stage5 = nn.Sequential(_conv_bn_act(8 * w, 16 * w, 2), _conv_bn_act(16 * w, 16 * w, 1))  # 32
        self.out_channels = [4 * w, 8 * w, 16 * w]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        p3 = self.stage3(self.stem(x))
        p4 = self.stage4(p3)
        p5 = self.stage5(p4)
        return [p3, p4, p5]


class LightweightVisualBackbone(nn.Module):
    """Multi-scale feature extractor (strides 8/16/32) with an optional YOLO box head.

    Args:
        name: ``"yolov8n"``, ``"yolov5s"`` (Ultralytics' anchor-free ``yolov5su`` architecture,
            same Detect head as v8) or ``"simple"`` (a small built-in CNN, no box head).
        checkpoint: weights for the backbone: an Ultralytics ``.pt`` (needs
            ``trust_checkpoint=True``) or a plain ``{"state_dict", "names"}`` file. Every key
            and shape is checked.
        trust_checkpoint: allow unpickling Python objects from ``checkpoint``.
        fallback: use ``"simple"`` instead of an Ultralytics model (with a warning). The same
            happens, with a warning, when Ultralytics is not installed and no checkpoint is given.

    Attributes:
        name: the architecture actually built.
        out_channels: channels of the three maps.
        strides: ``[8, 16, 32]``.
        has_box_head: True for Ultralytics Detect-based models (see :meth:`box_regression`).
        num_source_classes: classes of the Detect head (0 without one).
        source_names: class names from the checkpoint, or None.
    """

    def __init__(
        self,
        name: str = "yolov8n",
        *,
        checkpoint: str | Path | None = None,
        trust_checkpoint: bool = False,
        fallback: bool = False,
    ) -> None:
        super().__init__()
        if name not in BACKBONE_NAMES:
            raise UsageError(f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONE_NAMES)}")
        if name in _ULTRALYTICS_YAML and (fallback or not _ultralytics_available()):
            if checkpoint is not None:
                if fallback:
                    raise UsageError(
                        f"backbone fallback to 'simple' cannot load the {name} checkpoint {checkpoint}; "
                        "drop the fallback or the checkpoint"
                    )
                _require_ultralytics(f"the {name} backbone with checkpoint {checkpoint}")
            reason = "fallback requested" if fallback else "ultralytics is not installed"
            logger.warning("backbone %s unavailable (%s): using the 'simple' CNN backbone instead", name, reason)
            name = "simple"
        self.name = name
        self.source_names: list[str] | None = None
        self.net: nn.Module
        if name == "simple":
            self.net = SimpleConvBackbone()
            self.out_channels: list[int] = list(self.net.out_channels)
            self.strides: list[int] = [8, 16, 32]
            self.has_box_head = False
            self.num_source_classes = 0
            if checkpoint is not None:
                state, names = self._read_weights(checkpoint, trust_checkpoint)
                check_state_dict(self.net, state, source=f"backbone checkpoint {checkpoint}")
                self.source_names = names
            return

        state, names = (None, None) if checkpoint is None else self._read_weights(checkpoint, trust_checkpoint)
        self._build_ultralytics(nc=len(names) if names else None)
        if state is not None:
            self.load_detection_state_dict(state, source=f"backbone checkpoint {checkpoint}")
        self.source_names = names

    # -- construction --------------------------------------------------------------------------

    def _build_ultralytics(self, nc: int | None) -> None:
        import ultralytics
        from ultralytics.nn.tasks import DetectionModel

        cfg = Path(ultralytics.__file__).parent / "cfg" / "models" / _ULTRALYTICS_YAML[self.name]
        # An absolute path: Ultralytics would otherwise prefer a same-named file in the cwd.
        self.net = DetectionModel(str(cfg), nc=nc, verbose=False)
        self._configure_from_net()

    def _configure_from_net(self) -> None:
        from ultralytics.nn.modules.head import Detect

        layers = self.net.model
        detect = layers[-1]
        if not isinstance(detect, Detect):
            raise UsageError(f"backbone {self.name}: the last layer is {type(detect).__name__}, not Detect")
        self._feature_layers = list(detect.f)
        # Layer outputs to keep: the model's own save list plus the Detect inputs.
        self._keep = frozenset(self.net.save) | frozenset(self._feature_layers)
        self.strides = [int(s) for s in detect.stride.tolist()]
        self.out_channels = [int(detect.cv2[i][0].conv.in_channels) for i in range(detect.nl)]
        self.has_box_head = True
        self.num_source_classes = int(detect.nc)
        self.reg_max = int(detect.reg_max)
        # DFL expectation weights 0..reg_max-1, a buffer so it follows .to(device) and exports as a constant.
        self.register_buffer("dfl_bins", torch.arange(self.reg_max, dtype=torch.float32), persistent=False)

    @property
    def detect(self) -> nn.Module:
        """The Ultralytics Detect head (UsageError for the simple backbone)."""
        if not self.has_box_head:
            raise UsageError(f"backbone {self.name!r} has no YOLO Detect head")
        return self.net.model[-1]

    @staticmethod
    def _read_weights(checkpoint: str | Path, trust: bool) -> tuple[dict[str, torch.Tensor], list[str] | None]:
        """Return (state dict, class names) from an Ultralytics or plain checkpoint file."""
        obj = load_checkpoint_file(checkpoint, trust=trust, what="backbone checkpoint")
        names: Any = None
        if isinstance(obj, Mapping) and ("ema" in obj or "model" in obj) and "state_dict" not in obj:
            model = obj.get("ema") if obj.get("ema") is not None else obj.get("model")
            if not isinstance(model, nn.Module):
                raise CheckpointError(
                    f"backbone checkpoint {checkpoint} has no model under 'ema' or 'model' "
                    f"(got {type(model).__name__})"
                )
            state = {k: v for k, v in model.float().state_dict().items()}
            names = getattr(model, "names", None)
        elif isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
            state = dict(obj["state_dict"])
            names = obj.get("names")
        else:
            raise CheckpointError(
                f"backbone checkpoint {checkpoint} is neither an Ultralytics checkpoint nor a "
                "{'state_dict': ..., 'names': ...} file"
            )
        if isinstance(names, Mapping):
            try:
                names = [str(names[k]) for k in sorted(names, key=int)]
            except (TypeError, ValueError):
                raise CheckpointError(f"backbone checkpoint {checkpoint}: class names keys are not integers") from None
        elif isinstance(names, (list, tuple)):
            names = [str(n) for n in names]
        elif names is not None:
            raise CheckpointError(f"backbone checkpoint {checkpoint}: 'names' must be a dict or a list")
        return state, names

    # -- weights -------------------------------------------------------------------------------

    def is_fused(self) -> bool:
        """True when BatchNorm has been folded into the convolutions (Ultralytics models)."""
        return bool(self.has_box_head and self.net.is_fused())

    def fuse(self) -> LightweightVisualBackbone:
        """Fold BatchNorm into the convolutions (Ultralytics models; no-op for ``simple``)."""
        if self.has_box_head:
            self.net.fuse(verbose=False)
        return self

    def adapt_to_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Make the Ultralytics model able to take ``state_dict`` (keys ``model.<i>...``).

        Fuses the model when the weights are fused (no BatchNorm keys) and rebuilds the Detect
        head when the weights have another number of classes. A no-op for ``simple``.
        """
        if not self.has_box_head or not state_dict:
            return
        fused = not any(".bn." in k for k in state_dict)
        nc = state_dict.get(f"model.{len(self.net.model) - 1}.cv3.0.2.bias")
        if isinstance(nc, torch.Tensor) and nc.ndim == 1 and int(nc.shape[0]) != self.num_source_classes:
            self._build_ultralytics(nc=int(nc.shape[0]))
        if fused and not self.is_fused():
            self.fuse()

    def load_detection_state_dict(self, state_dict: Mapping[str, Any], *, source: str) -> None:
        """Load a state dict of ``self.net`` (an Ultralytics ``DetectionModel`` state dict, keys
        ``model.<i>...``, or the simple CNN's) after :meth:`adapt_to_state_dict`, checking every
        key and shape."""
        self.adapt_to_state_dict(state_dict)
        check_state_dict(self.net, state_dict, source=source)

    # -- forward -------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Return the three feature maps ``[B, C_l, H/s_l, W/s_l]`` for strides 8, 16 and 32."""
        if not self.has_box_head:
            return self.net(x)
        saved: dict[int, torch.Tensor] = {}
        last = max(self._feature_layers)
        for layer in self.net.model[: last + 1]:
            src = layer.f
            if src != -1:  # input comes from earlier layers, as in DetectionModel._predict_once
                x = saved[src] if isinstance(src, int) else [x if j == -1 else saved[j] for j in src]
            x = layer(x)
            if layer.i in self._keep:
                saved[layer.i] = x
        return [saved[i] for i in self._feature_layers]

    def anchor_points(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Cell centres in input pixels ``[N, 2]`` (x, y) and the stride of each ``[N, 1]``.

        Levels in order P3, P4, P5, each row-major. Built from the feature shapes with
        ``torch.arange`` so a traced graph keeps them dynamic.
        """
        points, strides = [], []
        for feat, stride in zip(feats, self.strides):
            h, w = feat.shape[-2], feat.shape[-1]
            sx = (torch.arange(w, device=feat.device, dtype=feat.dtype) + 0.5) * stride
            sy = (torch.arange(h, device=feat.device, dtype=feat.dtype) + 0.5) * stride
            gy, gx = torch.meshgrid(sy, sx, indexing="ij")
            pts = torch.stack((gx, gy), -1).reshape(-1, 2)
            points.append(pts)
            strides.append(torch.full_like(pts[:, :1], float(stride)))
        return torch.cat(points, 0), torch.cat(strides, 0)

    def box_regression(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Decode the Detect head's box branch into xyxy boxes ``[B, N, 4]`` in input pixels.

        Per level ``l``: ``cv2[l]`` gives ``4 * reg_max`` logits per cell; a softmax over the
        ``reg_max`` bins and its expectation ``sum_k k * p_k`` give the (left, top, right, bottom)
        distances in stride units; the box is ``(c - lt, c + rb) * stride`` around the cell
        centre ``c``. ``N = sum_l H_l * W_l``, levels P3, P4, P5, each row-major.
        """
        head = self.detect
        if head.cv2 is None:
            raise UsageError(f"backbone {self.name!r}: its Detect head has no one-to-many box branch")
        b = feats[0].shape[0]
        dists = []
        for i, feat in enumerate(feats):
            raw = head.cv2[i](feat).reshape(b, 4, self.reg_max, -1)  # [B, 4, bins, HW]
            if self.reg_max > 1:
                # Expectation over the bins as a [1, bins] @ [bins, HW] product: one GEMM per
                # side instead of a transposing einsum (much faster in onnxruntime).
                raw = torch.matmul(self.dfl_bins.to(raw.dtype).unsqueeze(0), raw.softmax(2)).squeeze(2)
            else:
                raw = raw[:, :, 0]
            dists.append(raw)  # [B, 4, HW] in stride units
        dist = torch.cat(dists, 2).transpose(1, 2)  # [B, N, 4]
        points, strides = self.anchor_points(feats)
        lt, rb = dist[..., :2], dist[..., 2:]
        return torch.cat((points - lt * strides, points + rb * strides), -1)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, out_channels={self.out_channels}, strides={self.strides}"
