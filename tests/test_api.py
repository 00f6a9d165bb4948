"""Tests of optimizer/api.py's ``optimize(output=...)``: the result is written atomically with
the bytes validation ran, only when it passes (or ``keep_invalid``), never over the input."""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import onnx
import pytest
from onnx import helper

from helpers import assert_same_outputs, make_model
from onnxopt import UsageError, ValidationFailed, optimize
from onnxopt.pass_manager import REGISTRY, Pass, PassResult

VALIDATE = sys.modules["onnxopt.validate"]  # the package's ``validate`` is the function


def _model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Identity", ["x"], ["xi"]),
             helper.make_node("Add", ["A", "B"], ["ab"]),
             helper.make_node("MatMul", ["xi", "ab"], ["y"])]
    return make_model(nodes, [("x", np.float32, [2, 4])], [("y", np.float32, [2, 3])],
                      {"A": rng.normal(size=(4, 3)).astype(np.float32),
                       "B": rng.normal(size=(4, 3)).astype(np.float32)})


class _Corrupt(Pass):
    """Negates every float initializer, declared lossy: judged by the drift criterion, never
    rolled back."""
    name = "test_api_corrupt"
    description = "test only"
    lossless = False

    def run(self, graph, ctx):
        for t in graph.tensors().values():
            if hasattr(t, "values") and getattr(t.values, "dtype", None) == np.float32:
                t.values = -t.values
        return PassResult(True, {})


@pytest.fixture(params=["in memory", "staged"])
def staging(request, monkeypatch):
    """Both ways a result to be written is validated: from its serialization, or (``staged``,
    what a result of ``onnxopt.api.STAGE_BYTES`` or more gets) from its file, written first."""
    if request.param == "staged":
        monkeypatch.setattr("onnxopt.api.STAGE_BYTES", 0)
    return request.param


@pytest.mark.parametrize("source", ["path", "proto"])
def test_output_is_the_returned_model_and_named_in_the_report(tmp_path, source, staging):
    path = tmp_path / "in.onnx"
    path.write_bytes(_model().SerializeToString())
    out = tmp_path / "sub" / "out.onnx"
    model, report = optimize(str(path) if source == "path" else _model(), output=out)
    assert report.output == str(out) and report.validation.passed
    assert out.read_bytes() == model.SerializeToString()
    assert report.after.file_bytes == out.stat().st_size
    assert report.before.file_bytes == len(_model().SerializeToString())
    assert_same_outputs(_model(), onnx.load(str(out)))
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(["in.onnx", "sub", "out.onnx"])


def test_failed_validation_writes_nothing_unless_keep_invalid(tmp_path, monkeypatch, staging):
    monkeypatch.setitem(REGISTRY, _Corrupt.name, _Corrupt)
    out = tmp_path / "out.onnx"
    with pytest.raises(ValidationFailed, match="cosine") as raised:
        optimize(_model(), passes=[_Corrupt.name], output=out)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert_same_outputs(raised.value.model, _Corrupt_applied())
    _, report = optimize(_model(), passes=[_Corrupt.name], output=out, raise_on_failure=False)
    assert not out.exists() and report.output is None and list(tmp_path.iterdir()) == []
    model, report = optimize(_model(), passes=[_Corrupt.name], output=out,
                             raise_on_failure=False, keep_invalid=True)
    assert out.exists() and report.output == str(out) and not report.validation.passed
    assert out.read_bytes() == model.SerializeToString() and list(tmp_path.iterdir()) == [out]


def _Corrupt_applied() -> onnx.ModelProto:
    """What :class:`_Corrupt` makes of :func:`_model`."""
    model = _model()
    for t in model.graph.initializer:
        t.raw_data = (-onnx.numpy_helper.to_array(t)).tobytes()
    return model


def test_a_large_result_is_validated_from_its_file_before_it_is_in_place(tmp_path, monkeypatch):
    """Above ``STAGE_BYTES`` onnxruntime loads the result from a file in a hidden folder beside
    the output (never from bytes in memory), and the output appears only after validation."""
    monkeypatch.setattr("onnxopt.api.STAGE_BYTES", 0)
    out = tmp_path / "out.onnx"
    loaded = []
    real = VALIDATE.make_session

    def spy(model, what, **kwargs):
        if what.startswith("candidate"):
            loaded.append((type(model), model, out.exists()))
        return real(model, what, **kwargs)

    monkeypatch.setattr(VALIDATE, "make_session", spy)
    model, report = optimize(_model(), output=out)
    assert loaded and all(kind is not bytes and not written for kind, _, written in loaded)
    staged = {p for _, p, _ in loaded}
    assert all(p.parent.parent == tmp_path and p.parent.name.startswith(".out.onnx.")
               for p in staged)
    assert not any(p.exists() for p in staged) and list(tmp_path.iterdir()) == [out]
    assert out.read_bytes() == model.SerializeToString() and report.validation.passed


def test_output_never_overwrites_the_input(tmp_path):
    path = tmp_path / "in.onnx"
    original = _model().SerializeToString()
    path.write_bytes(original)
    with pytest.raises(UsageError, match="refusing to overwrite"):
        optimize(str(path), output=path)
    assert path.read_bytes() == original


def test_without_output_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, report = optimize(_model())
    assert report.output is None and list(tmp_path.iterdir()) == []
    assert report.after.file_bytes > 0


@pytest.mark.parametrize("kwargs,message", [
    ({"atol": float("nan")}, "tolerances must be finite"),
    ({"rtol": float("inf")}, "tolerances must be finite"),
    ({"max_drift": float("nan")}, "cosine similarity"),
    ({"seed": -1}, "seed must be a non-negative integer"),
    ({"input_shapes": {"x": [-1, 4]}}, "non-negative integers"),
])
def test_settings_that_cannot_mean_anything_are_usage_errors(kwargs, message):
    with pytest.raises(UsageError, match=message):
        optimize(_model(), **kwargs)


class _Understated(Pass):
    """Proposes ``A + 0.14`` and ``B + 0.04`` but applies ``A + 0.22``: a pass whose estimate
    (like a simulation that cannot see kernel saturation) is kinder than what it does."""

    name = "test_understated"
    description = "test only"
    lossless = False
    #: (weight, added in the proposal, added when applied)
    changes = (("A", 0.14, 0.22), ("B", 0.04, 0.04))

    def run(self, graph, ctx):
        from onnxopt.budget import Proposal

        tensors = graph.tensors()
        out = []
        for name, shown, real in self.changes:
            w = tensors[name]

            def apply(w=w, real=real):
                w.values = np.asarray(w.values) + np.float32(real)
            out.append(Proposal(w, np.asarray(w.values) + np.float32(shown), apply))
        return PassResult(False, proposals=out)


def test_a_budget_estimate_that_misses_is_decided_again_with_more_in_reserve():
    """Estimated, both changes fit cosine 0.99 (0.9936); applied, they miss it (0.9891). The run
    decides again with half the allowed drift in reserve, keeps A float and passes."""
    nodes = [helper.make_node("MatMul", ["x", "A"], ["h"]),
             helper.make_node("MatMul", ["h", "B"], ["y"])]
    model = make_model(nodes, [("x", np.float32, [4, 2])], [("y", np.float32, [4, 2])],
                       {"A": np.eye(2, dtype=np.float32), "B": np.eye(2, dtype=np.float32)})
    feed = {"x": np.random.default_rng(0).standard_normal((4, 2)).astype(np.float32)}
    _, report = optimize(model, passes=[_Understated()], inputs=feed, max_drift=0.99)
    assert report.validation.passed
    stats = report.passes[-1].stats
    assert stats["accepted"] == 1 and stats["drift_budget"]["kept"] == ["A"]
    assert any("estimate missed" in w for w in report.warnings)


@dataclasses.dataclass(frozen=True)
class _UnderstatedOptions:
    understate: bool = True  # False: applies what it proposes
    marker: int = 0  # reported in the statistics: which options ran


class _ModeUnderstated(_Understated):
    """Proposes ``A + 0.02`` and ``B + 0.001``, harmless, but applies ``B + 1.0`` unless its
    option says otherwise: a pass of a quantization mode whose estimate misses by more than
    any margin can make up for, and whose second-decision options mend it."""

    name = "test_mode_understated"
    Options = _UnderstatedOptions

    @property
    def changes(self):
        return tuple((name, shown, real if self.options.understate else shown)
                     for name, shown, real in (("A", 0.02, 0.02), ("B", 0.001, 1.0)))

    def run(self, graph, ctx):
        result = super().run(graph, ctx)
        result.stats["marker"] = self.options.marker
        return result


def test_the_second_decision_takes_the_modes_second_decision_options(monkeypatch):
    """A mode's pass whose estimate misses (B's change understated) is decided again with the
    mode's options for the second decision: the pass then applies what it proposed, and the
    warning names the options replaced. When the user gave that option, it stays, and the
    second decision fails too (B + 1.0 once more)."""
    from onnxopt import pipeline as pipeline_module

    monkeypatch.setitem(REGISTRY, _ModeUnderstated.name, _ModeUnderstated)
    monkeypatch.setitem(pipeline_module.QUANTIZE_MODES, "test-mode",
                        {_ModeUnderstated.name: {}})
    monkeypatch.setitem(pipeline_module.SECOND_DECISION, "test-mode",
                        {_ModeUnderstated.name: {"understate": False}})
    nodes = [helper.make_node("MatMul", ["x", "A"], ["h"]),
             helper.make_node("MatMul", ["h", "B"], ["y"])]
    model = make_model(nodes, [("x", np.float32, [4, 2])], [("y", np.float32, [4, 2])],
                       {"A": np.eye(2, dtype=np.float32), "B": np.eye(2, dtype=np.float32)})
    feed = {"x": np.random.default_rng(0).standard_normal((4, 2)).astype(np.float32)}
    _, report = optimize(model, passes=[], quantize="test-mode", inputs=feed, max_drift=0.99)
    assert report.validation.passed
    assert any("second-decision options (test_mode_understated: understate=False)" in w
               for w in report.warnings)
    assert report.passes[-1].stats["accepted"] == 2
    with pytest.raises(ValidationFailed) as failed:
        optimize(model, passes=[], quantize="test-mode", inputs=feed, max_drift=0.99,
                 options={_ModeUnderstated.name: {"understate": True}})
    warnings = failed.value.report.warnings
    assert any("estimate missed" in w and "second-decision" not in w for w in warnings)


class _NegatesC(Pass):
    """A lossless pass with a bug: it negates the weight ``C``, after the lossy passes (so
    that the drift budget, which compares with the original, accepts their proposals)."""

    name = "test_negates_c"
    description = "test only"

    def run(self, graph, ctx):
        c = graph.tensors()["C"]
        if ctx.lossy_pending or getattr(c, "negated", False):
            return PassResult(False)
        c.values, c.negated = -np.asarray(c.values), True
        return PassResult(True)


@pytest.mark.parametrize("first_passes", [True, False])
def test_a_lossless_culprit_found_after_the_second_decision_restores_the_first(
        monkeypatch, first_passes):
    """A lossless pass breaks the model beside a mode's lossy pass: the first and the second
    decision fail, the lossless passes alone fail too, the culprit is rolled back -- and the
    lossy pass then runs with its first decision (the full budget, the mode's options: marker
    0) when that validates, else with the second (marker 1); the warning says so instead of
    blaming the budget's estimate."""
    from onnxopt import pipeline as pipeline_module

    monkeypatch.setitem(REGISTRY, _ModeUnderstated.name, _ModeUnderstated)
    monkeypatch.setitem(REGISTRY, _NegatesC.name, _NegatesC)
    monkeypatch.setitem(pipeline_module.QUANTIZE_MODES, "test-mode", {
        _ModeUnderstated.name: {"understate": not first_passes}})
    monkeypatch.setitem(pipeline_module.SECOND_DECISION, "test-mode", {
        _ModeUnderstated.name: {"understate": False, "marker": 1}})
    nodes = [helper.make_node("MatMul", ["x", "A"], ["h"]),
             helper.make_node("MatMul", ["h", "B"], ["g"]),
             helper.make_node("MatMul", ["g", "C"], ["y"])]
    rng = np.random.default_rng(1)
    model = make_model(nodes, [("x", np.float32, [4, 2])], [("y", np.float32, [4, 2])],
                       {n: (np.eye(2) + 0.3 * rng.standard_normal((2, 2))).astype(np.float32)
                        for n in "ABC"})
    feed = {"x": np.random.default_rng(0).standard_normal((4, 2)).astype(np.float32)}
    _, report = optimize(model, passes=["default", _NegatesC.name], quantize="test-mode",
                         inputs=feed, max_drift=0.99)
    assert report.validation.passed
    assert [r["pass"] for r in report.rolled_back] == [_NegatesC.name]
    record = {r.name: r for r in report.passes}[_ModeUnderstated.name]
    assert record.stats["marker"] == (0 if first_passes else 1)
    assert record.stats["accepted"] == 2
    warning = next(w for w in report.warnings if "rolled back" in w)
    assert "lossless passes alone fail too" in warning and warning.endswith("passed")
    assert ("then with 50% of the allowed drift" in warning) is not first_passes
    assert not any("estimate missed" in w for w in report.warnings)


def test_api_warns_in_api_terms_about_synthesized_inputs(tmp_path):
    from onnxopt.errors import OnnxoptWarning
    from tools.gen_chain import generate
    path = generate(tmp_path / "chain.onnx", layers=1, dim=8)
    with pytest.warns(OnnxoptWarning, match=r"input_shapes=\{'x': \[\.\.\.\]\} or give inputs=") \
            as caught:
        optimize(path)
    assert all("--" not in str(w.message) for w in caught)
    assert caught[0].filename == __file__  # attributed to the caller


def test_cli_prints_warnings_once_in_cli_terms(tmp_path, capsys):
    from onnxopt.cli import main
    from tools.gen_chain import generate
    path = generate(tmp_path / "chain.onnx", layers=1, dim=8)
    assert main(["optimize", str(path), "-o", str(tmp_path / "o.onnx"), "--quiet"]) == 0
    printed = capsys.readouterr()
    text = printed.out + printed.err
    assert text.count("dynamic dim(s)") == 1 and "--input-shape x:DxD..." in text


def test_a_model_with_optional_types_is_written_unchanged_with_a_warning(tmp_path):
    from onnxopt.errors import OnnxoptWarning
    optional = helper.make_optional_type_proto(
        helper.make_tensor_type_proto(onnx.TensorProto.FLOAT, [2]))
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["i"]), helper.make_node("Identity", ["i"], ["y"])],
        "g", [helper.make_value_info("x", optional)], [helper.make_value_info("y", optional)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)])
    with pytest.warns(OnnxoptWarning, match="optional.*written unchanged"):
        result, report = optimize(model, validate=False, output=tmp_path / "o.onnx")
    assert result.graph == model.graph and report.passes == []
    assert onnx.load(str(tmp_path / "o.onnx")).graph == model.graph


def test_a_modes_helper_pass_that_changes_nothing_does_not_warn():
    """``--quantize int8-weight`` on a model without embedding tables: quantize_embeddings (a
    helper of the mode) changes nothing, which its statistics show (nothing quantized) but no
    warning repeats; named in the pipeline by the user, it warns."""
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"])]
    model = make_model(nodes, [("x", np.float32, [2, 64])], [("y", np.float32, [2, 64])],
                       {"W": rng.normal(size=(64, 64)).astype(np.float32)})
    feed = {"x": rng.normal(size=(2, 64)).astype(np.float32)}
    _, report = optimize(model, quantize="int8-weight", inputs=feed)
    (embeddings,) = [r for r in report.passes if r.name == "quantize_embeddings"]
    assert not embeddings.modified and embeddings.stats["tensors_quantized"] == 0
    assert not any("quantize_embeddings" in w for w in report.warnings)
    assert any(r.name == "quantize_weights" and r.modified for r in report.passes)
    from onnxopt.errors import OnnxoptWarning

    with pytest.warns(OnnxoptWarning, match="quantize_embeddings changed nothing"):
        _, report = optimize(model, passes=["default", "quantize_embeddings"], inputs=feed)
    assert any("quantize_embeddings changed nothing" in w for w in report.warnings)
