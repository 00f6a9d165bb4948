"""Test utilities: build small models with ``onnx.helper``, run them on onnxruntime, make random
feeds, run passes, and compare an optimized model with its original on onnxruntime."""

from __future__ import annotations

import os
from typing import Iterable, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from onnxopt.graph import export_graph, import_graph
from onnxopt.pass_manager import Pass, PassContext, PassManager, PassRecord, get_pass

OPSET = 17
IR_VERSION = 8

ValueSpec = tuple  # (name, dtype, shape): dtype a numpy dtype or an onnx TensorProto enum


def value_info(spec) -> onnx.ValueInfoProto:
    """A ValueInfoProto from ``(name, dtype, shape)`` (shape None: unknown rank), or as is."""
    if isinstance(spec, onnx.ValueInfoProto):
        return spec
    name, dtype, shape = spec
    elem = dtype if isinstance(dtype, int) else onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    return helper.make_tensor_value_info(name, elem, shape)


def make_model(nodes: Sequence[onnx.NodeProto], inputs: Iterable, outputs: Iterable,
               initializers: Mapping[str, np.ndarray] | Iterable[onnx.TensorProto] = (),
               opset: int = OPSET, check: bool = True, **graph_kwargs) -> onnx.ModelProto:
    """A model of one graph. ``inputs``/``outputs`` are ``(name, dtype, shape)`` or ValueInfoProtos;
    ``initializers`` a ``{name: array}`` or TensorProtos. Checked with the ONNX checker unless
    ``check`` is False (for deliberately odd models)."""
    if isinstance(initializers, Mapping):
        inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in initializers.items()]
    else:
        inits = list(initializers)
    graph = helper.make_graph(list(nodes), "test", [value_info(i) for i in inputs],
                              [value_info(o) for o in outputs], inits, **graph_kwargs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="onnxopt-tests")
    model.ir_version = IR_VERSION
    if check:
        onnx.checker.check_model(model, full_check=True)
    return model


def make_branch(nodes, outputs, initializers=(), name="branch") -> onnx.GraphProto:
    """A subgraph (If branch) with no inputs."""
    if isinstance(initializers, Mapping):
        initializers = [numpy_helper.from_array(np.asarray(v), k) for k, v in initializers.items()]
    return helper.make_graph(list(nodes), name, [], [value_info(o) for o in outputs],
                             list(initializers))


def session(model: onnx.ModelProto, optimize: bool = False,
            path=None) -> ort.InferenceSession:
    """An onnxruntime CPU session of ``model``: graph optimizations off unless ``optimize``;
    ``path``: where onnxruntime saves the model it optimized (to read its fusions)."""
    opts = ort.SessionOptions()
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if path is not None:
        opts.optimized_model_filepath = str(path)
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def run_ort(model: onnx.ModelProto, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs of ``model`` on onnxruntime CPU (graph optimizations off), by output name."""
    sess = session(model)
    names = [i.name for i in sess.get_inputs()]
    outs = sess.run(None, {n: feed[n] for n in names})
    return dict(zip([o.name for o in sess.get_outputs()], outs))


def random_feed(model: onnx.ModelProto, seed: int = 0, dim: int = 2) -> dict[str, np.ndarray]:
    """Normal floats, integers in [0, 5), random booleans; dynamic dims take ``dim``."""
    rng = np.random.default_rng(seed)
    inits = {i.name for i in model.graph.initializer}
    feed = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        shape = [d.dim_value if d.HasField("dim_value") else dim for d in tt.shape.dim]
        if dtype.kind == "f":
            feed[inp.name] = rng.normal(size=shape).astype(dtype)
        elif dtype.kind == "b":
            feed[inp.name] = rng.random(shape) < 0.5
        else:
            feed[inp.name] = rng.integers(0, 5, size=shape).astype(dtype)
    return feed


def output_names(model: onnx.ModelProto) -> list[str]:
    return [o.name for o in model.graph.output]


def assert_same_outputs(original: onnx.ModelProto, optimized: onnx.ModelProto,
                        feeds: Sequence[Mapping[str, np.ndarray]] | None = None,
                        rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Same output names, order, dtypes, shapes and values (within rtol/atol) on onnxruntime."""
    assert output_names(optimized) == output_names(original)
    for feed in feeds or [random_feed(original, seed) for seed in (0, 1)]:
        ref, got = run_ort(original, feed), run_ort(optimized, feed)
        assert list(got) == list(ref)
        for name in ref:
            assert got[name].dtype == ref[name].dtype, name
            assert got[name].shape == ref[name].shape, name
            np.testing.assert_allclose(got[name], ref[name], rtol=rtol, atol=atol, err_msg=name)


def run_passes(model: onnx.ModelProto, names: Sequence[str] | Sequence[Pass],
               ctx: PassContext | None = None, *, verify_each: bool = True,
               max_iterations: int = 10) -> tuple[onnx.ModelProto, list[PassRecord]]:
    """Import ``model``, run the passes (names or instances) to a fixed point with verification
    after each, export. Returns the optimized model and the pass records."""
    graph = import_graph(model)
    ctx = ctx or PassContext(template=model)
    if ctx.template is None:
        ctx.template = model
    passes = [get_pass(n) if isinstance(n, str) else n for n in names]
    records = PassManager(passes, verify_each=verify_each, max_iterations=max_iterations).run(graph, ctx)
    out = export_graph(graph, model)
    onnx.checker.check_model(out, full_check=True)
    return out, records


def run_pass(graph, p: str | Pass, model: onnx.ModelProto, ctx: PassContext | None = None):
    """Run pass ``p`` (a name or instance) once on an imported ``graph`` through the pass
    manager; returns its PassRecord (``modified``, ``stats``, ``warnings``)."""
    ctx = ctx or PassContext(template=model)
    return PassManager([]).run_pass(get_pass(p) if isinstance(p, str) else p, graph, ctx)


def run_once(model: onnx.ModelProto, name: str | Pass, ctx: PassContext | None = None):
    """Run one pass once through the pass manager (a lossy pass's proposals go to
    ``ctx.budget``, or are all accepted); returns (exported model, PassRecord)."""
    graph = import_graph(model)
    ctx = ctx or PassContext(template=model)
    if ctx.template is None:
        ctx.template = model
    record = PassManager([]).run_pass(get_pass(name) if isinstance(name, str) else name,
                                      graph, ctx)
    return export_graph(graph, model), record


def ops(model_or_graph) -> list[str]:
    graph = model_or_graph.graph if isinstance(model_or_graph, onnx.ModelProto) else model_or_graph
    return [n.op_type for n in graph.node]


def initializers(graph_or_model) -> dict[str, np.ndarray]:
    graph = graph_or_model.graph if isinstance(graph_or_model, onnx.ModelProto) else graph_or_model
    return {i.name: numpy_helper.to_array(i) for i in graph.initializer}


def all_graphs(graph: onnx.GraphProto):
    """``graph`` and its subgraphs, depth first."""
    from onnxopt.graph import graph_protos

    return graph_protos(graph)


def all_initializers(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [i for g in all_graphs(model.graph) for i in g.initializer]


def is_topologically_sorted(graph: onnx.GraphProto, outer: set[str] = frozenset()) -> bool:
    """Every node input is a graph input, an initializer, an outer-scope name or an earlier output."""
    known = set(outer) | {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    for node in graph.node:
        if any(name not in known for name in node.input):
            return False
        for attr in node.attribute:
            subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            if any(not is_topologically_sorted(g, known) for g in subs):
                return False
        known.update(node.output)
    return True


# ----------------------------------------------------------------------------- generated graphs

_BINARY = ("Add", "Sub", "Mul", "Max", "Min")
_UNARY = ("Relu", "Neg", "Abs", "Identity", "Sigmoid", "Tanh", "Floor", "Dropout")
_CONST_SHAPES = ((), (1,), (3,), (1, 3), (2, 3))


def _const_value(shape: tuple, variant: int) -> np.ndarray:
    """A constant determined by (shape, variant): equal variants give byte-equal initializers."""
    rng = np.random.default_rng(1000 * variant + len(shape) * 10 + sum(shape))
    return rng.integers(-3, 4, size=shape).astype(np.float32) / 2


def random_models():
    """Hypothesis strategy: models of elementwise and shape ops on an input ``x`` [2, 3], with
    constants that often repeat (same bytes, other names), constant-only subexpressions, Shape of
    static tensors, duplicated nodes and Identity/Dropout; 1 to 3 outputs."""
    from hypothesis import strategies as st

    @st.composite
    def build(draw):
        nodes, inits = [], {}
        pool = [("x", (2, 3))]  # (tensor name, shape)
        counter = iter(range(10_000))

        def fresh(prefix="t"):
            return f"{prefix}{next(counter)}"

        def constant():
            shape = draw(st.sampled_from(_CONST_SHAPES))
            name = fresh("c")
            inits[name] = _const_value(shape, draw(st.integers(0, 2)))
            return name, shape

        def operand():
            if draw(st.booleans()):
                return draw(st.sampled_from(pool))
            return constant()

        produced = []
        for _ in range(draw(st.integers(1, 10))):
            kind = draw(st.sampled_from(["binary", "binary", "unary", "const", "dup", "shape",
                                         "transpose"]))
            out = fresh()
            if kind == "binary" or kind == "const":
                a = operand() if kind == "binary" else constant()
                b = operand() if kind == "binary" else constant()
                op = draw(st.sampled_from(_BINARY))
                nodes.append(helper.make_node(op, [a[0], b[0]], [out]))
                shape = tuple(np.broadcast_shapes(a[1], b[1]))
            elif kind == "unary":
                a = draw(st.sampled_from(pool))
                op = draw(st.sampled_from(_UNARY))
                nodes.append(helper.make_node(op, [a[0]], [out]))
                shape = a[1]
            elif kind == "dup":
                shapes = dict(produced)
                candidates = [n for n in nodes if n.output[0] in shapes]
                if not candidates:
                    continue
                src = draw(st.sampled_from(candidates))
                copy = onnx.NodeProto()
                copy.CopyFrom(src)
                del copy.output[:]
                copy.output.append(out)
                nodes.append(copy)
                shape = shapes[src.output[0]]
            elif kind == "shape":
                a = draw(st.sampled_from(pool))
                s = fresh("s")
                if draw(st.booleans()):
                    nodes += [helper.make_node("Shape", [a[0]], [s]),
                              helper.make_node("Reshape", [a[0], s], [out])]
                    shape = a[1]
                else:
                    nodes += [helper.make_node("Shape", ["x"], [s]),
                              helper.make_node("Expand", [a[0], s], [out])]
                    shape = (2, 3)
            else:  # transpose
                a = draw(st.sampled_from([p for p in pool if len(p[1]) == 2] or [pool[0]]))
                mid = fresh()
                nodes += [helper.make_node("Transpose", [a[0]], [mid], perm=[1, 0]),
                          helper.make_node("Transpose", [mid], [out], perm=[1, 0])]
                shape = a[1]
            pool.append((out, shape))
            produced.append((out, shape))
        if not produced:
            nodes.append(helper.make_node("Relu", ["x"], ["t_relu"]))
            produced.append(("t_relu", (2, 3)))
        outputs = draw(st.lists(st.sampled_from(produced), min_size=1, max_size=3, unique=True))
        return make_model(nodes, [("x", np.float32, [2, 3])],
                          [(n, np.float32, list(s)) for n, s in outputs], inits)

    return build()


def zoo_files(name: str) -> tuple[str, str]:
    """Paths of a fetched real model and of its validation inputs; skips the test when they are
    not fetched (tests/conftest.py turns that skip into a failure under ONNXOPT_REQUIRE_ZOO=1)."""
    import pytest

    from tools import zoo

    onnx_file = zoo.model_path(zoo.DEFAULT_DEST, name)
    npz_file = zoo.inputs_path(zoo.DEFAULT_DEST, name)
    if not onnx_file.is_file() or not npz_file.is_file():
        pytest.skip(f"{onnx_file} not fetched (tools/fetch_models.py)")
    return str(onnx_file), str(npz_file)


def with_and_without(name: str, pass_name: str, verify_each: bool = False,
                     also_without: Sequence[str] = (), pipeline: Sequence[str] | None = None):
    """The default pipeline on the fetched real model ``name``, without ``pass_name`` and with
    it: ``((model, report) without, (model, report) with)``; the run with it must validate.
    ``also_without``: passes left out of both runs; ``pipeline``: these passes instead of the
    default pipeline. Skips as :func:`zoo_files` does."""
    import onnxopt
    from onnxopt.passes import LOSSLESS_PIPELINE

    onnx_file, npz_file = zoo_files(name)
    base = [p for p in (LOSSLESS_PIPELINE if pipeline is None else pipeline)
            if p not in also_without]
    without = onnxopt.optimize(onnx_file, inputs=npz_file,
                                 passes=[p for p in base if p != pass_name])
    with_pass = onnxopt.optimize(onnx_file, inputs=npz_file, passes=base,
                                   verify_each=verify_each)
    assert with_pass[1].validation.passed, with_pass[1].validation.reason
    return without, with_pass


def initializer_as_input(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """Also list initializer ``name`` as a graph input (an overridable default)."""
    init = next(i for i in model.graph.initializer if i.name == name)
    model.graph.input.append(helper.make_tensor_value_info(name, init.data_type, init.dims))
    return model


def initializer_as_variable(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """Make initializer ``name`` a plain graph input (no initializer)."""
    initializer_as_input(model, name)
    keep = [i for i in model.graph.initializer if i.name != name]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return model


def with_initializers(model: onnx.ModelProto, values: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers named in ``values`` hold those arrays."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        if init.name in values:
            init.CopyFrom(numpy_helper.from_array(values[init.name], init.name))
    return out


_LOADS = """
import sys, onnxruntime as ort
options = ort.SessionOptions()
options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
"""


def loads_optimized(model: onnx.ModelProto, folder) -> int:
    """The exit code of a child process that loads ``model`` in onnxruntime's default session
    (graph optimizations on): 0 when it loads; a crash of onnxruntime kills only the child."""
    import subprocess
    import sys

    path = os.path.join(str(folder), "loads_optimized.onnx")
    onnx.save(model, path)
    return subprocess.run([sys.executable, "-c", _LOADS, path]).returncode
