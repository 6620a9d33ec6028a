"""Multi-scale deformable attention: the sampling convention, the paper's init, weights and gradients."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from vlexport.models.captioner.deformable import (  # noqa: E402
    MultiScaleDeformableAttention,
    bilinear_sample_reference,
    grid_sample_bilinear,
)

SAMPLERS = [grid_sample_bilinear, bilinear_sample_reference]
# Non-square levels, one of them a single cell.
LEVEL_SHAPES = [(5, 7), (3, 2), (2, 4), (1, 1)]


@pytest.mark.parametrize("sampler", SAMPLERS, ids=["grid_sample", "reference"])
def test_sampling_hand_solved(sampler):
    # A 2 x 3 map; pixel (col i, row j) has its centre at ((i + 0.5) / 3, (j + 0.5) / 2).
    value = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]).view(1, 1, 2, 3)
    points = [
        ((0.5 / 3, 0.25), 1.0),  # centre of the first pixel
        ((2.5 / 3, 0.75), 6.0),  # centre of the last pixel
        ((1.0 / 3, 0.25), 1.5),  # half way between pixels 1 and 2 of row 0
        ((0.5 / 3, 0.5), 2.5),  # half way between rows: (1 + 4) / 2
        ((0.0, 0.25), 0.5),  # left edge: half of pixel 1, half of the zero padding
        ((0.0, 0.0), 0.25),  # corner: a quarter of pixel 1
        ((1.5, 0.5), 0.0),  # far outside
        ((0.5, -0.7), 0.0),  # far outside, above
    ]
    locations = torch.tensor([p for p, _ in points]).view(1, 1, len(points), 2)
    got = sampler(value, locations).flatten()
    assert torch.allclose(got, torch.tensor([v for _, v in points]), atol=1e-6)


def test_grid_sample_matches_reference_on_random_non_square_maps():
    gen = torch.Generator().manual_seed(0)
    for h, w in LEVEL_SHAPES:
        value = torch.randn(3, 5, h, w, generator=gen, requires_grad=True)
        # Up to 30% outside the map on each side, so the zero padding is exercised.
        locations = (torch.rand(3, 11, 4, 2, generator=gen) * 1.6 - 0.3).requires_grad_(True)
        fast = grid_sample_bilinear(value, locations)
        slow = bilinear_sample_reference(value, locations)
        assert fast.shape == slow.shape == (3, 5, 11, 4)
        assert (fast - slow).abs().max().item() < 1e-5
        # Same gradients too, in the values and in the locations (what trains the offsets).
        cotangent = torch.randn(fast.shape, generator=gen)
        g_fast = torch.autograd.grad(fast, (value, locations), cotangent)
        g_slow = torch.autograd.grad(slow, (value, locations), cotangent)
        for a, b in zip(g_fast, g_slow, strict=True):
            assert (a - b).abs().max().item() < 1e-4


def _inputs(batch: int = 2, queries: int = 6, dim: int = 32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, queries, dim, generator=gen)
    ref = torch.rand(batch, queries, 2, generator=gen)
    values = [torch.randn(batch, dim, h, w, generator=gen) for h, w in LEVEL_SHAPES]
    return query, ref, values


def _randomise(attn: MultiScaleDeformableAttention, seed: int = 1) -> None:
    # The paper's init has zero offset/weight layers; random ones make the checks non-trivial.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in (attn.sampling_offsets, attn.attention_weights):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * 0.5)


def test_module_output_shape_and_dynamic_batch():
    attn = MultiScaleDeformableAttention(32, num_heads=4, num_levels=4, num_points=3).eval()
    for batch in (1, 3):
        query, ref, values = _inputs(batch=batch)
        assert attn(query, ref, values).shape == (batch, 6, 32)
    with pytest.raises(ValueError, match="4 value maps"):
        attn(query, ref, values[:3])


def test_module_with_reference_sampler_matches_and_batch_items_are_independent():
    torch.manual_seed(0)
    attn = MultiScaleDeformableAttention(32, num_heads=4, num_levels=4, num_points=3).eval()
    _randomise(attn)
    query, ref, values = _inputs(batch=3)
    with torch.no_grad():
        fast = attn(query, ref, values)
        attn.sampler = bilinear_sample_reference
        slow = attn(query, ref, values)
        attn.sampler = grid_sample_bilinear
        # Each image only sees its own maps: running item 1 alone gives the same result.
        alone = attn(query[1:2], ref[1:2], [v[1:2] for v in values])
    assert (fast - slow).abs().max().item() < 1e-5
    assert (fast[1:2] - alone).abs().max().item() < 1e-5


def test_attention_weights_sum_to_one_per_head():
    attn = MultiScaleDeformableAttention(32, num_heads=4, num_levels=4, num_points=3)
    _randomise(attn)
    query, ref, _ = _inputs()
    locations, weights = attn.sampling_locations_and_weights(query, ref, LEVEL_SHAPES)
    assert locations.shape == (2, 6, 4, 4, 3, 2)
    assert weights.shape == (2, 6, 4, 4, 3)
    assert (weights >= 0).all()
    assert torch.allclose(weights.sum(dim=(-1, -2)), torch.ones(2, 6, 4), atol=1e-6)
    # Not uniform once the layer has weights: the softmax really depends on the query.
    assert weights.std() > 1e-3


def test_paper_initialisation():
    heads, points = 8, 3
    attn = MultiScaleDeformableAttention(64, num_heads=heads, num_levels=4, num_points=points)
    query, ref, _ = _inputs(dim=64)
    locations, weights = attn.sampling_locations_and_weights(query, ref, LEVEL_SHAPES)
    # Uniform attention at the start.
    assert torch.allclose(weights, torch.full_like(weights, 1.0 / (4 * points)))
    # Head k looks in direction 2*pi*k/8, scaled onto the unit square, point p at (p + 1) pixels.
    for k in range(heads):
        angle = 2 * math.pi * k / heads
        direction = torch.tensor([math.cos(angle), math.sin(angle)])
        direction = direction / direction.abs().max()
        for level, (h, w) in enumerate(LEVEL_SHAPES):
            for p in range(points):
                expected = ref + (p + 1) * direction / torch.tensor([float(w), float(h)])
                assert torch.allclose(locations[:, :, k, level, p], expected, atol=1e-6)
    assert torch.count_nonzero(attn.sampling_offsets.weight) == 0


def test_gradients_reach_the_offset_and_weight_layers():
    torch.manual_seed(0)
    attn = MultiScaleDeformableAttention(32, num_heads=4, num_levels=4, num_points=3)
    query, ref, values = _inputs()
    target = torch.randn(2, 6, 32)
    grads = {}
    for name, sampler in (("fast", grid_sample_bilinear), ("reference", bilinear_sample_reference)):
        attn.zero_grad()
        attn.sampler = sampler
        loss = ((attn(query, ref, values) - target) ** 2).mean()
        loss.backward()
        grads[name] = (attn.sampling_offsets.weight.grad.clone(), attn.attention_weights.weight.grad.clone())
    attn.sampler = grid_sample_bilinear
    offset_grad, weight_grad = grads["fast"]
    # From the paper's init (zero weights) there is a training signal for where to look and how much.
    assert offset_grad.abs().max() > 1e-6
    assert weight_grad.abs().max() > 1e-6
    assert torch.allclose(offset_grad, grads["reference"][0], atol=1e-5)
    assert torch.allclose(weight_grad, grads["reference"][1], atol=1e-5)


def test_rejects_bad_head_count():
    with pytest.raises(ValueError, match="divisible"):
        MultiScaleDeformableAttention(30, num_heads=4)
