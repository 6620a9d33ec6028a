"""Loading frozen open_clip CLIP models without ever hanging: where the weights come from.

Loading rules (see :func:`load_clip_model`):

* a pretrained *tag* (``"openai"``, ``"laion2b_s34b_b79k"`` …) is looked up in the local Hugging Face
  cache first; only when it is not cached, the caller is not offline and ``huggingface.co`` answers
  a quick TCP probe is it downloaded;
* a *path* is loaded as a state dict with ``weights_only=True`` (or safetensors);
* ``None`` builds a randomly initialised model on purpose;
* unreachable weights either fall back to a loudly announced, seeded random model
  (``allow_random=True``) or raise :class:`~vlexport.errors.WeightsUnavailableError`.

The activation is decided by :func:`~vlexport.models.clip.activation.resolve_activation`; the
encoders built on the loaded model are in :mod:`vlexport.models.clip.towers`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import socket
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.transform import PreprocessCfg
from torch import nn

from vlexport.errors import CheckpointError, UsageError, WeightsUnavailableError
from vlexport.models.clip.activation import (
    _check_activation,
    _is_torchscript,
    _torchscript_state_dict,
    resolve_activation,
)
from vlexport.models.clip.tiny import _TINY_CONFIG, _TINY_TOKENIZER_FROM, TINY
from vlexport.models.common.hf_cache import cached_file

logger = logging.getLogger(__name__)

__all__ = [
    "RANDOM_SEED",
    "RandomWeightsWarning",
    "LoadedCLIP",
    "load_clip_model",
    "clear_clip_cache",
    "is_offline",
]

#: Seed of every randomly initialised model, so that random weights (and their hash) are reproducible.
RANDOM_SEED = 0

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

