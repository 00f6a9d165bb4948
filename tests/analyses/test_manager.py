"""Tests of optimizer/analyses/manager.py and its use by the pass manager: analyses are computed
once, shared by passes, and dropped after a change unless the changing pass preserves them."""

from __future__ import annotations

import numpy as np
from onnx import helper

from helpers import make_model
from onnxopt.analyses import TensorTypes, UseDef
from onnxopt.graph import import_graph
from onnxopt.pass_manager import Pass, PassContext, PassManager, PassResult


def _model():
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["y"])]
    return make_model(nodes, [("x", np.float32, [3])], [("y", np.float32, [3])])


class _Reads(Pass):
    name = "test_reads_types"
    description = "asks for the types, changes nothing"

    def run(self, graph, ctx):
        ctx.analyses.get(TensorTypes)
        ctx.analyses.get(UseDef)
        return PassResult(False)


class _Changes(Pass):
    name = "test_changes"
    description = "claims a change once"
    calls = 0

    def run(self, graph, ctx):
        type(self).calls += 1
        return PassResult(type(self).calls == 1)


class _ChangesPreservingTypes(_Changes):
    name = "test_changes_preserving"
    preserves = frozenset({TensorTypes})


def _computed(*passes):
    model = _model()
    ctx = PassContext(template=model)
    PassManager(list(passes), max_iterations=3).run(import_graph(model), ctx)
    return ctx.analyses.computed


def test_analyses_are_shared_until_a_pass_changes_the_graph():
    _Changes.calls = 0
    # round 1: computed, change invalidates; round 2: computed again; round 3 is not run
    assert _computed(_Reads(), _Changes(), _Reads()) == {"TensorTypes": 2, "UseDef": 2}


def test_a_pass_that_preserves_an_analysis_keeps_it():
    _ChangesPreservingTypes.calls = 0
    assert _computed(_Reads(), _ChangesPreservingTypes(), _Reads()) == \
        {"TensorTypes": 1, "UseDef": 2}
