"""Validation inputs: read them from ``.npz`` files or synthesize them from the declared types.

Synthesis (all from one ``numpy.random.default_rng(seed)``):

* dynamic dims take the value given with ``--input-shape name:1x3x224x224``, else
  :data:`DEFAULT_DIM` (1), as Polygraphy does;
* floats are uniform in [0, 1); booleans are random;
* integers are uniform in [0, 10), except those that (possibly through Cast/Unsqueeze/Reshape)
  index a Gather table: they stay inside the table's axis.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx

from optimizer.errors import InputError, UsageError

#: Value of a dynamic dimension that no ``--input-shape`` fixes.
DEFAULT_DIM = 1
_PASS_THROUGH = {"Cast", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Identity"}


def parse_input_shapes(specs: list[str] | None) -> dict[str, list[int]]:
    """Parse ``["name:1x3x224x224", "scalar:"]`` into ``{"name": [1, 3, 224, 224], "scalar": []}``.

    Raises:
        UsageError: a spec is not ``NAME:DxDx...`` with non-negative integer dims.
    """
    shapes = {}
    for spec in specs or []:
        name, sep, dims = spec.rpartition(":")
        if not sep or not name or not re.fullmatch(r"(\d+(x\d+)*)?", dims):
            raise UsageError(f"--input-shape '{spec}': expected NAME:DxDx... such as x:1x3x224x224")
        shapes[name] = [int(d) for d in dims.split("x")] if dims else []
    return shapes


def load_feeds(path: str | Path) -> list[dict[str, np.ndarray]]:
    """Read one feed from an ``.npz`` file, or one per ``.npz`` file of a folder (sorted by name).

    Raises:
        InputError: the path is missing, holds no ``.npz`` file, or a file is not a valid archive.
    """
    path = Path(path)
    files = sorted(path.glob("*.npz")) if path.is_dir() else [path]
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if not files:
        raise InputError(f"{path}: folder holds no .npz file")
    feeds = []
    for f in files:
        try:
            data = np.load(f, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise InputError(f"{f}: not a readable .npz file ({err})") from None
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise InputError(f"{f}: a single array, not an .npz archive of named inputs "
                             "(save with numpy.savez(path, name=array, ...))")
        with data:
            try:
                feeds.append({k: data[k] for k in data.files})
            except (OSError, ValueError) as err:
                raise InputError(f"{f}: not a readable .npz file ({err})") from None
    return feeds


def _gather_bounds(model: onnx.ModelProto) -> dict[str, int]:
    """For graph inputs used as Gather indices: the size of the indexed axis of the table."""
    graph = model.graph
    inits = {i.name: list(i.dims) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].type == onnx.AttributeProto.TENSOR:
            inits[node.output[0]] = list(node.attribute[0].t.dims)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    bounds = {}
    for inp in graph.input:
        frontier, seen = [inp.name], set()
        while frontier:
            name = frontier.pop()
            if name in seen:
                continue
            seen.add(name)
            for node in consumers.get(name, []):
                if node.op_type in ("Gather", "GatherElements") and len(node.input) > 1 \
                        and node.input[1] == name and node.input[0] in inits:
                    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                    dims = inits[node.input[0]]
                    size = dims[axis] if dims else 0
                    bounds[inp.name] = min(bounds.get(inp.name, size), size)
                elif node.op_type in _PASS_THROUGH and node.input and node.input[0] == name:
                    frontier.extend(node.output)
    return bounds


def synthesize_feed(model: onnx.ModelProto, shapes: dict[str, list[int]] | None = None,
                    seed: int = 0) -> dict[str, np.ndarray]:
    """Make one input feed for ``model`` from its declared input types.

    Args:
        model: the model (its initializers that are also listed as inputs are skipped).
        shapes: concrete shapes by input name, overriding the declared ones.
        seed: seed of the random generator.

    Returns:
        ``{input name: array}`` for every graph input.

    Raises:
        InputError: an input is not a tensor, or has a dtype that cannot be synthesized (string).
        UsageError: a shape in ``shapes`` names no input or has the wrong rank.
    """
    shapes = dict(shapes or {})
    rng = np.random.default_rng(seed)
    initializers = {i.name for i in model.graph.initializer}
    names = {i.name for i in model.graph.input}
    for name in shapes:
        if name not in names:
            raise UsageError(f"--input-shape names '{name}', which is not a model input "
                             f"(inputs: {', '.join(sorted(names - initializers))})")
    bounds = _gather_bounds(model)
    feed = {}
    for inp in model.graph.input:
        if inp.name in initializers:
            continue
        if not inp.type.HasField("tensor_type"):
            raise InputError(f"input '{inp.name}' is not a tensor; pass it with --inputs")
        tt = inp.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        declared = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        if inp.name in shapes:
            shape = shapes[inp.name]
            if tt.HasField("shape") and len(shape) != len(declared):
                raise UsageError(f"--input-shape {inp.name}: rank {len(shape)}, but the model "
                                 f"declares rank {len(declared)}")
        else:
            shape = [DEFAULT_DIM if d is None else d for d in declared]
        if dtype.kind == "f":
            value = rng.random(shape).astype(dtype)
        elif dtype.kind == "b":
            value = rng.random(shape) < 0.5
        elif dtype.kind in "iu":
            high = bounds.get(inp.name, 10)
            value = rng.integers(0, max(high, 1), size=shape).astype(dtype)
        else:
            raise InputError(f"input '{inp.name}' has dtype {dtype}, which cannot be synthesized; "
                             "pass it with --inputs")
        feed[inp.name] = value
    return feed
