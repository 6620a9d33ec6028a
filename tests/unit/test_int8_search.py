"""The precision search's parts: layer groups, ranking, the schedule, per-tensor ranges, Concat ties."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from vlexport.calibration.ranges import TensorHistogram, choose_range, tie_ranges
from vlexport.calibration.search import (
    SearchPoint,
    free_groups,
    group_of,
    paired_latency_ratios,
    rank_groups,
    search_schedule,
)


@pytest.mark.parametrize("name, group", [
    ("/backbone/model.2/m.0/cv1/conv/Conv", "/backbone/model.2/m.0/cv1"),
    ("/backbone/model.2/m.0/cv1/act/Sigmoid", "/backbone/model.2/m.0/cv1"),
    # onnxruntime's names after fusion keep the module path: the profile maps onto the same layers
    ("/backbone/model.0/act/Mul/QuickGeluFusion/", "/backbone/model.0"),
    ("/cv3.0/cv3.0.1/conv/Conv_output_0_nchwc", "/cv3.0/cv3.0.1"),
    ("/backbone/model.2/Slice_1/GatherSliceToSplitFusion", "/backbone/model.2"),
    ("/backbone/model.2/m.0/Add", "/backbone/model.2/m.0"),
    ("Conv_3", "Conv_3"),
    ("/Concat_9", "/Concat_9"),
])
def test_nodes_group_by_their_layer(name, group):
    assert group_of(name) == group


def test_rank_puts_free_layers_first_then_accuracy_per_millisecond():
    sensitivity = {"a": 0.01, "b": 0.04, "c": 0.02, "free": 0.001, "free2": 0.003}
    cost = {"a": 0.1, "b": 2.0, "c": 0.1, "free": -1.0, "free2": -0.8}
    # free layers by sensitivity, then c (0.2 per ms), a (0.1 per ms), b (0.02 per ms)
    assert rank_groups(sensitivity, cost) == ["free2", "free", "c", "a", "b"]


def test_free_means_faster_by_a_share_of_the_whole_graph():
    # On a large graph a 0.01 ms gain is profiler noise; on a tiny one it is a real share.
    large = {"conv": 20.0, "head": 10.0, "noise": -0.01, "first": -1.5}
    assert free_groups(large) == {"first"}
    tiny = {"mm1": 0.2, "mm2": 0.2, "attn": -0.05, "norm": 0.0}
    assert free_groups(tiny) == {"attn"}
    assert free_groups({"a": 1.0, "b": 2.0}) == set()


def test_rank_puts_not_slower_layers_right_after_the_free_ones():
    # Both sets the search tries when INT8 already meets the budget are prefixes of the order.
    sensitivity = {"conv": 0.05, "head": 0.01, "noise": 0.02, "first": 0.001, "cheap": 0.03}
    cost = {"conv": 20.0, "head": 10.0, "noise": -0.01, "first": -1.5, "cheap": 0.0}
    order = rank_groups(sensitivity, cost)
    assert order[:1] == ["first"] and order[:2] == ["first", "noise"]
    assert order[2:] == ["cheap", "conv", "head"]  # the zero cost counts as the floor, not as zero


def test_schedule_doubles_until_within_budget_then_bisects():
    calls = []

    def passed(k):
        calls.append(k)
        return k >= 5

    assert search_schedule(20, passed, max_points=10) == [1, 2, 4, 8, 6, 5] == calls
    assert search_schedule(20, lambda k: False, max_points=3) == [1, 2, 4]
    assert search_schedule(3, lambda k: False, max_points=10) == [1, 2, 3]  # stops at every layer float
    assert search_schedule(0, lambda k: True, max_points=10) == []


def test_point_records_its_ratio_and_drop():
    p = SearchPoint(2, 3, ["n1", "n2"], "map50_95", 0.45, 0.46, 20.0, 40.0, True, True)
    d = p.to_dict()
    assert d["latency_ratio"] == pytest.approx(0.5) and d["drop_points"] == pytest.approx(1.0)
    assert (d["excluded_nodes"], d["excluded_groups"], d["round"]) == (2, 3, 2)


def _hist(values: np.ndarray, bins: int = 2048) -> TensorHistogram:
    lo, hi = float(values.min()), float(values.max())
    counts, _ = np.histogram(values, bins=bins, range=(lo, hi))
    return TensorHistogram(lo, hi, counts.astype(np.int64))


def test_long_tails_get_a_percentile_range_and_compact_values_keep_minmax():
    rng = np.random.default_rng(0)
    compact = rng.uniform(-1, 3, 200_000)
    c = choose_range(_hist(compact))
    assert c.method == "minmax" and (c.lowest, c.highest) == pytest.approx((compact.min(), compact.max()))
    tailed = rng.standard_t(3, 200_000)  # a long tail: nearly all values within +-5, the extremes past 50
    t = choose_range(_hist(tailed))
    assert t.method.startswith("percentile:") and t.highest < tailed.max() and t.lowest > tailed.min()
    assert t.error < 0.9 * t.minmax_error
    s = choose_range(_hist(tailed), symmetric=True, levels=254)
    assert s.lowest == pytest.approx(-s.highest) and s.highest < max(-tailed.min(), tailed.max())
    # A couple of isolated outliers cost more clipped than kept: measured, min-max wins.
    spikes = np.concatenate([rng.normal(0, 1, 200_000), [400.0, -350.0]])
    assert choose_range(_hist(spikes)).method == "minmax"


def _concat_model() -> onnx.ModelProto:
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 2])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    nodes = [helper.make_node("Relu", ["a"], ["ra"], name="ra"),
             helper.make_node("Concat", ["ra", "b"], ["cat"], axis=1, name="cat"),
             helper.make_node("Reshape", ["cat", "shape"], ["r"], name="r"),
             helper.make_node("Sigmoid", ["r"], ["y"], name="sig")]
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [1, 4])
    return helper.make_model(helper.make_graph(nodes, "g", [a, b], [y], [shape]))


def test_concat_inputs_output_and_data_movement_share_one_range():
    ranges = {"a": (-5.0, 5.0), "ra": (0.0, 2.0), "b": (-1.0, 3.0), "cat": (-1.0, 3.0), "r": (-1.0, 3.0),
              "y": (0.0, 1.0)}
    assert tie_ranges(_concat_model(), ranges) == 1  # only ra widened
    assert ranges["ra"] == ranges["b"] == ranges["cat"] == ranges["r"] == (-1.0, 3.0)
    assert ranges["a"] == (-5.0, 5.0) and ranges["y"] == (0.0, 1.0)  # not tied: Relu and Sigmoid compute
    # A member that would lose more than 2 bits keeps its own range.
    far = {"ra": (0.0, 0.5), "b": (-1.0, 3.0), "cat": (-1.0, 3.0), "r": (-1.0, 3.0)}
    assert tie_ranges(_concat_model(), far) == 0 and far["ra"] == (0.0, 0.5)


def _matmul_chain(path, n: int) -> None:
    """A graph of ``n`` chained 256x256 MatMuls: its run time grows with ``n``."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [256, 256], np.eye(256, dtype=np.float32).ravel().tolist())
    nodes = [helper.make_node("MatMul", ["x" if k == 0 else f"h{k}", "w"], [f"h{k + 1}" if k < n - 1 else "y"])
             for k in range(n)]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [256, 256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [256, 256])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


def test_paired_ratios_rank_graphs_timed_in_one_run(tmp_path):
    """One ratio per candidate, in order, against the first graph: 40x the work is clearly slower."""
    base, same, heavy = tmp_path / "base.onnx", tmp_path / "same.onnx", tmp_path / "heavy.onnx"
    _matmul_chain(base, 1)
    _matmul_chain(same, 1)
    _matmul_chain(heavy, 40)
    feed = {"x": np.ones((256, 256), np.float32)}
    ratios = paired_latency_ratios(base, [heavy, same], feed, threads=1, rounds=4, runs=3, warmup=1)
    assert len(ratios) == 2 and all(r > 0 for r in ratios)
    assert ratios[0] > 4 * ratios[1]
