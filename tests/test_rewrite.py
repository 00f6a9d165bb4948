"""Tests of optimizer/rewrite.py: the shared walker visits every scope, counts refusals under one
key, sweeps disconnected nodes, and the pass manager applies a rule's declared opset range."""

from __future__ import annotations

import numpy as np
from onnx import helper

from helpers import all_graphs, assert_same_outputs, make_branch, make_model, random_feed
from onnxopt.edit import bypass
from onnxopt.graph import export_graph, import_graph
from onnxopt.pass_manager import PassContext, PassManager
from onnxopt.rewrite import RewritePass, refuse


class _DoubleNeg(RewritePass):
    """Neg(Neg(x)) -> x, refused when the inner Neg has another reader."""

    name = "test_double_neg"
    description = "test only"
    ops = ("Neg",)

    def match(self, node, scope):
        inner = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
        if inner is None or inner.op != "Neg":
            return None
        if len(inner.outputs[0].outputs) != 1:
            return refuse("inner neg has other readers")
        return inner

    def rewrite(self, node, inner, scope):
        if not bypass(scope.graph, node, inner.inputs[0], node.outputs[0]):
            return refuse("graph output name cannot be kept")
        return "Neg"


class _FromOpset18(_DoubleNeg):
    name = "test_double_neg_18"
    min_opset = 18


def _model():
    branch_nodes = [helper.make_node("Neg", ["x"], ["b1"]), helper.make_node("Neg", ["b1"], ["b2"]),
                    helper.make_node("Relu", ["b2"], ["bt"])]
    then = make_branch(branch_nodes, [("bt", np.float32, [3])])
    other = make_branch([helper.make_node("Abs", ["x"], ["be"])], [("be", np.float32, [3])],
                        name="else")
    nodes = [helper.make_node("Neg", ["x"], ["n1"]), helper.make_node("Neg", ["n1"], ["n2"]),
             helper.make_node("Relu", ["n2"], ["r"]),
             helper.make_node("Neg", ["x"], ["m1"]), helper.make_node("Neg", ["m1"], ["m2"]),
             helper.make_node("Add", ["m1", "m2"], ["s"]),
             helper.make_node("If", ["c"], ["i"], then_branch=then, else_branch=other)]
    return make_model(nodes, [("x", np.float32, [3]), ("c", np.bool_, [])],
                      [("r", np.float32, [3]), ("s", np.float32, [3]), ("i", np.float32, [3])])


def test_rule_is_applied_in_every_scope_with_refusals_counted():
    model = _model()
    graph = import_graph(model)
    record = PassManager([]).run_pass(_DoubleNeg(), graph, PassContext(template=model))
    assert record.stats == {"rewritten": 2, "by_kind": {"Neg": 2},
                            "refused": {"inner neg has other readers": 1}}
    out = export_graph(graph, model)
    # the outer Neg of both pairs is gone (main graph and branch) and swept; the inner one is
    # left dead for eliminate_dead; the refused pair stays
    assert sorted(n.op_type for n in out.graph.node) == ["Add", "If", "Neg", "Neg", "Neg", "Relu"]
    assert sum(n.op_type == "Neg" for g in all_graphs(out.graph) for n in g.node) == 4
    relu = next(n for n in out.graph.node if n.op_type == "Relu")
    assert list(relu.input) == ["x"]
    for c in (True, False):
        feed = {**random_feed(model), "c": np.array(c)}
        assert_same_outputs(model, out, [feed])


def test_declared_opset_range_is_applied_by_the_pass_manager():
    model = _model()  # opset 17
    graph = import_graph(model)
    record = PassManager([]).run_pass(_FromOpset18(), graph, PassContext(template=model))
    assert not record.modified and record.stats == {"refused": {"opset 17 < 18": 1}}
