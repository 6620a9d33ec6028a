"""The detector graph's folded similarity equals text @ soft_normalize(GroupNorm(conv(x)), floor)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlexport.models.kdeov.heads import best_folded_similarity, folded_similarity, soft_normalize

CASES = [(64, 512, 32, 0.0, 0.0), (16, 64, 8, 3.0, 0.0), (8, 32, 1, -2.0, 0.0), (16, 64, 8, 1.0, 37.0)]


def _setup(cin, d, groups, offset):
    g = torch.Generator().manual_seed(cin)
    conv = nn.Conv2d(cin, d, 1)
    norm = nn.GroupNorm(groups, d)
    with torch.no_grad():
        for p in (*conv.parameters(), *norm.parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5 + 0.1)  # non-trivial affine terms
    x = torch.randn(2, cin, 12, 10, generator=g) + offset  # inputs with a mean far from zero too
    text = F.normalize(torch.randn(7, d, generator=g), dim=-1)
    return conv, norm, x, text


@pytest.mark.parametrize("cin, d, groups, offset, floor", CASES)
def test_matches_the_plain_computation(cin, d, groups, offset, floor):
    conv, norm, x, text = _setup(cin, d, groups, offset)
    with torch.no_grad():
        plain = torch.matmul(text, soft_normalize(norm(conv(x)), floor, dim=1).flatten(2))
        folded = folded_similarity(x, conv, norm, text, floor)
    assert folded.shape == (2, 7, 120)
    scale = plain.abs().max()
    assert (folded - plain).abs().max() < 1e-4 * scale
    assert torch.equal(folded.argmax(1), plain.argmax(1))


@pytest.mark.parametrize("cin, d, groups, offset, floor", CASES)
def test_best_class_matches_the_maximum_of_the_plain_computation(cin, d, groups, offset, floor):
    conv, norm, x, text = _setup(cin, d, groups, offset)
    with torch.no_grad():
        plain = torch.matmul(text, soft_normalize(norm(conv(x)), floor, dim=1).flatten(2))  # [B, C, HW]
        top, idx = best_folded_similarity(x, conv, norm, text, floor)
    want_top, want_idx = plain.max(dim=1)
    assert top.shape == idx.shape == (2, 120)
    assert (top - want_top).abs().max() < 1e-4 * want_top.abs().max()
    assert torch.equal(idx, want_idx)


def test_a_floor_scales_cosines_down_by_the_norm_it_adds():
    x = torch.tensor([[3.0, 4.0]])  # |x| = 5
    assert torch.allclose(soft_normalize(x, 0.0), torch.tensor([[0.6, 0.8]]))
    assert torch.allclose(soft_normalize(x, 12.0), x / 13.0)
