"""Validation inputs: read them from ``.npz`` files or synthesize them from the declared types.

Synthesis (all from one ``numpy.random.default_rng(seed)``):

* the shape is the declared one; dynamic dims take the value given with ``--input-shape
  name:1x3x224x224``, else :data:`DEFAULT_DIM` (1), as Polygraphy does; an input larger than
  :data:`MAX_SYNTHESIZED_BYTES` (1 GiB) is refused with the dims to fix;
* floats (float16/32/64) are uniform in [0, 1), complex values too in both parts; booleans are
  random;
* integers (every width, signed or not) are uniform in [0, 10), except indices: an input whose
  values reach (through Cast, Reshape, Squeeze, Concat, ...) the indices of a Gather,
  GatherElements or GatherND stays in [0, size) of the indexed axis whenever that size is known
  (an initializer, a Constant, or the :class:`~onnxopt.analyses.TensorTypes` analysis run with
  the graph inputs at their synthesized shapes). Uses inside If/Loop bodies count, read through
  outer scope or as Loop-carried values;
* strings, bfloat16 and the float8/int4 family (no numpy dtype onnxruntime's Python API takes)
  and non-tensor inputs (sequence, optional, map) are refused.

:func:`input_warnings` names the inputs whose synthesized values are likely meaningless: those that
decide an If condition or a Loop, and integer scalars compared with a constant (a sample rate, a
mode). :func:`check_feeds` checks given feeds against the model's declared inputs.

Reads are followed on the model imported by :func:`onnxopt.graph.import_graph`, through
onnx-graphsurgeon's links (:func:`onnxopt.edit.input_slots`; subgraph readers of outer-scope
values included). Messages name inputs and nodes as the model does: the import renames only
subgraph tensors whose names clash, never graph inputs or nodes. A model onnxopt cannot import
(optional or map graph inputs or outputs) gets neither index ranges nor the warnings about
settings.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.analyses import TensorTypes
from onnxopt.edit import input_slots
from onnxopt.errors import InputError, UsageError
from onnxopt.graph import import_graph
from onnxopt.ops import is_default_domain

#: Value of a dynamic dimension that no ``--input-shape`` fixes.
DEFAULT_DIM = 1
#: Largest synthesized input, in bytes.
MAX_SYNTHESIZED_BYTES = 1 << 30
#: Ops whose first input's values reach their output (indices and settings are traced through).
_PASS_THROUGH = {"Cast", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Identity", "Expand",
                 "Transpose", "Slice", "Tile", "Gather"}
_INDEXING = {"Gather", "GatherElements", "GatherND"}
_COMPARISONS = {"Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual"}
_LOGICAL = {"Not", "And", "Or", "Xor"}
_KINDS = {"sequence_type": "a sequence", "optional_type": "an optional", "map_type": "a map",
          "sparse_tensor_type": "a sparse tensor", None: "untyped"}


def parse_input_shapes(specs: list[str] | None) -> dict[str, list[int]]:
    """Parse ``["name:1x3x224x224", "scalar:"]`` into ``{"name": [1, 3, 224, 224], "scalar": []}``.

    Dims may also be written as onnxsim's ``--overwrite-input-shape`` takes them
    (``name:1,3,224,224``) and as Polygraphy's ``--input-shapes`` does (``name:[1,3,224,224]``).

    Raises:
        UsageError: a spec is not ``NAME:DxDx...`` (or one of the other two) with non-negative
            integer dims.
    """
    shapes = {}
    for spec in specs or []:
        name, sep, dims = spec.rpartition(":")
        if dims.startswith("[") and dims.endswith("]"):
            dims = dims[1:-1]
        if not sep or not name or not re.fullmatch(r"(\d+(x\d+)*|\d+(,\d+)*)?", dims):
            raise UsageError(f"--input-shape '{spec}': expected NAME:DxDx... such as "
                             "x:1x3x224x224 (or x:1,3,224,224 or x:[1,3,224,224])")
        shapes[name] = [int(d) for d in re.split("[x,]", dims)] if dims else []
    return shapes


def feed_files(path: str | Path) -> list[Path]:
    """The ``.npz`` file ``path``, or the ``.npz`` files of the folder ``path`` sorted by name.

    Raises:
        InputError: the path is missing, or is a folder without ``.npz`` files.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    files = sorted(path.glob("*.npz")) if path.is_dir() else [path]
    if not files:
        raise InputError(f"{path}: folder holds no .npz file")
    return files


def load_feed(file: str | Path) -> dict[str, np.ndarray]:
    """One feed, ``{input name: array}``, from an ``.npz`` archive (pickled objects refused).

    Raises:
        InputError: the file is not a readable ``.npz`` archive.
    """
    try:
        data = np.load(file, allow_pickle=False)
    except (OSError, ValueError):
        raise InputError(f"{file}: not an .npz archive (save feeds with "
                         "numpy.savez(path, input_name=array, ...))") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise InputError(f"{file}: a single array, not an .npz archive of named inputs "
                         "(save with numpy.savez(path, name=array, ...))")
    with data:
        try:
            return {k: data[k] for k in data.files}
        except (OSError, ValueError) as err:
            raise InputError(f"{file}: not a readable .npz file ({err})") from None


def load_feeds(path: str | Path) -> list[dict[str, np.ndarray]]:
    """Read one feed from an ``.npz`` file, or one per ``.npz`` file of a folder (sorted by name).

    Raises:
        InputError: see :func:`feed_files` and :func:`load_feed`.
    """
    return [load_feed(f) for f in feed_files(path)]


def _feedable_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs a feed must give (those with an initializer have a default)."""
    initializers = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def _declared_dims(tt: onnx.TypeProto.Tensor) -> list[int | str | None] | None:
    """Dims as ints (static), dim_param strings or None (anonymous, or negative as some exporters
    write dynamic dims: PaddleOCR's -1); None when the rank is unknown."""
    if not tt.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else (d.dim_param or None)
            for d in tt.shape.dim]


def _numpy_dtype(inp: onnx.ValueInfoProto) -> np.dtype:
    """The numpy dtype of a tensor input.

    Raises:
        InputError: no element type, or one onnxruntime's Python API cannot take (bfloat16,
            float8, int4, ...: ml_dtypes types numpy does not know natively).
    """
    elem = inp.type.tensor_type.elem_type
    if elem == onnx.TensorProto.UNDEFINED:
        raise InputError(f"input '{inp.name}' declares no element type; pass it with --inputs")
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem))
    if dtype.kind == "V":
        raise InputError(f"input '{inp.name}' is {onnx.TensorProto.DataType.Name(elem)}, which "
                         "numpy has no native dtype for and onnxruntime's Python API cannot take: "
                         "this model cannot be validated here (use --no-validate)")
    return dtype


def _imported(model: onnx.ModelProto) -> gs.Graph | None:
    """``model`` as the graph the analyses read; None when onnxopt cannot import it (optional
    or map graph inputs or outputs: :func:`import_graph`'s InputError)."""
    try:
        return import_graph(model)
    except InputError:
        return None


def _reach(start: gs.Tensor, through: frozenset[str] = frozenset()
           ) -> Iterator[tuple[gs.Node, int]]:
    """Yield ``(node, index)`` for every read of ``start``'s values, in any scope: ``node`` reads
    them as its input ``index``, directly, through the first input of :data:`_PASS_THROUGH` ops,
    any input of Concat and of the ops in ``through``, and as Loop-carried values in the body."""
    frontier, seen = [start], set()
    while frontier:
        t = frontier.pop()
        if id(t) in seen or t.is_empty():
            continue
        seen.add(id(t))
        for node, index in input_slots(t):
            yield node, index
            if not is_default_domain(node):
                continue
            if (node.op in _PASS_THROUGH and index == 0) or node.op == "Concat" \
                    or node.op in through:
                frontier.extend(node.outputs)
            elif node.op == "Loop" and index >= 2:
                # Loop inputs (M, cond, v...) bind to body inputs (iteration, cond, v...)
                body = node.attrs.get("body")
                if isinstance(body, gs.Graph) and index < len(body.inputs):
                    frontier.append(body.inputs[index])


def _label(node: gs.Node) -> str:
    return f"{node.op} '{node.name}'" if node.name else f"an unnamed {node.op} node"


def _indexed_size(node: gs.Node, types: TensorTypes) -> int | None:
    """Size of the axis (smallest of the axes, for GatherND) that ``node``'s indices select in."""
    data = types.shape(node.inputs[0])
    if data is None:
        return None
    if node.op == "GatherND":
        batch = node.attrs.get("batch_dims", 0)
        indices = types.shape(node.inputs[1])
        depth = indices[-1] if indices and indices[-1] is not None else len(data) - batch
        dims = data[batch:batch + depth]
        return min(dims) if dims and None not in dims else None
    axis = node.attrs.get("axis", 0)
    return data[axis] if -len(data) <= axis < len(data) else None


def _index_bounds(model: onnx.ModelProto, names: list[str],
                  shapes: dict[str, list[int]]) -> dict[str, int]:
    """For the inputs ``names`` used as Gather/GatherElements/GatherND indices: the smallest size
    of an axis they index (see :func:`_indexed_size`), where known, with the inputs at
    ``shapes``."""
    graph = _imported(model)
    if graph is None:
        return {}
    inputs = {t.name: t for t in graph.inputs}
    for name, shape in shapes.items():
        inputs[name].shape = list(shape)  # inference starts from the synthesized shapes
    types = TensorTypes(graph, model)
    bounds: dict[str, int] = {}
    for name in names:
        for node, index in _reach(inputs[name]):
            if node.op in _INDEXING and is_default_domain(node) and index == 1:
                size = _indexed_size(node, types)
                if size is not None:
                    bounds[name] = min(bounds.get(name, size), size)
    return bounds


def _synthesized_shape(inp: onnx.ValueInfoProto, shapes: dict[str, list[int]]) -> list[int]:
    """The shape to synthesize: ``shapes[name]``, else the declared one with DEFAULT_DIM for
    dynamic dims (a scalar when the rank is unknown).

    Raises:
        UsageError: ``shapes[name]`` has another rank than the declared one.
        InputError: the input would exceed :data:`MAX_SYNTHESIZED_BYTES`.
    """
    declared = _declared_dims(inp.type.tensor_type)
    if inp.name in shapes:
        shape = list(shapes[inp.name])
        if declared is not None and len(shape) != len(declared):
            raise UsageError(f"--input-shape {inp.name}: rank {len(shape)}, but the model "
                             f"declares rank {len(declared)}")
        for axis, (given, fixed) in enumerate(zip(shape, declared or [])):
            if isinstance(fixed, int) and given != fixed:
                raise UsageError(f"--input-shape {inp.name}: dim {axis} is {given}, but the "
                                 f"model fixes it to {fixed}")
    else:
        shape = [d if isinstance(d, int) else DEFAULT_DIM for d in declared or []]
    _check_size(inp.name, _numpy_dtype(inp).itemsize, shape, declared)
    return shape


def _check_size(name: str, itemsize: int, shape: list[int],
                declared: list[int | str | None] | None) -> None:
    """Refuse a synthesized input over MAX_SYNTHESIZED_BYTES, naming the dynamic dims to shrink
    and a ``--input-shape`` that fits (dynamic dims capped at the largest power of two that
    does)."""
    nbytes = math.prod(shape) * itemsize
    if nbytes <= MAX_SYNTHESIZED_BYTES:
        return
    size = f"input '{name}' would be {nbytes / 2**30:.1f} GiB with shape {shape}"
    limit = f"synthesized inputs are limited to {MAX_SYNTHESIZED_BYTES / 2**30:g} GiB"
    dynamic = list(range(len(shape))) if declared is None else \
        [i for i, d in enumerate(declared) if not isinstance(d, int)]
    if not dynamic:
        raise InputError(f"{size}, all static ({limit}): give real inputs with --inputs")
    for cap in (1 << p for p in range(62, -1, -1)):
        fitting = [min(d, cap) if i in dynamic else d for i, d in enumerate(shape)]
        if math.prod(fitting) * itemsize <= MAX_SYNTHESIZED_BYTES:
            break
    else:
        raise InputError(f"{size}, and its static dims alone exceed the limit ({limit}): "
                         "give real inputs with --inputs")
    named = [f"{i}" + (f" ('{declared[i]}')" if declared and declared[i] else "") for i in dynamic]
    what = named[0] if len(named) == 1 else f"{', '.join(named[:-1])} and {named[-1]}"
    many = len(dynamic) > 1
    raise InputError(f"{size} ({limit}): dim{'s' if many else ''} {what} "
                     f"{'are' if many else 'is'} dynamic; set {'them' if many else 'it'} with "
                     f"--input-shape {name}:{'x'.join(map(str, fitting))}")


def synthesize_feed(model: onnx.ModelProto, shapes: dict[str, list[int]] | None = None,
                    seed: int = 0) -> dict[str, np.ndarray]:
    """Make one input feed for ``model`` from its declared input types (see the module docstring).

    Args:
        model: the model (its initializers that are also listed as inputs are skipped).
        shapes: concrete shapes by input name, overriding the declared ones.
        seed: seed of the random generator.

    Returns:
        ``{input name: array}`` for every graph input, arrays of the declared dtype and rank.

    Raises:
        InputError: an input is not a tensor, has a dtype that cannot be synthesized (string,
            bfloat16, float8, int4, ...), or would exceed :data:`MAX_SYNTHESIZED_BYTES`.
        UsageError: a shape in ``shapes`` names no input or has the wrong rank.
    """
    shapes = dict(shapes or {})
    inputs = _feedable_inputs(model)
    names = {i.name for i in inputs}
    for name in shapes:
        if name not in names:
            raise UsageError(f"--input-shape names '{name}', which is not a model input "
                             f"(inputs: {', '.join(sorted(names))})")
    dtypes, concrete = {}, {}
    for inp in inputs:
        kind = inp.type.WhichOneof("value")
        if kind != "tensor_type":
            raise InputError(f"input '{inp.name}' is {_KINDS.get(kind, kind)}, not a tensor, and "
                             "cannot be synthesized; pass it with --inputs")
        dtypes[inp.name] = dtype = _numpy_dtype(inp)
        if dtype.kind in "OSU":
            raise InputError(f"input '{inp.name}' holds strings, which cannot be synthesized; "
                             "pass it with --inputs")
        concrete[inp.name] = _synthesized_shape(inp, shapes)
    integers = [name for name, dtype in dtypes.items() if dtype.kind in "iu"]
    bounds = _index_bounds(model, integers, concrete) if integers else {}
    rng = np.random.default_rng(seed)
    feed = {}
    for name, dtype in dtypes.items():
        shape = concrete[name]
        if dtype.kind == "f":
            value = rng.random(shape).astype(dtype)
        elif dtype.kind == "c":
            value = (rng.random(shape) + 1j * rng.random(shape)).astype(dtype)
        elif dtype.kind == "b":
            value = rng.random(shape) < 0.5
        else:
            high = min(bounds.get(name, 10), int(np.iinfo(dtype).max) + 1)
            value = rng.integers(0, max(high, 1), size=shape).astype(dtype)
        feed[name] = np.asarray(value)
    return feed


def _constant_text(tensor: gs.Constant) -> str:
    if math.prod(tensor.shape) > 4:
        return "a constant"
    value = np.asarray(tensor.values).ravel().tolist()
    return str(value[0] if len(value) == 1 else value)


def input_warnings(model: onnx.ModelProto, shapes: dict[str, list[int]] | None = None) -> list[str]:
    """Warnings about inputs whose synthesized values are likely meaningless.

    * An input whose values decide an If condition or a Loop's trip count or condition (directly,
      or through Cast, Reshape, comparisons, Not/And/Or/Xor, ...).
    * An integer scalar (or ``[1]``) input compared (Equal, Greater, Less, ...) with a constant:
      a setting such as a sample rate, which random values in [0, 10) do not hit.
    * An input with dynamic dims, without ``--input-shape``: they are set to ``DEFAULT_DIM`` (a
      1x1 image can make every output constant and the comparison meaningless).
    * An input that declares no shape, without ``--input-shape``: synthesized as a scalar.

    Each warning names the input and recommends ``--inputs``; inputs that cannot be synthesized
    at all are :func:`synthesize_feed`'s errors, not warnings.
    """
    shapes = shapes or {}
    graph = _imported(model)
    tensors = {t.name: t for t in graph.inputs} if graph is not None else {}
    warnings = []
    for inp in _feedable_inputs(model):
        if inp.type.WhichOneof("value") != "tensor_type":
            continue
        reasons = []
        start = tensors.get(inp.name)
        deciding = () if start is None else _reach(start, frozenset(_COMPARISONS | _LOGICAL))
        for node, index in deciding:
            if node.op == "If" and index == 0:
                reasons.append(f"decides the condition of {_label(node)}")
            elif node.op == "Loop" and index < 2:
                reasons.append(f"sets the trip count or condition of {_label(node)}")
        tt = inp.type.tensor_type
        declared = _declared_dims(tt)
        scalar = declared is not None and declared in ([], [1])
        if scalar and start is not None \
                and tt.elem_type in (onnx.TensorProto.INT32, onnx.TensorProto.INT64):
            for node, index in _reach(start):
                if node.op in _COMPARISONS and is_default_domain(node):
                    other = [x for i, x in enumerate(node.inputs)
                             if i != index and isinstance(x, gs.Constant)]
                    if other:
                        reasons.append(f"is compared with {_constant_text(other[0])} by "
                                       f"{_label(node)}")
        if reasons:
            warnings.append(f"input '{inp.name}' looks like a setting, not data "
                            f"({'; '.join(dict.fromkeys(reasons))}): a synthesized value is "
                            "arbitrary and may take the wrong branch or fail; give real values "
                            "with --inputs")
        defaulted = [f"{axis}" + (f" ('{d}')" if isinstance(d, str) else "")
                     for axis, d in enumerate(declared or []) if not isinstance(d, int)]
        if defaulted and inp.name not in shapes:
            warnings.append(f"input '{inp.name}': dynamic dim(s) {', '.join(defaulted)} set to "
                            f"{DEFAULT_DIM}; if that is not a size the model is meant for, set "
                            f"real sizes with --input-shape {inp.name}:DxD... or give --inputs")
        if declared is None and inp.name not in shapes:
            warnings.append(f"input '{inp.name}' declares no shape and is synthesized as a "
                            f"scalar; set its shape with --input-shape {inp.name}:DxD...")
    return warnings


def check_feeds(model: onnx.ModelProto, feeds: list[dict], labels: list[str] | None = None
                ) -> list[str]:
    """Check that every feed gives every input of ``model`` with its declared dtype, rank and
    static dims.

    Args:
        feeds: ``{input name: array}`` each; values of non-tensor inputs are not checked.
        labels: how to name each feed in messages (its file); default ``feed 0``, ``feed 1``, ...

    Returns:
        Warnings for keys that name no input, or an initializer (both are ignored).

    Raises:
        InputError: a feed lacks an input, or one has the wrong dtype, rank or static dim; the
            message names the feed and the input.
    """
    inputs = _feedable_inputs(model)
    names = {i.name for i in inputs}
    initializers = {i.name for i in model.graph.initializer}
    warnings = []
    for i, feed in enumerate(feeds):
        label = labels[i] if labels else f"feed {i}"
        for inp in inputs:
            if inp.name not in feed:
                raise InputError(f"{label}: no value for input '{inp.name}' "
                                 f"(the feed has {', '.join(map(repr, feed)) or 'no key'})")
            if inp.type.WhichOneof("value") != "tensor_type":
                continue
            value = np.asarray(feed[inp.name])
            elem = inp.type.tensor_type.elem_type
            expected = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem)) if elem else None
            if expected is not None and expected.kind != "V" and not (
                    value.dtype == expected or value.dtype.kind in "SU" and expected.kind == "O"):
                raise InputError(f"{label}: input '{inp.name}' is {value.dtype}, but the model "
                                 f"declares {onnx.TensorProto.DataType.Name(elem).lower()}")
            declared = _declared_dims(inp.type.tensor_type)
            if declared is None:
                continue
            if value.ndim != len(declared):
                raise InputError(f"{label}: input '{inp.name}' has rank {value.ndim} (shape "
                                 f"{list(value.shape)}), but the model declares rank "
                                 f"{len(declared)} ({declared})")
            for axis, (got, want) in enumerate(zip(value.shape, declared)):
                if isinstance(want, int) and got != want:
                    raise InputError(f"{label}: input '{inp.name}' has shape {list(value.shape)}, "
                                     f"but the model declares dim {axis} = {want}")
        for key in feed:
            if key in initializers:
                warnings.append(f"{label}: '{key}' names an initializer, which validation does "
                                "not override; ignored")
            elif key not in names:
                warnings.append(f"{label}: '{key}' names no model input; ignored")
    return warnings


class FeedStream:
    """Feeds read lazily, one at a time, every time they are iterated: calibration data whose
    memory does not grow with the number of samples.

    Args:
        source: an ``.npz`` file or a folder of them (one feed per file, sorted by name; a file
            is read when the iteration reaches it), one feed (a dict), a sequence of feeds, a
            re-iterable collection, or a function returning a fresh iterable of feeds each time
            it is called. A one-shot iterator (a generator) can be iterated once: a second
            iteration raises UsageError.
        model: each feed is checked against its inputs as it is read (:func:`check_feeds`).
        what: how messages name the data (``calibration``).

    ``warnings`` collects what :func:`check_feeds` says about the feeds read so far (keys that
    name no input), once per feed label.

    Raises:
        UsageError: ``source`` is an empty list or tuple, or of an unknown type.

    Raises (when iterated):
        InputError: an unreadable file, or a feed that lacks an input or has a wrong dtype,
            rank or static dim (the message names the file, or the feed's index).
    """

    def __init__(self, source: str | Path | dict | Iterable[dict] | Callable[[], Iterable[dict]],
                 model: onnx.ModelProto | None = None, what: str = "calibration") -> None:
        self.model, self.what, self.warnings = model, what, []
        self._files: list[Path] | None = None
        self._source = source
        self._consumed = False
        if isinstance(source, (str, Path)):
            self._files = feed_files(source)  # raises now: a missing folder is a usage mistake
        elif isinstance(source, dict):
            self._source = [source]
        elif isinstance(source, (list, tuple)) and not source:
            raise UsageError(f"{what}: no feeds (an empty {type(source).__name__}); give at "
                             "least one, or leave it out")
        elif not callable(source) and not isinstance(source, Iterable):
            raise UsageError(f"{what}: expected a path, a feed, an iterable of feeds or a "
                             f"function returning one, got {type(source).__name__}")

    def __len__(self) -> int:
        """The number of feeds, when known without reading them (files, sequences)."""
        if self._files is not None:
            return len(self._files)
        return len(self._source)  # TypeError for iterators, as for any iterable without one

    def __repr__(self) -> str:
        return f"FeedStream({self._source!r})"

    def _labelled(self) -> Iterator[tuple[str, dict]]:
        if self._files is not None:
            for f in self._files:
                yield str(f), load_feed(f)
            return
        fresh = callable(self._source)
        source = self._source() if fresh else self._source
        if not fresh and iter(source) is source:  # a one-shot iterator
            if self._consumed:
                raise UsageError(f"{self.what}: the iterator of feeds was already consumed; "
                                 "give a list, a folder or a function returning an iterator")
            self._consumed = True
        for i, feed in enumerate(source):
            if not isinstance(feed, dict):
                raise InputError(f"{self.what} feed {i}: expected {{input name: array}}, got "
                                 f"{type(feed).__name__}")
            yield f"{self.what} feed {i}", feed

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for label, feed in self._labelled():
            if self.model is not None:
                for w in check_feeds(self.model, [feed], [label]):
                    if w not in self.warnings:
                        self.warnings.append(w)
            yield feed
