"""cluster_weights: float16 codebooks and mixed strength (``wide_clusters`` by measured drift
under ``size_budget``)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import with_initializers
from onnxopt import optimize
from onnxopt.cli import _parser, _sugar
from onnxopt.errors import UsageError
from onnxopt.passes.cluster_weights import ClusterWeights
from onnxopt.pipeline import build_pipeline
from test_cluster_weights import _cluster, _run


def _two_branches(rng, k=64, n=64, rows=8):
    """``y = x A + (x B) s``: with ``s`` small, A's error dominates the output."""
    nodes = [helper.make_node("MatMul", ["x", "A"], ["xa"]),
             helper.make_node("MatMul", ["x", "B"], ["xb"]),
             helper.make_node("Mul", ["xb", "s"], ["xbs"]),
             helper.make_node("Add", ["xa", "xbs"], ["y"])]
    inits = {"A": rng.normal(size=(k, n)).astype(np.float32),
             "B": rng.normal(size=(k, n)).astype(np.float32),
             "s": np.array(0.01, np.float32)}
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, n])],
        [numpy_helper.from_array(v, name) for name, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    feeds = [{"x": rng.normal(size=(rows, k)).astype(np.float32)} for _ in range(4)]
    return model, feeds


@pytest.mark.parametrize("clusters, per_channel", [(16, True), (16, False), (200, False)])
def test_float16_codebooks_decode_in_onnxruntime(clusters, per_channel):
    """The codebook is stored in float16 and Cast back: onnxruntime computes with exactly the
    proposed (numpy-decoded) weight, which is within the clustering error of the original,
    and the codebook bytes halve."""
    rng = np.random.default_rng(21)
    model, feeds = _two_branches(rng, k=256, n=16)
    found = {}
    for dtype in ("float32", "float16"):
        out, stats, proposed = _cluster(model, clusters=clusters, per_channel=per_channel,
                                        min_size=16, codebook_dtype=dtype)
        books = [t for t in out.graph.initializer if "codebook" in t.name]
        assert books and all(t.data_type == (TensorProto.FLOAT16 if dtype == "float16"
                                             else TensorProto.FLOAT) for t in books)
        assert stats["codebook_dtype"] == dtype
        reference = with_initializers(model, proposed)
        for f in feeds:
            np.testing.assert_allclose(_run(out, f), _run(reference, f), rtol=1e-5, atol=1e-5)
        found[dtype] = (stats, proposed)
    for name in ("A", "B"):
        w = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))
        half, single = found["float16"][1][name], found["float32"][1][name]
        assert np.linalg.norm(half - w) <= 1.01 * np.linalg.norm(single - w)
        tensor16 = found["float16"][0]["per_tensor"][name]
        tensor32 = found["float32"][0]["per_tensor"][name]
        book32 = 4 * tensor32["codebooks"] * tensor32["clusters"]
        if tensor16["codebooks"] == tensor32["codebooks"]:
            assert tensor32["bytes_after"] - tensor16["bytes_after"] == book32 // 2


def _optimize_mixed(tmp_path, model, feeds, size_budget, name="model.onnx", **options):
    source = tmp_path / name
    onnx.save(model, source)
    return optimize(str(source), passes=["cluster_weights"], options={"cluster_weights": {
        "clusters": 4, "min_size": 16, "wide_clusters": 64, "size_budget": size_budget,
        **options}}, inputs=feeds, max_drift={"cosine": 0.1})


def test_mixed_strength_widens_the_most_harmful_tensor(tmp_path):
    """With room for one widened tensor, the one whose clustering harms the output most (A,
    measured by the drift budget) gets ``wide_clusters``; the model computes with more than
    ``clusters`` values there, and decodes in onnxruntime as the original within the
    clustering error."""
    rng = np.random.default_rng(22)
    model, feeds = _two_branches(rng)
    n = 64 * 64
    # both at 4 clusters: n / 2 bytes + codebook each; room for one at 8 bits, not two
    floats = 4 * (2 * n + 1)
    budget = (n // 2 + n + 1024) / floats
    out, report = _optimize_mixed(tmp_path, model, feeds, budget)
    stats = next(p.stats for p in report.passes if p.name == "cluster_weights")
    assert stats["ranking"] == "measured" and stats["wide"] == ["A"]
    per = stats["per_tensor"]
    assert per["A"]["drift"] > per["B"]["drift"] > 0
    assert per["A"]["clusters"] == 64 and per["B"]["clusters"] == 4
    values = {t.name: t for t in out.graph.initializer}
    assert any(t.name.startswith("A_indices") and t.data_type == TensorProto.UINT8
               for t in values.values())
    stored = sum(numpy_helper.to_array(t).nbytes for t in out.graph.initializer)
    assert stored <= budget * floats
    original = [_run(model, f) for f in feeds]
    clustered = [_run(out, f) for f in feeds]
    narrow, report = _optimize_mixed(tmp_path, model, feeds, 0.01, name="narrow.onnx")
    assert "wide" not in next(p.stats for p in report.passes if p.name == "cluster_weights")
    error = sum(float(np.linalg.norm(c - o)) for c, o in zip(clustered, original))
    error_narrow = sum(float(np.linalg.norm(_run(narrow, f) - o))
                       for f, o in zip(feeds, original))
    assert error < 0.7 * error_narrow


def test_mixed_strength_is_deterministic(tmp_path):
    rng = np.random.default_rng(23)
    model, feeds = _two_branches(rng)
    runs = [_optimize_mixed(tmp_path, model, feeds, 0.5, name=f"m{i}.onnx",
                            codebook_dtype="float16")[0].SerializeToString() for i in range(2)]
    assert runs[0] == runs[1]


def test_mixed_strength_without_a_budget_says_why():
    rng = np.random.default_rng(24)
    model, _ = _two_branches(rng)
    _, stats, proposed = _cluster(model, clusters=4, min_size=16, wide_clusters=64,
                                  size_budget=0.5)
    assert stats["ranking"] == "none (no drift budget to measure with)"
    assert "wide" not in stats and set(proposed) == {"A", "B"}
    assert {stats["per_tensor"][t]["clusters"] for t in "AB"} == {4}


@pytest.mark.parametrize("bad, match", [
    ({"codebook_dtype": "bfloat16"}, "codebook_dtype"),
    ({"wide_clusters": 256}, "go together"), ({"size_budget": 0.2}, "go together"),
    ({"wide_clusters": 300, "size_budget": 0.2}, "wide_clusters"),
    ({"wide_clusters": 256, "size_budget": 0.0}, "size_budget")])
def test_mixed_strength_options_checked(bad, match):
    with pytest.raises(UsageError, match=match):
        ClusterWeights(clusters=16, **bad)


def test_cli_flags_set_the_mixed_strength_options():
    args = _parser().parse_args(["optimize", "m.onnx", "-o", "o.onnx", "--cluster-weights", "16",
                                 "--cluster-codebook-dtype", "float16", "--cluster-wide", "256",
                                 "--cluster-size-budget", "0.15"])
    (cluster,) = build_pipeline([], **_sugar(args)).passes
    assert (cluster.options.clusters, cluster.options.codebook_dtype,
            cluster.options.wide_clusters, cluster.options.size_budget) == \
        (16, "float16", 256, 0.15)
