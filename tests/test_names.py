"""Tests of optimizer/names.py: fresh names come from the model's own authority, are unique across
every scope, and do not depend on what ran before in the process."""

from __future__ import annotations

import numpy as np
from onnx import helper

from helpers import make_branch, make_model
from onnxopt.graph import import_graph
from onnxopt.names import NameAuthority, fresh_name


def _model_with_branch():
    then = make_branch([helper.make_node("Neg", ["x"], ["W__0"])], [("W__0", np.float32, [2])])
    other = make_branch([helper.make_node("Abs", ["x"], ["b"])], [("b", np.float32, [2])],
                        name="else")
    nodes = [helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)]
    return make_model(nodes, [("x", np.float32, [2]), ("c", np.bool_, [])],
                      [("y", np.float32, [2])])


def test_names_are_fresh_across_scopes_and_follow_a_per_base_counter():
    graph = import_graph(_model_with_branch())
    # W__0 is taken inside the then-branch: the authority sees every scope
    assert fresh_name(graph, "W") == "W__1"
    assert fresh_name(graph, "W") == "W__2"
    assert fresh_name(graph, "y") == "y__0"


def test_the_same_model_gets_the_same_names_whatever_ran_before():
    model = _model_with_branch()
    first = import_graph(model)
    names = [fresh_name(first, "t") for _ in range(3)]
    for _ in range(5):  # other graphs' requests in between
        fresh_name(import_graph(model), "t")
    again = import_graph(model)
    assert [fresh_name(again, "t") for _ in range(3)] == names


def test_a_fork_avoids_the_models_names_without_reserving_any():
    graph = import_graph(_model_with_branch())
    authority = NameAuthority.of(graph)
    fork = authority.fork()
    assert fork.fresh("W") == "W__1"
    assert authority.fresh("W") == "W__1"  # the fork's name was not taken from the model
