"""Tests of passes/prune_channels.py: the sliced model computes what the proposed equivalent
(silenced channels, folded bias) computes, on onnxruntime; refusals; bias folding;
reconstruction."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import make_model, run_ort

from onnxopt.analyses import AnalysisManager
from onnxopt.graph import export_graph, import_graph
from onnxopt.pass_manager import PassContext, get_pass
from onnxopt.passes import prune_channels

RNG = np.random.default_rng(0)
F = np.float32


def _w(*shape, scale=0.3):
    return RNG.normal(0, scale, size=shape).astype(F)


def propose(model, feeds, **options):
    """The pass run on ``model``; ``round_to`` is 1 unless given (the small layers here)."""
    options.setdefault("round_to", 1)
    graph = import_graph(model)
    ctx = PassContext(template=model, feeds=feeds, calibration=feeds)
    ctx.analyses = AnalysisManager(graph, ctx)
    p = get_pass("prune_channels", **options)
    return graph, p, p.run(graph, ctx)


def equivalent_and_sliced(model, feeds, **options):
    """(equivalent model, sliced model, statistics) with every proposal applied."""
    graph, p, result = propose(model, feeds, **options)
    assert result.proposals, result.stats
    originals = {id(x.tensor): x.tensor.values for x in result.proposals}
    for x in result.proposals:
        assert x.value.shape == x.tensor.values.shape and x.value.dtype == x.tensor.values.dtype
        x.tensor.values = x.value
    equivalent = export_graph(graph, model)
    for x in result.proposals:
        x.tensor.values = originals[id(x.tensor)]
    for x in result.proposals:
        x.apply()
    sliced = export_graph(graph, model)
    onnx.checker.check_model(sliced, full_check=True)
    return equivalent, sliced, p.summarize(result, result.proposals)


def assert_same(a, b, feeds, atol=1e-5):
    for feed in feeds:
        ra, rb = run_ort(a, feed), run_ort(b, feed)
        for k in ra:
            np.testing.assert_allclose(ra[k], rb[k], atol=atol, rtol=1e-5)


def conv_model(middle=("bn", "relu"), depthwise=False, tail=None, c=8, inputs=(), k2=1):
    """x[1,3,6,6] -> Conv(c) -> [BN] -> act -> [depthwise Conv + BN + HardSwish] -> Conv(4) -> y,
    with ``tail`` extra nodes reading the activation ``a``."""
    inits = {"W1": _w(c, 3, 3, 3), "B1": _w(c), "W2": _w(4, c, k2, k2), "B2": _w(4)}
    nodes = [onnx.helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], pads=[1, 1, 1, 1])]
    last = "c1"
    if "bn" in middle:
        inits.update(s=np.abs(_w(c)) + 0.5, b=_w(c), m=_w(c), v=np.abs(_w(c)) + 0.5)
        nodes.append(onnx.helper.make_node("BatchNormalization", [last, "s", "b", "m", "v"],
                                           ["bn"]))
        last = "bn"
    if "relu" in middle:
        nodes.append(onnx.helper.make_node("Relu", [last], ["a"]))
        last = "a"
    if depthwise:
        inits.update(Wd=_w(c, 1, 3, 3), Bd=_w(c), s2=np.abs(_w(c)) + 0.5, b2=_w(c), m2=_w(c),
                     v2=np.abs(_w(c)) + 0.5, three=np.array(3, F), six=np.array(6, F),
                     zero=np.array(0, F))
        nodes += [
            onnx.helper.make_node("Conv", [last, "Wd", "Bd"], ["d"], group=c, pads=[1, 1, 1, 1]),
            onnx.helper.make_node("BatchNormalization", ["d", "s2", "b2", "m2", "v2"], ["dn"]),
            onnx.helper.make_node("Add", ["dn", "three"], ["h1"]),
            onnx.helper.make_node("Clip", ["h1", "zero", "six"], ["h2"]),
            onnx.helper.make_node("Mul", ["dn", "h2"], ["h3"]),
            onnx.helper.make_node("Div", ["h3", "six"], ["h"]),
        ]
        last = "h"
    nodes.append(onnx.helper.make_node("Conv", [last, "W2", "B2"], ["y"],
                                       pads=[k2 // 2] * 4))
    outputs = [("y", F, [1, 4, 6, 6])]
    for node, extra_inits, extra_out in tail or []:
        nodes.append(node)
        inits.update(extra_inits)
        outputs += extra_out
    return make_model(nodes, [("x", F, [1, 3, 6, 6]), *inputs], outputs, inits)


def feeds(n=8, shape=(1, 3, 6, 6), name="x"):
    return [{name: RNG.normal(size=shape).astype(F)} for _ in range(n)]


@pytest.mark.parametrize("depthwise", [False, True])
def test_conv_bn_relu_conv_removed_equals_silenced(depthwise):
    model = conv_model(depthwise=depthwise, k2=3)
    fs = feeds()
    equivalent, sliced, stats = equivalent_and_sliced(model, fs, flops=0.3)
    assert stats["channels_removed"] > 0 and stats["flops_after"] < stats["flops_before"]
    w2 = {i.name: i for i in sliced.graph.initializer}["W2"]
    assert w2.dims[1] == 8 - stats["channels_removed"]
    if depthwise:
        dw = next(n for n in sliced.graph.node if len(n.input) > 1 and n.input[1] == "Wd")
        assert [a.i for a in dw.attribute if a.name == "group"] == [w2.dims[1]]
    assert_same(equivalent, sliced, fs)
    # and it is a real change from the original
    assert not np.allclose(run_ort(model, fs[0])["y"], run_ort(sliced, fs[0])["y"])


def ffn_model(hidden=16, inner=32, erf_gelu=True):
    """MiniLM's FFN: MatMul W1 + b1 -> GELU (Div, Erf, Add, Mul, Mul) -> MatMul W2 + b2."""
    inits = {"W1": _w(hidden, inner), "b1": _w(inner), "W2": _w(inner, hidden), "b2": _w(hidden),
             "sqrt2": np.array(1.4142135, F), "one": np.array(1, F), "half": np.array(0.5, F)}
    nodes = [
        onnx.helper.make_node("MatMul", ["x", "W1"], ["m1"]),
        onnx.helper.make_node("Add", ["b1", "m1"], ["h"]),
        onnx.helper.make_node("Div", ["h", "sqrt2"], ["g1"]),
        onnx.helper.make_node("Erf", ["g1"], ["g2"]),
        onnx.helper.make_node("Add", ["g2", "one"], ["g3"]),
        onnx.helper.make_node("Mul", ["h", "g3"], ["g4"]),
        onnx.helper.make_node("Mul", ["g4", "half"], ["g"]),
        onnx.helper.make_node("MatMul", ["g", "W2"], ["m2"]),
        onnx.helper.make_node("Add", ["m2", "b2"], ["y"]),
    ]
    return make_model(nodes, [("x", F, [2, 5, hidden])], [("y", F, [2, 5, hidden])], inits)


def test_ffn_neurons_removed_equals_silenced():
    model = ffn_model()
    fs = feeds(shape=(2, 5, 16))
    equivalent, sliced, stats = equivalent_and_sliced(model, fs, flops=0.25,
                                                      importance="activation")
    init = {i.name: i for i in sliced.graph.initializer}
    kept = 32 - stats["channels_removed"]
    assert list(init["W1"].dims) == [16, kept] and list(init["W2"].dims) == [kept, 16]
    assert list(init["b1"].dims) == [kept]
    assert abs(stats["flops_removed"] - 0.25) < 0.05
    assert_same(equivalent, sliced, fs)


def test_constant_channel_folds_exactly():
    """A Conv row of zeros makes its channel the constant Relu(BN(bias)): removing it and folding
    into the next (1x1) Conv's bias changes nothing."""
    model = conv_model()
    w1 = {i.name: i for i in model.graph.initializer}["W1"]
    values = onnx.numpy_helper.to_array(w1).copy()
    values[[2, 5]] = 0
    w1.CopyFrom(onnx.numpy_helper.from_array(values, "W1"))
    fs = feeds()
    _, sliced, stats = equivalent_and_sliced(model, fs, threshold=1e-9)
    assert stats["channels_removed"] == 2
    assert_same(model, sliced, fs)


def _refusal(model, fs):
    _, _, result = propose(model, fs, flops=0.3)
    return result.stats["refused"], result.proposals


@pytest.mark.parametrize("tail, reason", [
    ([(onnx.helper.make_node("Add", ["a", "x4"], ["r"]), {}, [("r", F, [1, 8, 6, 6])])],
     "residual Add"),
    ([(onnx.helper.make_node("Concat", ["a", "a"], ["r"], axis=1), {}, [("r", F, [1, 16, 6, 6])])],
     "Concat"),
    ([(onnx.helper.make_node("Reshape", ["a", "shape"], ["r"]),
       {"shape": np.array([1, -1], np.int64)}, [("r", F, [1, 288])])], "Reshape"),
    ([], "channel reaches a graph output"),
])
def test_refusals(tail, reason):
    model = conv_model(tail=tail, inputs=[("x4", F, [1, 8, 6, 6])] * (reason == "residual Add"))
    if reason == "channel reaches a graph output":
        model.graph.output.append(onnx.helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT,
                                                                     [1, 8, 6, 6]))
    fs = feeds()
    if reason == "residual Add":
        for f in fs:
            f["x4"] = RNG.normal(size=(1, 8, 6, 6)).astype(F)
    refused, proposals = _refusal(model, fs)
    # the last Conv's output is the graph output: refused in every variant
    expected = {"channel reaches a graph output": 1}
    expected[reason] = expected.get(reason, 0) + 1
    assert refused == expected and not proposals


def _sigmoid_model(k2):
    model = conv_model(middle=("bn",), k2=k2)
    for n in model.graph.node:
        if n.op_type == "Conv" and n.input[0] == "bn":
            n.input[0] = "sg"
    model.graph.node.insert(2, onnx.helper.make_node("Sigmoid", ["bn"], ["sg"]))
    return model


def test_region_not_mapping_zero_refused_before_padded_conv():
    """Sigmoid(0) = 0.5: a silenced channel is 0.5 at the consumer, which a padded 3x3 Conv does
    not see as a constant (the borders)."""
    refused, proposals = _refusal(_sigmoid_model(3), feeds())
    assert refused == {"region does not map 0 to 0": 1, "channel reaches a graph output": 1}
    assert not proposals


def test_region_mapping_zero_to_constant_before_pointwise_conv():
    """Before a 1x1 Conv the silenced 0.5 is folded out of the bias: still exact."""
    fs = feeds()
    equivalent, sliced, stats = equivalent_and_sliced(_sigmoid_model(1), fs, flops=0.3)
    assert stats["channels_removed"] > 0
    assert_same(equivalent, sliced, fs)


def test_reconstruct_beats_plain_removal_on_correlated_inputs():
    """Inner neurons that are near copies of each other: refitting W2 on the kept ones recovers
    what the removed ones carried."""
    hidden, inner = 8, 32
    model = ffn_model(hidden, inner)
    init = {i.name: i for i in model.graph.initializer}
    base = _w(hidden, inner // 4)
    w1 = np.concatenate([base + 0.01 * _w(hidden, inner // 4) for _ in range(4)], axis=1)
    init["W1"].CopyFrom(onnx.numpy_helper.from_array(w1.astype(F), "W1"))
    fs = feeds(n=16, shape=(2, 5, hidden))
    errors = {}
    for reconstruct in (False, True):
        _, sliced, _ = equivalent_and_sliced(model, fs, flops=0.3, importance="activation",
                                             reconstruct=reconstruct)
        errors[reconstruct] = np.mean([np.linalg.norm(run_ort(model, f)["y"]
                                                      - run_ort(sliced, f)["y"]) for f in fs])
    assert errors[True] < 0.5 * errors[False], errors


def test_activation_without_data_is_a_usage_error():
    from onnxopt.errors import UsageError
    with pytest.raises(UsageError):
        propose(ffn_model(), None, flops=0.2, importance="activation")


@pytest.mark.zoo
def test_rec_model_zero_channels_removed_exactly():
    """PP-OCRv4 rec has Conv rows of zeros: removing those channels (threshold 0+) is exact on
    the real model, and the sliced model equals its proposed equivalent."""
    from helpers import zoo_files
    onnx_file, npz_file = zoo_files("ch_PP-OCRv4_rec_infer")
    model = onnx.load(onnx_file)
    feed = dict(np.load(npz_file))
    equivalent, sliced, stats = equivalent_and_sliced(model, [feed], threshold=1e-12)
    assert stats["channels_removed"] > 0 and stats["flops_after"] < stats["flops_before"]
    assert_same(model, sliced, [feed], atol=1e-4)
    assert_same(equivalent, sliced, [feed], atol=1e-4)


def _chain_model():
    """Conv -> BN -> Relu -> Conv -> BN -> Relu -> Conv (8 then 6 prunable channels)."""
    inits = {"W1": _w(8, 3, 3, 3), "W2": _w(6, 8, 1, 1), "W3": _w(4, 6, 3, 3), "B3": _w(4)}
    nodes = [onnx.helper.make_node("Conv", ["x", "W1"], ["c1"], pads=[1, 1, 1, 1])]
    for i, (inp, c) in enumerate((("c1", 8), ("c2", 6)), start=1):
        inits.update({f"s{i}": np.abs(_w(c)) + 0.5, f"b{i}": _w(c), f"m{i}": _w(c),
                      f"v{i}": np.abs(_w(c)) + 0.5})
        nodes += [onnx.helper.make_node("BatchNormalization",
                                        [inp, f"s{i}", f"b{i}", f"m{i}", f"v{i}"], [f"n{i}"]),
                  onnx.helper.make_node("Relu", [f"n{i}"], [f"a{i}"])]
        if i == 1:
            nodes.append(onnx.helper.make_node("Conv", ["a1", "W2"], ["c2"]))
    nodes.append(onnx.helper.make_node("Conv", ["a2", "W3", "B3"], ["y"], pads=[1, 1, 1, 1]))
    return make_model(nodes, [("x", F, [1, 3, 6, 6])], [("y", F, [1, 4, 6, 6])], inits)


def test_chain_groups_apply_in_any_order_and_alone():
    """Conv -> BN -> Relu -> Conv -> BN -> Relu -> Conv: two groups (the second Conv's mean takes
    the first fold, its BN scale the silencing). Each alone, and both in reverse order, give the
    model their equivalents compute."""
    model, fs = _chain_model(), feeds()
    for order in ([0], [1], [1, 0]):
        graph, p, result = propose(model, fs, flops=0.3)
        groups = list(dict.fromkeys(x.group for x in result.proposals))
        assert len(groups) == 2
        chosen = [x for x in result.proposals if x.group in {groups[i] for i in order}]
        originals = {id(x.tensor): x.tensor.values for x in chosen}
        for x in chosen:
            x.tensor.values = x.value
        equivalent = export_graph(graph, model)
        for x in chosen:
            x.tensor.values = originals[id(x.tensor)]
        for i in order:
            for x in chosen:
                if x.group == groups[i]:
                    x.apply()
        sliced = export_graph(graph, model)
        onnx.checker.check_model(sliced, full_check=True)
        assert_same(equivalent, sliced, fs)


def test_flops_planned_counts_a_conv_between_two_layers_once():
    """The middle Conv loses input channels to the first layer and output channels to the
    second: its FLOPs scale by (kept in / 8) x (kept out / 6), not by the sum of the two cuts,
    and the plan says what the sliced model removes."""
    _, _, stats = equivalent_and_sliced(_chain_model(), feeds(), flops=0.4)
    assert stats["layers_pruned"] == 2
    assert stats["flops_planned"] == pytest.approx(stats["flops_removed"])
    assert stats["flops_removed"] > 0.3


def _if_model(then_nodes, else_nodes, tail_inits, outputs):
    """x -> MatMul W1 + b1 -> Relu -> h, then an If on ``c`` whose branches read ``h``."""
    vi = onnx.helper.make_tensor_value_info
    then_g = onnx.helper.make_graph(then_nodes, "then", [], [vi("t", onnx.TensorProto.FLOAT, None)])
    else_g = onnx.helper.make_graph(else_nodes, "else", [], [vi("e", onnx.TensorProto.FLOAT, None)])
    nodes = [onnx.helper.make_node("MatMul", ["x", "W1"], ["m1"]),
             onnx.helper.make_node("Add", ["m1", "b1"], ["a1"]),
             onnx.helper.make_node("Relu", ["a1"], ["h"]),
             onnx.helper.make_node("If", ["c"], ["z"], then_branch=then_g, else_branch=else_g)]
    return make_model(nodes + tail_inits[0], [("x", F, [5, 8]), ("c", np.bool_, [])], outputs,
                      {"W1": _w(8, 16), "b1": _w(16), **tail_inits[1]}, check=False)


@pytest.mark.parametrize("consumers_in_branches", [False, True])
def test_a_region_read_inside_a_subgraph_is_refused(consumers_in_branches):
    """A tensor of the region read by a node of an If branch (an outer-scope read): slicing it
    would change the branch's output shape (or crash on the branch MatMuls' FLOPs)."""
    if consumers_in_branches:  # the next-layer MatMuls live in the branches
        model = _if_model([onnx.helper.make_node("MatMul", ["h", "W3"], ["t"])],
                          [onnx.helper.make_node("MatMul", ["h", "W4"], ["e"])],
                          ([], {"W3": _w(16, 4), "W4": _w(16, 4)}), [("z", F, None)])
    else:  # a main-graph consumer, and elementwise readers in the branches
        model = _if_model([onnx.helper.make_node("Sigmoid", ["h"], ["t"])],
                          [onnx.helper.make_node("Neg", ["h"], ["e"])],
                          ([onnx.helper.make_node("MatMul", ["h", "W2"], ["y"])],
                           {"W2": _w(16, 4)}), [("y", F, None), ("z", F, None)])
    fs = [{"x": RNG.normal(size=(5, 8)).astype(F), "c": np.array(v)} for v in (True, False)]
    _, _, result = propose(model, fs, flops=0.3)
    assert result.stats["refused"]["read inside a subgraph"] == 1 and not result.proposals


def _gemm_chain(producer, consumer, zero_rows=(1, 4, 6, 9, 12), scalar_bias=False):
    """x[3, 8] -> (MatMul + Add | Gemm transB with alpha/beta) -> Relu -> (MatMul + Add | Gemm)
    -> y, the producer's channels ``zero_rows`` with all-zero weights."""
    c, nodes = 16, []
    w1 = _w(c, 8)
    w1[list(zero_rows)] = 0
    inits = {"b1": np.array(0.7, F) if scalar_bias else np.abs(_w(c)) + 0.5}
    if producer == "matmul":
        inits["W1"] = np.ascontiguousarray(w1.T)
        nodes += [onnx.helper.make_node("MatMul", ["x", "W1"], ["m1"]),
                  onnx.helper.make_node("Add", ["m1", "b1"], ["a1"])]
    else:
        alpha, beta = producer
        inits["W1"] = w1
        nodes.append(onnx.helper.make_node("Gemm", ["x", "W1", "b1"], ["a1"], transB=1,
                                           alpha=alpha, beta=beta))
    nodes.append(onnx.helper.make_node("Relu", ["a1"], ["h"]))
    if consumer == "matmul":
        inits.update(W2=_w(c, 4), b2=_w(4))
        nodes += [onnx.helper.make_node("MatMul", ["h", "W2"], ["m2"]),
                  onnx.helper.make_node("Add", ["m2", "b2"], ["y"])]
    else:
        alpha, beta = consumer
        inits.update(W2=_w(4, c), b2=_w(4))
        nodes.append(onnx.helper.make_node("Gemm", ["h", "W2", "b2"], ["y"], transB=1,
                                           alpha=alpha, beta=beta))
    return make_model(nodes, [("x", F, [3, 8])], [("y", F, [3, 4])], inits)


@pytest.mark.parametrize("producer", ["matmul", (1.0, 2.0), (0.7, 1.3)])
@pytest.mark.parametrize("consumer", ["matmul", (1.5, 0.5), (1.7, 0.4), (1.0, 1.0)])
def test_zero_weight_channels_of_gemm_layers_are_removed_exactly(producer, consumer):
    """Channels with all-zero producer weights are the constants ``Relu(beta C[r])``; removing
    them and folding ``alpha / beta * c W2[r]`` into the consumer Gemm's ``C`` (which it scales
    by beta) changes nothing, whatever alpha and beta."""
    model = _gemm_chain(producer, consumer)
    fs = [{"x": RNG.normal(size=(3, 8)).astype(F)} for _ in range(4)]
    equivalent, sliced, stats = equivalent_and_sliced(model, fs, threshold=1e-9)
    assert stats["channels_removed"] == 5
    assert_same(model, equivalent, fs, atol=1e-4)
    assert_same(model, sliced, fs, atol=1e-4)


def test_consumer_gemm_with_beta_zero_gets_no_fold():
    """``beta = 0``: the consumer's C is ignored, nothing can be folded into it; what the
    proposal measures is what apply writes."""
    model = _gemm_chain((1.0, 1.0), (1.5, 0.0))
    fs = [{"x": RNG.normal(size=(3, 8)).astype(F)} for _ in range(4)]
    equivalent, sliced, stats = equivalent_and_sliced(model, fs, threshold=1e-9)
    assert stats["channels_removed"] == 5
    b2 = onnx.numpy_helper.to_array({i.name: i for i in sliced.graph.initializer}["b2"])
    assert np.all(np.isfinite(b2))  # no alpha / beta fold scale
    assert_same(equivalent, sliced, fs, atol=1e-4)


@pytest.mark.parametrize("consumer", ["matmul", (1.5, 0.5)])
def test_gemm_producer_with_a_scalar_bias_removed_equals_silenced(consumer):
    """A Gemm producer with a scalar (broadcast) C: a silenced channel (weights zeroed) still
    outputs ``beta C``, the Relu passes it on; the equivalent model must account for it, so the
    sliced model computes what the budget measured (and zero-weight channels go exactly)."""
    model = _gemm_chain((1.0, 2.0), consumer, zero_rows=(3,), scalar_bias=True)
    w1 = {i.name: i for i in model.graph.initializer}["W1"]
    values = onnx.numpy_helper.to_array(w1).copy()
    values[[1, 4, 6]] *= 1e-3  # near-dead: removed, not exact
    w1.CopyFrom(onnx.numpy_helper.from_array(values, "W1"))
    fs = [{"x": RNG.normal(size=(3, 8)).astype(F)} for _ in range(4)]
    equivalent, sliced, stats = equivalent_and_sliced(model, fs, threshold=1e-2)
    assert stats["channels_removed"] == 4
    assert_same(equivalent, sliced, fs, atol=1e-4)
    assert_same(model, sliced, fs, atol=0.05)  # folded means of nearly constant channels


# -- attention heads ----------------------------------------------------------------------------

def attention_model(embed=16, heads=4, shape="minus_one", mask="shared"):
    """A BERT self-attention block: Q, K, V = x W + b, split into ``heads`` heads (Reshape to
    ``[0, 0, -1 | heads, d]`` -- or ``computed`` from Shape dims -- and Transpose), scores
    ``Q K^T * d^-0.5 + mask`` (``mask`` [B, 1, 1, S]; ``per_head``: [B, heads, S, S]), Softmax,
    ``scores V``, merged back (``[0, 0, -1]``), ``W_o`` + b_o, then a residual Add with x."""
    d = embed // heads
    inits = {f"W{k}": _w(embed, embed) for k in "qkvo"}
    inits.update({f"b{k}": _w(embed) for k in "qkvo"})
    inits["scale"] = np.array(d ** -0.5, F)
    nodes = []
    for k in "qkv":
        nodes += [onnx.helper.make_node("MatMul", ["x", f"W{k}"], [f"m{k}"], name=f"{k}_proj"),
                  onnx.helper.make_node("Add", [f"m{k}", f"b{k}"], [f"a{k}"])]
    if shape == "computed":
        inits.update(i0=np.array([0], np.int64), i1=np.array([1], np.int64),
                     hd=np.array([heads, d], np.int64), merged=np.array([embed], np.int64))
        nodes += [onnx.helper.make_node("Shape", ["x"], ["xs"]),
                  onnx.helper.make_node("Gather", ["xs", "i0"], ["bdim"], axis=0),
                  onnx.helper.make_node("Gather", ["xs", "i1"], ["sdim"], axis=0),
                  onnx.helper.make_node("Concat", ["bdim", "sdim", "hd"], ["split"], axis=0),
                  onnx.helper.make_node("Concat", ["bdim", "sdim", "merged"], ["merge"],
                                        axis=0)]
    else:
        inits["split"] = np.array([0, 0, -1 if shape == "minus_one" else heads, d], np.int64)
        inits["merge"] = np.array([0, 0, -1 if shape == "minus_one" else embed], np.int64)
    for k, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        nodes += [onnx.helper.make_node("Reshape", [f"a{k}", "split"], [f"r{k}"]),
                  onnx.helper.make_node("Transpose", [f"r{k}"], [f"t{k}"], perm=perm)]
    nodes += [onnx.helper.make_node("MatMul", ["tq", "tk"], ["s0"]),
              onnx.helper.make_node("Mul", ["s0", "scale"], ["s1"]),
              onnx.helper.make_node("Add", ["s1", "mask"], ["s2"]),
              onnx.helper.make_node("Softmax", ["s2"], ["p"], axis=-1),
              onnx.helper.make_node("MatMul", ["p", "tv"], ["c0"]),
              onnx.helper.make_node("Transpose", ["c0"], ["c1"], perm=[0, 2, 1, 3]),
              onnx.helper.make_node("Reshape", ["c1", "merge"], ["c"]),
              onnx.helper.make_node("MatMul", ["c", "Wo"], ["mo"], name="o_proj"),
              onnx.helper.make_node("Add", ["mo", "bo"], ["ao"]),
              onnx.helper.make_node("Add", ["ao", "x"], ["y"])]
    mask_shape = ["B", 1, 1, "S"] if mask == "shared" else ["B", heads, "S", "S"]
    return make_model(nodes, [("x", F, ["B", "S", embed]), ("mask", F, mask_shape)],
                      [("y", F, ["B", "S", embed])], inits)


def attention_feeds(n, batch, seq, embed=16, heads=4, mask="shared"):
    out = []
    for _ in range(n):
        m = np.zeros((batch, 1, 1, seq) if mask == "shared" else (batch, heads, seq, seq), F)
        m[..., seq - 1:] = -1e4 if seq > 1 else 0  # the last position is padding
        out.append({"x": RNG.normal(size=(batch, seq, embed)).astype(F), "mask": m})
    return out


@pytest.mark.parametrize("shape", ["minus_one", "explicit", "computed"])
@pytest.mark.parametrize("reconstruct", [False, True])
def test_attention_heads_removed_equal_silenced_at_other_shapes(shape, reconstruct):
    """Two of four heads go (Q, K, V columns and W_o rows of each); the sliced model computes
    what the equivalent (V heads silenced, W_o's bias folded or refit) does, also for batch
    sizes and sequence lengths the calibration never had; the Reshapes read constant shapes."""
    model = attention_model(shape=shape)
    calibration = attention_feeds(8, 2, 6)
    equivalent, sliced, stats = equivalent_and_sliced(
        model, calibration, flops=0.5, importance="activation", reconstruct=reconstruct)
    assert stats["heads_removed"] == 2 and stats["channels_removed"] == 0
    init = {i.name: i for i in sliced.graph.initializer}
    for k in "qkv":
        assert list(init[f"W{k}"].dims) == [16, 8] and list(init[f"b{k}"].dims) == [8]
    assert list(init["Wo"].dims) == [8, 16] and list(init["bo"].dims) == [16]
    reshapes = [n for n in sliced.graph.node if n.op_type == "Reshape"]
    assert all(n.input[1] in init for n in reshapes)
    assert sorted(onnx.numpy_helper.to_array(init[n.input[1]]).tolist()
                  for n in reshapes) == [[0, 0, 2, 4]] * 3 + [[0, 0, 8]]
    # batch 0: onnxruntime refuses a -1 in a Reshape of an empty tensor (so does the source
    # model with the -1 shapes); the sliced model names the heads kept
    shapes = ((2, 6), (3, 9), (1, 1)) + (((0, 4),) if shape != "minus_one" else ())
    for batch, seq in shapes:
        assert_same(equivalent, sliced, attention_feeds(2, batch, seq))
    assert stats["per_layer"]["v_proj"]["heads_removed"] == 2
    assert stats["flops_removed"] == pytest.approx(0.5)
    assert stats["flops_planned"] == pytest.approx(0.5)


def test_attention_heads_with_a_per_head_mask_are_refused():
    model = attention_model(mask="per_head")
    _, _, result = propose(model, attention_feeds(4, 2, 6, mask="per_head"), flops=0.3)
    assert result.stats["refused"].get("attention heads: Add operand differs per head") == 1
    assert not result.proposals


def test_reconstruct_removes_a_duplicated_neuron_before_a_unique_one(monkeypatch):
    """Greedy OBS order (``reconstruct``): neuron 0 is copied into neuron 1 (W1 columns) and the
    two are strong; neuron 2 is unique and weaker. Activation importance removes the weak one
    and loses it; OBS removes a copy, which the refit makes up exactly."""
    rng = np.random.default_rng(0)
    hidden, inner = 8, 4
    model = ffn_model(hidden, inner)
    init = {i.name: i for i in model.graph.initializer}
    w1 = rng.normal(0, 0.3, size=(hidden, inner)).astype(F)
    w1[:, 1] = w1[:, 0]
    w1[:, 2] *= 0.8
    init["W1"].CopyFrom(onnx.numpy_helper.from_array(w1, "W1"))
    b1 = onnx.numpy_helper.to_array(init["b1"]).copy()
    b1[1] = b1[0]
    init["b1"].CopyFrom(onnx.numpy_helper.from_array(b1, "b1"))
    w2 = rng.normal(0, 0.3, size=(inner, hidden)).astype(F)
    w2[[0, 1, 3]] *= 2
    init["W2"].CopyFrom(onnx.numpy_helper.from_array(w2, "W2"))
    fs = [{"x": rng.normal(size=(2, 5, hidden)).astype(F)} for _ in range(16)]
    _, p, _ = propose(model, fs, flops=0.2, importance="activation", reconstruct=True)
    layer = p._layers[0]
    assert int(np.argmin(layer.importance)) == 2  # what the importance alone would remove
    assert layer.removed in ([0], [1])
    errors = []
    for order in (True, False):
        if not order:  # the importance's order
            monkeypatch.setattr(prune_channels, "_obs_order", lambda *args: None)
        _, sliced, _ = equivalent_and_sliced(model, fs, flops=0.2, importance="activation",
                                             reconstruct=True)
        errors.append(np.mean([np.linalg.norm(run_ort(sliced, f)["y"] - run_ort(model, f)["y"])
                               for f in fs]))
    assert errors[0] < 0.5 * errors[1], errors


def test_channel_statistics_leave_out_the_padding_but_flops_count_it():
    """With a drift mask (``attention_mask`` [B, S]), the consumer input's channel statistics
    come from the kept positions only (padding holds huge values here), while the element
    counts behind the FLOPs keep every position the model computes."""
    model = ffn_model(8, 16)
    graph_input = onnx.helper.make_tensor_value_info("attention_mask", onnx.TensorProto.INT64,
                                                     ["B", "S"])
    model.graph.input.append(graph_input)
    fs = []
    for _ in range(4):
        x = RNG.normal(size=(2, 5, 8)).astype(F)
        mask = np.ones((2, 5), np.int64)
        mask[:, 3:] = 0
        x[:, 3:] = 1e3
        fs.append({"x": x, "attention_mask": mask})
    graph = import_graph(model)
    ctx = PassContext(template=model, feeds=fs, calibration=fs, mask="attention_mask")
    stats = prune_channels.ChannelStatistics.compute(graph, ctx)
    layer = prune_channels.discover(graph)[0][0]
    ts = stats.stats[layer.terminal_inputs[0].name]
    assert ts.rows == 4 * 2 * 3
    hidden = np.concatenate([run_ort(_exposed(model, "g"), f)["g"][:, :3].reshape(-1, 16)
                             for f in fs])
    np.testing.assert_allclose(ts.channel_mean, hidden.mean(axis=0), rtol=1e-4, atol=1e-5)
    matmul = next(n for n in graph.nodes if n.op == "MatMul")
    assert stats.stats[matmul.outputs[0].name].count == 4 * 2 * 5 * 16


def _exposed(model, name):
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return out


def _with_initializers(model, **values):
    out = onnx.ModelProto()
    out.CopyFrom(model)
    init = {i.name: i for i in out.graph.initializer}
    for name, value in values.items():
        init[name].CopyFrom(onnx.numpy_helper.from_array(np.asarray(value, F), name))
    return out


def _array(model, name):
    return onnx.numpy_helper.to_array(next(i for i in model.graph.initializer
                                           if i.name == name)).copy()


def test_attention_heads_with_a_dropout_mask_as_graph_output_are_refused():
    """The Dropout's second output has the heads too: as a graph output its shape would change."""
    model = attention_model()
    g = model.graph
    for n in g.node:
        if n.op_type == "MatMul" and n.input[0] == "p":
            n.input[0] = "pd"
    g.node.insert(next(i for i, n in enumerate(g.node) if n.op_type == "Softmax") + 1,
                  onnx.helper.make_node("Dropout", ["p"], ["pd", "dmask"]))
    g.output.append(onnx.helper.make_tensor_value_info("dmask", onnx.TensorProto.BOOL,
                                                       ["B", 4, "S", "S"]))
    _, _, result = propose(model, attention_feeds(4, 2, 6), flops=0.5)
    assert result.stats["refused"].get("attention heads: heads reach a graph output") == 1
    assert not result.proposals


def test_a_head_of_bias_alone_is_not_rated_zero():
    """V's columns of head 1 are zero but its bias is not: the head outputs the bias (softmax
    rows sum to 1), so without data to fold it the head must not be dropped as worthless."""
    model = attention_model()
    wv = _array(model, "Wv")
    wv[:, 4:8] = 0
    model = _with_initializers(model, Wv=wv)
    _, p, _ = propose(model, None, threshold=1e-9)
    assert p._layers[0].removed == []


def test_reconstruct_removes_a_dead_head_first_and_exactly():
    """Head 1 is dead (V columns and bias zero) but its output rows are large: the constant head
    goes first (not where OBS's dampened error would put it), and the refit, dampened towards
    the original weights, leaves the others exactly as they were."""
    model = attention_model()
    wv, bv, wo = _array(model, "Wv"), _array(model, "bv"), _array(model, "Wo")
    wv[:, 4:8], bv[4:8], wo[4:8] = 0, 0, 10 * wo[4:8]
    model = _with_initializers(model, Wv=wv, bv=bv, Wo=wo)
    fs = attention_feeds(8, 2, 6)
    _, sliced, stats = equivalent_and_sliced(model, fs, flops=0.25, importance="activation",
                                             reconstruct=True)
    assert stats["per_layer"]["v_proj"]["heads_removed"] == 1
    np.testing.assert_array_equal(_array(sliced, "Wo"), np.delete(wo, range(4, 8), axis=0))
    assert_same(model, sliced, fs, atol=1e-4)


def test_reconstruct_is_the_same_for_a_rescaled_head():
    """Scaling head 3's V by s and its output rows by 1/s is the same function: the removal
    order and the refit model's outputs do not change (dampening relative to each channel)."""
    base = attention_model()
    fs = attention_feeds(8, 2, 6)
    outputs, orders = [], []
    for s in (1.0, 100.0):
        wv, bv, wo = _array(base, "Wv"), _array(base, "bv"), _array(base, "Wo")
        wv[:, 12:16] *= s
        bv[12:16] *= s
        wo[12:16] /= s
        model = _with_initializers(base, Wv=wv, bv=bv, Wo=wo)
        _, p, _ = propose(model, fs, flops=0.25, importance="activation", reconstruct=True)
        orders.append(p._layers[0].order.tolist())
        _, sliced, _ = equivalent_and_sliced(model, fs, flops=0.25, importance="activation",
                                             reconstruct=True)
        outputs.append(run_ort(sliced, fs[0])["y"])
    assert orders[0] == orders[1]
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-3, atol=1e-3)


def test_statistics_are_of_the_weights_before_apply():
    """The pass manager applies before it summarizes: FLOPs per layer and the parameter counts
    are of the original weights."""
    model = attention_model()
    graph, p, result = propose(model, attention_feeds(4, 2, 6), flops=0.5)
    before = p.summarize(result, result.proposals)
    for x in result.proposals:
        x.apply()
    after = p.summarize(result, result.proposals)
    assert after == before
    assert after["params_before"] == 4 * 16 * 16 and after["params_removed"] > 0
    assert set(after["per_layer"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}


def test_a_projection_that_reads_the_heads_is_refused():
    """The output projection's result, multiplied by V's projection, feeds another projection:
    the output projection would be both sliced as a consumer and as a producer of the block."""
    model = attention_model()
    g = model.graph
    y = next(n for n in g.node if n.output[0] == "y")
    y.op_type, y.input[:], y.output[:] = "Mul", ["ao", "av"], ["gm"]
    g.node.append(onnx.helper.make_node("MatMul", ["gm", "Wf"], ["y"], name="f_proj"))
    g.initializer.append(onnx.numpy_helper.from_array(_w(16, 16), "Wf"))
    _, _, result = propose(model, attention_feeds(4, 2, 6), flops=0.4)
    assert result.stats["refused"].get("attention heads: a projection reads the heads") == 1
    assert not result.proposals


def test_kept_channels_are_rounded_to_a_multiple_of_round_to():
    """32 channels at a 25 % cut: 24 kept with round_to 8 (the NCHWc block of AVX2); with
    round_to 16, 32 is kept whole below 50 % (16 kept at most); 7 would not divide 32: no
    rounding."""
    model = conv_model(c=32)
    fs = feeds()
    kept = {}
    for r in (1, 8, 16, 7):
        _, p, result = propose(model, fs, flops=0.2, round_to=r)
        kept[r] = 32 - len(p._layers[0].removed)
    assert kept[8] % 8 == 0 and kept[16] % 16 == 0 and kept[7] == kept[1]
    assert kept[1] % 8 != 0 and kept[8] <= kept[1] + 7
    _, sliced, _ = equivalent_and_sliced(model, fs, flops=0.2, round_to=8)
    assert {i.name: list(i.dims) for i in sliced.graph.initializer}["W2"][1] == kept[8]
