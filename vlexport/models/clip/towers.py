"""Frozen open_clip towers: loading CLIP weights without ever hanging, and the text/image encoders.

Loading rules (see :func:`load_clip_model`):

* a pretrained *tag* (``"openai"``, ``"laion2b_s34b_b79k"`` …) is looked up in the local Hugging Face
  cache first; only when it is not cached, the caller is not offline and ``huggingface.co`` answers
  a quick TCP probe is it downloaded;
* a *path* is loaded as a state dict with ``weights_only=True`` (or safetensors);
* ``None`` builds a randomly initialised model on purpose;
* unreachable weights either fall back to a loudly announced, seeded random model
  (``allow_random=True``) or raise :class:`~vlexport.errors.WeightsUnavailableError`.

The MLP activation is decided from where the weights come from (:func:`resolve_activation`):
OpenAI's CLIP uses QuickGELU (``x * sigmoid(1.702 x)``) while open_clip's plain configs build
``nn.GELU``, and running weights with the other one shifts every embedding. A ``-quickgelu``
model name, a pretrained tag's config, an ``open_clip_config.json`` beside a weights file, or
OpenAI's checkpoint layout (TorchScript release archives and plain state dicts with OpenAI's key
names) decide it, unless the caller names the activation explicitly.

The ``"tiny"`` preset is a 2-layer CLIP with ViT-B-32's tokenizer, for fast tests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import socket
import threading
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transform import PreprocessCfg
from torch import nn

from vlexport.errors import CheckpointError, UsageError, WeightsUnavailableError

logger = logging.getLogger(__name__)

__all__ = [
    "TINY",
    "RANDOM_SEED",
    "ACTIVATIONS",
    "resolve_activation",
    "RandomWeightsWarning",
    "LoadedCLIP",
    "load_clip_model",
    "clear_clip_cache",
    "is_offline",
    "FrozenCLIPTextEncoder",
    "FrozenCLIPImageEncoder",
]

#: Name of the test-only preset: a 2-layer CLIP that builds in milliseconds.
TINY = "tiny"
#: Seed of every randomly initialised model, so that random weights (and their hash) are reproducible.
RANDOM_SEED = 0

# Config of the "tiny" preset, in open_clip's model-config format (heads = width // head_width).
_TINY_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
# The tiny preset shares ViT-B-32's BPE vocabulary (49408 tokens).
_TINY_TOKENIZER_FROM = "ViT-B-32"

#: ``activation=`` values: decide from the weights' provenance, or force one.
ACTIVATIONS = ("auto", "quickgelu", "gelu")
# Entries OpenAI's TorchScript archives carry besides the weights (open_clip drops them too).
_TORCHSCRIPT_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")

_PROBE_HOST = ("huggingface.co", 443)
_PROBE_TIMEOUT_S = 3.0
_TRUE = {"1", "true", "yes", "on"}


class RandomWeightsWarning(UserWarning):
    """Pretrained CLIP weights were unreachable and a randomly initialised model is used instead."""


@dataclasses.dataclass(frozen=True, eq=False)
class LoadedCLIP:
    """An open_clip model in eval mode with frozen parameters, and where its weights came from.

    Attributes:
        model: the open_clip ``CLIP`` (or ``CustomTextCLIP``) module; eval, ``requires_grad=False``.
        model_name: open_clip config name, or ``"tiny"``.
        pretrained: what the caller asked for (tag, path or ``None``), unchanged.
        is_pretrained: ``True`` only when trained weights were really loaded.
        weights_source: ``"open_clip:<tag>"``, ``"file:<absolute path>"`` or ``"random(seed=0)"``.
        weights_sha256: sha256 over every state-dict tensor (sorted keys, float32 bytes).
        tokenizer: open_clip tokenizer: ``tokenizer(list_of_str) -> LongTensor[N, context_length]``.
        embed_dim: size of the joint embedding.
        context_length: number of tokens the text tower reads.
        fallback_reason: why trained weights were asked for but not loaded (``None`` otherwise).
        activation: the MLP activation the towers run with, ``"quickgelu"`` or ``"gelu"``.
        activation_source: why that activation (model config, tag, file layout, or asked for).
    """

    model: nn.Module
    model_name: str
    pretrained: str | None
    is_pretrained: bool
    weights_source: str
    weights_sha256: str
    tokenizer: Callable[..., torch.Tensor]
    embed_dim: int
    context_length: int
    fallback_reason: str | None = None
    activation: str = "gelu"
    activation_source: str = "model config"

    @property
    def provenance(self) -> dict[str, Any]:
        """Where the tower's weights and activation came from, for a bundle manifest."""
        return {
            "model": self.model_name,
            "pretrained": self.pretrained,
            "weights_source": self.weights_source,
            "weights_sha256": self.weights_sha256,
            "activation": self.activation,
            "activation_source": self.activation_source,
        }

    @property
    def preprocess_cfg(self) -> dict[str, Any]:
        """open_clip's image preprocessing config of the model (size, mean, std, …)."""
        return dict(open_clip.get_model_preprocess_cfg(self.model))


# In-process cache: building ViT-B-32 and hashing its weights takes seconds.
_CACHE: dict[tuple[Any, ...], LoadedCLIP] = {}
_CACHE_LOCK = threading.Lock()


def clear_clip_cache() -> None:
    """Forget every model loaded by :func:`load_clip_model` in this process."""
    with _CACHE_LOCK:
        _CACHE.clear()


def is_offline(offline: bool | None = None) -> bool:
    """The ``offline`` argument when given, else ``VLEXPORT_OFFLINE`` or ``HF_HUB_OFFLINE`` set to a true value."""
    if offline is not None:
        return bool(offline)
    return any(os.environ.get(var, "").strip().lower() in _TRUE for var in ("VLEXPORT_OFFLINE", "HF_HUB_OFFLINE"))


def load_clip_model(
    model_name: str = "ViT-B-32",
    pretrained: str | None = "openai",
    *,
    activation: str = "auto",
    allow_random: bool = True,
    offline: bool | None = None,
) -> LoadedCLIP:
    """Load (once per process) an open_clip model with frozen weights.

    Args:
        model_name: an open_clip config name (``open_clip.list_models()``) or ``"tiny"``.
        pretrained: an open_clip pretrained tag for ``model_name``, a path to a state-dict file
            (.pt/.pth/.bin/.safetensors), or ``None`` for a seeded random initialisation.
            The tiny preset has no tags: a tag is ignored there (random weights), a path is loaded.
        activation: ``"auto"`` decides QuickGELU or GELU from the weights' provenance (see
            :func:`resolve_activation`); ``"quickgelu"`` / ``"gelu"`` force one.
        allow_random: when trained weights are unreachable, continue with random weights after a
            loud :class:`RandomWeightsWarning` instead of raising.
        offline: never touch the network; ``None`` reads ``VLEXPORT_OFFLINE`` / ``HF_HUB_OFFLINE``.

    Raises:
        UsageError: unknown model name or pretrained tag.
        CheckpointError: the weights file is missing, not a file, or cannot be loaded.
        WeightsUnavailableError: the tag's weights are unreachable and ``allow_random`` is False,
            or the model's tokenizer needs a download that is not possible.
    """
    _check_model_name(model_name)
    key, checkpoint = _cache_key(model_name, pretrained)
    _check_activation(activation)
    key = (*key, activation)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
    if hit is not None:
        if hit.fallback_reason is not None:
            # A cached random fallback must obey this call's allow_random, and warn again.
            _announce_fallback(model_name, str(pretrained), hit.fallback_reason, allow_random)
        return hit

    fallback_reason: str | None = None
    pcfg: dict[str, Any] = {}
    if checkpoint is None and pretrained is not None and model_name != TINY:
        pcfg = dict(open_clip.get_pretrained_cfg(model_name, pretrained))
        checkpoint, fallback_reason = _resolve_tag(model_name, pretrained, pcfg, is_offline(offline))
        if checkpoint is None:
            assert fallback_reason is not None  # internal invariant of _resolve_tag
            _announce_fallback(model_name, pretrained, fallback_reason, allow_random)
    elif model_name == TINY and checkpoint is None:
        logger.debug("tiny CLIP preset: seeded random weights (pretrained=%r ignored)", pretrained)

    act, act_source = resolve_activation(model_name, activation, pretrained=pretrained, pcfg=pcfg,
                                         checkpoint=checkpoint)
    model = _build_model(model_name, pcfg, quick_gelu=act == "quickgelu")
    if checkpoint is not None:
        _load_weights(model, checkpoint)
        source = f"open_clip:{pretrained}" if pcfg else f"file:{checkpoint}"
    else:
        source = f"random(seed={RANDOM_SEED})"
    model.eval()
    model.requires_grad_(False)

    loaded = LoadedCLIP(
        model=model,
        model_name=model_name,
        pretrained=pretrained,
        is_pretrained=checkpoint is not None,
        weights_source=source,
        weights_sha256=_state_dict_sha256(model),
        tokenizer=_get_tokenizer(model_name),
        embed_dim=_embed_dim(model_name),
        context_length=int(model.context_length),
        fallback_reason=fallback_reason,
        activation=act,
        activation_source=act_source,
    )
    logger.info("CLIP %s loaded from %s (weights sha256 %s, %s: %s)", model_name, source,
                loaded.weights_sha256[:12], act, act_source)
    with _CACHE_LOCK:
        # Another thread may have loaded it meanwhile: keep the first so every caller shares one model.
        return _CACHE.setdefault(key, loaded)


# --------------------------------------------------------------------------------------------------
# loading helpers


def _check_model_name(model_name: str) -> None:
    if model_name == TINY or model_name in open_clip.list_models():
        return
    examples = ", ".join(["ViT-B-32", "ViT-B-16", "ViT-L-14", TINY])
    raise UsageError(
        f"unknown CLIP model {model_name!r}; choose one of open_clip.list_models(), e.g. {examples}"
    )


def _cache_key(model_name: str, pretrained: str | None) -> tuple[tuple[Any, ...], Path | None]:
    """The in-process cache key, and the checkpoint path when ``pretrained`` names a file."""
    if pretrained is None:
        return (model_name, None), None
    if not pretrained.strip():
        raise UsageError("empty CLIP pretrained value: pass an open_clip tag (e.g. openai) or a weights file path")
    if model_name != TINY and open_clip.is_pretrained_cfg(model_name, pretrained):
        return (model_name, "tag", pretrained.lower().replace("-", "_")), None
    path = Path(pretrained).expanduser()
    if path.is_file():
        path = path.resolve()
        stat = path.stat()
        # mtime and size: a rewritten weights file is reloaded, not served stale from the cache.
        return (model_name, "file", str(path), stat.st_mtime_ns, stat.st_size), path
    if model_name == TINY and not _looks_like_path(pretrained):
        return (model_name, "ignored", pretrained), None
    if _looks_like_path(pretrained) or path.exists():
        what = "is not a file" if path.exists() else "does not exist"
        raise CheckpointError(f"CLIP weights file {str(path)!r} {what}")
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    shown = ", ".join(tags[:8]) + (", …" if len(tags) > 8 else "")
    raise UsageError(
        f"unknown pretrained weights {pretrained!r} for CLIP {model_name}: pass one of its tags "
        f"({shown or 'none known'}) or a path to a weights file"
    )


def _looks_like_path(value: str) -> bool:
    suffixes = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
    return os.sep in value or "/" in value or value.lower().endswith(suffixes) or value.startswith("~")


def _hf_candidates(pcfg: dict[str, Any]) -> list[tuple[str, str]]:
    """(repo_id, filename) pairs open_clip would fetch for a pretrained config, safetensors first."""
    hub = pcfg.get("hf_hub", "")
    if not hub:
        return []
    # open_clip's convention: 'org/repo/' means the default weights file, 'org/repo/file.bin' a named one.
    repo_id, filename = os.path.split(hub)
    filename = filename or open_clip.constants.HF_WEIGHTS_NAME
    candidates = []
    if filename == open_clip.constants.HF_WEIGHTS_NAME:
        candidates.append((repo_id, open_clip.constants.HF_SAFE_WEIGHTS_NAME))
    elif filename.endswith((".bin", ".pth")):
        candidates.append((repo_id, filename[:-4] + ".safetensors"))
    candidates.append((repo_id, filename))
    return candidates


def _cached_weights(pcfg: dict[str, Any]) -> Path | None:
    """The tag's weights file if it is already on disk (Hugging Face cache or open_clip's URL cache)."""
    for repo_id, filename in _hf_candidates(pcfg):
        found = cached_file(repo_id, filename)  # local lookup only: never touches the network
        if found is not None:
            return found
    url = pcfg.get("url", "")
    if url:
        # Where open_clip.download_pretrained_from_url stores URL downloads by default.
        local = Path("~/.cache/clip").expanduser() / os.path.basename(url)
        if local.is_file():
            return local
    return None


def _reachable(host: tuple[str, int] = _PROBE_HOST, timeout: float = _PROBE_TIMEOUT_S) -> bool:
    """Quick TCP probe; runs in a daemon thread because DNS resolution ignores socket timeouts."""
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection(host, timeout=timeout):
                result.append(True)
        except BaseException:  # noqa: BLE001 - any failure means "not reachable"
            result.append(False)

    thread = threading.Thread(target=probe, name="vlexport-hf-probe", daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return bool(result and result[0])


def _download(pcfg: dict[str, Any]) -> Path:
    from huggingface_hub import hf_hub_download

    errors = []
    for repo_id, filename in _hf_candidates(pcfg):
        try:
            return Path(hf_hub_download(repo_id, filename, library_name="vlexport"))
        except Exception as exc:  # try the next candidate (e.g. no safetensors variant)
            errors.append(f"{repo_id}/{filename}: {type(exc).__name__}")
    if pcfg.get("url"):
        try:
            return Path(open_clip.download_pretrained_from_url(pcfg["url"]))
        except Exception as exc:
            errors.append(f"{pcfg['url']}: {type(exc).__name__}")
    raise OSError("; ".join(errors) or "no download source in the open_clip pretrained config")


def _resolve_tag(
    model_name: str, tag: str, pcfg: dict[str, Any], offline: bool
) -> tuple[Path | None, str | None]:
    """Local file of a tag's weights, or ``(None, why not)``; bounded in time when offline/unreachable."""
    cached = _cached_weights(pcfg)
    if cached is not None:
        logger.debug("CLIP weights %s/%s found in the local cache: %s", model_name, tag, cached)
        return cached, None
    if offline:
        return None, "offline, not in the Hugging Face cache"
    if not _reachable():
        return None, "huggingface.co is unreachable, not in the Hugging Face cache"
    logger.info("downloading CLIP weights %s/%s from the Hugging Face hub", model_name, tag)
    try:
        return _download(pcfg), None
    except Exception as exc:
        return None, f"download failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"


def _announce_fallback(model_name: str, tag: str, reason: str, allow_random: bool) -> None:
    advice = "Pass --clip-pretrained PATH to a local weights file."
    if not allow_random:
        raise WeightsUnavailableError(
            f"CLIP weights '{model_name}/{tag}' are unreachable ({reason}). {advice}"
        )
    message = (
        f"!!! CLIP weights '{model_name}/{tag}' are unreachable ({reason}); continuing with "
        f"RANDOMLY INITIALISED weights: embeddings will be meaningless. {advice}"
    )
    # stacklevel=3: the warning points at the caller of load_clip_model, not at this helper.
    warnings.warn(message, RandomWeightsWarning, stacklevel=3)
    logging.getLogger("vlexport").warning(message)


class _DropOpenClipRandomInitNotice(logging.Filter):
    # open_clip logs "No pretrained weights loaded ... initialized randomly" on the root logger for
    # every model we build without a tag (we load weights ourselves afterwards): it would mislead.
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded for model")


@contextlib.contextmanager
def _seeded_init() -> Iterator[None]:
    """Deterministic parameter init that leaves the caller's global RNG state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        yield


def _build_model(model_name: str, pcfg: dict[str, Any], *, quick_gelu: bool) -> nn.Module:
    with _seeded_init():
        if model_name == TINY:
            model = open_clip.CLIP(**_TINY_CONFIG, quick_gelu=quick_gelu)
            size = model.visual.image_size
            open_clip.set_model_preprocess_cfg(model, dataclasses.asdict(PreprocessCfg(size=size)))
            return model
        overrides = {k: pcfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in pcfg}
        notice_filter = _DropOpenClipRandomInitNotice()
        logging.getLogger().addFilter(notice_filter)
        try:
            return open_clip.create_model(
                model_name,
                pretrained=None,
                # Decided by resolve_activation (a -quickgelu config builds QuickGELU either way).
                force_quick_gelu=quick_gelu,
                force_preprocess_cfg=overrides or None,
                # Never fetch timm / Hugging Face base-tower weights behind the caller's back.
                pretrained_image=False,
                pretrained_text=False,
            )
        finally:
            logging.getLogger().removeFilter(notice_filter)


def _is_torchscript(path: Path) -> bool:
    """Whether ``path`` is a TorchScript archive (how OpenAI released its CLIP weights)."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    # torch.save archives hold data.pkl only; TorchScript ones also hold their code and constants.
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def _torchscript_state_dict(path: Path) -> dict[str, torch.Tensor]:
    # TorchScript archives hold tensors and TorchScript code, not arbitrary pickled Python objects.
    module = torch.jit.load(str(path), map_location="cpu")
    state = {k: v for k, v in module.state_dict().items() if k not in _TORCHSCRIPT_EXTRA_KEYS}
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def _state_dict_keys(path: Path) -> list[str]:
    """The tensor names of a weights file (read once more by the loader; cheap next to building the model)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    if _is_torchscript(path):
        return list(_torchscript_state_dict(path))
    return list(open_clip.factory.load_state_dict(str(path), weights_only=True))


def _is_openai_layout(keys: Sequence[str]) -> bool:
    """OpenAI CLIP's own parameter names (a ViT or ModifiedResNet image tower, the CLIP text tower).

    open_clip's native ViT checkpoints share these names; timm towers (``visual.trunk``), Hugging
    Face text towers (``text.``) and SigLIP (``logit_bias``) do not.
    """
    names = set(keys)
    if any(k.startswith(("visual.trunk.", "text.")) for k in names) or "logit_bias" in names:
        return False
    text = {"token_embedding.weight", "positional_embedding", "text_projection", "ln_final.weight"}
    vision = any(k.startswith(("visual.transformer.resblocks.", "visual.layer1.")) for k in names)
    return text <= names and vision and any(k.startswith("transformer.resblocks.") for k in names)


def _sibling_config_quick_gelu(path: Path) -> bool | None:
    """``model_cfg.quick_gelu`` of an ``open_clip_config.json`` beside the weights (Hugging Face layout)."""
    config = path.parent / "open_clip_config.json"
    if not config.is_file():
        return None
    try:
        model_cfg = json.loads(config.read_text(encoding="utf-8")).get("model_cfg", {})
    except (OSError, ValueError, AttributeError):
        return None
    return bool(model_cfg.get("quick_gelu", False)) if isinstance(model_cfg, dict) else None


def _config_quick_gelu(model_name: str) -> bool:
    if model_name == TINY:
        return False
    return bool((open_clip.get_model_config(model_name) or {}).get("quick_gelu", False))


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise UsageError(f"unknown CLIP activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")


def resolve_activation(
    model_name: str,
    activation: str = "auto",
    *,
    pretrained: str | None = None,
    pcfg: dict[str, Any] | None = None,
    checkpoint: Path | None = None,
) -> tuple[str, str]:
    """``("quickgelu" | "gelu", why)`` for a CLIP model and where its weights come from.

    In order: an explicit ``activation``; a ``-quickgelu`` model config; a pretrained tag's
    config; for a weights file, an ``open_clip_config.json`` beside it, else QuickGELU when the
    file has OpenAI's layout (OpenAI trained every CLIP it released with QuickGELU; pass
    ``activation="gelu"`` for open_clip weights trained with ``nn.GELU`` in the same layout);
    otherwise the model config's own activation.

    Raises:
        UsageError: ``activation`` is unknown or contradicts a ``-quickgelu`` model name.
    """
    _check_activation(activation)
    config_quick = _config_quick_gelu(model_name)
    if activation != "auto":
        if config_quick and activation == "gelu":
            raise UsageError(f"CLIP model {model_name} is a QuickGELU config but activation gelu was asked for: "
                             f"drop one of them (e.g. use {model_name.removesuffix('-quickgelu')})")
        return activation, "asked for"
    if config_quick:
        return "quickgelu", f"model config {model_name}"
    if pcfg:
        return ("quickgelu" if pcfg.get("quick_gelu") else "gelu"), f"pretrained tag {pretrained}"
    if checkpoint is not None:
        sibling = _sibling_config_quick_gelu(checkpoint)
        if sibling is not None:
            return ("quickgelu" if sibling else "gelu"), "open_clip_config.json beside the weights"
        try:
            keys = _state_dict_keys(checkpoint)
        except Exception:  # unreadable: _load_weights reports it with a clear message
            keys = []
        if _is_openai_layout(keys):
            return "quickgelu", "OpenAI CLIP layout of the weights file (pass activation gelu for nn.GELU weights)"
    return ("quickgelu" if config_quick else "gelu"), "model config"


def _load_weights(model: nn.Module, path: Path) -> None:
    try:
        if _is_torchscript(path):
            _load_torchscript_weights(model, path)
        else:
            open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True, device="cpu")
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if len(detail) > 160:  # keep one readable line: the first sentence of long library messages
            first = detail.split(". ")[0]
            detail = first if len(first) <= 160 else first[:160] + "…"
        raise CheckpointError(
            f"cannot load CLIP weights from {str(path)!r}: {type(exc).__name__}"
            + (f": {detail}" if detail else "")
            + " (expected a state dict saved with torch.save or safetensors for this CLIP model)"
        ) from exc


def _load_torchscript_weights(model: nn.Module, path: Path) -> None:
    """OpenAI's release archives: the TorchScript module's tensors into the open_clip model."""
    from open_clip.model import resize_pos_embed

    state = _torchscript_state_dict(path)
    if "logit_scale" in state and model.logit_scale.ndim != state["logit_scale"].ndim:
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    resize_pos_embed(state, model)
    model.load_state_dict(state, strict=True)


def _state_dict_sha256(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for _, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous()
        digest.update(data.numpy().tobytes())
    return digest.hexdigest()


def _get_tokenizer(model_name: str) -> Callable[..., torch.Tensor]:
    name = _TINY_TOKENIZER_FROM if model_name == TINY else model_name
    try:
        return open_clip.get_tokenizer(name)
    except Exception as exc:  # some tokenizers (Hugging Face, SigLIP) are downloaded on first use
        raise WeightsUnavailableError(
            f"the tokenizer of CLIP {model_name} cannot be loaded ({type(exc).__name__}); "
            "choose a model with the built-in CLIP tokenizer, e.g. ViT-B-32"
        ) from exc


def _embed_dim(model_name: str) -> int:
    config = _TINY_CONFIG if model_name == TINY else open_clip.get_model_config(model_name)
    return int(config["embed_dim"])


# --------------------------------------------------------------------------------------------------
# encoders


@contextlib.contextmanager
def _export_safe_attention() -> Iterator[None]:
    """Disable nn.MultiheadAttention's fused fast path while tracing/exporting.

    With frozen parameters in eval mode PyTorch picks ``aten::_native_multi_head_attention``,
    which the ONNX exporter cannot convert; the regular path computes the same function.
    """
    exporting = torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()
    if not exporting or not torch.backends.mha.get_fastpath_enabled():
        yield
        return
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


_T = TypeVar("_T", bound="_FrozenTower")


class _FrozenTower(nn.Module):
    """Shared plumbing: holds the (shared, cached) CLIP model, frozen and always in eval mode.

    The wrapped model is the one cached by :func:`load_clip_model`: moving an encoder to another
    device or dtype moves that shared model too.
    """

    def __init__(
        self,
        model_name: str = "ViT-B-32",
        pretrained: str | None = "openai",
        *,
        activation: str = "auto",
        allow_random: bool = True,
        offline: bool | None = None,
    ) -> None:
        super().__init__()
        self._setup(load_clip_model(model_name, pretrained, activation=activation, allow_random=allow_random,
                                    offline=offline))

    @classmethod
    def from_loaded(cls: type[_T], loaded: LoadedCLIP) -> _T:
        """Wrap an already loaded model (no loading, no cache lookup)."""
        obj = cls.__new__(cls)
        nn.Module.__init__(obj)
        obj._setup(loaded)
        return obj

    def _setup(self, loaded: LoadedCLIP) -> None:
        self.loaded = loaded
        self.clip = loaded.model
        self.model_name = loaded.model_name
        self.pretrained = loaded.pretrained
        self.is_pretrained = loaded.is_pretrained
        self.weights_sha256 = loaded.weights_sha256
        self.weights_source = loaded.weights_source
        self.activation = loaded.activation
        self.embed_dim = loaded.embed_dim
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> _FrozenTower:
        """Frozen towers stay in eval mode whatever is asked (dropout/batch-norm off)."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.clip.parameters()).device


class FrozenCLIPTextEncoder(_FrozenTower):
    """The text tower of a CLIP model: tokens -> L2-normalised embeddings.

    ``FrozenCLIPTextEncoder(model_name="ViT-B-32", pretrained="openai", *, activation="auto",
    allow_random=True, offline=None)`` loads through :func:`load_clip_model`; ``FrozenCLIPTextEncoder.from_loaded(loaded)``
    wraps a model already loaded.

    Attributes: ``embed_dim``, ``context_length``, ``model_name``, ``pretrained``, ``is_pretrained``,
    ``weights_sha256``, ``weights_source``, ``activation``.
    """

    def _setup(self, loaded: LoadedCLIP) -> None:
        super()._setup(loaded)
        self.context_length = loaded.context_length
        self.tokenizer = loaded.tokenizer

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Tokenize with the model's tokenizer: ``LongTensor[N, context_length]`` (long texts truncated)."""
        if isinstance(texts, str):
            raise TypeError("tokenize() takes a list of strings, not a single string")
        tokens = self.tokenizer(list(texts))
        return tokens.to(torch.long)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` [N, context_length] int64 -> ``[N, embed_dim]`` float, unit L2 norm."""
        with _export_safe_attention():
            return self.clip.encode_text(tokens, normalize=True)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Embed texts in batches without gradients: ``FloatTensor[N, embed_dim]`` on the model's device."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        texts = list(texts)
        if not texts:
            return torch.zeros((0, self.embed_dim), dtype=torch.float32, device=self.device)
        device = self.device
        chunks = [
            self._encode_trimmed(self.tokenize(texts[i : i + batch_size]).to(device))
            for i in range(0, len(texts), batch_size)
        ]
        return torch.cat(chunks).float()

    def _encode_trimmed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Same result as ``forward`` but runs only up to the longest prompt's end-of-text token.

        In a causal text tower pooled at the end-of-text token, the padding after it never
        influences the pooled feature, so dropping it is exact; prompts are ~15 of 77 tokens,
        which makes baking 80 templates several times faster.
        """
        clip = self.clip
        trimmable = (
            getattr(clip, "text_pool_type", None) == "argmax"
            and getattr(clip, "attn_mask", None) is not None
            and hasattr(clip, "token_embedding")
            and hasattr(clip, "positional_embedding")
        )
        if not trimmable:
            return self(tokens)
        length = int(tokens.argmax(dim=-1).max()) + 1  # end-of-text has the largest token id
        t = tokens[:, :length]
        cast_dtype = clip.transformer.get_cast_dtype()
        x = clip.token_embedding(t).to(cast_dtype) + clip.positional_embedding[:length].to(cast_dtype)
        x = clip.transformer(x, attn_mask=clip.attn_mask[:length, :length])
        x = clip.ln_final(x)
        x = x[torch.arange(x.shape[0]), t.argmax(dim=-1)]
        proj = clip.text_projection
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return F.normalize(x, dim=-1)


class FrozenCLIPImageEncoder(_FrozenTower):
    """The vision tower of a CLIP model (distillation teacher): images -> L2-normalised embeddings.

    ``forward(images)`` takes float RGB images ``[B, 3, H, W]`` in ``[0, 1]`` of any size, resizes
    them (bilinear, no antialias) to ``image_size``, applies the model's mean/std normalisation and
    returns ``[B, embed_dim]`` with unit L2 norm.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def _setup(self, loaded: LoadedCLIP) -> None:
        super()._setup(loaded)
        cfg = loaded.preprocess_cfg
        size = cfg["size"]
        self.image_size: tuple[int, int] = (int(size), int(size)) if isinstance(size, int) else tuple(size)
        self.preprocess_cfg = cfg
        # Non-persistent: derived from the model's config, not weights of their own.
        mean = torch.tensor(cfg["mean"], dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(cfg["std"], dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # Static check for eager callers; under tracing shapes are symbolic and checked by the exporter.
        if not torch.jit.is_tracing() and (images.ndim != 4 or images.shape[1] != 3):
            raise ValueError(f"expected images of shape [B, 3, H, W], got {tuple(images.shape)}")
        x = F.interpolate(
            images.to(self.mean.dtype), size=self.image_size, mode="bilinear", align_corners=False, antialias=False
        )
        x = (x - self.mean) / self.std
        with _export_safe_attention():
            return self.clip.encode_image(x, normalize=True)
