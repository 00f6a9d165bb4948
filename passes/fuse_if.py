"""If fusion: two Ifs of one graph that read the same condition tensor become one If.

ONNX spec, ``If`` (opsets 1-21): the outputs are those of ``then_branch`` when ``cond`` (one bool
element) is true, of ``else_branch`` otherwise; the branches take no inputs, bind their outputs
to the If's by position and may read any tensor of an enclosing scope. Two nodes
``(a_1..a_m) = A = If(c)[T_A, E_A]`` and ``(b_1..b_n) = B = If(c)[T_B, E_B]`` reading the *same
tensor* ``c`` choose the same branch in every run, so::

    (a_1..a_m, b_1..b_n) = If(c)[T_A ; T_B[a_i := T_A.out_i], E_A ; E_B[a_i := E_A.out_i]]

where ``T_A ; T_B`` runs the nodes of ``T_A`` and then those of ``T_B``: when ``c`` is true,
``a_i`` is ``T_A``'s output ``i``, so ``T_B`` reading that tensor instead of ``a_i`` reads the
same value (reads from nested subgraphs of ``T_B`` included); when false, the same with ``E``.
Every branch node runs exactly when it ran before, on the same values: the fusion is exact for
any branch contents.

Placement. ``A`` comes before ``B`` in a topological order. The fused node reads what both read
(``B``'s reads include the outer-scope values its branches read, recursively) and writes what
both write; a topological order keeps it exactly when no node other than ``A`` and ``B`` lies on a
path from ``A``'s outputs to ``B``'s reads -- such a node would have to run both after and before
the fused If (``path through another node``; the LSTM between torch's rank-dispatch Ifs is one).
The graph is then sorted again.

Declared shapes. Where ``B``'s branches read ``A``'s outputs, the outputs of every graph in them
lose their declared shape (the dtype stays): a read of ``a_i`` has the shape of ``a_i``, which
is often of unknown rank, a read of ``T_A.out_i`` that of one branch, so ONNX shape inference
now checks declarations it could not check before, and exports sometimes get them wrong. It
re-derives them from the ops.

Outputs. The fused If writes ``A``'s outputs that something other than ``B`` reads, or that are
graph outputs (the same tensors, so their names stay), followed by ``B``'s outputs; ``A``'s outputs
only ``B`` read become tensors inside the branches. Branch tensors whose names another tensor of
the model uses are renamed, and so are ``B``'s branch nodes whose names another node uses
(``A``'s branches and the graph around them may repeat names; onnxruntime refuses a graph with
two nodes of one name). A fused branch binding one tensor to two outputs (``A`` or ``B``
did already, or their branches return one shared initializer) is refused
(``branch output bound twice``): onnxruntime 1.32 without graph optimizations returns wrong
values for such an If. A branch with inputs or with as many outputs as the If has not is
``malformed branch``.

Scope: every graph (If/Loop/Scan bodies too), If nodes only; each If is fused into the first
earlier If on its condition that can take it. Statistics: ``rewritten`` (one per If removed) and
``refused`` (per If that has earlier Ifs on its condition but could join none of them, with the
first one's reason).
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxopt.edit import IF_BRANCHES, if_branches, node_reads, rename_clashes, sort_nodes
from onnxopt.graph import iter_graphs
from onnxopt.names import rename_node_clashes
from onnxopt.ops import is_default_domain
from onnxopt.pass_manager import register
from onnxopt.rewrite import Refusal, RewritePass, Scope, refuse

class _Order:
    """Reachability between the nodes of a sorted graph, reads of subgraphs included."""

    def __init__(self, g: gs.Graph):
        self.nodes = list(g.nodes)
        self.position = {id(n): i for i, n in enumerate(self.nodes)}
        self.reads = {id(n): node_reads(n) for n in self.nodes}

    def descendants(self, a: gs.Node) -> set[int]:
        """Nodes reading ``a``'s outputs, transitively."""
        produced, found = {id(t) for t in a.outputs}, set()
        for n in self.nodes[self.position[id(a)] + 1:]:
            if any(id(t) in produced for t in self.reads[id(n)]):
                found.add(id(n))
                produced.update(id(t) for t in n.outputs)
        return found

    def ancestors(self, b: gs.Node) -> set[int]:
        """Nodes whose outputs ``b`` reads, transitively."""
        needed, found = {id(t) for t in self.reads[id(b)]}, set()
        for n in reversed(self.nodes[:self.position[id(b)]]):
            if any(id(t) in needed for t in n.outputs):
                found.add(id(n))
                needed.update(id(t) for t in self.reads[id(n)])
        return found


def _kept(a: gs.Node, b: gs.Node, outputs: set[int]) -> list[int]:
    """Indices of ``a``'s outputs read by something other than ``b`` or that are graph outputs."""
    inside = {id(n) for attr in IF_BRANCHES for sub in iter_graphs(b.attrs[attr]) for n in sub.nodes}
    return [i for i, o in enumerate(a.outputs)
            if id(o) in outputs or any(id(n) not in inside for n in o.outputs)]


def _fused_outputs(a: gs.Node, b: gs.Node, attr: str, kept: list[int]) -> list[gs.Tensor]:
    """The outputs of the fused branch ``attr``: ``a``'s kept ones, then ``b``'s (a branch
    output is computed in its branch or an initializer, never an outer tensor such as ``a_i``:
    the ONNX checker rejects that)."""
    return [a.attrs[attr].outputs[i] for i in kept] + list(b.attrs[attr].outputs)


def _refusal(order: _Order, descendants: set[int], a: gs.Node, b: gs.Node,
             outputs: set[int]) -> str | None:
    """Why ``a`` and ``b`` (``a`` first) cannot be fused, or None."""
    if if_branches(a) is None or if_branches(b) is None:
        return "malformed branch"
    if descendants & order.ancestors(b):
        return "path through another node"
    kept = _kept(a, b, outputs)
    for attr in IF_BRANCHES:
        fused = _fused_outputs(a, b, attr, kept)
        if len({id(t) for t in fused}) != len(fused):
            return "branch output bound twice"
    return None


def _fuse(root: gs.Graph, a: gs.Node, b: gs.Node, outputs: set[int]) -> None:
    """Make ``a`` compute ``b``'s outputs too and disconnect ``b`` (see the module docstring)."""
    kept = _kept(a, b, outputs)
    for attr in IF_BRANCHES:
        mine, theirs = a.attrs[attr], b.attrs[attr]
        rename_clashes(root, theirs)
        fused = _fused_outputs(a, b, attr, kept)
        binding = {id(o): t for o, t in zip(a.outputs, mine.outputs)}
        subs = list(iter_graphs(theirs))
        rebound = False
        for sub in subs:
            for n in sub.nodes:
                for k, t in enumerate(n.inputs):
                    if id(t) in binding:
                        n.inputs[k], rebound = binding[id(t)], True
        if rebound:
            for t in (t for sub in subs for t in sub.outputs):
                t.shape = None
        rename_node_clashes(root, theirs.nodes, mine)
        mine.nodes.extend(theirs.nodes)
        mine.outputs = fused
        theirs.nodes, theirs.outputs = [], []
    new_outputs = [a.outputs[i] for i in kept] + list(b.outputs)
    b.inputs.clear()
    b.outputs.clear()
    a.outputs.clear()
    a.outputs.extend(new_outputs)


def _earlier_on_same_condition(g: gs.Graph, b: gs.Node) -> list[gs.Node]:
    """The Ifs of ``g`` before ``b`` (in the order of ``g.nodes``) reading ``b``'s condition
    tensor."""
    earlier = []
    for n in g.nodes:
        if n is b:
            return earlier
        if n.op == "If" and is_default_domain(n) and n.inputs and n.outputs \
                and n.inputs[0] is b.inputs[0]:
            earlier.append(n)
    return []


@register
class FuseIf(RewritePass):
    name = "fuse_if"
    description = "Fuse Ifs of one graph that read the same condition tensor into one If."
    ops = ("If",)
    sorted_walk = True

    def match(self, b: gs.Node, scope: Scope) -> tuple[gs.Node, set[int]] | Refusal | None:
        if not b.inputs:
            return None
        g = scope.graph
        sort_nodes(g)  # a fusion earlier in the walk may have left the graph out of order
        earlier = _earlier_on_same_condition(g, b)
        if not earlier:
            return None
        order = _Order(g)
        # a graph output of any scope must keep its producer
        outputs = {id(t) for sub in iter_graphs(scope.root) for t in sub.outputs}
        reasons = []
        for a in earlier:
            reason = _refusal(order, order.descendants(a), a, b, outputs)
            if reason is None:
                return a, outputs
            reasons.append(reason)
        return refuse(reasons[0])

    def rewrite(self, b: gs.Node, match: tuple[gs.Node, set[int]], scope: Scope) -> None:
        a, outputs = match
        _fuse(scope.root, a, b, outputs)
