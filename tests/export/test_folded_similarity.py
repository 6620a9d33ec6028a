"""The detector graph's folded similarity equals text @ normalize(GroupNorm(conv(x)))."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlexport.export.kdeov import folded_similarity


@pytest.mark.parametrize("cin, d, groups, offset", [(64, 512, 32, 0.0), (16, 64, 8, 3.0), (8, 32, 1, -2.0)])
def test_matches_the_plain_computation(cin, d, groups, offset):
    g = torch.Generator().manual_seed(cin)
    conv = nn.Conv2d(cin, d, 1)
    norm = nn.GroupNorm(groups, d)
    with torch.no_grad():
        for p in (*conv.parameters(), *norm.parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5 + 0.1)  # non-trivial affine terms
    x = torch.randn(2, cin, 12, 10, generator=g) + offset  # inputs with a mean far from zero too
    text = F.normalize(torch.randn(7, d, generator=g), dim=-1) * 14.3
    with torch.no_grad():
        plain = torch.matmul(text, F.normalize(norm(conv(x)), dim=1).flatten(2))
        folded = folded_similarity(x, conv, norm, text)
    assert folded.shape == (2, 7, 120)
    assert (folded - plain).abs().max() < 1e-4
    assert torch.equal(folded.argmax(1), plain.argmax(1))
