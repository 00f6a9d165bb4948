"""Tests of passes/fuse_if.py: two Ifs of one graph on the same condition tensor become one If --
independent ones, one reading the other's output (in its branches or in a nested If there), in
a branch of another If, with branch initializers, with the fused If moving past nodes the second
If read -- keeping the outputs read elsewhere and the graph outputs' names; Ifs on different
conditions, with a node on a path from the first to the second, or whose fusion would bind one
branch tensor to two outputs stay. Every model is checked with the ONNX checker (full check),
compared with the original on onnxruntime with each branch taken, and the total node count never
grows."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from helpers import (
    run_pass,
    all_graphs,
    assert_same_outputs,
    is_topologically_sorted,
    make_branch,
    make_model,
    run_passes,
    with_and_without,
)
from onnx import helper


PASS = ["fuse_if"]
X = ("x", np.float32, [2, 3])
C = ("c", np.bool_, [])
D = ("d", np.bool_, [])
F = np.float32


def _if(cond: str, out: str, then_op: str = "Neg", else_op: str = "Relu", x: str = "x",
        shape=(2, 3)) -> onnx.NodeProto:
    """``out = If(cond)``: then ``then_op(x)``, else ``else_op(x)``."""
    then = make_branch([helper.make_node(then_op, [x], [f"{out}_t"])],
                       [(f"{out}_t", F, list(shape))], name=f"{out}_then")
    other = make_branch([helper.make_node(else_op, [x], [f"{out}_e"])],
                        [(f"{out}_e", F, list(shape))], name=f"{out}_else")
    return helper.make_node("If", [cond], [out], then_branch=then, else_branch=other)


def _feeds(*conds: str):
    x = np.array([[-1.0, 2.0, -3.0], [4.0, -5.0, 6.0]], F)
    names = conds or ("c",)
    return [{"x": x, **{n: np.array(bool(bits >> i & 1)) for i, n in enumerate(names)}}
            for bits in range(2 ** len(names))]


def _ops(graph: onnx.GraphProto) -> list[str]:
    return [n.op_type for n in graph.node]


def _branches(node: onnx.NodeProto) -> dict[str, onnx.GraphProto]:
    return {a.name: a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH}


def _total(model: onnx.ModelProto) -> int:
    return sum(len(g.node) for g in all_graphs(model.graph))


def _check(model, names=PASS, feeds=None):
    out, records = run_passes(model, names)
    assert_same_outputs(model, out, feeds or _feeds())
    assert is_topologically_sorted(out.graph)
    assert _total(out) <= _total(model)
    return out, records


def test_independent_ifs_become_one():
    model = make_model([_if("c", "y"), _if("c", "z", "Abs", "Sigmoid")], [X, C],
                       [("y", F, [2, 3]), ("z", F, [2, 3])])
    out, records = _check(model)
    assert _ops(out.graph) == ["If"]
    assert list(out.graph.node[0].output) == ["y", "z"]
    branches = _branches(out.graph.node[0])
    assert _ops(branches["then_branch"]) == ["Neg", "Abs"]
    assert _ops(branches["else_branch"]) == ["Relu", "Sigmoid"]
    assert records[0].stats == {"rewritten": 1}


def _dependent(extra_nodes=(), extra_outputs=(), z_else_shape=(1, 1, 2, 3, 1)
               ) -> onnx.ModelProto:
    """The torch LSTM-wrapper pattern: ``y = If(c)[Squeeze(x3, [-1])][Identity(x3)]``, then
    ``z = If(c)[Unsqueeze(y, [0])][Unsqueeze(y, [0, 1])]``, ``s = ReduceSum(z)``; the else
    branch of ``z`` declares ``z_else_shape``."""
    a = helper.make_node("If", ["c"], ["y"], then_branch=make_branch(
        [helper.make_node("Squeeze", ["x3", "minus_one"], ["y_t"])], [("y_t", F, None)],
        name="y_then"), else_branch=make_branch(
        [helper.make_node("Identity", ["x3"], ["y_e"])], [("y_e", F, None)], name="y_else"))
    b = helper.make_node("If", ["c"], ["z"], then_branch=make_branch(
        [helper.make_node("Unsqueeze", ["y", "zero"], ["z_t"])], [("z_t", F, [1, 2, 3])],
        name="z_then"), else_branch=make_branch(
        [helper.make_node("Unsqueeze", ["y", "zero_one"], ["z_e"])],
        [("z_e", F, list(z_else_shape))], name="z_else"))
    total = helper.make_node("ReduceSum", ["z"], ["s"], keepdims=0)  # z's rank is 3 or 4
    return make_model([a, b, total, *extra_nodes], [("x3", F, [2, 3, 1]), C],
                      [("s", F, []), *extra_outputs],
                      {"minus_one": np.array([-1]), "zero": np.array([0]),
                       "zero_one": np.array([0, 1])})


def _dependent_feeds():
    x = np.arange(6, dtype=F).reshape(2, 3, 1)
    return [{"x3": x, "c": np.array(v)} for v in (True, False)]


def test_if_reading_the_other_if_output_in_its_branches():
    """``y``, read only by the second If, becomes a tensor of each fused branch."""
    model = _dependent()
    out, _ = _check(model, feeds=_dependent_feeds())
    assert _ops(out.graph) == ["If", "ReduceSum"]
    assert list(out.graph.node[0].output) == ["z"]
    branches = _branches(out.graph.node[0])
    assert _ops(branches["then_branch"]) == ["Squeeze", "Unsqueeze"]
    assert _ops(branches["else_branch"]) == ["Identity", "Unsqueeze"]
    assert branches["then_branch"].node[1].input[0] == branches["then_branch"].node[0].output[0]


def test_stale_declared_branch_shape_is_dropped():
    """``z``'s else branch declares rank 4 where ``Unsqueeze(y, [0, 1])`` has rank 5; while ``y``
    had no known rank nothing could tell, in the fused branch ``y`` is ``Identity(x3)``.
    Compared with the then branch taken only: onnxruntime rejects the original's else branch
    for its declaration."""
    model = _dependent(z_else_shape=(1, 1, 2, 3))
    out, _ = _check(model, feeds=_dependent_feeds()[:1])
    assert _ops(out.graph) == ["If", "ReduceSum"]


def test_output_read_elsewhere_is_kept():
    model = _dependent([helper.make_node("ReduceSum", ["y"], ["r"], keepdims=0)],
                       [("r", F, [])])
    out, _ = _check(model, feeds=_dependent_feeds())
    assert _ops(out.graph) == ["If", "ReduceSum", "ReduceSum"]
    assert list(out.graph.node[0].output) == ["y", "z"]


def test_output_that_is_a_graph_output_keeps_its_name():
    model = make_model([_if("c", "y"), _if("c", "z", "Abs", "Sigmoid", x="y")], [X, C],
                       [("y", F, [2, 3]), ("z", F, [2, 3])])
    out, _ = _check(model)
    assert _ops(out.graph) == ["If"]
    assert list(out.graph.node[0].output) == ["y", "z"]
    assert [o.name for o in out.graph.output] == ["y", "z"]


def test_nested_if_reading_the_first_output():
    """The second If's then branch holds an If on ``d`` reading ``y`` from the outer scope."""
    inner = _if("d", "inner", "Abs", "Sigmoid", x="y")
    b = helper.make_node("If", ["c"], ["z"], then_branch=make_branch(
        [inner], [("inner", F, [2, 3])], name="z_then"), else_branch=make_branch(
        [helper.make_node("Tanh", ["y"], ["z_e"])], [("z_e", F, [2, 3])], name="z_else"))
    model = make_model([_if("c", "y"), b], [X, C, D], [("z", F, [2, 3])])
    out, _ = _check(model, feeds=_feeds("c", "d"))
    assert _ops(out.graph) == ["If"]
    assert _ops(_branches(out.graph.node[0])["then_branch"]) == ["Neg", "If"]


def test_ifs_inside_a_branch():
    """Two Ifs on ``c`` in the then branch of an If on ``d`` fuse there."""
    then = make_branch([_if("c", "y"), _if("c", "z", "Abs", "Sigmoid", x="y")],
                       [("z", F, [2, 3])], name="outer_then")
    other = make_branch([helper.make_node("Identity", ["x"], ["w"])], [("w", F, [2, 3])],
                        name="outer_else")
    model = make_model([helper.make_node("If", ["d"], ["o"], then_branch=then,
                                         else_branch=other)], [X, C, D], [("o", F, [2, 3])])
    out, records = _check(model, feeds=_feeds("c", "d"))
    assert _ops(_branches(out.graph.node[0])["then_branch"]) == ["If"]
    assert records[0].stats == {"rewritten": 1}


def test_ifs_inside_a_loop_body():
    """Two Ifs on ``c`` in a Loop body, the second reading the first's output and the
    loop-carried ``v``: one iteration's Ifs take the same branch, like any graph's."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         _if("c", "y", x="v_in"), _if("c", "z", "Abs", "Sigmoid", x="y"),
         helper.make_node("Add", ["z", "v_in"], ["v_out"])], "body",
        [helper.make_tensor_value_info("i", onnx.TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", onnx.TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", onnx.TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("cond_out", onnx.TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", onnx.TensorProto.FLOAT, [2, 3])])
    model = make_model([helper.make_node("Loop", ["trips", "", "x"], ["v"], body=body)],
                       [X, C], [("v", F, [2, 3])], {"trips": np.array(3, np.int64)})
    out, records = _check(model)
    assert records[0].stats == {"rewritten": 1}
    assert [n.op_type for n in out.graph.node[0].attribute[0].g.node].count("If") == 1


def test_branch_initializers_come_along():
    def branch(op, name, value):
        return make_branch([helper.make_node(op, ["x", f"{name}_k"], [name])], [(name, F, [2, 3])],
                           {f"{name}_k": np.full([3], value, F)}, name=f"{name}_g")

    model = make_model(
        [helper.make_node("If", ["c"], ["y"], then_branch=branch("Add", "yt", 1.0),
                          else_branch=branch("Mul", "ye", 2.0)),
         helper.make_node("If", ["c"], ["z"], then_branch=branch("Sub", "zt", 3.0),
                          else_branch=branch("Div", "ze", 4.0))],
        [X, C], [("y", F, [2, 3]), ("z", F, [2, 3])])
    out, _ = _check(model)
    assert _ops(out.graph) == ["If"]
    assert sorted(i.name for i in _branches(out.graph.node[0])["then_branch"].initializer) \
        == ["yt_k", "zt_k"]


def test_fused_if_moves_after_what_the_second_if_reads():
    """``n = Relu(x)`` sits between the Ifs and only the second reads it; ``m = Neg(y)`` sits
    between them too and reads the first: the fused If goes after ``n``, ``m`` after it."""
    model = make_model([_if("c", "y"), helper.make_node("Neg", ["y"], ["m"]),
                        helper.make_node("Relu", ["x"], ["n"]),
                        _if("c", "z", "Abs", "Sigmoid", x="n")],
                       [X, C], [("m", F, [2, 3]), ("z", F, [2, 3])])
    out, _ = _check(model)
    assert sorted(_ops(out.graph)) == ["If", "Neg", "Relu"]


def test_chain_of_ifs_fuses_up_to_the_node_between_them():
    """The silero-vad shape: ``y``, ``z`` (reads ``y``) and ``w`` (independent) on ``c`` become
    one If; ``v`` on ``c`` reads ``Relu(z)`` and stays."""
    model = make_model([_if("c", "y"), _if("c", "z", "Abs", "Sigmoid", x="y"),
                        _if("c", "w", "Tanh", "Softsign"), helper.make_node("Relu", ["z"], ["r"]),
                        _if("c", "v", "Neg", "Abs", x="r")],
                       [X, C], [("w", F, [2, 3]), ("v", F, [2, 3])])
    out, records = _check(model)
    assert _ops(out.graph) == ["If", "Relu", "If"]
    assert list(out.graph.node[0].output) == ["z", "w"]
    assert records[0].stats == {"rewritten": 2, "refused": {"path through another node": 1}}


def test_clashing_branch_names_are_renamed():
    """Sibling branches may reuse a name (``t`` in both then branches); the import makes names
    unique, so the pass is run on a graph imported without that step."""
    from onnxopt.graph import export_graph

    def branch(op, out):
        return make_branch([helper.make_node(op, ["x"], ["t"]),
                            helper.make_node("Identity", ["t"], [out])], [(out, F, [2, 3])],
                           name=f"{out}_g")

    model = make_model(
        [helper.make_node("If", ["c"], ["y"], then_branch=branch("Neg", "yt"),
                          else_branch=branch("Relu", "ye")),
         helper.make_node("If", ["c"], ["z"], then_branch=branch("Abs", "zt"),
                          else_branch=branch("Sigmoid", "ze"))],
        [X, C], [("y", F, [2, 3]), ("z", F, [2, 3])])
    graph = gs.import_onnx(model)
    assert run_pass(graph, "fuse_if", model).modified
    out = export_graph(graph, model)
    onnx.checker.check_model(out, full_check=True)
    assert_same_outputs(model, out, _feeds())


def test_branch_nodes_named_like_the_other_ifs_are_renamed():
    """Exporters name nodes per scope, so both Ifs' branches hold a node ``/Neg``: after the
    fusion the fused branch must not hold two (onnxruntime refuses "two nodes with same node
    name"). Found by the differential fuzzer (tests/fuzz)."""
    def named(cond, out):
        node = _if(cond, out)
        for branch in _branches(node).values():
            branch.node[0].name = "/Neg"
        return node

    model = make_model([named("c", "y"), named("c", "z")], [X, C],
                       [("y", F, [2, 3]), ("z", F, [2, 3])])
    out, records = _check(model)
    assert records[0].stats == {"rewritten": 1}
    for branch in _branches(out.graph.node[0]).values():
        names = [n.name for n in branch.node]
        assert len(set(names)) == 2 and names[0] == "/Neg", names


def _refused(model, reason, feeds=None):
    out, records = _check(model, feeds=feeds)
    assert records[0].stats["rewritten"] == 0
    assert records[0].stats.get("refused") == ({reason: 1} if reason else None)
    assert _total(out) == _total(model)


def test_different_conditions_are_left_alone():
    model = make_model([_if("c", "y"), _if("d", "z", "Abs", "Sigmoid")], [X, C, D],
                       [("y", F, [2, 3]), ("z", F, [2, 3])])
    _refused(model, None, _feeds("c", "d"))


def test_node_on_the_path_between_the_ifs_is_refused():
    """``z`` reads ``Relu(y)``: the Relu would have to run both after and before the fused If."""
    model = make_model([_if("c", "y"), helper.make_node("Relu", ["y"], ["r"]),
                        _if("c", "z", "Abs", "Sigmoid", x="r")], [X, C], [("z", F, [2, 3])])
    _refused(model, "path through another node")


def test_node_on_the_path_through_a_branch_read_is_refused():
    """The same, with the second If reading ``Relu(y)`` only inside a nested If."""
    inner = _if("d", "inner", "Abs", "Sigmoid", x="r")
    b = helper.make_node("If", ["c"], ["z"], then_branch=make_branch(
        [inner], [("inner", F, [2, 3])], name="z_then"), else_branch=make_branch(
        [helper.make_node("Tanh", ["x"], ["z_e"])], [("z_e", F, [2, 3])], name="z_else"))
    model = make_model([_if("c", "y"), helper.make_node("Relu", ["y"], ["r"]), b],
                       [X, C, D], [("z", F, [2, 3])])
    _refused(model, "path through another node", _feeds("c", "d"))


def test_path_is_found_in_a_graph_left_out_of_order():
    """A previous pass may leave nodes out of order (here the Relu between the Ifs is moved to
    the end): the graph is sorted before paths are looked for."""
    from onnxopt.graph import import_graph

    model = make_model([_if("c", "y"), helper.make_node("Relu", ["y"], ["r"]),
                        _if("c", "z", "Abs", "Sigmoid", x="r")], [X, C], [("z", F, [2, 3])])
    graph = import_graph(model)
    graph.nodes = [graph.nodes[0], graph.nodes[2], graph.nodes[1]]
    result = run_pass(graph, "fuse_if", model)
    assert result.stats == {"rewritten": 0, "refused": {"path through another node": 1}}


def test_branch_tensor_bound_twice_is_refused():
    """The first If's then branch binds one tensor to its two outputs, both graph outputs, so
    the fused then branch would too. Compared with the else branch taken only: onnxruntime
    (1.32, optimizations off) returns zeros for the first of two If outputs bound to one
    then-branch tensor."""
    then = make_branch([helper.make_node("Neg", ["x"], ["t"])],
                       [("t", F, [2, 3]), ("t", F, [2, 3])], name="y_then")
    other = make_branch([helper.make_node("Relu", ["x"], ["e1"]),
                         helper.make_node("Abs", ["x"], ["e2"])],
                        [("e1", F, [2, 3]), ("e2", F, [2, 3])], name="y_else")
    model = make_model([helper.make_node("If", ["c"], ["y1", "y2"], then_branch=then,
                                         else_branch=other), _if("c", "z", "Tanh", "Sigmoid")],
                       [X, C], [("y1", F, [2, 3]), ("y2", F, [2, 3]), ("z", F, [2, 3])])
    _refused(model, "branch output bound twice", _feeds()[:1])


@pytest.mark.zoo
@pytest.mark.parametrize("name", ["silero_vad_16k_op15", "silero_vad_half"])
def test_real_models(name):
    """torch's LSTM wrapper: the If squeezing the LSTM input or not, the If unsqueezing it and
    the If unsqueezing the initial states become one If (two main-graph nodes fewer; the fused
    else branch's Identity goes too); the If reading the LSTM's outputs stays."""
    (_, base), (_, report) = with_and_without(name, "fuse_if", verify_each=True)
    assert report.after.nodes == base.after.nodes - 2
    assert report.after.nodes_total == base.after.nodes_total - 3
    assert sum(r.stats["rewritten"] for r in report.passes if r.name == "fuse_if") == 2
