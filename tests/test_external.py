"""Tests of optimizer/external.py: models with external data stay in their files through a run.

The models are small MatMul chains from ``tools/gen_chain.py`` (the large-model benchmark's
generator); every result is run on onnxruntime against the original from its own folder.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxopt
from onnxopt import errors, external, io
from tools.gen_chain import generate


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.fixture
def chain(tmp_path) -> Path:
    return generate(tmp_path / "in" / "chain.onnx", layers=3, dim=64)


def _feeds(dim: int = 64) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal((b, dim), dtype=np.float32) for b in (1, 3, 0)]


def test_default_run_streams_unchanged_weights_and_keeps_the_input(chain, tmp_path):
    before = {p.name: _digest(p) for p in chain.parent.iterdir()}
    out = tmp_path / "out" / "chain.opt.onnx"
    model, report = onnxopt.optimize(chain, output=out)
    assert report.validation.passed
    assert {p.name: _digest(p) for p in chain.parent.iterdir()} == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["chain.opt.onnx",
                                                          "chain.opt.onnx.data"]
    for x in _feeds():
        np.testing.assert_array_equal(_run(out, x), _run(chain, x))
    saved = onnx.load(str(out), load_external_data=False)
    weights = [t for t in saved.graph.initializer if t.name.startswith("W")]
    assert weights and all(external.is_external(t) for t in weights)
    for t in weights:  # page-aligned, so onnxruntime maps them
        info = onnx.external_data_helper.ExternalDataInfo(t)
        assert info.location == "chain.opt.onnx.data" and int(info.offset) % 4096 == 0
    assert report.after.file_bytes == out.stat().st_size + Path(f"{out}.data").stat().st_size
    assert report.before.file_bytes >= external.external_bytes(io.load_model(chain, lazy=True))
    # the returned model refers to the input's data, by the input's locations
    assert all(onnx.external_data_helper.ExternalDataInfo(t).location == "chain.onnx.data"
               for t in model.graph.initializer if external.is_external(t))


def test_returned_model_is_self_contained_or_saved_with_its_base_dir(chain, tmp_path):
    """Export pipelines take the ModelProto out: without ``output`` it holds its data (it fits
    in one protobuf) and runs and saves anywhere; with ``output`` it refers to the input's
    data, and saving it elsewhere needs the input's folder."""
    model, _ = onnxopt.optimize(chain, validate=False)
    assert not external.has_external_data(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for x in _feeds():
        np.testing.assert_array_equal(session.run(None, {"x": x})[0], _run(chain, x))
    onnxopt.save_model(model, tmp_path / "a" / "m.onnx")
    np.testing.assert_array_equal(_run(tmp_path / "a" / "m.onnx", _feeds()[1]),
                                  _run(chain, _feeds()[1]))

    model, _ = onnxopt.optimize(chain, validate=False, output=tmp_path / "b" / "m.onnx")
    assert external.has_external_data(model)
    with pytest.raises(errors.ModelLoadError, match="folder is unknown: pass base_dir"):
        onnxopt.save_model(model, tmp_path / "c" / "m.onnx")
    assert not (tmp_path / "c" / "m.onnx").exists()
    onnxopt.save_model(model, tmp_path / "c" / "m.onnx", base_dir=chain.parent)
    np.testing.assert_array_equal(_run(tmp_path / "c" / "m.onnx", _feeds()[1]),
                                  _run(chain, _feeds()[1]))


def test_changed_weights_are_written_and_validated(chain, tmp_path):
    out = tmp_path / "q.onnx"
    _, report = onnxopt.optimize(chain, output=out, quantize="int8-weight", max_drift=0.99)
    assert report.validation.passed and report.validation.mode == "lossy"
    reference = onnx.load(str(chain))
    quantized = onnx.load(str(out))  # loads its external data from the output's folder
    assert any(t.data_type == onnx.TensorProto.INT8 for t in quantized.graph.initializer)
    x = _feeds()[1]
    ref = ort.InferenceSession(reference.SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = _run(out, x)
    cosine = float((ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got))
    assert cosine > 0.99


def test_weights_read_by_a_pass_are_not_copied_into_the_output_protobuf(chain, tmp_path):
    """dedup reads every weight (sketches, digests): they must still leave as references."""
    model, _ = onnxopt.optimize(chain, validate=False, output=tmp_path / "o.onnx")
    inline = [t.name for t in model.graph.initializer
              if not external.is_external(t) and t.name.startswith("W")]
    assert inline == []


def _duplicated(tmp_path: Path, middle_differs: bool) -> Path:
    """A model adding two external [64, 64] weights that are equal, or differ in one element
    in the middle (outside the sampled windows of ``ExternalValues.sketch``)."""
    w = np.arange(64 * 64, dtype=np.float32).reshape(64, 64) / 4096
    v = w.copy()
    if middle_differs:
        v[40, 3] += 1  # byte 10252: between the sketch windows of a 16 KiB tensor
    inits = [onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(v, "v")]
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Add", ["x", "w"], ["a"]),
         onnx.helper.make_node("Add", ["a", "v"], ["y"])], "dup",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [64, 64])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [64, 64])], inits)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    path = tmp_path / "dup" / "dup.onnx"
    io.save_model(model, path, external_data=True)
    return path


@pytest.mark.parametrize("middle_differs", [False, True])
def test_external_duplicates_are_merged_only_when_equal(tmp_path, middle_differs):
    path = _duplicated(tmp_path, middle_differs)
    # 64 x 64 float32 is 16 KiB: sketch windows are 4 KiB at 0, 1/3, 2/3 and the end
    _, report = onnxopt.optimize(path, output=tmp_path / "o.onnx")
    record = next(r for r in report.passes if r.name == "dedup_initializers")
    assert record.stats["initializers_merged"] == (0 if middle_differs else 1)
    x = np.ones((64, 64), np.float32)
    np.testing.assert_array_equal(_run(tmp_path / "o.onnx", x), _run(path, x))


def test_short_external_data_is_refused_naming_the_tensor(chain):
    data = Path(f"{chain}.data")
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(errors.ModelLoadError, match="too short for tensor 'W0'"):
        onnxopt.optimize(chain)


def test_saving_in_memory_model_with_external_data_round_trips(tmp_path):
    rng = np.random.default_rng(1)
    weights = {"a": rng.standard_normal((33, 17)).astype(np.float32),
               "b": rng.integers(0, 9, (300,)).astype(np.int64),
               "small": np.ones(3, np.float32)}
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", [n], [f"{n}_out"]) for n in weights], "g", [],
        [onnx.helper.make_tensor_value_info(f"{n}_out", onnx.helper.np_dtype_to_tensor_dtype(
            v.dtype), list(v.shape)) for n, v in weights.items()],
        [onnx.numpy_helper.from_array(v, n) for n, v in weights.items()])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    before = model.SerializeToString()
    written = io.save_model(model, tmp_path / "m.onnx", external_data=True)
    assert model.SerializeToString() == before  # put back as it was
    assert [p.name for p in written] == ["m.onnx", "m.onnx.data"]
    loaded = onnx.load(str(tmp_path / "m.onnx"))
    for t in loaded.graph.initializer:
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(t), weights[t.name])
    lazy = io.load_model(tmp_path / "m.onnx", lazy=True)
    assert {t.name for t in lazy.graph.initializer if external.is_external(t)} == {"a", "b"}


def test_validate_api_runs_models_from_their_own_folders(chain, tmp_path):
    out = tmp_path / "elsewhere" / "c.onnx"
    onnxopt.optimize(chain, output=out)
    report = onnxopt.validate(chain, out)
    assert report.validation.passed


def test_long_steps_report_progress(chain, tmp_path):
    from onnxopt import progress
    steps = []
    with progress.listening(lambda step, done, total: steps.append((step, done, total))):
        onnxopt.optimize(chain, output=tmp_path / "p.onnx")
    names = [s for s, _, _ in steps]
    assert "pass remove_identity (round 1)" in names
    assert "validation: loading the reference model" in names
    writing = [(d, t) for s, d, t in steps if s == "writing p.onnx.data"]
    assert writing and writing[0][0] == 0 and writing[0][1] >= 3 * 64 * 64 * 4


def test_inspect_and_size_table_count_external_data(chain, capsys):
    from onnxopt.cli import main
    assert main(["inspect", str(chain)]) == 0
    data = Path(f"{chain}.data")
    out = capsys.readouterr().out
    assert f"of external data in {data.name}" in " ".join(out.split())
    out_path = chain.parent.parent / "o.onnx"
    assert main(["optimize", str(chain), "-o", str(out_path), "--report",
                 str(chain.parent.parent / "r.json")]) == 0
    import json
    report = json.loads((chain.parent.parent / "r.json").read_text())
    assert report["before"]["file_bytes"] == chain.stat().st_size + data.stat().st_size
    assert report["after"]["file_bytes"] == (out_path.stat().st_size
                                             + Path(f"{out_path}.data").stat().st_size)


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def test_every_pass_gives_the_same_result_on_external_data():
    """Random models with every tensor stored outside (onnx's own writer, unaligned offsets):
    the run from the file finds the same rewrites as the in-memory run, and the written model
    computes the original's outputs."""
    import tempfile

    from hypothesis import given

    from helpers import assert_same_outputs, random_models

    @given(random_models())
    def check(model):
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder, "in", "m.onnx")
            path.parent.mkdir()
            stored = onnx.ModelProto()
            stored.CopyFrom(model)  # onnx.save_model moves the data out of the model it saves
            onnx.save_model(stored, str(path), save_as_external_data=True, size_threshold=0,
                            all_tensors_to_one_file=True, location="m.bin")
            in_memory, _ = onnxopt.optimize(model, validate=False)
            from_file, report = onnxopt.optimize(path, output=Path(folder, "out", "m.onnx"))
            assert report.validation.passed
            assert _ops(from_file) == _ops(in_memory)
            assert_same_outputs(model, onnx.load(str(Path(folder, "out", "m.onnx"))))

    check()


def test_checker_of_models_with_external_data_still_rejects_invalid_ones(chain):
    model = io.load_model(chain, lazy=True)
    external.check_with_references(model)  # valid: the data files need not be at hand
    model.graph.node[0].input[0] = "undefined"
    with pytest.raises(onnx.checker.ValidationError, match="undefined"):
        external.check_with_references(model)
    inline = io.load_model(chain)  # in-memory weights are checked as references too
    inline.graph.node[1].op_type = "NoSuchOp"
    with pytest.raises(onnx.checker.ValidationError, match="NoSuchOp"):
        external.check_with_references(inline)


def _external(tensor: onnx.TensorProto, location: str) -> onnx.TensorProto:
    """``tensor`` stored at offset 0 of ``location`` (the caller writes the file)."""
    stored = onnx.TensorProto()
    stored.CopyFrom(tensor)
    stored.ClearField("raw_data")
    stored.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"),
                       ("length", str(len(tensor.raw_data)))):
        entry = stored.external_data.add()
        entry.key, entry.value = key, value
    return stored


def test_constant_nodes_with_external_data_in_the_main_graph_and_a_branch(tmp_path):
    """A Constant node's value may be stored outside too (onnx's writer moves tensor
    attributes out): it is lowered to an initializer that stays a reference."""
    w = np.random.default_rng(0).standard_normal((16, 16)).astype(np.float32)
    (tmp_path / "w.bin").write_bytes(w.tobytes())
    value = _external(onnx.numpy_helper.from_array(w, "c"), "w.bin")
    h = onnx.helper
    branch = h.make_graph(
        [h.make_node("Constant", [], ["e"], value=value),
         h.make_node("MatMul", ["b", "e"], ["t"])], "then", [], [h.make_tensor_value_info("t", onnx.TensorProto.FLOAT, [2, 16])])
    other = h.make_graph([h.make_node("Neg", ["b"], ["f"])], "else", [],
                         [h.make_tensor_value_info("f", onnx.TensorProto.FLOAT, [2, 16])])
    graph = h.make_graph(
        [h.make_node("Constant", [], ["c"], value=value), h.make_node("MatMul", ["x", "c"], ["b"]),
         h.make_node("ReduceSum", ["b"], ["s"], keepdims=0),
         h.make_node("Greater", ["s", "zero"], ["cond"]),
         h.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=other)], "g",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 16])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 16])],
        [onnx.numpy_helper.from_array(np.array(0, np.float32), "zero")])
    path = tmp_path / "m.onnx"
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), path)
    out = tmp_path / "out" / "m.onnx"
    model, report = onnxopt.optimize(path, output=out)
    assert report.validation.passed
    weights = [t for t in external.all_tensors(model) if list(t.dims) == [16, 16]]
    assert weights and all(external.is_external(t) for t in weights)  # never read in
    x = np.random.default_rng(1).standard_normal((2, 16)).astype(np.float32)
    for feed in (x, -x):  # both branches
        np.testing.assert_array_equal(_run(out, feed), _run(path, feed))


def test_empty_and_scalar_tensors_stored_outside_keep_their_length(tmp_path):
    """onnx's writer stores an empty tensor with length 0: it must not come out as -1."""
    h = onnx.helper
    values = {"empty": np.zeros((0, 4), np.float32), "scalar": np.array(3, np.int64),
              "matrix": np.arange(6, dtype=np.int32).reshape(2, 3)}
    graph = h.make_graph(
        [h.make_node("Identity", [n], [f"{n}_out"]) for n in values] +
        [h.make_node("Identity", ["x"], ["y"])], "g",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [h.make_tensor_value_info(f"{n}_out", onnx.helper.np_dtype_to_tensor_dtype(v.dtype),
                                  list(v.shape)) for n, v in values.items()] +
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
        [onnx.numpy_helper.from_array(v, n) for n, v in values.items()])
    path = tmp_path / "in" / "m.onnx"
    path.parent.mkdir()
    onnx.save_model(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), str(path),
                    save_as_external_data=True, size_threshold=0, location="m.bin")
    out = tmp_path / "out" / "m.onnx"
    onnxopt.optimize(path, output=out, validate=False, passes=["eliminate_dead"])
    saved = onnx.load(str(out))  # onnx refuses a negative length
    got = {t.name: onnx.numpy_helper.to_array(t) for t in saved.graph.initializer}
    for name, v in values.items():
        np.testing.assert_array_equal(got[name], v)


def test_model_proto_without_its_external_data_is_refused_by_validate(chain):
    model = onnx.load(str(chain), load_external_data=False)
    with pytest.raises(errors.UsageError, match="whose folder a ModelProto does not tell"):
        onnxopt.validate(model, model)
    with pytest.raises(errors.UsageError, match="whose folder a ModelProto does not tell"):
        onnxopt.validate(chain, model)


def _mlp(tmp_path: Path) -> Path:
    """``Relu(x W1) W2`` with x ``[batch, 4, 64]`` (3-D: int4's MatMuls stay MatMuls), W1
    ``[64, 128]``, W2 ``[128, 64]``, stored outside."""
    rng = np.random.default_rng(1)
    inits = [onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) / 8, n)
             for n, shape in (("W1", (64, 128)), ("W2", (128, 64)))]
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "W1"], ["h"]),
         onnx.helper.make_node("Relu", ["h"], ["r"]),
         onnx.helper.make_node("MatMul", ["r", "W2"], ["y"])], "mlp",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 4, 64])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 4, 64])],
        inits)
    path = tmp_path / "in" / "mlp.onnx"
    io.save_model(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]),
                  path, external_data=True)
    return path


@pytest.mark.parametrize("mode, options", [
    ("int8-weight", None),
    ("int4-weight", {"quantize_int4": {"method": "gptq", "ratio": 1.0}}),
])
def test_large_model_codes_and_grams_wait_in_the_spill_file(tmp_path, monkeypatch, mode,
                                                            options):
    """Quantized codes (and GPTQ's Gram matrices) of a model with external data go to the spill
    file, mapped only while read; the written model holds the same tensors as the in-memory
    run's and computes the same outputs."""
    model = _mlp(tmp_path)
    monkeypatch.setattr(external, "SPILL_THRESHOLD", 1024)
    spilled = []
    make = external.SpilledValues.__init__

    def counted(self, *args, **kwargs):
        make(self, *args, **kwargs)
        spilled.append(self.data_type)

    monkeypatch.setattr(external.SpilledValues, "__init__", counted)
    rng = np.random.default_rng(2)
    feeds = [{"x": rng.standard_normal((b, 4, 64), dtype=np.float32)} for b in (1, 3, 0)]
    calibration = feeds[:2]
    run = dict(quantize=mode, max_drift=0.99, inputs=calibration[1], calibration=calibration,
               options=options)
    out = tmp_path / "out" / "q.onnx"
    _, report = onnxopt.optimize(model, output=out, **run)
    assert report.validation.passed and report.validation.mode == "lossy"
    codes = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4} if mode == "int4-weight" \
        else {onnx.TensorProto.INT8}
    assert codes & set(spilled)
    if mode == "int4-weight":
        assert onnx.TensorProto.DOUBLE in spilled  # the Gram matrices
    from_file = len(spilled)
    in_memory, _ = onnxopt.optimize(onnx.load(str(model)), **run)
    assert len(spilled) == from_file  # a model held in memory spills nothing
    written = {t.name: onnx.numpy_helper.to_array(t)
               for t in onnx.load(str(out)).graph.initializer}
    expected = {t.name: onnx.numpy_helper.to_array(t) for t in in_memory.graph.initializer}
    assert written.keys() == expected.keys()
    assert any(t.data_type in codes for t in in_memory.graph.initializer)
    for name, value in expected.items():
        np.testing.assert_array_equal(written[name], value, err_msg=name)
    session = ort.InferenceSession(in_memory.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    for feed in feeds:
        np.testing.assert_array_equal(_run(out, feed["x"]), session.run(None, feed)[0])


def test_spilled_weights_are_digested_from_the_file_not_kept_mapped(tmp_path, monkeypatch):
    """dedup_initializers merges equal spilled arrays by their stored bytes; its digest cache
    holds no mapping of them (a decoder's 1 GiB of codes stayed resident through it)."""
    import contextvars

    import onnx_graphsurgeon as gs

    from onnxopt.pass_manager import PassContext, get_pass

    monkeypatch.setattr(external, "SPILL_THRESHOLD", 1024)
    w = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)

    def run():
        external.use_folder(tmp_path)
        a, b = external.spill(w), external.spill(w.copy())
        assert isinstance(a, external.SpilledValues) and a is not b
        x = gs.Variable("x", np.float32, [64, 64])
        y, z = gs.Variable("y", np.float32, [64, 64]), gs.Variable("z", np.float32, [64, 64])
        graph = gs.Graph(nodes=[gs.Node("Add", "add", inputs=[x, gs.Constant("a", a)],
                                        outputs=[y]),
                                gs.Node("Add", "add2", inputs=[y, gs.Constant("b", b)],
                                        outputs=[z])],
                         inputs=[x], outputs=[z], opset=17)
        dedup = get_pass("dedup_initializers")
        result = dedup.run(graph, PassContext())
        assert result.stats["initializers_merged"] == 1
        assert dedup._digests == {}
        model = gs.export_onnx(graph)  # the stand-in of the one weight left, then its bytes
        assert not model.graph.initializer[0].raw_data
        external.fill_spilled(model)
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(model.graph.initializer[0]), w)

    contextvars.copy_context().run(run)
