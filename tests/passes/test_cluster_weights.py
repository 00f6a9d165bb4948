"""Tests of passes/cluster_weights.py: k-means weight sharing stored as indices and a codebook,
rebuilt by a Gather; compared with onnxruntime on the original model with the proposed weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import with_initializers
from onnxopt import optimize
from onnxopt.errors import UsageError
from onnxopt.graph import export_graph, import_graph
from onnxopt.pass_manager import PassContext, PassManager, verify_model
from onnxopt.passes.cluster_weights import (ClusterWeights, kmeans_1d, pack_nibbles,
                                            unpack_nibbles)

ZOO = Path(__file__).resolve().parents[2] / "models" / "zoo"


def _model(nodes, inputs, outputs, initializers, opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs,
                              [numpy_helper.from_array(v, k) for k, v in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _f(name, shape=None):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _run(model, feed):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)[0]


def _cluster(model, calibration=None, **options):
    """Run the pass (all proposals accepted): the clustered model, its statistics and the
    proposed values by tensor name."""
    graph = import_graph(model)
    proposed = {}
    cls = ClusterWeights(**options)
    run = cls.run

    def spy(g, ctx):
        result = run(g, ctx)
        proposed.update({p.tensor.name: p.value for p in result.proposals})
        return result
    cls.run = spy
    record = PassManager([]).run_pass(cls, graph, PassContext(template=model,
                                                              calibration=calibration))
    out = export_graph(graph, model)
    verify_model(out, "cluster_weights")
    return out, record.stats, proposed


def _matmul(shape, rng, gemm=False, rows=4):
    w = rng.normal(size=shape).astype(np.float32)
    k = shape[1] if gemm else shape[0]
    n = shape[0] if gemm else shape[1]
    node = helper.make_node("Gemm", ["x", "W"], ["y"], transB=1) if gemm \
        else helper.make_node("MatMul", ["x", "W"], ["y"])
    model = _model([node], [_f("x", [rows, k])], [_f("y", [rows, n])], {"W": w})
    return model, {"x": rng.normal(size=(rows, k)).astype(np.float32)}


@pytest.mark.parametrize("clusters, per_channel, gemm", [
    (256, False, False), (256, False, True), (40, True, False), (16, False, True),
    (16, True, False), (3, True, True), (3, False, False)])
def test_model_computes_with_codebook_indices(clusters, per_channel, gemm):
    """The rebuilt weight is exactly the proposed ``codebook[indices]`` (odd sizes exercise the
    4-bit unpacking's padding), with at most K values per codebook."""
    rng = np.random.default_rng(clusters)
    shape = ((7, 641) if gemm else (641, 7)) if per_channel else (37, 51)  # small codebooks
    model, feed = _matmul(shape, rng, gemm)
    out, stats, proposed = _cluster(model, clusters=clusters, per_channel=per_channel,
                                    min_size=16)
    assert stats["accepted"] == 1
    expected = _run(with_initializers(model, proposed), feed)
    np.testing.assert_array_equal(_run(out, feed), expected)
    value = proposed["W"]
    assert not np.array_equal(value, numpy_helper.to_array(model.graph.initializer[0]))
    channels = [value] if not per_channel else (list(value) if gemm else list(value.T))
    assert max(np.unique(c).size for c in channels) <= clusters
    if per_channel:
        assert len(channels) == 7
    assert stats["per_tensor"]["W"]["codebooks"] == (len(channels) if per_channel else 1)
    stored = sum(numpy_helper.to_array(i).nbytes for i in out.graph.initializer)
    assert stored == stats["bytes_after"]  # indices, codebooks, offsets, unpacking constants
    assert stored < value.nbytes or per_channel


def test_conv_per_channel_exact():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(6, 16, 3, 3)).astype(np.float32)
    model = _model([helper.make_node("Conv", ["x", "W"], ["y"], pads=[1, 1, 1, 1])],
                   [_f("x", [1, 16, 5, 5])], [_f("y", [1, 6, 5, 5])], {"W": w})
    out, stats, proposed = _cluster(model, clusters=4, per_channel=True, min_size=16)
    assert stats["per_tensor"]["W"]["codebooks"] == 6
    feed = {"x": rng.normal(size=(1, 16, 5, 5)).astype(np.float32)}
    np.testing.assert_array_equal(_run(out, feed), _run(with_initializers(model, proposed), feed))
    assert max(np.unique(c).size for c in proposed["W"]) <= 4


@pytest.mark.parametrize("n", [1, 2, 7, 64, 101])
def test_pack_nibbles_round_trip(n):
    indices = np.random.default_rng(n).integers(0, 16, n)
    packed = pack_nibbles(indices)
    assert packed.size == (n + 1) // 2
    np.testing.assert_array_equal(unpack_nibbles(packed, n), indices)


def test_kmeans_recovers_clusters_and_histogram_path():
    """Well separated clusters are found exactly, also on the histogram path (large tensor)."""
    rng = np.random.default_rng(2)
    centers = np.array([-3.0, -1.0, 0.5, 2.0])
    for n in (1000, 300_000):
        values = centers[rng.integers(0, 4, n)] + rng.normal(scale=1e-3, size=n)
        codebook, index = kmeans_1d(values[None, :], 4, 30)
        np.testing.assert_allclose(codebook[0], centers, atol=1e-3)
        assert np.abs(codebook[0][index[0]] - values).max() < 1e-2


def _weighted_case(rng):
    """Input channels 0..31 carry large activations and weights of small spread; channels
    32..63 carry tiny activations and weights of a wide spread, which an unweighted k-means
    spends most clusters on."""
    w = np.concatenate([rng.normal(scale=0.1, size=(32, 48)),
                        rng.normal(scale=5.0, size=(32, 48))]).astype(np.float32)
    scale = np.concatenate([np.full(32, 10.0), np.full(32, 1e-3)]).astype(np.float32)
    model = _model([helper.make_node("MatMul", ["x", "W"], ["y"])], [_f("x", [16, 64])],
                   [_f("y", [16, 48])], {"W": w})
    feeds = [{"x": (rng.normal(size=(16, 64)) * scale).astype(np.float32)} for _ in range(3)]
    return model, feeds


def test_weighted_beats_unweighted():
    rng = np.random.default_rng(3)
    model, feeds = _weighted_case(rng)
    errors = {}
    for weighted in (False, True):
        out, _, _ = _cluster(model, calibration=feeds, clusters=8, weighted=weighted,
                             min_size=16)
        errors[weighted] = sum(float(np.linalg.norm(_run(out, f) - _run(model, f)))
                               for f in feeds)
    assert errors[True] < 0.5 * errors[False]


def test_weighted_needs_calibration():
    model, _ = _matmul((64, 64), np.random.default_rng(4))
    with pytest.raises(UsageError, match="calibration"):
        _cluster(model, clusters=8, weighted=True)


def test_refusals_and_options():
    model, _ = _matmul((8, 8), np.random.default_rng(5))
    out, stats, proposed = _cluster(model, clusters=8)
    assert proposed == {} and stats["refused"] == {"smaller than min_size": 1}
    for bad in (1, 257, "many"):
        with pytest.raises(UsageError, match="clusters"):
            ClusterWeights(clusters=bad)
    assert ClusterWeights(clusters="auto").options.clusters == "auto"
    assert ClusterWeights.strength == "clusters" and ClusterWeights.ladder[0] == 256


def test_run_twice_same_proposals():
    """The strength search runs the pass several times on the same graph."""
    model, _ = _matmul((40, 40), np.random.default_rng(6))
    graph = import_graph(model)
    ctx = PassContext(template=model)
    PassManager([]).run_pass(ClusterWeights(clusters=4, min_size=16), graph, ctx)
    first = ClusterWeights(clusters=16, min_size=16).run(import_graph(model), ctx)
    second = ClusterWeights(clusters=16, min_size=16).run(import_graph(model), ctx)
    np.testing.assert_array_equal(first.proposals[0].value, second.proposals[0].value)


def _embedding_and_matmul(rng, shape):
    table = rng.normal(size=(300, 64)).astype(np.float32)
    w = rng.normal(size=shape).astype(np.float32)
    nodes = [helper.make_node("Gather", ["E", "ids"], ["e"]),
             helper.make_node("MatMul", ["e", "W"], ["y"])]
    model = _model(nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 5])],
                   [_f("y", [2, 5, shape[1]])], {"E": table, "W": w})
    return model, {"ids": rng.integers(0, 300, (2, 5))}


def _through_pipeline(tmp_path, shape, clusters, **kwargs):
    """The model of :func:`_embedding_and_matmul` through the default pipeline and the pass:
    the result and the file sizes before and after."""
    rng = np.random.default_rng(7)
    model, feed = _embedding_and_matmul(rng, shape)
    source = tmp_path / "model.onnx"
    onnx.save(model, source)
    out, report = optimize(str(source), passes=["default", "cluster_weights"],
                           options={"cluster_weights": {"clusters": clusters}}, inputs=feed,
                           max_drift=0.5, output=tmp_path / "out.onnx", **kwargs)
    stats = next(p.stats for p in report.passes if p.name == "cluster_weights")
    assert stats["accepted"] == 2
    return out, source.stat().st_size, (tmp_path / "out.onnx").stat().st_size


def test_file_shrinks_through_default_pipeline(tmp_path):
    """A clustered weight stays clustered in the saved file after the lossless passes."""
    out, before, after = _through_pipeline(tmp_path, (64, 4200), 256)
    assert {"Gather", "Cast"} <= {n.op_type for n in out.graph.node}
    assert not [i for i in out.graph.initializer if list(i.dims) == [64, 4200]
                and i.data_type == TensorProto.FLOAT]
    assert after <= 0.32 * before  # 23 % of indices + 7 % of the float table


def test_file_shrinks_to_4_bits_without_growing_folds(tmp_path):
    """The 4-bit storage of both the small table and the matrix is marked as storage
    (``PassContext.storage``) and survives the default pipeline's fold_constants, whose 64 KiB
    growth limit alone let it unpack the table step by step back into floats: the file is under
    15 % of float32."""
    out, before, after = _through_pipeline(tmp_path, (64, 4200), 16)
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("BitShift") == ops.count("Mod") == ops.count("Gather") - 1 == 2
    assert not [i for i in out.graph.initializer if i.data_type == TensorProto.FLOAT
                and i.dims and np.prod(i.dims) > 16]  # only the codebooks are float
    assert after <= 0.15 * before


def _single_weight(shape, rng):
    w = rng.normal(size=shape).astype(np.float32)
    model = _model([helper.make_node("MatMul", ["x", "W"], ["y"])], [_f("x", ["b", shape[0]])],
                   [_f("y", ["b", shape[1]])], {"W": w})
    return model, {"x": rng.normal(size=(3, shape[0])).astype(np.float32)}


@pytest.mark.parametrize("shape", [(256, 256), (255, 33)])
def test_4_bit_weight_stays_packed_and_bytes_after_is_the_file(shape):
    """A 256 x 256 weight at K = 16: each unpacking step adds under 64 KiB, so fold_constants
    folded them one by one into uint8 indices twice the size the pass reported. The storage
    nodes are now refused ("compressed storage"); the initializers left are exactly the
    ``bytes_after`` reported, and the output is the proposed weight's (odd size: a Slice)."""
    rng = np.random.default_rng(11)
    model, feed = _single_weight(shape, rng)
    out, report = optimize(model, cluster_weights=16, max_drift=0.5, inputs=feed)
    stats = next(p.stats for p in report.passes if p.name == "cluster_weights")
    assert stats["accepted"] == 1
    assert {"BitShift", "Mod", "Concat", "Reshape", "Cast", "Gather"} <= \
        {n.op_type for n in out.graph.node}
    n = int(np.prod(shape))
    (packed,) = [i for i in out.graph.initializer if i.data_type == TensorProto.UINT8
                 and i.dims and i.dims[0] > 16]
    assert list(packed.dims) == [(n + 1) // 2]
    stored = sum(numpy_helper.to_array(i).nbytes for i in out.graph.initializer)
    assert stored == stats["bytes_after"] == stats["per_tensor"]["W"]["bytes_after"]
    refused = [p.stats.get("refused", {}) for p in report.passes if p.name == "fold_constants"]
    assert any("compressed storage" in r for r in refused)
    _, _, proposed = _cluster(model, clusters=16)
    np.testing.assert_allclose(_run(out, feed), _run(with_initializers(model, proposed), feed),
                               rtol=1e-5, atol=1e-5)


def test_storage_names_are_marked_in_the_context():
    """The pass marks the output of every node it creates, and only those."""
    rng = np.random.default_rng(12)
    model, _ = _single_weight((64, 64), rng)
    graph = import_graph(model)
    ctx = PassContext(template=model)
    PassManager([]).run_pass(ClusterWeights(clusters=16), graph, ctx)
    made = {t.name for n in graph.nodes if n.op != "MatMul" for t in n.outputs}
    assert made and ctx.storage == made


def test_fewer_distinct_values_than_clusters_are_the_codebook():
    """Three distinct values (two of them 9e-4 apart) clustered with K = 4: k-means left a
    centroid where no value is and merged the close pair; the codebook is now the values."""
    values = np.array([-0.6143366694450378, 0.4595724642276764, 0.46047550439834595],
                      np.float32)
    rng = np.random.default_rng(0)
    w = values[rng.integers(0, 3, size=400)]
    centers, index = kmeans_1d(w[None], 4, 30)
    np.testing.assert_array_equal(np.take_along_axis(centers, index, 1)[0].astype(np.float32), w)
    # per row: an exact row beside a row clustered as usual
    rows = np.stack([w, rng.normal(size=400).astype(np.float32)])
    centers, index = kmeans_1d(rows, 4, 30)
    np.testing.assert_array_equal(np.take_along_axis(centers, index, 1)[0].astype(np.float32), w)
    assert np.unique(index[1]).size == 4
    model = _model([helper.make_node("MatMul", ["x", "W"], ["y"])], [_f("x", ["b", 20])],
                   [_f("y", ["b", 20])], {"W": w.reshape(20, 20)})
    _, stats, proposed = _cluster(model, clusters=4, min_size=1)
    assert stats["per_tensor"]["W"]["relative_error"] == 0.0
    np.testing.assert_array_equal(proposed["W"], w.reshape(20, 20))


def test_packing_not_folded_back(tmp_path):
    """fold_constants' growth limit (64 KiB a fold) keeps a weight's 4-bit packing (unpacking
    it would add 0.9 MB, under the 1 MiB size limit) in the default pipeline."""
    out, before, after = _through_pipeline(tmp_path, (64, 4200), 16)
    assert {"BitShift", "Mod"} <= {n.op_type for n in out.graph.node}
    assert not [i for i in out.graph.initializer if list(i.dims) == [64, 4200]]
    assert after <= 0.2 * before


@pytest.mark.zoo
def test_ocr_cls_clustered_validates(tmp_path):
    path = ZOO / "ch_ppocr_mobile_v2.0_cls_infer.onnx"
    if not path.exists():
        pytest.skip(f"{path.name} not fetched")
    out, report = optimize(str(path), passes=["default", "cluster_weights"],
                           options={"cluster_weights": {"clusters": 256, "min_size": 1024}},
                           inputs=str(ZOO / "ch_ppocr_mobile_v2.0_cls_infer.inputs.npz"),
                           max_drift=0.99, output=tmp_path / "out.onnx")
    stats = next(p.stats for p in report.passes if p.name == "cluster_weights")
    assert stats["accepted"] > 0
    assert (tmp_path / "out.onnx").stat().st_size < path.stat().st_size


def test_weighted_clusters_tables_unweighted():
    rng = np.random.default_rng(9)
    model, feed = _embedding_and_matmul(rng, (64, 80))
    _, stats, proposed = _cluster(model, calibration=[feed], clusters=8, weighted=True,
                                  min_size=16)
    assert set(proposed) == {"E", "W"} and stats["unweighted"] == 1


def test_per_channel_only_where_codebooks_are_small():
    """K = 256 codebooks per channel of a small matrix would outweigh its indices: one
    codebook; a table gets one codebook per embedding dimension."""
    rng = np.random.default_rng(10)
    model, feed = _embedding_and_matmul(rng, (64, 80))
    out, stats, proposed = _cluster(model, clusters=16, per_channel=True, min_size=16)
    assert stats["per_tensor"]["E"]["codebooks"] == 64
    assert max(np.unique(c).size for c in proposed["E"].T) <= 16
    np.testing.assert_array_equal(_run(out, feed), _run(with_initializers(model, proposed), feed))
    _, stats, _ = _cluster(model, clusters=256, per_channel=True, min_size=16)
    assert stats["one_codebook"] == 2 and stats["per_tensor"]["W"]["codebooks"] == 1


def _correlated_layer(rng, gemm=False, k=64, n=48, rows=64):
    """A layer whose inputs are strongly correlated (a few latent factors plus a little noise),
    with calibration and held-out evaluation feeds from the same distribution."""
    mixing = rng.normal(size=(6, k))
    w = rng.normal(scale=0.2, size=(n, k) if gemm else (k, n)).astype(np.float32)
    node = helper.make_node("Gemm", ["x", "W"], ["y"], transB=1) if gemm \
        else helper.make_node("MatMul", ["x", "W"], ["y"])
    model = _model([node], [_f("x", [rows, k])], [_f("y", [rows, n])], {"W": w})

    def feed():
        x = rng.normal(size=(rows, 6)) @ mixing + 0.05 * rng.normal(size=(rows, k))
        return {"x": x.astype(np.float32)}
    return model, [feed() for _ in range(4)], [feed() for _ in range(4)]


@pytest.mark.parametrize("per_channel, gemm", [(False, False), (True, False), (True, True)])
def test_gptvq_beats_kmeans_on_correlated_inputs(per_channel, gemm):
    """The Hessian-compensated assignment (same codebook) cuts the output error on held-out
    inputs; the clustered model runs in onnxruntime and computes with its own proposed
    weight, at most K values per codebook."""
    rng = np.random.default_rng(11)
    shape = {"k": 256, "n": 16} if per_channel else {}  # per-output codebooks small enough
    model, calibration, evaluation = _correlated_layer(rng, gemm, **shape)
    errors = {}
    for method in ("kmeans", "gptvq"):
        out, stats, proposed = _cluster(model, calibration=calibration, clusters=8,
                                        per_channel=per_channel, weighted=True,
                                        method=method, min_size=16)
        assert stats["method"] == method
        for f in evaluation:
            np.testing.assert_allclose(_run(out, f), _run(with_initializers(model, proposed), f),
                                       rtol=1e-5, atol=1e-5)
        value = proposed["W"]
        channels = [value] if not per_channel else (list(value) if gemm else list(value.T))
        assert max(np.unique(c).size for c in channels) <= 8
        assert stats["per_tensor"]["W"]["codebooks"] == len(channels)
        errors[method] = sum(float(np.linalg.norm(_run(out, f) - _run(model, f)))
                             for f in evaluation)
    assert stats["compensated"] == 1 and "uncompensated" not in stats
    assert errors["gptvq"] < 0.5 * errors["kmeans"]


def test_gptvq_keeps_exact_values_and_counts_uncompensated():
    """A weight of at most K distinct values stays exact (every assignment error is 0, so
    nothing is spread); a table and a Conv kernel are clustered by k-means, with the reason."""
    rng = np.random.default_rng(12)
    model, calibration, evaluation = _correlated_layer(rng)
    w = numpy_helper.to_array(model.graph.initializer[0])
    exact = rng.choice(np.linspace(-1, 1, 5), size=w.shape).astype(np.float32)
    _, stats, proposed = _cluster(with_initializers(model, {"W": exact}), calibration=calibration,
                                  clusters=8, method="gptvq", min_size=16)
    np.testing.assert_array_equal(proposed["W"], exact)
    model, feed = _embedding_and_matmul(rng, (64, 80))
    _, stats, proposed = _cluster(model, calibration=[feed], clusters=8, method="gptvq",
                                  min_size=16)
    assert set(proposed) == {"E", "W"} and stats["compensated"] == 1
    assert stats["uncompensated"] == {"not the 2-D weight of a MatMul or Gemm": 1}


def test_gptvq_needs_calibration_and_valid_options():
    model, _ = _matmul((64, 64), np.random.default_rng(13))
    with pytest.raises(UsageError, match="calibration"):
        _cluster(model, clusters=8, method="gptvq")
    for bad in ({"method": "gptq"}, {"damp": 0.0}, {"damp": 1.5}):
        with pytest.raises(UsageError, match=next(iter(bad))):
            ClusterWeights(clusters=8, **bad)


def test_gptvq_through_default_pipeline(tmp_path):
    """After the lossless passes (MatMul + Add may become a Gemm) the weight still finds its
    input's Gram matrix: compensated, validated, and closer to the original on held-out
    inputs than k-means."""
    rng = np.random.default_rng(14)
    model, calibration, evaluation = _correlated_layer(rng, k=128, n=64)
    model.graph.node[0].output[0] = "xw"
    model.graph.node.append(helper.make_node("Add", ["xw", "b"], ["y"]))
    model.graph.initializer.append(numpy_helper.from_array(
        rng.normal(size=64).astype(np.float32), "b"))
    source = tmp_path / "model.onnx"
    onnx.save(model, source)
    errors = {}
    for method in ("kmeans", "gptvq"):
        out, report = optimize(str(source), passes=["default", "cluster_weights"],
                               options={"cluster_weights": {"clusters": 16, "method": method,
                                                            "min_size": 16}},
                               inputs=evaluation[0], calibration=calibration, max_drift=0.5)
        assert report.verdict == "passed"
        stats = next(p.stats for p in report.passes if p.name == "cluster_weights")
        assert stats["accepted"] == 1
        errors[method] = sum(float(np.linalg.norm(_run(out, f) - _run(model, f)))
                             for f in evaluation)
    assert stats["compensated"] == 1
    assert errors["gptvq"] < 0.5 * errors["kmeans"]
