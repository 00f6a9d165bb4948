"""Activation statistics from calibration feeds: ranges, histograms, per-channel norms and,
on request, Gram matrices.

What calibration (min/max, percentile, entropy and MSE ranges all read a histogram), activation-
aware pruning (Wanda: ``|W_ij| · ||x_j||_2``, Sun et al. 2023, "A Simple and Effective Pruning
Approach for Large Language Models", section 3) and SmoothQuant (``max |X_j|`` per input channel,
Xiao et al. 2023, section 4) need, collected in one instrumented onnxruntime run: the tensors of
interest become extra graph outputs, the model runs once per feed, and each feed's values are
folded into running statistics and dropped, so memory does not grow with the number of feeds.

The tensors collected by default are the float activations read by a weighted op of the main
graph (the data input of MatMul/Gemm/Conv/ConvTranspose whose weight is an initializer: the
inputs a quantizer or an activation-aware pruner looks at); the channel axis of each is the axis
the weight contracts (MatMul/Gemm: the last axis of A, or axis 1 of A^T; Conv: axis 1).
:func:`collect` also reaches tensors computed inside If branches (nested Ifs included): each is
added to its branch's outputs, the other branch yields an empty tensor of the same dtype in
its place (ONNX If: corresponding outputs share a type, their shapes may differ), and the If's
new output is passed up the same way to the main graph's outputs. A feed that takes the other
branch adds nothing to the tensor's statistics (a branch no feed takes has a count of 0).
Loop and Scan bodies are not reached (a body's tensor holds one iteration at a time).

Histogram: ``bins`` equal bins over ``[-r, r]``, ``r`` the largest magnitude seen so far; when a
feed exceeds ``r``, ``r`` doubles (as often as needed) and pairs of bins merge, so counts stay
exact up to bin resolution without a second pass (the streaming scheme of onnxruntime's
``HistogramCollector``, re-binning by powers of two instead of by interpolation).

Gram matrices (opt-in: the analysis :class:`ActivationGrams`): for the input ``X`` of a MatMul or
Gemm, flattened to rows ``[n, K]`` along its contracted axis, ``G = X^T X`` (float64, ``[K, K]``)
summed over the feeds, for ``K <=`` :data:`GRAM_MAX_CHANNELS`. GPTQ's layer Hessian is ``H = 2 G``
(Frantar et al. 2023, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", ICLR, section 3); with it the output error of any weight change ``dW`` over the
calibration rows is ``||X dW||^2 = tr(dW^T G dW)`` without holding ``X``. The mean ``|x_j|`` per
channel is AWQ's activation salience (Lin et al. 2024, "AWQ: Activation-aware Weight
Quantization", MLSys, section 3.2). Each feed adds its rows to the running sums and is dropped:
memory is ``O(K^2)`` per tensor, independent of the number of feeds.

Rows left out (``collect``'s ``rows``; the run's ``--drift-mask`` for :class:`ActivationStats`):
positions a model input marks 0 -- padding tokens under an ``attention_mask`` -- are dropped
from every statistic of a tensor whose leading dimensions are that input's shape (MiniLM's
``[batch, sequence, hidden]`` states under its ``[batch, sequence]`` mask), before the channel
axis; other tensors (attention scores ``[batch, heads, sequence, sequence]``) keep every value.
The result is judged on the kept positions only, so ranges, norms and Gram matrices fitted to the
padding spend resolution on values nobody reads: on MiniLM-L6, 54 % of the calibration rows are
padding. A feed whose mask keeps nothing is taken whole (as ``onnxopt.metrics.kept_positions``
judges it). The test is made on each feed's values, not on declared shapes (exported graphs
rarely carry them): a channels-first ``[batch, channels, time]`` tensor in a feed where the
channel count equals the mask's sequence length would be masked along its channels.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt import external
from onnxopt.analyses.manager import Analysis
from onnxopt.errors import UsageError
from onnxopt.graph import export_graph, graph_protos
from onnxopt.names import NameAuthority
from onnxopt.ops import FLOAT_DTYPES, is_default_domain

#: Bins of each histogram.
HISTOGRAM_BINS = 2048
#: Largest contracted dimension ``K`` whose Gram matrix is collected (8192^2 float64 = 512 MiB).
GRAM_MAX_CHANNELS = 8192

_WEIGHTED = {"MatMul": 0, "Gemm": 0, "Conv": 0, "ConvTranspose": 0}
#: Ops whose input gets a Gram matrix (their contracted axis is the channel axis).
_GRAM_OPS = frozenset({"MatMul", "Gemm"})


@dataclass
class TensorStats:
    """Running statistics of one activation tensor over the calibration feeds.

    Attributes:
        name: the tensor's name.
        channel_axis: the axis ``channel_sq_sum`` is kept along (None: rank 0 or unknown).
        count: elements seen.
        minimum, maximum: smallest and largest value seen (float64).
        histogram: counts (int64, ``[HISTOGRAM_BINS]``) over ``[-range, range]``.
        range: the histogram's half-width, >= every ``|value|`` seen.
        channel_sq_sum: ``sum x^2`` per channel over everything else (float64, ``[C]``); its
            square root is the L2 norm of input feature ``j`` (Wanda's ``||x_j||_2``).
        channel_absmax: ``max |x|`` per channel (float64, ``[C]``; SmoothQuant's ``max |X_j|``).
        channel_abs_sum: ``sum |x|`` per channel (float64, ``[C]``; see ``channel_abs_mean``).
        channel_sum: ``sum x`` per channel (float64, ``[C]``; see ``channel_mean``: the input
            mean that bias correction propagates through a changed weight).
        rows: how many vectors along the channel axis were seen (the divisor of the means).
        gram: ``X^T X`` over every row seen (float64, ``[C, C]``) when ``wants_gram`` and
            ``C <=`` :data:`GRAM_MAX_CHANNELS`, else None. In the run of a model with external
            data it is an ``onnxopt.external.SpilledValues`` (a decoder's Gram matrices
            outweigh its weights): ``onnxopt.external.unspill`` maps it.
        wants_gram: whether ``update`` accumulates ``gram``.
        wants_histogram: whether ``update`` accumulates ``histogram`` (a range-only user, such
            as float16 conversion, saves most of the cost).
    """

    name: str
    channel_axis: int | None
    count: int = 0
    minimum: float = np.inf
    maximum: float = -np.inf
    histogram: np.ndarray = field(default_factory=lambda: np.zeros(HISTOGRAM_BINS, np.int64))
    range: float = 0.0
    channel_sq_sum: np.ndarray | None = None
    channel_absmax: np.ndarray | None = None
    channel_abs_sum: np.ndarray | None = None
    channel_sum: np.ndarray | None = None
    rows: int = 0
    gram: np.ndarray | None = None
    wants_gram: bool = False
    wants_histogram: bool = True

    def update(self, x: np.ndarray) -> None:
        """Fold the values of one feed into the statistics (non-finite values are skipped; in
        the per-channel sums and the Gram matrix they count as 0)."""
        x = np.asarray(x, dtype=np.float64)
        finite = x[np.isfinite(x)]
        if finite.size == 0:
            return
        self.count += int(finite.size)
        self.minimum = min(self.minimum, float(finite.min()))
        self.maximum = max(self.maximum, float(finite.max()))
        if self.wants_histogram:
            self._histogram(finite)
        if self.channel_axis is not None and x.ndim > self.channel_axis:
            moved = np.moveaxis(np.where(np.isfinite(x), x, 0.0), self.channel_axis, -1)
            flat = moved.reshape(-1, moved.shape[-1])
            sq, amax = (flat * flat).sum(axis=0), np.abs(flat).max(axis=0, initial=0.0)
            asum, total = np.abs(flat).sum(axis=0), flat.sum(axis=0)
            gram = flat.T @ flat if self.wants_gram and flat.shape[1] <= GRAM_MAX_CHANNELS \
                else None
            if self.channel_sq_sum is None or self.channel_sq_sum.shape != sq.shape:
                self.channel_sq_sum, self.channel_absmax = sq, amax
                self.channel_abs_sum, self.rows = asum, flat.shape[0]
                self.gram = None if gram is None else external.spill(gram)
                self.channel_sum = total
            else:
                self.channel_sq_sum = self.channel_sq_sum + sq
                self.channel_absmax = np.maximum(self.channel_absmax, amax)
                self.channel_abs_sum = self.channel_abs_sum + asum
                self.channel_sum = self.channel_sum + total
                self.rows += flat.shape[0]
                if gram is not None and self.gram is not None:
                    self.gram = external.accumulate(self.gram, gram)

    def _histogram(self, finite: np.ndarray) -> None:
        peak = float(np.abs(finite).max())
        if self.range == 0.0:
            self.range = peak if peak > 0 else 1.0
        while peak > self.range:
            # double the range: bin k of the new histogram covers old bins 2k-n/2 .. 2k+1-n/2
            n = HISTOGRAM_BINS
            merged = self.histogram.reshape(n // 2, 2).sum(axis=1)
            self.histogram = np.zeros(n, np.int64)
            self.histogram[n // 4: n // 4 + n // 2] = merged
            self.range *= 2.0
        counts, _ = np.histogram(finite, bins=HISTOGRAM_BINS, range=(-self.range, self.range))
        self.histogram += counts

    @property
    def channel_norm(self) -> np.ndarray | None:
        """``||x_j||_2`` per channel (float64, ``[C]``), or None."""
        return None if self.channel_sq_sum is None else np.sqrt(self.channel_sq_sum)

    @property
    def channel_abs_mean(self) -> np.ndarray | None:
        """Mean ``|x_j|`` per channel over the rows seen (float64, ``[C]``), or None."""
        if self.channel_abs_sum is None or self.rows == 0:
            return None
        return self.channel_abs_sum / self.rows

    @property
    def channel_mean(self) -> np.ndarray | None:
        """Mean ``x_j`` per channel over the rows seen (float64, ``[C]``), or None."""
        if self.channel_sum is None or self.rows == 0:
            return None
        return self.channel_sum / self.rows

    def percentile_range(self, percentile: float) -> tuple[float, float]:
        """The symmetric ``(-a, a)`` holding ``percentile`` % of the values seen (bin
        resolution: ``2 range / HISTOGRAM_BINS``)."""
        total = int(self.histogram.sum())
        if total == 0:
            return 0.0, 0.0
        n = HISTOGRAM_BINS
        centre = n // 2
        mass = self.histogram[centre:] + self.histogram[:centre][::-1]  # by distance from 0
        k = int(np.searchsorted(np.cumsum(mass), percentile / 100.0 * total))
        a = (k + 1) * self.range / centre
        return -min(a, self.range), min(a, self.range)


def activation_inputs(graph: gs.Graph, ops=_WEIGHTED) -> dict[str, int | None]:
    """The float activations of the main graph read by a weighted op (of ``ops``, default
    MatMul, Gemm, Conv, ConvTranspose) whose weight is an initializer, with the channel axis
    each contracts: ``{tensor name: axis}``."""
    out: dict[str, int | None] = {}
    for node in graph.nodes:
        if node.op not in ops:
            continue
        index = _WEIGHTED.get(node.op)
        if index is None or not is_default_domain(node) or len(node.inputs) < 2:
            continue
        x, w = node.inputs[index], node.inputs[1]
        if isinstance(x, gs.Constant) or not isinstance(w, gs.Constant) or x.is_empty():
            continue
        if x.dtype is not None and np.dtype(x.dtype).type not in FLOAT_DTYPES:
            continue
        if node.op == "MatMul":
            axis = -1
        elif node.op == "Gemm":
            axis = 0 if node.attrs.get("transA", 0) else -1
        else:
            axis = 1
        out.setdefault(x.name, axis)
    return out


def calibration_feeds(ctx, who: str):
    """The run's calibration feeds (``ctx.calibration``, else the validation feeds).

    Raises:
        UsageError: the run has none (the message names ``who`` needs them).
    """
    feeds = ctx.calibration if ctx.calibration is not None else ctx.feeds
    if feeds is None or (isinstance(feeds, list) and not feeds):
        raise UsageError(f"{who} need calibration data: give --calibration-data or real "
                         "--inputs")
    return feeds


class ActivationStats(Analysis):
    """:class:`TensorStats` of activations over the run's calibration feeds, the positions the
    run's drift mask (``PassContext.drift_mask``) marks 0 left out (module docstring).

    Raises (from :meth:`compute`):
        UsageError: the run has no calibration feeds (give ``inputs`` or ``calibration``).
        InputError: onnxruntime cannot load or run the instrumented model.
    """

    #: Whether :meth:`compute` also collects the Gram matrices of MatMul/Gemm inputs.
    grams = False
    #: Whether :meth:`compute` leaves out the positions the run's drift mask marks 0.
    masked = True

    def __init__(self, stats: dict[str, TensorStats], feeds: int) -> None:
        self.tensors = stats
        self.feeds = feeds

    def __getitem__(self, name: str) -> TensorStats:
        return self.tensors[name]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    @classmethod
    def compute(cls, graph: gs.Graph, ctx) -> "ActivationStats":
        feeds = calibration_feeds(ctx, "activation statistics")
        grams = activation_inputs(graph, _GRAM_OPS) if cls.grams else {}
        return collect(export_graph(graph, ctx.template), activation_inputs(graph), feeds,
                       grams=grams, rows=ctx.drift_mask() if cls.masked else None)


class EveryPositionStats(ActivationStats):
    """:class:`ActivationStats` over every position, the drift mask ignored: for activations
    quantized at run time over the whole tensor (``DynamicQuantizeLinear``), whose range the
    padding sets too -- smoothing fitted to the real tokens alone leaves the padding's outliers
    to set that range (MiniLM ``int8-dynamic``: masked cosine 0.9957 with these statistics,
    0.9946 with the masked ones and one MatMul left float by the budget)."""

    masked = False


class ActivationGrams(ActivationStats):
    """:class:`ActivationStats` plus the Gram matrix ``X^T X`` of every MatMul/Gemm input with at
    most :data:`GRAM_MAX_CHANNELS` channels (``TensorStats.gram``), from the same streaming run
    (GPTQ and AWQ ask for this analysis; the others do not pay for the matrices)."""

    grams = True


class EveryPositionGrams(ActivationGrams):
    """:class:`ActivationGrams` over every position, the drift mask ignored (GPTQ rounding of
    ``quantize_dynamic``: fitted to the real tokens alone, its error compensation moves the
    error into what only the padding reads -- MiniLM ``int8-dynamic``, ``last_hidden_state`` over
    every position: worst feed 0.39 with the masked Gram matrices, 0.976 with these, while the
    masked cosine is 0.9963 and 0.9961)."""

    masked = False


def kept_rows(value: np.ndarray, keep: np.ndarray | None,
              axis: int | None) -> tuple[np.ndarray, int | None]:
    """``value`` without the positions where ``keep`` is 0, and its channel ``axis`` after that:
    when ``value``'s leading dimensions are ``keep``'s shape and ``axis`` (None, or any sign)
    lies beyond them, the result is ``value[keep != 0]`` (the leading dimensions collapse into
    one) and the axis moves accordingly; otherwise both are returned unchanged."""
    if keep is None or value.ndim <= keep.ndim or value.shape[:keep.ndim] != keep.shape:
        return value, axis
    if axis is None:
        return value[keep != 0], None
    ax = axis % value.ndim
    if ax < keep.ndim:
        return value, axis
    return value[keep != 0], ax - keep.ndim + 1


def collect(model: onnx.ModelProto, tensors: dict[str, int | None], feeds,
            grams: Iterable[str] = (), histograms: bool = True,
            rows: str | None = None, whole: Iterable[str] = ()) -> ActivationStats:
    """Run ``model`` with ``tensors`` (name -> channel axis) exposed as outputs over ``feeds``
    (an iterable of ``{input name: array}``, consumed once) and fold each result into
    :class:`TensorStats`; only one feed's activations are held at a time.

    Args:
        grams: names of ``tensors`` whose ``X^T X`` is accumulated too (float64 ``[K, K]``,
            ``K <=`` :data:`GRAM_MAX_CHANNELS`; see :class:`ActivationGrams`).
        histograms: False to keep only counts, ranges and per-channel sums.
        rows: a model input whose 0 entries mark positions left out of the statistics of every
            tensor whose leading dimensions are that input's shape (module docstring; a feed
            without it is taken whole).
        whole: names of ``tensors`` taken whole even with ``rows`` (element counts of the
            positions the model computes, for FLOPs).

    Raises:
        InputError: onnxruntime cannot load or run the instrumented model.
    """
    from onnxopt.validate import make_session, run_model  # onnxruntime, loaded only when needed

    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    g = exposed.graph
    present = {o.name for o in g.output}
    main = present | {i.name for i in g.input} | {i.name for i in g.initializer} | {
        o for node in g.node for o in node.output}
    # tensors of If branches reach the main graph as new outputs of their If nodes
    threaded = expose_branch_tensors(exposed, {n for n in tensors if n not in main})
    source = {n: n for n in tensors if n in main} | threaded
    names = [n for n in tensors if n in source and source[n] not in present] + [
        n for n in tensors if n in source and source[n] in present]
    g.output.extend(onnx.helper.make_empty_tensor_value_info(source[n])
                    for n in names if source[n] not in present)
    session = make_session(exposed, "instrumented model (activation statistics)")
    position = {o.name: i for i, o in enumerate(session.get_outputs())}
    position = {n: position[source[n]] for n in names}
    wanted, entire = set(grams), set(whole)
    stats = {n: TensorStats(n, None, wants_gram=n in wanted, wants_histogram=histograms)
             for n in tensors}
    count = 0
    for feed in feeds:
        values = run_model(session, feed, "instrumented model (activation statistics)")
        keep = feed.get(rows) if rows is not None else None
        # a mask keeping nothing: the feed whole, as the metrics judge it (kept_positions)
        keep = None if keep is None or not np.any(keep) else np.asarray(keep)
        for name in names:
            value, axis = kept_rows(np.asarray(values[position[name]]),
                                    None if name in entire else keep, tensors[name])
            s = stats[name]
            if axis is not None and value.ndim:
                s.channel_axis = axis % value.ndim
            s.update(value)
        count += 1
    return ActivationStats(stats, count)


#: Node outputs of a branch whose values tell whether it ran (one may be empty when it did).
BRANCH_PROBES = 3


def branches_run(graph: gs.Graph, template: onnx.ModelProto, branches: Iterable[gs.Graph],
                 feeds) -> set[int]:
    """``id``s of the graphs of ``branches`` (If branches of ``graph``'s model, reached from the
    main graph through If branches only: ``onnxopt.graph.branch_scopes``) that compute a value
    on at least one of ``feeds``: a branch none of them takes is not among them, nor one whose
    probed outputs (the first :data:`BRANCH_PROBES` named node outputs) are all empty or
    non-finite. What a drift budget measured on ``feeds`` cannot see.

    Raises:
        InputError: onnxruntime cannot load or run the instrumented model.
    """
    probes = {id(g): [o.name for n in g.nodes for o in n.outputs if o.name][:BRANCH_PROBES]
              for g in branches}
    names = sorted({n for found in probes.values() for n in found})
    if not names:
        return set()
    stats = collect(export_graph(graph, template), dict.fromkeys(names), feeds,
                    histograms=False)
    return {key for key, found in probes.items() if any(stats[n].count for n in found)}


def expose_branch_tensors(model: onnx.ModelProto, wanted: set[str],
                          guess_float: bool = True) -> dict[str, str]:
    """Make each tensor of ``wanted`` computed in an If branch of ``model``'s main graph (at any
    depth of nested Ifs) reachable as a tensor of the main graph (module docstring); edits
    ``model`` in place and returns ``{name: main-graph tensor carrying it}``. Names not
    computed in an If branch are left out, and so are those whose dtype ONNX shape inference
    does not give unless ``guess_float`` (then float32: the other branch's empty placeholder
    must have the tensor's dtype, or onnxruntime refuses the If)."""
    if not wanted:
        return {}
    used = {n for g in graph_protos(model.graph) for n in itertools.chain(
        (i.name for i in g.input), (i.name for i in g.initializer),
        (o for node in g.node for o in node.output))}
    fresh = NameAuthority(used).fresh

    @functools.cache
    def inferred_dtypes() -> dict[str, int]:
        """Element types by name, from one shape inference of the whole model (first use)."""
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
        except Exception:  # noqa: BLE001 -- any failure: no types known (see elem_type)
            inferred = model
        return {v.name: v.type.tensor_type.elem_type for g in graph_protos(inferred.graph)
                for v in itertools.chain(g.value_info, g.output, g.input)
                if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type}

    def elem_type(name: str) -> int:
        return inferred_dtypes().get(name, onnx.TensorProto.FLOAT if guess_float else 0)

    def expose(graph: onnx.GraphProto, wanted: set[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        for node in graph.node:
            if node.op_type != "If" or node.domain not in ("", "ai.onnx"):
                continue
            branches = {a.name: a.g for a in node.attribute
                        if a.type == onnx.AttributeProto.GRAPH}
            if set(branches) != {"then_branch", "else_branch"}:
                continue
            for key, body in branches.items():
                left = wanted - found.keys()
                local = left & {o for n in body.node for o in n.output}
                reach = {n: n for n in local} | expose(body, left - local)
                if not guess_float:
                    reach = {n: inside for n, inside in reach.items() if elem_type(n)}
                other = branches["else_branch" if key == "then_branch" else "then_branch"]
                listed = {o.name for o in body.output}
                for name, inside in sorted(reach.items()):
                    if inside in listed:  # already an output (the If's carries either branch's)
                        copy = fresh(f"{name}_calibration_copy")
                        body.node.append(onnx.helper.make_node(
                            "Identity", [inside], [copy],
                            name=fresh(f"{name}_calibration_Identity")))
                        inside = copy
                    body.output.append(onnx.helper.make_empty_tensor_value_info(inside))
                    empty = fresh(f"{name}_calibration_empty")
                    dtype = onnx.helper.tensor_dtype_to_np_dtype(elem_type(name))
                    other.node.append(onnx.helper.make_node(
                        "Constant", [], [empty], name=fresh(f"{name}_calibration_Constant"),
                        value=onnx.numpy_helper.from_array(np.empty((0,), dtype))))
                    other.output.append(onnx.helper.make_empty_tensor_value_info(empty))
                    found[name] = fresh(f"{name}_calibration")
                    node.output.append(found[name])
        return found

    return expose(model.graph, set(wanted))
