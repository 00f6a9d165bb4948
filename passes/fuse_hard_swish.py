"""HardSwish fusion: ``x * Clip(x + 3, 0, 6)``, MobileNetV3's h-swish as exporters write it
(Howard et al. 2019, "Searching for MobileNetV3", section 5.2: ``h-swish(x) = x ReLU6(x + 3) /
6``), becomes one ONNX ``HardSwish`` (opset 14 on) or a ``HardSigmoid`` (opset 6 on).

ONNX operator specification (https://onnx.ai/onnx/operators/): ``HardSwish(x) = x * max(0,
min(1, x / 6 + 1/2))`` and ``HardSigmoid(x; alpha, beta) = max(0, min(1, alpha x + beta))``, so
in real arithmetic, for every ``x``::

    x * Clip(x + 3, 0, 6)     = 6 HardSwish(x)                           (opset >= 14)
                              = 6 x HardSigmoid(x; alpha = 1/6, beta = 1/2)   (opset >= 6)

The product is usually scaled next -- by the ``/ 6`` of h-swish, or a constant ``k`` into which
the lossless passes merged it with a following BatchNormalization's scale -- and the 6 goes into
that constant: with ``t = Mul(m, k)``, ``Mul(k, m)`` or ``Div(m, k)`` (``k`` a constant the user
cannot override) reading ``m = x * Clip(x + 3, 0, 6)`` alone, ``t`` becomes ``Mul(h, 6 k)`` (or
``Mul(h, 6 / k)``) with ``h = HardSwish(x)``, or ``h = x * HardSigmoid(x)``; a factor ``6 k``
of exactly 1 is left to ``remove_noop``. Without such a scale, opset 14 on, ``m`` becomes
``Mul(HardSwish(x), 6)``; below, the rewrite would not save a node and is refused.

What it saves (measured on onnxruntime 1.32 CPU): four elementwise passes over the activation
(Add, Clip, Mul, scale) become two (HardSwish, scale) or three; on PP-OCRv4 rec, whose 28
h-swish sit between its convolutions, the elementwise ops took more time than the convolutions
(Add 4.6 ms, Mul 4.9 ms, Clip 2.8 ms, Div 2.3 ms against 8.2 ms of Conv per run).

Float semantics: the folded constant is computed in float64 and rounded once; ``HardSwish`` and
``HardSigmoid`` compute ``x / 6 + 1/2`` (``alpha = float(1/6)``) where the chain computed
``(x + 3)`` then multiplied, so results differ by float rounding only: a few units in the last
place, or, near ``x = -3`` where the result is close to 0, an absolute error of the order of the
chain's own (2.4e-7 at ``x = -2.9999995``, the result -2.4e-7 against -1.8e-7). For ``x = -inf``
both give NaN (``-inf * 0``), for ``+inf`` both ``+inf``. One difference is accepted, as in
``merge_scalar_mul``: the chain's ``x * 6`` overflows for ``|x| > 5.7e37`` in float32 where the
fused form, scaled by ``6 k < 6``, does not (``x = 1e38``: ``inf`` before, ``1e38`` after; the
fused form is then the exact one).

Conditions: float32 (onnxruntime's CPU kernels: ``HardSigmoid`` is float only, and a float16
or double chain is left as it is); ``3``, ``0`` and ``6`` exact constants of one
element that no user can override, the ``3`` of rank 0 or of a rank that ``x``'s proved rank
covers (a ``[1, 1]`` constant on a vector would broadcast the shape); Clip's bounds as inputs
(opset 11 on) or attributes (opset 6-10); ``x`` the same tensor in the Add and the Mul;
``x + 3`` and the Clip read by the chain only and not graph outputs (they disappear), as the
product when a scale is folded; the chain and the scale in one graph. Every graph and
subgraph is handled.

In the default pipeline since the drift budget checks its decision on the real model
(``onnxopt.budget.DriftBudget.decide``, ``trial``): before that check, slanet_en's
``int8-static`` result with this pass failed validation (cosine 0.9487 in onnxruntime's default
session against 0.9999 with its optimizations off) -- the changed graph put the budget's choice on
the far side of the gap between its float simulation and onnxruntime's integer kernels.

Statistics: ``rewritten``, ``by_kind`` (``HardSwish``, ``HardSwish (scale folded)``,
``HardSigmoid (scale folded)``), ``refused`` per reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.edit import clip_bounds, constant_value
from onnxopt.graph import iter_graphs
from onnxopt.pass_manager import PassContext, register
from onnxopt.rewrite import Refusal, RewritePass, Scope, producer_in_scope, refuse

#: The first opset with ``HardSwish``.
HARD_SWISH_OPSET = 14


@dataclass
class _Match:
    """``mul = Mul(x, clip)``, ``clip = Clip(add, 0, 6)``, ``add = Add(x, 3)``; ``scale``: the
    node reading ``mul`` alone whose constant takes the factor (None: none), ``k`` its new
    constant and ``index`` its position."""

    x: gs.Tensor
    add: gs.Node
    clip: gs.Node
    dtype: np.dtype
    scale: gs.Node | None = None
    k: np.ndarray | None = None
    index: int = 1


def _one(t: gs.Tensor, overridable: frozenset[str]) -> np.ndarray | None:
    """The value of ``t`` when it is a one-element constant no user can override."""
    value = None if t.name in overridable else constant_value(t)
    return None if value is None or np.asarray(value).size != 1 else np.asarray(value)




@register
class FuseHardSwish(RewritePass):
    name = "fuse_hard_swish"
    description = ("Fuse x * Clip(x + 3, 0, 6) (h-swish) into HardSwish, or HardSigmoid below "
                   "opset 14.")
    ops = ("Mul",)
    min_opset = 6
    sorted_walk = True

    def start(self, graph: gs.Graph, ctx: PassContext) -> None:
        self._overridable = frozenset(t.name for g in iter_graphs(graph) for t in g.inputs)
        # the outputs of every graph (a subgraph may output an outer tensor); this pass
        # changes none
        self._outputs = {id(t) for g in iter_graphs(graph) for t in g.outputs}

    def _alone(self, t: gs.Tensor, reader: gs.Node) -> bool:
        """Whether ``t`` is read by ``reader`` only and is no graph's output."""
        return all(r is reader for r in t.outputs) and id(t) not in self._outputs

    def match(self, node: gs.Node, scope: Scope) -> _Match | Refusal | None:
        if len(node.inputs) != 2:
            return None
        for xi in (0, 1):
            x, r = node.inputs[xi], node.inputs[1 - xi]
            clip = producer_in_scope(r)
            if clip is None or clip.op != "Clip":
                continue
            add = producer_in_scope(clip.inputs[0]) if clip.inputs else None
            if add is None or add.op != "Add" or len(add.inputs) != 2:
                continue
            three = next((i for i in (0, 1) if add.inputs[1 - i] is x), None)
            if three is None:
                continue
            found = self._checked(node, x, add, add.inputs[three], clip, scope)
            if found is not None:
                return found
        return None

    def _checked(self, node: gs.Node, x: gs.Tensor, add: gs.Node, c3: gs.Tensor,
                 clip: gs.Node, scope: Scope) -> _Match | Refusal | None:
        """The match of ``node = Mul(x, Clip(Add(x, c3)))``, a refusal, or None (another
        Mul)."""
        three = _one(c3, self._overridable)
        if three is None or float(three.ravel()[0]) != 3.0:
            return None
        if clip_bounds(clip) != (0.0, 6.0):
            return None
        if three.dtype != np.float32:
            return refuse("dtype is not float (onnxruntime's kernels)")
        if three.ndim:
            shape = scope.types.shape(x)
            if shape is None or len(shape) < three.ndim:
                return refuse("the constant 3 may broadcast the shape of x")
        if any(scope.usedef.owner(n) is not scope.graph for n in (add, clip)):
            return refuse("x + 3 or its Clip in an enclosing graph")
        if not (self._alone(add.outputs[0], clip) and self._alone(clip.outputs[0], node)):
            return refuse("x + 3 or its Clip has other readers or is a graph output")
        match = _Match(x, add, clip, three.dtype)
        product = node.outputs[0]
        readers = list(product.outputs)
        if len(readers) == 1 and self._alone(product, readers[0]) and readers[0].op in (
                "Mul", "Div") and len(readers[0].inputs) == 2 \
                and any(readers[0] is n for n in scope.graph.nodes):
            scale = readers[0]
            sides = (1, 0) if scale.op == "Mul" else (1,)
            for ki in sides:
                if scale.inputs[1 - ki] is not product:
                    continue
                k = None if scale.inputs[ki].name in self._overridable else \
                    constant_value(scale.inputs[ki])
                if k is None or np.asarray(k).dtype != three.dtype:
                    continue
                k64 = np.asarray(k, np.float64)
                if not np.isfinite(k64).all() or (scale.op == "Div" and not k64.all()):
                    continue
                with np.errstate(over="ignore"):  # not finite: refused below
                    folded = np.asarray(6.0 * k64 if scale.op == "Mul" else 6.0 / k64,
                                        three.dtype)
                if not np.isfinite(folded).all():
                    continue
                match.scale, match.k, match.index = scale, folded, ki
                return match
        if scope.opset < HARD_SWISH_OPSET:
            return refuse("no scale to fold the 6 into below opset 14 (no node saved)")
        return match

    def rewrite(self, node: gs.Node, match: _Match, scope: Scope) -> str:
        x = match.x
        hard_swish = scope.opset >= HARD_SWISH_OPSET
        if match.scale is None:  # opset >= 14: Mul(HardSwish(x), 6)
            h = gs.Variable(scope.fresh(f"{node.outputs[0].name}_hard_swish"), dtype=x.dtype,
                            shape=x.shape)
            scope.graph.nodes.append(gs.Node(
                "HardSwish", scope.fresh(f"{node.name}_hard_swish"), inputs=[x], outputs=[h]))
            six = gs.Constant(scope.fresh(f"{node.outputs[0].name}_six"),
                              np.asarray(6.0, match.dtype))
            node.inputs.clear()
            node.inputs.extend([h, six])
            kind = "HardSwish"
        else:
            if hard_swish:  # the product becomes HardSwish(x)
                node.op, node.attrs = "HardSwish", {}
                node.inputs.clear()
                node.inputs.append(x)
            else:  # the Clip becomes HardSigmoid(x), the product x * HardSigmoid(x)
                clip = match.clip
                clip.op, clip.attrs = "HardSigmoid", {"alpha": 1.0 / 6.0, "beta": 0.5}
                clip.inputs.clear()
                clip.inputs.append(x)
            scale = match.scale
            product = scale.inputs[1 - match.index]
            scale.op = "Mul"
            scale.inputs.clear()
            scale.inputs.extend([product, gs.Constant(
                scope.fresh(f"{scale.outputs[0].name}_scale"), match.k)])
            kind = "HardSwish (scale folded)" if hard_swish else "HardSigmoid (scale folded)"
        scope.drop_if_unused(match.clip)
        scope.drop_if_unused(match.add)
        return kind
