"""Tests of passes/inline_if.py: an If with a constant condition is replaced by the branch it
selects (either branch, its initializers included), its outputs keep their names, nested Ifs and
Ifs inside subgraphs are inlined, and Ifs on a graph input stay. Every optimized model is checked
with the ONNX checker and compared with the original on onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from helpers import (run_pass, all_graphs, all_initializers, assert_same_outputs, make_branch, make_model,
                     run_passes, session)
from onnxopt import optimize
from onnxopt.passes import LOSSLESS_PIPELINE

PIPELINE = ["fold_constants", "inline_if", "remove_identity", "cse", "dedup_initializers",
            "eliminate_dead"]
X = ("x", np.float32, [1, 3])


def _count(model: onnx.ModelProto, op: str) -> int:
    return sum(n.op_type == op for g in all_graphs(model.graph) for n in g.node)


def _branches(then_init: float = 2.0, else_init: float = 10.0):
    """then: y = x + c_then (its own initializer); else: y = x * c_else."""
    then = make_branch([helper.make_node("Add", ["x", "c_then"], ["t_out"])],
                       [("t_out", np.float32, None)],
                       {"c_then": np.full([3], then_init, np.float32)}, name="then")
    other = make_branch([helper.make_node("Mul", ["x", "c_else"], ["e_out"])],
                        [("e_out", np.float32, None)],
                        {"c_else": np.full([3], else_init, np.float32)}, name="else")
    return then, other


def shape_condition_model(dim0_equals: int = 1, extra_consumer: bool = True) -> onnx.ModelProto:
    """cond = Equal(Gather(Shape(x), 0), dim0_equals) with x static [1, 3]; y = If(cond); the If's
    output ``y`` is a graph output and, with ``extra_consumer``, also feeds ``z = Relu(y)``."""
    then, other = _branches()
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["dim0"], axis=0),
        helper.make_node("Equal", ["dim0", "expected"], ["cond"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other),
    ]
    outputs = [("y", np.float32, [1, 3])]
    if extra_consumer:
        nodes.append(helper.make_node("Relu", ["y"], ["z"]))
        outputs.append(("z", np.float32, [1, 3]))
    return make_model(nodes, [X], outputs, {"zero": np.array(0, np.int64),
                                            "expected": np.array(dim0_equals, np.int64)})


def _feeds():
    rng = np.random.default_rng(0)
    return [{"x": rng.normal(size=[1, 3]).astype(np.float32)} for _ in range(2)]


def test_shape_condition_then_branch_initializer_comes_along():
    """Regression: the condition is computable from static shapes; the then-branch holds its own
    initializer; after inlining the initializer is in the main graph and the model is valid."""
    original = shape_condition_model(dim0_equals=1)
    optimized, records = run_passes(original, PIPELINE)
    onnx.checker.check_model(optimized, full_check=True)
    assert _count(optimized, "If") == 0
    assert [n.op_type for n in optimized.graph.node] == ["Add", "Relu"]
    assert "c_then" in {i.name for i in optimized.graph.initializer}
    assert [o.name for o in optimized.graph.output] == ["y", "z"]
    assert sum(r.stats["rewritten"] + r.stats.get("nested", 0)
               for r in records if r.name == "inline_if") == 1
    assert_same_outputs(original, optimized, _feeds())


def test_else_branch_is_chosen_when_condition_is_false():
    original = shape_condition_model(dim0_equals=2)
    optimized, _ = run_passes(original, PIPELINE)
    assert [n.op_type for n in optimized.graph.node] == ["Mul", "Relu"]
    assert "c_else" in {i.name for i in optimized.graph.initializer}
    assert "c_then" not in {i.name for i in all_initializers(optimized)}
    assert_same_outputs(original, optimized, _feeds())


@pytest.mark.parametrize("cond", [True, False])
def test_initializer_condition_both_branches(cond):
    then, other = _branches()
    original = make_model([helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)],
                          [X], [("y", np.float32, [1, 3])], {"c": np.array(cond)})
    optimized, _ = run_passes(original, ["inline_if"])
    assert [n.op_type for n in optimized.graph.node] == ["Add" if cond else "Mul"]
    assert [o.name for o in optimized.graph.output] == ["y"]
    assert_same_outputs(original, optimized, _feeds())


def test_through_optimize_with_default_pipeline():
    original = shape_condition_model()
    optimized, report = optimize(original, passes=LOSSLESS_PIPELINE + ["inline_if"],
                                 inputs=_feeds())
    assert report.validation.passed
    assert _count(optimized, "If") == 0


def test_if_output_that_is_not_a_graph_output():
    then, other = _branches()
    original = make_model(
        [helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other),
         helper.make_node("Neg", ["y"], ["z"])],
        [X], [("z", np.float32, [1, 3])], {"c": np.array(True)})
    optimized, _ = run_passes(original, ["inline_if"])
    assert [n.op_type for n in optimized.graph.node] == ["Add", "Neg"]
    assert_same_outputs(original, optimized, _feeds())


def _twice_bound_model(distinct: bool) -> onnx.ModelProto:
    """If outputs a, b, c, d (all graph outputs) from then-branch outputs (t_neg, t_c, t_neg,
    t_neg): an initializer of the branch, and one branch tensor bound to three If outputs. With
    ``distinct`` each repeated branch output goes through an Identity of its own instead."""
    names = ["t_neg", "t_c", "t_neg_2", "t_neg_3"] if distinct else ["t_neg", "t_c", "t_neg", "t_neg"]
    copies = [helper.make_node("Identity", ["t_neg"], [n]) for n in names[2:]] if distinct else []
    then = make_branch([helper.make_node("Neg", ["x"], ["t_neg"])] + copies,
                       [(n, np.float32, None) for n in names],
                       {"t_c": np.arange(3, dtype=np.float32)}, name="then")
    other = make_branch([helper.make_node("Abs", ["x"], ["e_abs"])],
                        [(n, np.float32, None) for n in ["e_abs", "e_c", "e_abs", "e_abs"]],
                        {"e_c": np.ones(3, np.float32)}, name="else")
    outs = ["a", "b", "c", "d"]
    return make_model(
        [helper.make_node("If", ["cond"], outs, then_branch=then, else_branch=other)],
        [X], [(o, np.float32, [1, 3] if o != "b" else [3]) for o in outs],
        {"cond": np.array(True)})


def test_branch_output_that_is_an_initializer_or_bound_twice():
    """Branch outputs that no branch node produces (an initializer of the branch) or that are
    bound to several If outputs, every If output being a graph output. (A branch output cannot be
    an outer-scope tensor: the ONNX checker rejects that.)

    The reference is the same model with distinct branch outputs: onnxruntime 1.32 returns
    uninitialized memory for the first of two If outputs bound to the same branch tensor."""
    optimized, _ = run_passes(_twice_bound_model(distinct=False), PIPELINE)
    assert _count(optimized, "If") == 0
    assert_same_outputs(_twice_bound_model(distinct=True), optimized, _feeds())


def test_nested_if_both_constant():
    inner_then, inner_else = _branches(then_init=3.0, else_init=5.0)
    outer_then = make_branch(
        [helper.make_node("If", ["inner_c"], ["o_y"], then_branch=inner_then,
                          else_branch=inner_else)],
        [("o_y", np.float32, None)], {"inner_c": np.array(False)}, name="outer_then")
    outer_else = make_branch([helper.make_node("Sub", ["x", "x"], ["o_e"])],
                             [("o_e", np.float32, None)], name="outer_else")
    original = make_model(
        [helper.make_node("If", ["c"], ["y"], then_branch=outer_then, else_branch=outer_else)],
        [X], [("y", np.float32, [1, 3])], {"c": np.array(True)})
    optimized, records = run_passes(original, ["inline_if"])
    assert [n.op_type for n in optimized.graph.node] == ["Mul"]
    assert records[0].stats == {"rewritten": 1, "nested": 1}
    assert_same_outputs(original, optimized, _feeds())


def test_constant_if_inside_an_if_on_a_graph_input():
    """The outer If selects on a graph input and stays; the If in its then-branch is inlined."""
    inner_then, inner_else = _branches()
    outer_then = make_branch(
        [helper.make_node("If", ["inner_c"], ["o_y"], then_branch=inner_then,
                          else_branch=inner_else)],
        [("o_y", np.float32, None)], {"inner_c": np.array(True)}, name="outer_then")
    outer_else = make_branch([helper.make_node("Neg", ["x"], ["o_e"])],
                             [("o_e", np.float32, None)], name="outer_else")
    original = make_model(
        [helper.make_node("If", ["flag"], ["y"], then_branch=outer_then, else_branch=outer_else)],
        [X, ("flag", np.bool_, [])], [("y", np.float32, [1, 3])])
    optimized, records = run_passes(original, PIPELINE)
    assert _count(optimized, "If") == 1
    first = next(r for r in records if r.name == "inline_if")
    assert first.stats == {"rewritten": 1, "refused": {"condition not constant": 1}}
    feeds = [{"x": f["x"], "flag": np.array(flag)} for f, flag in zip(_feeds(), (True, False))]
    assert_same_outputs(original, optimized, feeds)


def test_constant_if_inside_loop_body_writes_body_output():
    """An If in a Loop body whose output is a body output: its name is kept in the body."""
    then, other = _branches()
    body = helper.make_graph(
        [helper.make_node("If", ["c"], ["y_body"], then_branch=then, else_branch=other),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("y_body", TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(np.array(True), "c")])
    original = make_model(
        [helper.make_node("Loop", ["n", "true"], ["ys"], body=body)],
        [X], [("ys", np.float32, [2, 1, 3])], {"n": np.array(2, np.int64), "true": np.array(True)})
    optimized, _ = run_passes(original, PIPELINE)
    assert _count(optimized, "If") == 0
    assert_same_outputs(original, optimized, _feeds())


def test_condition_that_is_a_graph_input_initializer_is_refused():
    """An initializer that is also a graph input may be overridden by the caller: not constant."""
    then, other = _branches()
    original = make_model(
        [helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)],
        [X, ("c", np.bool_, [])], [("y", np.float32, [1, 3])], {"c": np.array(True)})
    optimized, records = run_passes(original, ["inline_if"])
    assert _count(optimized, "If") == 1
    assert records[0].stats == {"rewritten": 0, "refused": {"condition not constant": 1}}
    assert [i.name for i in optimized.graph.input] == ["x", "c"]
    feed = {"x": _feeds()[0]["x"], "c": np.array(False)}
    np.testing.assert_allclose(session(optimized).run(None, feed)[0],
                               session(original).run(None, feed)[0])


def test_outer_tensor_read_by_discarded_branch_loses_that_consumer():
    """After inlining, an outer tensor no longer lists the discarded branch's nodes as consumers."""
    from onnxopt.graph import import_graph

    then, other = _branches()
    original = make_model([helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)],
                          [X], [("y", np.float32, [1, 3])], {"c": np.array(True)})
    graph = import_graph(original)
    run_pass(graph, "inline_if", original)
    x = graph.inputs[0]
    assert [n.op for n in x.outputs] == ["Add"]


def test_branch_reading_a_loop_body_input():
    """The If sits in a Loop body and its chosen branch reads the body's carried input."""
    then = make_branch([helper.make_node("Add", ["v_in", "c_then"], ["t_out"])],
                       [("t_out", np.float32, None)], {"c_then": np.full([3], 2.0, np.float32)},
                       name="then")
    other = make_branch([helper.make_node("Mul", ["v_in", "x"], ["e_out"])],
                        [("e_out", np.float32, None)], name="else")
    body = helper.make_graph(
        [helper.make_node("If", ["c"], ["v_if"], then_branch=then, else_branch=other),
         helper.make_node("Mul", ["v_if", "x"], ["v_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1, 3])],
        [onnx.numpy_helper.from_array(np.array(True), "c")])
    original = make_model(
        [helper.make_node("Loop", ["n", "true", "x"], ["v"], body=body)],
        [X], [("v", np.float32, [1, 3])], {"n": np.array(3, np.int64), "true": np.array(True)})
    optimized, _ = run_passes(original, PIPELINE)
    assert _count(optimized, "If") == 0
    assert_same_outputs(original, optimized, _feeds())


def test_branch_tensor_whose_name_clashes_is_renamed():
    """A branch tensor named like a main-graph tensor (possible only after a rewrite, import makes
    names unique) is renamed when the branch moves into the main graph."""
    from onnxopt.graph import export_graph, import_graph

    original = shape_condition_model()
    work = onnx.ModelProto()
    work.CopyFrom(original)  # renaming a lazily loaded initializer renames it in the proto
    graph = import_graph(work)
    if_node = next(n for n in graph.nodes if n.op == "If")
    if_node.attrs["then_branch"].nodes[0].inputs[1].name = "z"  # c_then
    run_pass(graph, "fold_constants", original)
    result = run_pass(graph, "inline_if", original)
    assert result.stats == {"rewritten": 1}
    optimized = export_graph(graph, original)
    assert [i.name for i in optimized.graph.initializer] != ["z"]
    assert [o.name for o in optimized.graph.output] == ["y", "z"]
    onnx.checker.check_model(optimized, full_check=True)
    assert_same_outputs(original, optimized, _feeds())


def test_branch_node_named_like_an_outer_node_is_renamed():
    """Exporters name nodes per scope: the chosen branch's ``/Add`` moves into a graph that has
    its own ``/Add``, and onnxruntime refuses a graph with two nodes of one name. Found by the
    differential fuzzer (tests/fuzz)."""
    then, other = _branches()
    then.node[0].name = other.node[0].name = "/Add"
    model = make_model(
        [helper.make_node("Add", ["x", "x"], ["x2"], name="/Add"),
         helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other),
         helper.make_node("Mul", ["y", "x2"], ["z"], name="/Mul")],
        [X], [("z", np.float32, [1, 3])], {"cond": np.array(True)})
    optimized, records = run_passes(model, ["inline_if"])
    assert records[0].stats == {"rewritten": 1}
    names = [n.name for n in optimized.graph.node]
    assert len(set(names)) == len(names) == 3 and "/Add" in names, names
    assert_same_outputs(model, optimized)
