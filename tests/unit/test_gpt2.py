"""GPT-2: the cache gives what a full recompute gives, and hub checkpoints load by name (both layouts)."""

from __future__ import annotations

import json

import pytest
import torch

from vlexport.errors import CheckpointError, WeightsUnavailableError
from vlexport.models.captioner.gpt2 import GPT2_PRESETS, GPT2Config, GPT2LMHeadModel, empty_cache, find_gpt2_files

TINY = GPT2_PRESETS["tiny"]


@pytest.fixture(scope="module")
def model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(TINY).eval()


def test_gpt2_small_has_the_published_parameter_count():
    assert sum(p.numel() for p in GPT2LMHeadModel(GPT2_PRESETS["gpt2"]).parameters()) == 124_439_808


@torch.no_grad()
def test_cached_steps_equal_one_full_pass(model):
    x = torch.randn(2, 9, TINY.n_embd)
    mask = torch.ones(2, 9, dtype=torch.long)
    full, full_cache = model(x, mask, empty_cache(TINY, 2))
    past = empty_cache(TINY, 2)
    outs = []
    for t in range(9):  # one position at a time, as a decoder does
        h, past = model(x[:, t:t + 1], mask[:, :t + 1], past)
        outs.append(h)
    assert torch.allclose(torch.cat(outs, 1), full, atol=1e-5)
    assert torch.allclose(past, full_cache, atol=1e-5)
    assert past.shape == (TINY.n_layer, 2, 2, TINY.n_head, 9, TINY.head_dim)


@torch.no_grad()
def test_attention_is_causal_and_masked_keys_are_ignored(model):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 6, TINY.n_embd, generator=gen)
    ones = torch.ones(1, 6, dtype=torch.long)
    base, _ = model(x, ones, empty_cache(TINY, 1))
    changed = x.clone()
    # The future must not change the past. A random change, not a constant shift: every block (and
    # ln_f) starts with LayerNorm, which removes a shift of all features exactly.
    changed[:, 4:] += torch.randn(1, 2, TINY.n_embd, generator=gen)
    out, _ = model(changed, ones, empty_cache(TINY, 1))
    assert torch.allclose(out[:, :4], base[:, :4], atol=1e-6)
    assert ((out[:, 4:] - base[:, 4:]).abs().amax(-1) > 0.1).all()  # each changed position's output moves
    # Left padding: a padded row gets the same positions and outputs as the unpadded sequence.
    padded = torch.cat([torch.randn(1, 2, TINY.n_embd, generator=gen), x], 1)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]])
    out_pad, _ = model(padded, mask, empty_cache(TINY, 1))
    assert torch.allclose(out_pad[:, 2:], base, atol=1e-5)


def _hub_state(model: GPT2LMHeadModel) -> dict[str, torch.Tensor]:
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for i in range(model.config.n_layer):  # the hub file carries the legacy mask buffers
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, model.config.n_positions, model.config.n_positions))
    return sd


def test_loads_hub_layout_and_save_pretrained_layout(model, tmp_path):
    from safetensors.torch import save_file

    # Hub layout (no prefix, attn.bias buffers) as model.safetensors + config.json.
    folder = tmp_path / "gpt2-hub"
    folder.mkdir()
    save_file(_hub_state(model), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "n_layer": TINY.n_layer, "n_embd": TINY.n_embd, "n_head": TINY.n_head, "n_positions": TINY.n_positions,
        "vocab_size": TINY.vocab_size, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5}))
    loaded = GPT2LMHeadModel.from_pretrained(folder)
    assert loaded.config == TINY
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # save_pretrained layout: "transformer." prefix, tied lm_head.weight, no buffers; a .bin file.
    sd = {f"transformer.{k}": v for k, v in model.state_dict().items()}
    sd["lm_head.weight"] = model.state_dict()["wte.weight"].clone()
    other = GPT2LMHeadModel(TINY)
    other.load_hf_state_dict(sd)
    x = torch.randn(1, 3, TINY.n_embd)
    m = torch.ones(1, 3, dtype=torch.long)
    assert torch.equal(other(x, m, empty_cache(TINY, 1))[0], model(x, m, empty_cache(TINY, 1))[0])


def test_every_missing_unexpected_or_misshaped_key_is_named(model):
    sd = model.state_dict()
    bad = {k: v for k, v in sd.items() if k != "h.1.mlp.c_fc.bias"}
    bad["h.0.attn.c_proj.weight"] = torch.zeros(3, 3)
    bad["h.7.attn.c_attn.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as e:
        GPT2LMHeadModel(TINY).load_hf_state_dict(bad, "bad.safetensors")
    msg = str(e.value)
    assert "h.1.mlp.c_fc.bias" in msg and "h.7.attn.c_attn.weight" in msg and "h.0.attn.c_proj.weight (3, 3)" in msg
    untied = dict(sd)
    untied["lm_head.weight"] = torch.zeros_like(sd["wte.weight"])
    with pytest.raises(CheckpointError, match="tied"):
        GPT2LMHeadModel(TINY).load_hf_state_dict(untied)


def test_hub_name_resolves_from_the_local_cache_only(tmp_path, monkeypatch, model):
    from safetensors.torch import save_file

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(WeightsUnavailableError, match="huggingface-cli download gpt2"):
        find_gpt2_files("gpt2")
    snap = tmp_path / "hub" / "models--gpt2" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    save_file(model.state_dict(), str(snap / "model.safetensors"))
    cfg, weights = find_gpt2_files("gpt2")
    assert weights == snap / "model.safetensors" and cfg is None
    with pytest.raises(CheckpointError, match="do not exist"):
        find_gpt2_files(tmp_path / "nope.safetensors")


def test_config_from_json_rejects_another_activation(tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps({"activation_function": "relu"}))
    with pytest.raises(CheckpointError, match="gelu_new"):
        GPT2Config.from_json(p)
