"""GPT-2 with an explicit key/value cache, loading Hugging Face's GPT-2 weights by name.

The module tree mirrors the hub checkpoint (``wte``, ``wpe``, ``h.{i}.ln_1``, ``h.{i}.attn.c_attn``,
…, ``ln_f``; projections stored ``[in, out]`` as GPT-2's "Conv1D"), so a hub state dict loads
without renaming and every key and shape is checked (see ``shared/references/gpt2.md``).

The cache is one tensor ``[n_layer, 2, B, n_head, S, head_dim]`` (keys, values) in and out, so
an exported step graph has exactly one cache input and one cache output, and a beam search
reorders it with a single gather on axis 2. Masks use a large finite negative instead of
``-inf``: it survives FP16 conversion without NaN.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlexport.errors import CheckpointError, WeightsUnavailableError
from vlexport.models.common.hf_cache import find_cached_files, hub_cache_dir

log = logging.getLogger("vlexport")

__all__ = ["GPT2Config", "GPT2_PRESETS", "GPT2LMHeadModel", "load_gpt2_state_dict", "find_gpt2_files",
           "empty_cache", "MASK_VALUE"]

MASK_VALUE = -1e4  # finite: exp underflows to 0 in FP32 and FP16 alike, and never makes a NaN


@dataclass(frozen=True)
class GPT2Config:
    """The fields of Hugging Face's ``config.json`` this implementation uses."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    layer_norm_epsilon: float = 1e-5
    bos_token_id: int = 50256
    eos_token_id: int = 50256

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> GPT2Config:
        """Read a Hugging Face ``config.json`` (unknown fields are ignored; gelu_new is checked)."""
        data = json.loads(Path(path).read_text())
        act = data.get("activation_function", "gelu_new")
        if act != "gelu_new":
            raise CheckpointError(f"{path}: activation_function {act!r} is not GPT-2's gelu_new")
        fields = {k: data[k] for k in asdict(cls()) if k in data}
        return cls(**fields)


GPT2_PRESETS: dict[str, GPT2Config] = {
    "gpt2": GPT2Config(),
    "gpt2-medium": GPT2Config(n_embd=1024, n_layer=24, n_head=16),
    # Real vocabulary (the real tokenizer works), toy width: trains in seconds on a CPU.
    "tiny": GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128),
}


class Conv1D(nn.Module):
    """GPT-2's projection: ``y = x @ weight + bias`` with ``weight`` stored ``[in, out]``."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class GPT2Attention(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        if cfg.n_embd % cfg.n_head:
            raise ValueError(f"n_embd {cfg.n_embd} is not divisible by n_head {cfg.n_head}")
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.c_attn = Conv1D(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = Conv1D(cfg.n_embd, cfg.n_embd)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.reshape(b, t, self.n_head, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
                bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self.c_attn(x).split(x.shape[-1], dim=-1)
        k = torch.cat([past_k, self._heads(k)], dim=2)
        v = torch.cat([past_v, self._heads(v)], dim=2)
        scores = self._heads(q) @ k.transpose(-1, -2) * (1.0 / math.sqrt(self.head_dim)) + bias
        y = torch.softmax(scores, dim=-1) @ v
        b, _, t, _ = y.shape
        y = y.transpose(1, 2).reshape(b, t, self.n_head * self.head_dim)
        return self.c_proj(y), k, v


class GPT2MLP(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.c_fc = Conv1D(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = Conv1D(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # "gelu_new"


class GPT2Block(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = GPT2Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = GPT2MLP(cfg)

    def forward(self, x: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
                bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a, k, v = self.attn(self.ln_1(x), past_k, past_v, bias)
        x = x + a
        return x + self.mlp(self.ln_2(x)), k, v


def empty_cache(cfg: GPT2Config, batch: int, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """A cache holding no positions: ``[n_layer, 2, batch, n_head, 0, head_dim]``."""
    return torch.zeros(cfg.n_layer, 2, batch, cfg.n_head, 0, cfg.head_dim, dtype=dtype, device=device)


class GPT2LMHeadModel(nn.Module):
    """GPT-2 (pre-norm blocks, learned positions, output projection tied to ``wte``).

    :meth:`forward` takes embeddings, so that image tokens can be a prefix (ClipCap style):
    ``forward(inputs_embeds [B,T,D], attention_mask [B,S+T], past [L,2,B,H,S,hd])`` returns the
    final hidden states ``[B,T,D]`` and the new cache ``[L,2,B,H,S+T,hd]``. Positions come from
    the mask (``cumsum - 1``), so left-padded rows get the same positions as unpadded ones;
    without padding, row ``j`` of the input sits at position ``S + j``.
    """

    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.h = nn.ModuleList(GPT2Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        nn.init.normal_(self.wte.weight, std=0.02)
        nn.init.normal_(self.wpe.weight, std=0.01)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                past: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = inputs_embeds.shape[1]
        s = past.shape[-2]
        mask = attention_mask.to(torch.long)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, s:]
        x = inputs_embeds + self.wpe(positions)
        # Query j (absolute position s + j) sees keys 0..s+j that the mask keeps.
        keys = torch.arange(s + t, device=x.device)
        queries = torch.arange(t, device=x.device) + s
        allowed = (keys[None, :] <= queries[:, None])[None, None] & (mask[:, None, None, :] > 0)
        bias = torch.where(allowed, torch.zeros((), dtype=x.dtype, device=x.device),
                           torch.full((), MASK_VALUE, dtype=x.dtype, device=x.device))
        present = []
        for i, block in enumerate(self.h):
            x, k, v = block(x, past[i, 0], past[i, 1], bias)
            present.append(torch.stack([k, v]))
        return self.ln_f(x), torch.stack(present)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The tied output projection: ``hidden @ wte.weightᵀ``."""
        return hidden @ self.wte.weight.t()

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.wte(ids)

    # -- weights ------------------------------------------------------------------------
    def load_hf_state_dict(self, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Load a GPT-2 state dict in either hub layout (see :func:`load_gpt2_state_dict`)."""
        load_gpt2_state_dict(self, state, source)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike) -> GPT2LMHeadModel:
        """GPT-2 from a folder (``config.json`` + ``model.safetensors``/``pytorch_model.bin``), a
        weights file (GPT-2 small's config assumed), or a hub name (``"gpt2"``) found in the local
        Hugging Face cache. Nothing is downloaded.

        Raises:
            WeightsUnavailableError: a hub name with no cached snapshot.
            CheckpointError: a file that is missing, unreadable, or whose tensors do not fit.
        """
        config_path, weights = find_gpt2_files(name_or_path)
        cfg = GPT2Config.from_json(config_path) if config_path else GPT2_PRESETS["gpt2"]
        model = cls(cfg)
        model.load_hf_state_dict(read_state_dict(weights), str(weights))
        return model.eval()


# ------------------------------------------------------------------------------------------------
# Loading by name

_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # legacy causal-mask buffers, not weights
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def find_gpt2_files(name_or_path: str | os.PathLike) -> tuple[Path | None, Path]:
    """``(config.json or None, weights file)`` for a folder, a file, or a cached hub name."""
    p = Path(name_or_path)
    if p.is_file():
        return (p.parent / "config.json" if (p.parent / "config.json").is_file() else None), p
    text = str(name_or_path)
    if p.is_dir():
        for name in _WEIGHT_FILES:
            if (p / name).is_file():
                cfg = p / "config.json"
                return (cfg if cfg.is_file() else None), p / name
        raise CheckpointError(f"{p} has no model.safetensors or pytorch_model.bin")
    if p.suffix in (".safetensors", ".bin", ".pt", ".pth") or text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise CheckpointError(f"GPT-2 weights {text} do not exist")
    # A hub id such as "gpt2" or "openai-community/gpt2": its cached snapshots, main ref first.
    found = find_cached_files(text, [(name,) for name in _WEIGHT_FILES])
    if found is not None:
        snap, (weights,) = found
        cfg = snap / "config.json"
        return (cfg if cfg.is_file() else None), weights
    raise WeightsUnavailableError(
        f"GPT-2 weights {str(name_or_path)!r} are not a file, a folder, or a cached Hugging Face snapshot "
        f"(looked in {hub_cache_dir()}); download them on a machine with "
        "internet (e.g. `huggingface-cli download gpt2`) or pass --gpt2 PATH"
    )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` or a ``.bin``/``.pt`` file (loaded with ``weights_only``)."""
    if not path.is_file():
        raise CheckpointError(f"GPT-2 weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read GPT-2 weights {path}: {e}") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    return state


def load_gpt2_state_dict(model: GPT2LMHeadModel, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """Copy a GPT-2 state dict into ``model``, checking every key and shape.

    Accepts the hub layout (no prefix, with or without ``h.{i}.attn.bias`` buffers) and the
    ``transformer.``-prefixed layout of ``save_pretrained``; an ``lm_head.weight`` must equal
    ``wte.weight`` (the projection is tied). Raises :class:`CheckpointError` naming every missing,
    unexpected or mis-shaped key.
    """
    own = model.state_dict()
    incoming: dict[str, torch.Tensor] = {}
    lm_head = None
    for key, value in state.items():
        name = key[len("transformer."):] if key.startswith("transformer.") else key
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        if name == "lm_head.weight":
            lm_head = value
            continue
        incoming[name] = value
    missing = sorted(set(own) - set(incoming))
    unexpected = sorted(set(incoming) - set(own))
    mismatched = [f"{k} {tuple(incoming[k].shape)} (model {tuple(own[k].shape)})"
                  for k in sorted(set(own) & set(incoming)) if tuple(incoming[k].shape) != tuple(own[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {', '.join(missing[:8])}{' …' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {', '.join(unexpected[:8])}{' …' if len(unexpected) > 8 else ''}")
    if mismatched:
        problems.append(f"wrong shape: {', '.join(mismatched[:8])}")
    if lm_head is not None and "wte.weight" in incoming and (
            lm_head.shape != incoming["wte.weight"].shape or not torch.equal(lm_head, incoming["wte.weight"])):
        problems.append("lm_head.weight differs from wte.weight, but GPT-2's output projection is tied")
    if problems:
        raise CheckpointError(f"{source} does not fit GPT-2 ({model.config.n_layer} layers, {model.config.n_embd} "
                              f"wide): " + "; ".join(problems))
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in incoming.items()}, strict=True)
    log.info("GPT-2 weights loaded from %s (%d tensors)", source, len(incoming))


def config_for(preset: str | GPT2Config, **overrides: Any) -> GPT2Config:
    """A preset name or a config, with field overrides."""
    cfg = GPT2_PRESETS[preset] if isinstance(preset, str) else preset
    return replace(cfg, **overrides) if overrides else cfg
