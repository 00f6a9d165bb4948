"""Reshape merging: a chain of shape-only ops becomes one op.

Three rewrites, all about ops that move no element (row-major order is kept; ONNX spec of
``Reshape`` opsets 5-21, ``Flatten`` 1-21, ``Squeeze``/``Unsqueeze`` 1-21, ``Transpose`` 1-21 of
size-1 dims only):

1. ``Reshape(R(X), s)`` with ``R`` one of ``Reshape``, ``Flatten``, ``Squeeze``, ``Unsqueeze``
   becomes ``Reshape(X, s)``. ``R`` keeps the elements and their order, so the outer Reshape's
   result depends only on the element count (the same for ``X`` and ``R(X)``) and on ``s`` -- except
   that an entry ``s[i] = 0`` with ``allowzero = 0`` copies dimension ``i`` *of ``R(X)``*. ``s`` is
   an initializer or ``Shape(T)``; ``-1`` entries are kept (the element count they divide is
   unchanged). With ``allowzero = 1`` a ``0`` is a literal zero: any ``s`` is kept. With
   ``allowzero = 0``:

   - ``s`` an initializer: a ``0`` entry is replaced by the intermediate's dimension ``i`` when
     shape inference knows it and it is positive (the new shape is a new initializer), else the
     node is refused.
   - ``s = Shape(T)`` (``start`` 0): ``s[i]`` is 0 only when ``T.shape[i]`` is. Kept as is when
     every ``i < rank(T)`` satisfies one of: ``T.shape[i]`` is known positive; ``i >= rank(R(X))``
     (a 0 there makes the original fail, and the rewrite may succeed instead); or
     ``X.shape[i] ≡ T.shape[i]`` and either ``R(X).shape[i] ≡ X.shape[i]`` or ``R(X)`` is 1-D (its
     one dim is ``numel(X)``, 0 when ``X.shape[i]`` is) -- then at a 0 both Reshapes copy 0.
     ``≡`` is the same dim at run time: the same tensor, equal static dims, or
     ``X = Gather(D, indices=T, axis=0)`` (shape ``T.shape + D.shape[1:]``); symbolic dims are not
     compared (declared ones may be wrong). E.g. ``Reshape(Reshape(Gather(D, T), [-1]), Shape(T))``,
     the attention-mask idiom of BERT exports.

2. ``Squeeze``/``Unsqueeze`` pairs become one op with combined axes. With ``r`` the rank of ``X``,
   axes normalized (a negative axis of ``Squeeze`` counts from ``r``, of ``Unsqueeze`` from the
   *output* rank), and ``nth(E, k)`` the k-th (from 0) non-negative integer not in the set ``E``:

   - ``Squeeze(Squeeze(X, a), b)   = Squeeze(X, a ∪ {nth(a, k) : k in b})``
   - ``Unsqueeze(Unsqueeze(X, a), b) = Unsqueeze(X, b ∪ {nth(b, k) : k in a})``
   - ``Unsqueeze(Squeeze(X, a), b) = X`` when ``a = b`` (the same dims are removed and put back)
   - ``Squeeze(Unsqueeze(X, a), b) = Unsqueeze(X, {k - |{j in b : j < k}| : k in a \\ b})`` when
     ``b ⊆ a`` (only inserted dims are removed again), ``= X`` when ``a = b``.

   A ``Squeeze`` without axes (all size-1 dims) gets explicit axes when the input shape is fully
   static. The result is written in the opset's form: ``axes`` attribute below opset 13, an int64
   ``axes`` initializer input from 13 on. An identity result bypasses the second node (a graph
   output keeps its name, see ``onnxopt.edit.bypass``).

3. ``op(Reshape(X, s), ...)`` with ``op`` a ``Squeeze``, ``Unsqueeze`` or ``Transpose`` and ``s``
   an initializer becomes ``Reshape(X, s')``. The three ops move no element when they only add,
   remove or move dims of size 1, so the result is the Reshape of ``X`` to the output shape
   ``s'``, written in ``s``'s terms (``r = len(s)``, axes normalized as in rewrite 2):

   - ``Unsqueeze(axes a)``: ``s'`` is ``s`` with a ``1`` inserted at each position of ``a``
     (positions of the output, rank ``r + |a|``); ``-1`` entries are kept.
   - ``Squeeze(axes a)``: ``s'`` is ``s`` without the entries at ``a``, each of which must be a
     literal ``1`` (a ``-1``, or a ``0`` copying a dim, is not provably 1). Without axes every
     entry must be a literal (no ``-1``, no copying ``0``): the ``1`` entries are removed.
   - ``Transpose(perm)`` (default: the reversed axes): ``s' = [s[perm[j]] for j]``, a Reshape
     when the entries that are not a literal ``1`` keep their order in ``perm`` (the output's
     row-major order is then the input's).

   With ``allowzero = 0`` an entry ``s[i] = 0`` copies dim ``i`` of ``X``. Kept as is when it
   stays at position ``i`` in ``s'`` (it copies the same dim, ``-1`` entries resolve the same);
   else replaced by ``X``'s dim ``i`` when shape inference knows it and it is positive (a ``0``
   moved as is would copy another dim), else the node is refused. With ``allowzero = 1`` the
   ``0`` is literal and kept.
   The new Reshape keeps the first one's ``allowzero``. Below opset 5 (``shape`` an attribute)
   nothing is done.

In every rewrite the second node is rewritten in place (it keeps its output tensor), new constants
are new initializers, and the first node is removed when nothing else reads it. Every graph and
subgraph is handled, each in topological order (a chain is merged from its start); the first node
may be in an enclosing graph. Ranks and shapes come from ONNX shape inference of the whole model,
subgraphs included (``onnxopt.analyses.TensorTypes``; never from declared value_info).

Statistics: ``rewritten`` (pairs rewritten), ``by_kind`` (``merged``: one op left;
``cancelled``: an identity pair bypassed), and ``refused`` per reason: ``shape not constant``
(neither an initializer nor ``Shape(T)``), ``zero copies unknown dim``, ``zero copies unrelated
dim`` (``Shape(T)`` not proven as above), ``rank unknown`` (negative axes whose rank is not
known), ``axes unknown`` (axes not an initializer, or an axis-less Squeeze of a shape not fully
static), ``not one op`` (a Squeeze/Unsqueeze pair that is neither an identity nor one op, e.g.
``Squeeze(Unsqueeze(X, [0]), [1])``), ``graph output name lost`` (an identity pair whose output
is a graph output that cannot be bypassed), ``squeezed dim not provably 1``, ``moves a dim not
provably 1`` (a Transpose that reorders only ``-1`` or copied ``0`` entries, a Reshape if they are
1; one that reorders a literal dim other than 1, or follows a computed Reshape, is not counted).
Rewrite 3 counts under ``by_kind`` as ``<op> absorbed`` (``Unsqueeze absorbed``...).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.analyses import TensorTypes
from onnxopt.edit import bypass, constant_value, int_list
from onnxopt.ops import is_default_domain
from onnxopt.pass_manager import register
from onnxopt.rewrite import Refusal, RewritePass, Scope, pair_start, refuse

_SHAPE_ONLY = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")
_SQUEEZES = ("Squeeze", "Unsqueeze")


def _nth(excluded: set[int], k: int) -> int:
    """The k-th (from 0) non-negative integer not in ``excluded``."""
    i = -1
    for _ in range(k + 1):
        i += 1
        while i in excluded:
            i += 1
    return i


def _normalized_axes(node: gs.Node, rank: int | None, shape: tuple | None) -> set[int] | Refusal:
    """Non-negative axes of a Squeeze/Unsqueeze whose input has ``rank``, or a refusal reason."""
    axes = int_list(node, "axes", 1)
    if axes == "unknown":
        return refuse("axes unknown")
    if axes is None:  # Squeeze of every size-1 dim (Unsqueeze requires axes)
        if node.op != "Squeeze" or shape is None or any(d is None for d in shape):
            return refuse("axes unknown")
        return {i for i, d in enumerate(shape) if d == 1}
    if all(a >= 0 for a in axes):
        return set(axes)
    if rank is None:
        return refuse("rank unknown")
    out_rank = rank + len(axes) if node.op == "Unsqueeze" else rank
    return {a % out_rank for a in axes}


def _combine(first: gs.Node, second: gs.Node, types: TensorTypes
             ) -> tuple[str | None, list[int]] | Refusal:
    """The op and axes equivalent to ``second(first(X))`` (op None: the identity), or a reason."""
    x, mid = first.inputs[0], second.inputs[0]
    written = int_list(first, "axes", 1), int_list(second, "axes", 1)
    if first.op == "Squeeze" and second.op == "Unsqueeze" and written[0] == written[1] \
            and isinstance(written[0], list):
        return None, []  # same length, so negative axes normalize against the same rank
    needs_rank = any(isinstance(a, list) and min(a, default=0) < 0 or a is None for a in written)
    rank = types.rank(x) if needs_rank else None
    a = _normalized_axes(first, rank, types.shape(x) if needs_rank else None)
    if isinstance(a, Refusal):
        return a
    mid_rank = None if rank is None else rank + len(a) * (1 if first.op == "Unsqueeze" else -1)
    b = _normalized_axes(second, mid_rank, types.shape(mid) if needs_rank else None)
    if isinstance(b, Refusal):
        return b
    if first.op == second.op == "Squeeze":
        return "Squeeze", sorted(a | {_nth(a, k) for k in b})
    if first.op == second.op == "Unsqueeze":
        return "Unsqueeze", sorted(b | {_nth(b, k) for k in a})
    if first.op == "Squeeze":
        return (None, []) if a == b else refuse("not one op")
    if not b <= a:
        return refuse("not one op")
    rest = sorted(k - sum(j < k for j in b) for k in a - b)
    return ("Unsqueeze", rest) if rest else (None, [])


def _set_axes(scope: Scope, node: gs.Node, op: str, x: gs.Tensor, axes: list[int]) -> None:
    """Make ``node`` ``op(x, axes)``, axes in the opset's form (an initializer input from 13)."""
    node.op = op
    node.inputs.clear()
    node.attrs.pop("axes", None)
    if scope.opset >= 13:
        name = scope.fresh(f"{node.outputs[0].name}_axes")
        node.inputs.extend([x, gs.Constant(name, np.array(axes, np.int64))])
    else:
        node.inputs.append(x)
        node.attrs["axes"] = axes


def _copied_zeros(target: np.ndarray, copies: dict[int, int], source: gs.Tensor,
                  types: TensorTypes) -> np.ndarray | Refusal:
    """``target`` with each entry ``j`` of ``copies`` (a 0 copying dim ``copies[j]`` of
    ``source``) replaced by that dim when shape inference knows it and it is positive, else a
    refusal."""
    shape = types.shape(source)
    resolved = target.copy()
    for j, i in copies.items():
        if shape is None or i >= len(shape) or not shape[i]:
            return refuse("zero copies unknown dim")
        resolved[j] = shape[i]
    return resolved


def _absorbed_target(reshape: gs.Node, node: gs.Node, opset: int, types: TensorTypes
                     ) -> np.ndarray | Refusal | None:
    """The target ``s'`` of ``Reshape(X, s')`` equal to ``node(Reshape(X, s))`` for ``node`` a
    Squeeze, Unsqueeze or Transpose (rewrite 3 of the module docstring), a refusal reason, or
    None when the pair is not valid ONNX (left to fail as it would)."""
    s = constant_value(reshape.inputs[1]) if opset >= 5 and len(reshape.inputs) == 2 else None
    if s is None:  # a Transpose is most often a real one: not counted
        return None if node.op == "Transpose" else refuse("shape not constant")
    s = np.asarray(s, np.int64).reshape(-1)
    r = len(s)
    literal = [bool(v > 0 or (v == 0 and reshape.attrs.get("allowzero", 0))) for v in s]
    if node.op == "Transpose":
        perm = [int(p) for p in node.attrs.get("perm", range(r - 1, -1, -1))]
        if sorted(perm) != list(range(r)):
            return None
        moved = [p for p in perm if not (literal[p] and s[p] == 1)]
        inversions = [(p, q) for i, p in enumerate(moved) for q in moved[i + 1:] if p > q]
        if inversions:
            # a literal dim other than 1 out of order: a real transposition, not a case
            return None if any(literal[p] or literal[q] for p, q in inversions) \
                else refuse("moves a dim not provably 1")
        source = perm
    else:
        axes = int_list(node, "axes", 1)
        if axes == "unknown" or (axes is None and node.op == "Unsqueeze"):
            return refuse("axes unknown")
        out_rank = r + len(axes) if node.op == "Unsqueeze" else r
        if axes is not None and (not all(-out_rank <= a < out_rank for a in axes)
                                 or len({a % out_rank for a in axes}) != len(axes)):
            return None
        if axes is None and not all(literal):
            return refuse("squeezed dim not provably 1")
        axes = {i for i in range(r) if s[i] == 1} if axes is None \
            else {a % out_rank for a in axes}
        if node.op == "Squeeze":
            if not all(literal[a] and s[a] == 1 for a in axes):
                return refuse("squeezed dim not provably 1")
            source = [i for i in range(r) if i not in axes]
        else:
            kept = iter(range(r))
            source = [-1 if j in axes else next(kept) for j in range(out_rank)]
    target = np.array([1 if i < 0 else s[i] for i in source], np.int64)
    moved_zeros = {j: i for j, i in enumerate(source) if i >= 0 and s[i] == 0
                   and not literal[i] and i != j}
    return _copied_zeros(target, moved_zeros, reshape.inputs[0], types) if moved_zeros \
        else target


def _same_dim(a: gs.Tensor, b: gs.Tensor, i: int, types: TensorTypes) -> bool:
    """Whether dim ``i`` of ``a`` is dim ``i`` of ``b`` at run time (``i < rank(b)``): the same
    tensor, equal static dims, or ``a = Gather(data, indices=b, axis=0)``."""
    if a is b:
        return True
    sa, sb = types.shape(a), types.shape(b)
    if sa is not None and sb is not None and i < min(len(sa), len(sb)) and sa[i] is not None \
            and sa[i] == sb[i]:
        return True
    if len(a.inputs) != 1:
        return False
    gather = a.inputs[0]
    if gather.op != "Gather" or not is_default_domain(gather) or gather.inputs[1] is not b:
        return False
    axis = gather.attrs.get("axis", 0)
    data_rank = types.rank(gather.inputs[0])
    return axis == 0 or data_rank is not None and axis == -data_rank


def _shape_source(second: gs.Node) -> gs.Tensor | None:
    """``T`` when the outer Reshape's target shape is ``Shape(T)`` from dim 0, else None."""
    target = second.inputs[1]
    if len(target.inputs) != 1:
        return None
    shape = target.inputs[0]
    if shape.op != "Shape" or not is_default_domain(shape) or shape.attrs.get("start", 0) != 0:
        return None
    return shape.inputs[0]


def _zeros_copy_same_dims(first: gs.Node, second: gs.Node, t: gs.Tensor,
                          types: TensorTypes) -> bool:
    """Whether every 0 of ``Shape(t)`` copies the same dim from ``X`` as from ``R(X)`` or makes
    the original fail (see the module docstring)."""
    x, mid = first.inputs[0], second.inputs[0]
    t_shape, mid_rank = types.shape(t), types.rank(mid)
    if t_shape is None or mid_rank is None:
        return False
    for i, d in enumerate(t_shape):
        if d is not None and d > 0 or i >= mid_rank:
            continue
        if not _same_dim(x, t, i, types) or not (mid_rank == 1 or _same_dim(mid, x, i, types)):
            return False
    return True


def _resolved_shape(first: gs.Node, second: gs.Node, types: TensorTypes
                    ) -> np.ndarray | None | Refusal:
    """The outer Reshape's target shape with its 0 entries resolved (None: keep the target as
    is), or a refusal reason."""
    allowzero = second.attrs.get("allowzero", 0)
    target = constant_value(second.inputs[1])
    if target is None:
        if allowzero:
            return None
        t = _shape_source(second)
        if t is None:
            return refuse("shape not constant")
        return None if _zeros_copy_same_dims(first, second, t, types) \
            else refuse("zero copies unrelated dim")
    target = np.asarray(target)
    if allowzero or not (target == 0).any():
        return None
    return _copied_zeros(target, {int(i): int(i) for i in np.flatnonzero(target == 0)},
                         second.inputs[0], types)


@register
class MergeReshape(RewritePass):
    name = "merge_reshape"
    description = ("Merge Reshape/Flatten/Squeeze/Unsqueeze feeding a Reshape, Squeeze/Unsqueeze "
                   "pairs, and a Squeeze/Unsqueeze/size-1 Transpose after a Reshape, into one op.")
    ops = ("Reshape",) + _SQUEEZES + ("Transpose",)
    sorted_walk = True

    def match(self, node: gs.Node, scope: Scope
              ) -> tuple[gs.Node, np.ndarray | None | tuple[str | None, list[int]]] \
            | Refusal | None:
        firsts = {"Reshape": _SHAPE_ONLY, "Transpose": ("Reshape",)}.get(
            node.op, _SQUEEZES + ("Reshape",))
        first = pair_start(node, scope, firsts)
        if first is None:
            return None
        if node.op == "Reshape":
            plan = _resolved_shape(first, node, scope.types)
        elif first.op == "Reshape":
            plan = _absorbed_target(first, node, scope.opset, scope.types)
            if plan is None:
                return None
        else:
            plan = _combine(first, node, scope.types)
        return plan if isinstance(plan, Refusal) else (first, plan)

    def rewrite(self, node: gs.Node,
                match: tuple[gs.Node, np.ndarray | None | tuple[str | None, list[int]]],
                scope: Scope) -> str | Refusal:
        first, plan = match
        x = first.inputs[0]
        kind = "merged"
        if node.op == "Reshape":
            node.inputs[0] = x
            if plan is not None:
                node.inputs[1] = gs.Constant(scope.fresh(f"{node.outputs[0].name}_shape"), plan)
        elif first.op == "Reshape":
            kind = f"{node.op} absorbed"
            node.op = "Reshape"
            node.attrs.clear()
            node.attrs.update({k: v for k, v in first.attrs.items() if k == "allowzero"})
            node.inputs.clear()
            node.inputs.extend([x, gs.Constant(scope.fresh(f"{node.outputs[0].name}_shape"),
                                               plan)])
        elif plan[0] is not None:
            _set_axes(scope, node, plan[0], x, plan[1])
        elif bypass(scope.graph, node, x, node.outputs[0]):
            kind = "cancelled"
        else:
            return refuse("graph output name lost")
        scope.drop_if_unused(first)
        return kind
