"""Regression tests of the default pipeline (``passes.LOSSLESS_PIPELINE``) on models with control
flow: Loop, If and Scan bodies, outer-scope reads, graph outputs that are also consumed or listed
twice, unsorted models and initializers shared between branches. Every case goes through
``onnxopt.optimize`` (which validates against the original on onnxruntime) and is also compared
with the original here, on more than one feed where the input matters."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from helpers import (all_graphs, all_initializers, assert_same_outputs, is_topologically_sorted,
                     make_branch, make_model, run_ort, session)
from onnxopt import optimize

X = ("x", np.float32, [2, 3])


def _optimize(model: onnx.ModelProto, feeds: list[dict]) -> onnx.ModelProto:
    """The default pipeline with verification after each pass; validation must pass."""
    optimized, report = optimize(model, inputs=feeds, verify_each=True)
    assert report.validation.passed, report.validation.reason
    onnx.checker.check_model(optimized, full_check=True)
    assert_same_outputs(model, optimized, feeds)
    return optimized


def _x_feeds(*values: float) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"x": (v * rng.normal(size=[2, 3])).astype(np.float32)} for v in values]


def _body(nodes, inputs, outputs, initializers=None, name="body") -> onnx.GraphProto:
    """A Loop body: inputs (i, cond_in, *inputs), outputs (cond_out, *outputs), float tensors
    given as ``(name, shape)``; ``cond_out`` is ``cond_in`` passed through an Identity."""
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in (initializers or {}).items()]
    return helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"])] + list(nodes), name,
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, [])]
        + [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, [])]
        + [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
        inits)


# (a) ---------------------------------------------------------------------------------------------

def test_loop_reading_a_graph_input_from_outer_scope_is_not_constant():
    """Trip count and condition are initializers, but the body reads the graph input ``x``: the
    Loop must not be folded, and the output follows ``x``."""
    body = _body([helper.make_node("Add", ["v_in", "x"], ["v_out"]),
                  helper.make_node("Mul", ["v_out", "two"], ["scan_out"])],
                 [("v_in", [2, 3])], [("v_out", [2, 3]), ("scan_out", [2, 3])],
                 {"two": np.float32(2.0)})
    model = make_model(
        [helper.make_node("Loop", ["n", "keep_going", "v0"], ["v_final", "scans"], body=body)],
        [X], [("v_final", np.float32, [2, 3]), ("scans", np.float32, [3, 2, 3])],
        {"n": np.array(3, np.int64), "keep_going": np.array(True),
         "v0": np.zeros([2, 3], np.float32)})
    optimized = _optimize(model, _x_feeds(1.0, -3.0))
    assert any(n.op_type == "Loop" for n in optimized.graph.node)


# (b) ---------------------------------------------------------------------------------------------

def test_loop_carried_value_is_not_folded_to_its_initial_value():
    """v = v + 1 three times from the initializer v0 = 0: the result is 3, not 0 or 1."""
    body = _body([helper.make_node("Add", ["v_in", "one"], ["v_out"])],
                 [("v_in", [])], [("v_out", [])], {"one": np.float32(1.0)})
    model = make_model(
        [helper.make_node("Loop", ["n", "keep_going", "v0"], ["v_final"], body=body),
         helper.make_node("Mul", ["x", "v_final"], ["y"])],
        [X], [("v_final", np.float32, []), ("y", np.float32, [2, 3])],
        {"n": np.array(3, np.int64), "keep_going": np.array(True), "v0": np.float32(0.0)})
    feeds = _x_feeds(1.0, 2.0)
    optimized = _optimize(model, feeds)
    assert run_ort(optimized, feeds[0])["v_final"] == np.float32(3.0)


# (c) ---------------------------------------------------------------------------------------------

def test_graph_output_that_also_feeds_a_node():
    model = make_model(
        [helper.make_node("Identity", ["x"], ["a"]),
         helper.make_node("Relu", ["a"], ["r"]),
         helper.make_node("Add", ["r", "r"], ["s"])],
        [X], [("r", np.float32, [2, 3]), ("s", np.float32, [2, 3])])
    _optimize(model, _x_feeds(1.0, -1.0))


def test_same_tensor_listed_twice_as_graph_output():
    model = make_model(
        [helper.make_node("Identity", ["x"], ["a"]),
         helper.make_node("Relu", ["a"], ["r"]),
         helper.make_node("Neg", ["r"], ["n"])],
        [X], [("r", np.float32, [2, 3]), ("n", np.float32, [2, 3]), ("r", np.float32, [2, 3])],
        check=False)
    _optimize(model, _x_feeds(1.0, -1.0))


def test_identity_output_listed_twice_as_graph_output():
    model = make_model(
        [helper.make_node("Relu", ["x"], ["r"]),
         helper.make_node("Identity", ["r"], ["y"])],
        [X], [("y", np.float32, [2, 3]), ("y", np.float32, [2, 3])], check=False)
    _optimize(model, _x_feeds(1.0, -1.0))


# (d) ---------------------------------------------------------------------------------------------

def _branch_adding(value: float, name: str) -> onnx.GraphProto:
    return make_branch([helper.make_node("Add", ["x", f"{name}_c"], [f"{name}_out"])],
                       [(f"{name}_out", np.float32, None)],
                       {f"{name}_c": np.full([3], value, np.float32)}, name=name)


def test_cse_keeps_two_ifs_whose_branches_differ_in_one_constant():
    """Same op, same inputs (the condition is a graph input), branches that differ in the value of
    one initializer: the two Ifs compute different things and both results stay (as two outputs
    of one If: fuse_if joins Ifs on one condition). Tensor names differ between the two Ifs here;
    see the next test for branches that reuse names."""
    model = make_model(
        [helper.make_node("If", ["flag"], ["y1"], then_branch=_branch_adding(1.0, "t1"),
                          else_branch=_branch_adding(0.0, "e1")),
         helper.make_node("If", ["flag"], ["y2"], then_branch=_branch_adding(2.0, "t2"),
                          else_branch=_branch_adding(0.0, "e2"))],
        [X, ("flag", np.bool_, [])],
        [("y1", np.float32, [2, 3]), ("y2", np.float32, [2, 3])])
    feeds = [{**f, "flag": np.array(flag)} for f, flag in zip(_x_feeds(1.0, 1.0), (True, False))]
    optimized = _optimize(model, feeds)
    assert sum(len(n.output) for n in optimized.graph.node if n.op_type == "If") == 2


def test_cse_keeps_two_ifs_whose_branches_reuse_names_and_differ_in_one_constant():
    """The two Ifs' branches are identical, names included, but for one initializer's value."""
    def branches(value: float):
        return {"then_branch": make_branch([helper.make_node("Add", ["x", "c"], ["out"])],
                                           [("out", np.float32, None)],
                                           {"c": np.full([3], value, np.float32)}, name="then"),
                "else_branch": make_branch([helper.make_node("Sub", ["x", "c"], ["out"])],
                                           [("out", np.float32, None)],
                                           {"c": np.zeros([3], np.float32)}, name="else")}
    model = make_model(
        [helper.make_node("If", ["flag"], ["y1"], **branches(1.0)),
         helper.make_node("If", ["flag"], ["y2"], **branches(2.0))],
        [X, ("flag", np.bool_, [])],
        [("y1", np.float32, [2, 3]), ("y2", np.float32, [2, 3])])
    pristine = model.SerializeToString()
    feeds = [{**f, "flag": np.array(flag)} for f, flag in zip(_x_feeds(1.0, 1.0), (True, False))]
    optimized = _optimize(model, feeds)
    assert sum(len(n.output) for n in optimized.graph.node if n.op_type == "If") == 2
    assert model.SerializeToString() == pristine


def test_cse_merges_two_identical_nodes_inside_a_loop_body():
    body = _body([helper.make_node("Mul", ["v_in", "x"], ["m1"]),
                  helper.make_node("Mul", ["v_in", "x"], ["m2"]),
                  helper.make_node("Add", ["m1", "m2"], ["v_out"])],
                 [("v_in", [2, 3])], [("v_out", [2, 3])])
    model = make_model(
        [helper.make_node("Loop", ["n", "", "v0"], ["v_final"], body=body)],
        [X], [("v_final", np.float32, [2, 3])],
        {"n": np.array(2, np.int64), "v0": np.ones([2, 3], np.float32)})
    optimized = _optimize(model, _x_feeds(0.5, -0.5))
    loop_body = next(n for n in optimized.graph.node if n.op_type == "Loop").attribute[0].g
    assert sorted(n.op_type for n in loop_body.node) == ["Add", "Identity", "Mul"]


# (e) ---------------------------------------------------------------------------------------------

def _unsorted_model(unsorted: bool) -> onnx.ModelProto:
    """z = If(flag)(then: -(relu(x) * 3), else: |sin(relu(x))|) + relu(x); with ``unsorted`` the
    main-graph nodes are in reverse topological order and each branch's nodes are reversed."""
    def order(nodes):
        return nodes[::-1] if unsorted else nodes

    then = make_branch(order([helper.make_node("Mul", ["r", "t_c"], ["t_a"]),
                              helper.make_node("Neg", ["t_a"], ["t_out"])]),
                       [("t_out", np.float32, None)], {"t_c": np.full([3], 3.0, np.float32)},
                       name="then")
    other = make_branch(order([helper.make_node("Sin", ["r"], ["e_a"]),
                               helper.make_node("Abs", ["e_a"], ["e_out"])]),
                        [("e_out", np.float32, None)], name="else")
    nodes = order([helper.make_node("Relu", ["x"], ["r"]),
                   helper.make_node("If", ["flag"], ["y"], then_branch=then, else_branch=other),
                   helper.make_node("Add", ["y", "r"], ["z"])])
    return make_model(nodes, [X, ("flag", np.bool_, [])], [("z", np.float32, [2, 3])],
                      check=not unsorted)


def test_unsorted_model_and_unsorted_branch_are_repaired():
    """onnxruntime refuses the unsorted model, so the optimized model is compared with the same
    model written in order."""
    model = _unsorted_model(unsorted=True)
    assert not is_topologically_sorted(model.graph)
    optimized, _ = optimize(model, validate=False, verify_each=True)
    onnx.checker.check_model(optimized, full_check=True)
    assert is_topologically_sorted(optimized.graph)
    feeds = [{**f, "flag": np.array(flag)} for f, flag in zip(_x_feeds(1.0, 2.0), (True, False))]
    assert_same_outputs(_unsorted_model(unsorted=False), optimized, feeds)


# (f) ---------------------------------------------------------------------------------------------

def test_scan_body():
    """Cumulative sum of x's rows, scaled by an outer initializer read inside the body, with a
    foldable subexpression (Mul of two body initializers) in the body."""
    body = helper.make_graph(
        [helper.make_node("Mul", ["two", "three"], ["six"]),
         helper.make_node("Mul", ["row", "scale"], ["scaled"]),
         helper.make_node("Mul", ["scaled", "six"], ["scaled6"]),
         helper.make_node("Add", ["acc_in", "scaled6"], ["acc_out"]),
         helper.make_node("Identity", ["acc_out"], ["row_out"])],
        "scan_body",
        [helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [3]),
         helper.make_tensor_value_info("row", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [3]),
         helper.make_tensor_value_info("row_out", TensorProto.FLOAT, [3])],
        [numpy_helper.from_array(np.float32(2.0), "two"),
         numpy_helper.from_array(np.float32(3.0), "three")])
    model = make_model(
        [helper.make_node("Scan", ["acc0", "x"], ["acc", "rows"], body=body, num_scan_inputs=1)],
        [X], [("acc", np.float32, [3]), ("rows", np.float32, [2, 3])],
        {"acc0": np.zeros([3], np.float32), "scale": np.full([3], 0.5, np.float32)})
    optimized = _optimize(model, _x_feeds(1.0, -2.0))
    scan_body = next(n for n in optimized.graph.node if n.op_type == "Scan").attribute[0].g
    assert len(scan_body.node) < 5


# (g) ---------------------------------------------------------------------------------------------

def test_outer_initializer_read_by_both_branches_is_stored_once():
    shared = np.arange(3, dtype=np.float32)
    then = make_branch([helper.make_node("Add", ["x", "w"], ["t_out"])],
                       [("t_out", np.float32, None)], name="then")
    other = make_branch([helper.make_node("Mul", ["x", "w"], ["e_out"])],
                        [("e_out", np.float32, None)], name="else")
    model = make_model(
        [helper.make_node("If", ["flag"], ["y"], then_branch=then, else_branch=other)],
        [X, ("flag", np.bool_, [])], [("y", np.float32, [2, 3])], {"w": shared})
    feeds = [{**f, "flag": np.array(flag)} for f, flag in zip(_x_feeds(1.0, 1.0), (True, False))]
    optimized = _optimize(model, feeds)
    stored = [i for i in all_initializers(optimized)
              if np.array_equal(numpy_helper.to_array(i), shared)]
    assert len(stored) == 1
    assert len(list(all_graphs(optimized.graph))) == 3


# an initializer that is also a graph input ------------------------------------------------------

def test_if_on_an_overridable_initializer_keeps_the_input():
    """The condition is a graph input that is also an initializer: the caller may override it, so
    the If stays and follows the fed value."""
    then = _branch_adding(1.0, "t")
    other = _branch_adding(-1.0, "e")
    model = make_model(
        [helper.make_node("If", ["flag"], ["y"], then_branch=then, else_branch=other)],
        [X, ("flag", np.bool_, [])], [("y", np.float32, [2, 3])], {"flag": np.array(True)})
    optimized, _ = optimize(model, validate=False)
    assert [i.name for i in optimized.graph.input] == ["x", "flag"]
    feed = {**_x_feeds(1.0)[0], "flag": np.array(False)}
    np.testing.assert_allclose(session(optimized).run(None, feed)[0],
                               session(model).run(None, feed)[0])
