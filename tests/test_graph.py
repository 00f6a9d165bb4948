"""Tests of optimizer/graph.py: import/export round trip, Constant lowering, unique names across
scopes, hoisting of initializers shared by subgraphs, topological sorting and model statistics."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from helpers import (all_graphs, all_initializers, assert_same_outputs, is_topologically_sorted,
                     make_branch, make_model, ops, session)
from onnxopt.graph import export_graph, import_graph, make_names_unique, model_stats


def round_trip(model: onnx.ModelProto) -> onnx.ModelProto:
    out = export_graph(import_graph(model), model)
    onnx.checker.check_model(out, full_check=True)
    return out


def _if_model(then_nodes, else_nodes, then_out="t_out", else_out="e_out", inits=None,
              extra_nodes=()) -> onnx.ModelProto:
    """y = If(cond) with branches reading the outer input x [2, 3]."""
    then_g = make_branch(then_nodes, [(then_out, np.float32, [2, 3])], name="then")
    else_g = make_branch(else_nodes, [(else_out, np.float32, [2, 3])], name="else")
    nodes = list(extra_nodes) + [
        helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)]
    return make_model(nodes, [("x", np.float32, [2, 3]), ("cond", np.bool_, [])],
                      [("y", np.float32, [2, 3])], inits or {})


def _run_both_branches(original, optimized):
    x = np.random.default_rng(0).normal(size=(2, 3)).astype(np.float32)
    assert_same_outputs(original, optimized, [{"x": x, "cond": np.array(c)} for c in (True, False)])


def test_round_trip_keeps_interface_and_outputs():
    nodes = [helper.make_node("Add", ["a", "W"], ["s"]),
             helper.make_node("Cast", ["i"], ["i_f"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["s", "i_f"], ["z"]),
             helper.make_node("Relu", ["s"], ["r"]),
             helper.make_node("Shape", ["a"], ["shp"])]
    inputs = [("i", np.int64, ["batch", 3]), ("a", np.float32, ["batch", 3])]
    outputs = [("z", np.float32, ["batch", 3]), ("shp", np.int64, [2]), ("r", np.float32, ["batch", 3])]
    model = make_model(nodes, inputs, outputs, {"W": np.ones(3, np.float32)})
    out = round_trip(model)
    for a, b in ((model.graph.input, out.graph.input), (model.graph.output, out.graph.output)):
        assert [v.SerializeToString() for v in a] == [v.SerializeToString() for v in b]
    assert out.ir_version == model.ir_version
    assert [(o.domain, o.version) for o in out.opset_import] == [("", 17)]
    assert out.producer_name == model.producer_name
    assert_same_outputs(model, out)


def test_round_trip_keeps_metadata_and_drops_intermediate_value_info():
    model = make_model([helper.make_node("Relu", ["x"], ["h"]), helper.make_node("Neg", ["h"], ["y"])],
                       [("x", np.float32, [2])], [("y", np.float32, [2])],
                       value_info=[helper.make_tensor_value_info("h", TensorProto.FLOAT, [7])],
                       check=False)  # the declared value_info is wrong, as real exports' can be
    helper.set_model_props(model, {"author": "tests"})
    model.doc_string = "doc"
    out = round_trip(model)
    assert {p.key: p.value for p in out.metadata_props} == {"author": "tests"}
    assert out.doc_string == "doc"
    assert len(out.graph.value_info) == 0


def test_constant_nodes_are_lowered_to_initializers():
    nodes = [helper.make_node("Constant", [], ["c1"], value=helper.make_tensor(
                 "v", TensorProto.FLOAT, [3], [1.0, 2.0, 3.0])),
             helper.make_node("Constant", [], ["c2"], value_float=0.5),
             helper.make_node("Constant", [], ["shape"], value_ints=[3, 1]),
             helper.make_node("Add", ["x", "c1"], ["a"]),
             helper.make_node("Mul", ["a", "c2"], ["m"]),
             helper.make_node("Reshape", ["m", "shape"], ["y"])]
    model = make_model(nodes, [("x", np.float32, [3])], [("y", np.float32, [3, 1])])
    out = round_trip(model)
    assert ops(out) == ["Add", "Mul", "Reshape"]
    inits = {i.name: i for i in out.graph.initializer}
    assert set(inits) == {"c1", "c2", "shape"}
    assert inits["c2"].data_type == TensorProto.FLOAT and list(inits["c2"].dims) == []
    assert inits["shape"].data_type == TensorProto.INT64
    assert_same_outputs(model, out)


def test_constant_that_is_a_graph_output_stays_a_node():
    nodes = [helper.make_node("Constant", [], ["c"], value_floats=[1.0, 2.0]),
             helper.make_node("Constant", [], ["d"], value_floats=[3.0, 4.0]),
             helper.make_node("Add", ["x", "d"], ["y"])]
    model = make_model(nodes, [("x", np.float32, [2])], [("c", np.float32, [2]), ("y", np.float32, [2])])
    out = round_trip(model)
    assert sorted(ops(out)) == ["Add", "Constant"]
    assert [i.name for i in out.graph.initializer] == ["d"]
    assert_same_outputs(model, out)


def test_constant_nodes_in_if_branches_are_lowered_except_branch_outputs():
    then_nodes = [helper.make_node("Constant", [], ["k"], value_float=2.0),
                  helper.make_node("Mul", ["x", "k"], ["t_out"])]
    else_nodes = [helper.make_node("Constant", [], ["e_out"], value=helper.make_tensor(
        "v", TensorProto.FLOAT, [2, 3], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]))]
    model = _if_model(then_nodes, else_nodes)
    out = round_trip(model)
    branches = {a.name: a.g for a in out.graph.node[0].attribute}
    then_g, else_g = branches["then_branch"], branches["else_branch"]
    assert ops(then_g) == ["Mul"]
    assert [i.name for g in all_graphs(out.graph) for i in g.initializer] == ["k"]
    assert ops(else_g) == ["Constant"]
    _run_both_branches(model, out)


def test_make_names_unique_renames_names_reused_by_two_if_branches():
    then_nodes = [helper.make_node("Neg", ["x"], ["t"]), helper.make_node("Abs", ["t"], ["t_out"])]
    else_nodes = [helper.make_node("Relu", ["x"], ["t"]), helper.make_node("Exp", ["t"], ["e_out"])]
    model = _if_model(then_nodes, else_nodes)
    graph = import_graph(model)  # import already made the names unique
    assert make_names_unique(graph) == 0
    out = export_graph(graph, model)
    names = [n for g in all_graphs(out.graph) for node in g.node for n in node.output]
    assert len(names) == len(set(names)), names
    assert "t" in names  # one branch keeps its name
    assert [o.name for o in out.graph.output] == ["y"]
    onnx.checker.check_model(out, full_check=True)
    _run_both_branches(model, out)


def test_make_names_unique_keeps_main_graph_names():
    # the If (and its branch's 'h') comes first, but the main graph's 'h' keeps its name
    then_nodes = [helper.make_node("Neg", ["x"], ["h"]), helper.make_node("Abs", ["h"], ["t_out"])]
    else_nodes = [helper.make_node("Identity", ["x"], ["e_out"])]
    then_g = make_branch(then_nodes, [("t_out", np.float32, [2, 3])])
    else_g = make_branch(else_nodes, [("e_out", np.float32, [2, 3])])
    nodes = [helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g),
             helper.make_node("Relu", ["y"], ["h"])]
    model = make_model(nodes, [("x", np.float32, [2, 3]), ("cond", np.bool_, [])],
                       [("h", np.float32, [2, 3])], check=False)  # 'h' in two scopes
    out = round_trip(model)
    assert [o.name for o in out.graph.output] == ["h"]
    assert [n.output[0] for n in out.graph.node if n.op_type == "Relu"] == ["h"]
    _run_both_branches(model, out)


def test_initializer_used_by_both_if_branches_is_stored_once():
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    then_nodes = [helper.make_node("Add", ["x", "W"], ["t_out"])]
    else_nodes = [helper.make_node("Mul", ["x", "W"], ["e_out"])]
    model = _if_model(then_nodes, else_nodes, inits={"W": w})
    out = round_trip(model)
    stored = [i.name for i in all_initializers(out)]
    assert stored.count("W") == 1, stored
    assert "W" in [i.name for i in out.graph.initializer]
    _run_both_branches(model, out)


def test_constant_node_used_by_both_if_branches_is_stored_once():
    then_nodes = [helper.make_node("Add", ["x", "C"], ["t_out"])]
    else_nodes = [helper.make_node("Sub", ["x", "C"], ["e_out"])]
    const = helper.make_node("Constant", [], ["C"], value=helper.make_tensor(
        "v", TensorProto.FLOAT, [3], [1.0, 2.0, 3.0]))
    model = _if_model(then_nodes, else_nodes, extra_nodes=[const])
    out = round_trip(model)
    assert [i.name for i in all_initializers(out)] == ["C"]
    assert ops(out) == ["If"]
    _run_both_branches(model, out)


def test_unsorted_model_exports_sorted_and_runs():
    nodes = [helper.make_node("Relu", ["x"], ["a"]),
             helper.make_node("Mul", ["a", "W"], ["b"]),
             helper.make_node("Add", ["b", "a"], ["c"]),
             helper.make_node("Neg", ["c"], ["y"])]
    model = make_model(nodes, [("x", np.float32, [4])], [("y", np.float32, [4])],
                       {"W": np.full(4, 3.0, np.float32)})
    reversed_model = onnx.ModelProto()
    reversed_model.CopyFrom(model)
    reversed_model.graph.ClearField("node")
    reversed_model.graph.node.extend(reversed(model.graph.node))
    assert not is_topologically_sorted(reversed_model.graph)
    out = round_trip(reversed_model)
    assert is_topologically_sorted(out.graph)
    assert ops(out) == ["Relu", "Mul", "Add", "Neg"]
    assert_same_outputs(model, out)


def test_model_stats_counts():
    then_g = make_branch([helper.make_node("Add", ["x", "B"], ["t_out"])],
                         [("t_out", np.float32, [2, 3])], {"B": np.ones(3, np.float32)})
    else_g = make_branch([helper.make_node("Neg", ["x"], ["n"]), helper.make_node("Abs", ["n"], ["e_out"])],
                         [("e_out", np.float32, [2, 3])])
    nodes = [helper.make_node("Constant", [], ["k"], value=helper.make_tensor(
                 "v", TensorProto.INT64, [2], [2, 3])),
             helper.make_node("Reshape", ["x", "k"], ["xr"]),
             helper.make_node("Relu", ["xr"], ["r"]),
             helper.make_node("Relu", ["r"], ["r2"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g),
             helper.make_node("Add", ["r2", "W"], ["z"])]
    model = make_model(nodes, [("x", np.float32, ["n", 3]), ("cond", np.bool_, [])],
                       [("y", np.float32, [2, 3]), ("z", np.float32, [2, 3])],
                       {"W": np.ones((2, 3), np.float64).astype(np.float32)})
    stats = model_stats(model)
    assert stats.nodes == 6
    assert stats.nodes_total == 6 + 1 + 2
    assert stats.op_counts == {"Add": 1, "Constant": 1, "If": 1, "Relu": 2, "Reshape": 1}
    assert stats.subgraphs == 2
    assert stats.parameters == 2 + 6 + 3  # Constant k, W, branch B
    assert stats.parameter_bytes == 2 * 8 + 6 * 4 + 3 * 4
    assert stats.file_bytes == model.ByteSize()
    assert stats.inputs == [{"name": "x", "dtype": "float32", "shape": ["n", 3]},
                            {"name": "cond", "dtype": "bool", "shape": []}]
    assert stats.outputs[1] == {"name": "z", "dtype": "float32", "shape": [2, 3]}
    d = stats.to_dict()
    assert set(d) == {"nodes", "nodes_total", "op_counts", "subgraphs", "parameters",
                      "parameter_bytes", "file_bytes", "inputs", "outputs"}


def test_initializer_that_is_also_a_graph_input_stays_overridable():
    """An initializer listed as a graph input is a default the caller may override (IR >= 4): the
    round trip keeps the input, and the lossless passes must not fold its default value in."""
    from helpers import run_passes, session
    from onnxopt.passes import LOSSLESS_PIPELINE

    model = make_model([helper.make_node("Neg", ["W"], ["n"]), helper.make_node("Add", ["x", "n"], ["y"])],
                       [("x", np.float32, [3]), ("W", np.float32, [3])], [("y", np.float32, [3])],
                       {"W": np.ones(3, np.float32)})
    assert [i.name for i in round_trip(model).graph.input] == ["x", "W"]
    out, _ = run_passes(model, LOSSLESS_PIPELINE)
    assert [i.name for i in out.graph.input] == ["x", "W"]
    feed = {"x": np.zeros(3, np.float32), "W": np.full(3, 5.0, np.float32)}
    np.testing.assert_array_equal(session(out).run(None, feed)[0], session(model).run(None, feed)[0])
    np.testing.assert_array_equal(session(out).run(None, {"x": feed["x"]})[0], -np.ones(3))


def test_initializers_listed_as_inputs_before_ir_4_are_constants():
    """IR 3 made every initializer a graph input; onnxruntime does not let them be fed, so they
    are weights: folding goes through them, and the result lists its initializers as inputs
    again (the IR 3 checker requires it)."""
    from helpers import run_passes, session
    from onnxopt.passes import LOSSLESS_PIPELINE

    model = make_model([helper.make_node("Neg", ["W"], ["n"]), helper.make_node("Add", ["x", "n"], ["y"])],
                       [("x", np.float32, [3]), ("W", np.float32, [3])], [("y", np.float32, [3])],
                       {"W": np.arange(3, dtype=np.float32)})
    model.ir_version = 3
    del model.opset_import[:]
    model.opset_import.add(domain="", version=9)
    onnx.checker.check_model(model)
    assert [i.name for i in session(model).get_inputs()] == ["x"]  # W is not an input to ORT
    out, _ = run_passes(model, LOSSLESS_PIPELINE)
    assert out.ir_version == 3 and ops(out) == ["Add"]  # Neg(W) folded
    onnx.checker.check_model(out)
    assert {i.name for i in out.graph.initializer} <= {i.name for i in out.graph.input}
    feed = {"x": np.ones(3, np.float32)}
    np.testing.assert_array_equal(session(out).run(None, feed)[0], session(model).run(None, feed)[0])


def test_value_info_naming_a_graph_output_does_not_replace_its_type():
    """Exports sometimes list a graph output in value_info too, with less (no shape): the output
    keeps its own declared type, so the result still passes the checker."""
    from helpers import run_passes
    from onnxopt.passes import LOSSLESS_PIPELINE

    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [("x", np.float32, [1, 4])],
                       [("y", np.float32, [1, 4])])
    model.graph.value_info.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, None))
    onnx.checker.check_model(model, full_check=True)
    for out in (round_trip(model), run_passes(model, LOSSLESS_PIPELINE)[0]):
        onnx.checker.check_model(out, full_check=True)
        assert out.graph.output[0] == model.graph.output[0]


def test_edits_undone_restores_graph_subgraphs_names_and_owner_state():
    """Everything a pass's ``apply`` may do inside the block -- new nodes in the main graph and
    in a branch, a node's inputs and attributes, a Constant's values, a Constant turned into a
    Variable, a rename, names handed out, its own counters -- is undone on leaving it: the
    export is byte-identical and the next fresh name is the one handed out inside."""
    import onnx_graphsurgeon as gs

    from onnxopt.graph import edits_undone
    from onnxopt.names import fresh_name

    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    model = _if_model([helper.make_node("Add", ["x", "W"], ["t_out"])],
                      [helper.make_node("Relu", ["x"], ["e_out"])], inits={"W": w},
                      extra_nodes=[helper.make_node("LeakyRelu", ["x"], ["lx"], alpha=0.1)])
    graph = import_graph(model)
    before = export_graph(graph, model).SerializeToString()
    branch = graph.nodes[-1].attrs["then_branch"]

    class Owner:
        def __init__(self):
            self.count, self.seen, self.by_name = 0, [], {}

    owner = Owner()
    seen = owner.seen
    with edits_undone(graph, [owner]):
        name = fresh_name(graph, "added")
        weight, x = branch.tensors()["W"], graph.tensors()["x"]
        weight.values = -weight.values
        out = gs.Variable(name, np.float32, [2, 3])
        graph.nodes.append(gs.Node("Neg", inputs=[x], outputs=[out]))
        graph.outputs.append(out)
        branch.nodes[0].inputs[0] = out
        leaky = next(n for n in graph.nodes if n.op == "LeakyRelu")
        leaky.attrs["alpha"] = 0.5
        leaky.outputs[0].name = "renamed"
        assert export_graph(graph, model).SerializeToString() != before
        weight.to_variable(np.float32, [2, 3])
        owner.count += 1
        seen.append(out)
        owner.by_name[name] = out
        owner.extra = True
    assert export_graph(graph, model).SerializeToString() == before
    assert isinstance(branch.tensors()["W"], gs.Constant)
    assert (owner.count, owner.seen, owner.by_name) == (0, [], {}) and owner.seen is seen
    assert not hasattr(owner, "extra")
    assert fresh_name(graph, "added") == name


def test_edits_undone_restores_what_owners_hold_beyond_the_graph():
    """A pass may make a tensor before the block (a scaled bias in its plan, or one only a
    closure holds) and link it inside: after the block neither keeps a link to the node made
    inside, and the plan's own attributes are back."""
    import onnx_graphsurgeon as gs

    from onnxopt.graph import edits_undone

    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [("x", np.float32, [2, 3])],
                       [("y", np.float32, [2, 3])])
    graph = import_graph(model)
    before = export_graph(graph, model).SerializeToString()

    class Plan:
        def __init__(self):
            self.bias, self.stored = gs.Constant("bias", np.ones((2, 3), np.float32)), 0

    class Owner:
        def __init__(self):
            self.plans = {"relu": Plan()}

    owner = Owner()
    plan = owner.plans["relu"]
    hidden = gs.Constant("hidden", np.ones((2, 3), np.float32))  # held by no owner
    with edits_undone(graph, [owner]):
        y = graph.outputs[0]
        out = gs.Variable("sum", np.float32, [2, 3])
        graph.nodes.append(gs.Node("Add", inputs=[y, plan.bias], outputs=[out]))
        graph.nodes.append(gs.Node("Mul", inputs=[out, hidden],
                                   outputs=[gs.Variable("z", np.float32, [2, 3])]))
        plan.stored = 24
        plan.bias.name = "renamed"
    assert export_graph(graph, model).SerializeToString() == before
    assert (list(plan.bias.outputs), plan.stored, plan.bias.name) == ([], 0, "bias")
    assert list(hidden.outputs) == []


def _shadowing_model() -> onnx.ModelProto:
    """A Loop carrying the outer initializer ``W`` while its body adds its own initializer
    ``W`` (another value); an If whose branches read the Loop's final ``W`` and their own ``W``
    (ONNX: in a subgraph a name it defines means its own value, as onnxruntime computes)."""
    F = np.float32
    own = helper.make_tensor("W", TensorProto.FLOAT, [4, 4],
                             (np.cos(np.arange(16)) * 0.3).astype(F).ravel().tolist())
    vi = helper.make_tensor_value_info
    body = helper.make_graph(
        [helper.make_node("MatMul", ["h_in", "w_in"], ["hw"]),
         helper.make_node("Add", ["hw", "W"], ["hw2"]),
         helper.make_node("Tanh", ["hw2"], ["h_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])], "body",
        [vi("i", TensorProto.INT64, []), vi("cond_in", TensorProto.BOOL, []),
         vi("h_in", TensorProto.FLOAT, [4, 4]), vi("w_in", TensorProto.FLOAT, [4, 4])],
        [vi("cond_out", TensorProto.BOOL, []), vi("h_out", TensorProto.FLOAT, [4, 4]),
         vi("w_in", TensorProto.FLOAT, [4, 4])], [own])
    then_g = helper.make_graph([helper.make_node("Add", ["w_final", "W"], ["t"])], "then", [],
                               [vi("t", TensorProto.FLOAT, [4, 4])], [own])
    else_g = helper.make_graph([helper.make_node("Sub", ["w_final", "W"], ["e"])], "else", [],
                               [vi("e", TensorProto.FLOAT, [4, 4])], [own])
    nodes = [helper.make_node("Loop", ["n", "", "x", "W"], ["h_final", "w_final"], body=body),
             helper.make_node("If", ["c"], ["z"], then_branch=then_g, else_branch=else_g)]
    return make_model(nodes, [("x", F, [4, 4]), ("n", np.int64, []), ("c", np.bool_, [])],
                      [("h_final", F, [4, 4]), ("z", F, [4, 4])],
                      {"W": (np.sin(np.arange(16)) * 0.5).astype(F).reshape(4, 4)})


def test_a_subgraph_value_named_like_an_outer_one_keeps_its_own_value():
    from helpers import run_passes
    from onnxopt.passes import LOSSLESS_PIPELINE

    model = _shadowing_model()
    feeds = [{"x": np.cos(np.arange(16) + k).astype(np.float32).reshape(4, 4),
              "n": np.array(t, np.int64), "c": np.array(c)}
             for k in (0, 1) for t in (0, 1, 3) for c in (True, False)]
    assert_same_outputs(model, round_trip(model), feeds)
    out, _ = run_passes(model, LOSSLESS_PIPELINE)
    assert_same_outputs(model, out, feeds)


def test_an_initializer_a_sibling_branch_reads_from_outside_is_the_outer_value():
    """The then branch has its own initializer ``W``, the else branch reads the outer ``W``:
    onnxruntime (and onnx's reference evaluator) feed the outer ``W`` to both branches, where it
    takes the place of the then branch's own -- the import must compute the same (a rename
    made the then branch add 100 instead of 1)."""
    from helpers import run_passes
    from onnxopt.passes import LOSSLESS_PIPELINE

    F = np.float32
    vi = helper.make_tensor_value_info
    then_g = helper.make_graph([helper.make_node("Add", ["x", "W"], ["t"])], "then", [],
                               [vi("t", TensorProto.FLOAT, [4])],
                               [helper.make_tensor("W", TensorProto.FLOAT, [4], [100.0] * 4)])
    else_g = helper.make_graph([helper.make_node("Sub", ["x", "W"], ["e"])], "else", [],
                               [vi("e", TensorProto.FLOAT, [4])])
    model = make_model([helper.make_node("If", ["c"], ["y"], then_branch=then_g,
                                         else_branch=else_g)],
                       [("x", F, [4]), ("c", np.bool_, [])], [("y", F, [4])],
                       {"W": np.ones(4, F)})
    feeds = [{"x": np.arange(4, dtype=F) + k, "c": np.array(c)} for k in (0, 1)
             for c in (True, False)]
    assert_same_outputs(model, round_trip(model), feeds)
    out, _ = run_passes(model, LOSSLESS_PIPELINE)
    assert_same_outputs(model, out, feeds)


@pytest.mark.parametrize("reads_it", [False, True])
def test_an_overridden_branch_initializer_the_branch_returns_is_its_own_value(reads_it):
    """As above, but the then branch also returns its own ``W`` (and, with ``reads_it``, adds
    it in a node as well): onnxruntime returns the branch's own ``W`` for the output and feeds
    the outer one to the node -- the import dropped the initializer, leaving the output
    undefined (breaker's find)."""
    from helpers import run_passes
    from onnxopt.passes import LOSSLESS_PIPELINE

    F = np.float32
    vi = helper.make_tensor_value_info
    nodes = [helper.make_node("Add", ["x", "W"], ["t"])] if reads_it else []
    then_g = helper.make_graph(nodes, "then", [],
                               [vi("W", TensorProto.FLOAT, [4])]
                               + ([vi("t", TensorProto.FLOAT, [4])] if reads_it else []),
                               [helper.make_tensor("W", TensorProto.FLOAT, [4], [100.0] * 4)])
    else_nodes = [helper.make_node("Sub", ["x", "W"], ["e"])]
    else_outputs = [vi("e", TensorProto.FLOAT, [4])]
    if reads_it:
        else_nodes.append(helper.make_node("Neg", ["x"], ["e2"]))
        else_outputs.append(vi("e2", TensorProto.FLOAT, [4]))
    else_g = helper.make_graph(else_nodes, "else", [], else_outputs)
    outputs = [("y", F, [4])] + ([("y2", F, [4])] if reads_it else [])
    model = make_model([helper.make_node("If", ["c"], [o[0] for o in outputs],
                                         then_branch=then_g, else_branch=else_g)],
                       [("x", F, [4]), ("c", np.bool_, [])], outputs, {"W": np.ones(4, F)})
    feeds = [{"x": np.arange(4, dtype=F) + k, "c": np.array(c)} for k in (0, 1)
             for c in (True, False)]
    expected = session(model).run(None, feeds[0])
    assert expected[0].tolist() == [100.0] * 4  # the branch's own W for the output
    if reads_it:
        assert expected[1].tolist() == [1.0, 2.0, 3.0, 4.0]  # x + outer W for the node
    assert_same_outputs(model, round_trip(model), feeds)
    out, _ = run_passes(model, LOSSLESS_PIPELINE)
    assert_same_outputs(model, out, feeds)
