"""Tests of optimizer/io.py: loading from every source, external-data safety, atomic saves."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import make_model, run_ort, random_feed
from onnxopt import errors
from onnxopt.io import external_data_files, load_model, save_model


def _model(weight_elems: int = 4096) -> onnx.ModelProto:
    w = np.arange(weight_elems, dtype=np.float32).reshape(-1, 16) / weight_elems
    return make_model([helper.make_node("MatMul", ["x", "W"], ["y"])],
                      [("x", np.float32, [2, w.shape[0]])], [("y", np.float32, [2, 16])], {"W": w})


def _files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def _with_external_location(location: str) -> onnx.ModelProto:
    """The model, its weight W marked as external data at ``location`` (offset 0)."""
    model = _model(64)
    w = model.graph.initializer[0]
    w.ClearField("raw_data")
    w.ClearField("float_data")
    w.data_location = TensorProto.EXTERNAL
    del w.external_data[:]
    for key, value in (("location", location), ("offset", "0"), ("length", str(64 * 4))):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    return model


# ----------------------------------------------------------------------------- loading

def test_load_from_path_bytes_and_proto_give_the_same_model(tmp_path):
    model = _model()
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    from_path = load_model(path)
    from_str = load_model(str(path))
    from_bytes = load_model(model.SerializeToString())
    assert load_model(model) is model
    for loaded in (from_path, from_str, from_bytes):
        assert loaded.SerializeToString() == model.SerializeToString()


@pytest.mark.parametrize("content", [b"", b"not an onnx model at all \x00\xff" * 10])
def test_invalid_file_raises_model_load_error(tmp_path, content):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(errors.ModelLoadError, match="bad.onnx"):
        load_model(path)


def test_invalid_bytes_and_missing_file_raise_model_load_error(tmp_path):
    with pytest.raises(errors.ModelLoadError, match="<bytes>"):
        load_model(b"\xff\xfe garbage \x00")
    with pytest.raises(errors.ModelLoadError, match="missing.onnx"):
        load_model(tmp_path / "missing.onnx")
    with pytest.raises(errors.ModelLoadError):
        load_model(tmp_path)  # a folder is not a model


def test_model_saved_with_external_data_loads(tmp_path):
    model = _model()
    path = tmp_path / "ext.onnx"
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # onnx.save_model moves the tensors out of the proto it is given
    onnx.save_model(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    assert (tmp_path / "weights.bin").stat().st_size >= 4096 * 4
    loaded = load_model(path)
    assert not onnx.external_data_helper.uses_external_data(loaded.graph.initializer[0])
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[0]),
                                  numpy_helper.to_array(model.graph.initializer[0]))
    feed = random_feed(model)
    np.testing.assert_array_equal(run_ort(loaded, feed)["y"], run_ort(model, feed)["y"])


def test_bytes_referring_to_external_data_are_refused(tmp_path):
    model = _with_external_location("w.bin")
    with pytest.raises(errors.ModelLoadError, match="external data"):
        load_model(model.SerializeToString())


@pytest.mark.parametrize("location", ["/etc/passwd", "../secret.bin", "sub/../../secret.bin",
                                      "sub/../../model_dir/../secret.bin"])
def test_external_data_outside_the_model_folder_is_refused(tmp_path, location):
    folder = tmp_path / "model_dir"
    (folder / "sub").mkdir(parents=True)
    (tmp_path / "secret.bin").write_bytes(np.ones(64, np.float32).tobytes())
    path = folder / "m.onnx"
    path.write_bytes(_with_external_location(location).SerializeToString())
    with pytest.raises(errors.ModelLoadError, match="W"):
        load_model(path)


def test_external_data_through_a_symlink_escaping_the_folder_is_refused(tmp_path):
    folder = tmp_path / "model_dir"
    folder.mkdir()
    (tmp_path / "secret.bin").write_bytes(np.ones(64, np.float32).tobytes())
    os.symlink(tmp_path / "secret.bin", folder / "w.bin")
    path = folder / "m.onnx"
    path.write_bytes(_with_external_location("w.bin").SerializeToString())
    with pytest.raises(errors.ModelLoadError, match="escapes"):
        load_model(path)


def test_external_data_inside_the_folder_with_dotdot_that_stays_inside_loads(tmp_path):
    (tmp_path / "sub").mkdir()
    values = np.arange(64, dtype=np.float32)
    (tmp_path / "w.bin").write_bytes(values.tobytes())
    path = tmp_path / "m.onnx"
    path.write_bytes(_with_external_location("sub/../w.bin").SerializeToString())
    loaded = load_model(path)
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[0]).ravel(), values)


def test_missing_external_data_file_is_refused(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(_with_external_location("absent.bin").SerializeToString())
    with pytest.raises(errors.ModelLoadError, match="absent.bin"):
        load_model(path)


def test_truncated_external_data_file_is_refused(tmp_path):
    (tmp_path / "w.bin").write_bytes(np.ones(10, np.float32).tobytes())  # 40 of 256 bytes
    path = tmp_path / "m.onnx"
    path.write_bytes(_with_external_location("w.bin").SerializeToString())
    with pytest.raises(errors.ModelLoadError):
        load_model(path)


@pytest.mark.parametrize("key,value", [("offset", "-4"), ("offset", "abc"), ("length", "-1"),
                                       ("length", "1e3")])
def test_invalid_external_data_offset_or_length_is_refused(tmp_path, key, value):
    (tmp_path / "w.bin").write_bytes(np.ones(64, np.float32).tobytes())
    model = _with_external_location("w.bin")
    for entry in model.graph.initializer[0].external_data:
        if entry.key == key:
            entry.value = value
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(errors.ModelLoadError, match="tensor .W. has invalid external data"):
        load_model(path, lazy=True)
    assert external_data_files(path) == []  # no crash when looking for files to protect


# ----------------------------------------------------------------------------- saving

def test_save_writes_the_model_and_leaves_no_temporary_file(tmp_path):
    model = _model()
    written = save_model(model, tmp_path / "out.onnx")
    assert written == [tmp_path / "out.onnx"]
    assert _files(tmp_path) == {"out.onnx"}
    assert load_model(tmp_path / "out.onnx").SerializeToString() == model.SerializeToString()


@pytest.mark.parametrize("external_data", [False, True])
def test_save_keeps_the_file_mode_of_the_output_it_replaces(tmp_path, external_data):
    out = tmp_path / "out.onnx"
    save_model(_model(), out, external_data=external_data)
    umask = os.umask(0)
    os.umask(umask)
    new = 0o666 & ~umask
    assert all(stat.S_IMODE(f.stat().st_mode) == new for f in tmp_path.iterdir())
    out.chmod(0o600)
    save_model(_model(), out, external_data=external_data)
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in tmp_path.iterdir())


def test_save_creates_missing_folders(tmp_path):
    save_model(_model(), tmp_path / "a" / "b" / "out.onnx")
    assert (tmp_path / "a" / "b" / "out.onnx").is_file()


class _Unserializable:
    """Stands for a model whose serialization fails half-way (e.g. out of memory)."""

    graph, functions = onnx.GraphProto(), ()

    def ByteSize(self):
        return 100

    def SerializeToString(self, **kwargs):
        raise RuntimeError("serialization failed")


def test_failed_save_leaves_the_target_untouched_and_no_temporary_file(tmp_path):
    target = tmp_path / "out.onnx"
    target.write_bytes(b"previous content")
    with pytest.raises(RuntimeError, match="serialization failed"):
        save_model(_Unserializable(), target, external_data=False)
    assert target.read_bytes() == b"previous content"
    assert _files(tmp_path) == {"out.onnx"}


def test_save_external_data_writes_out_data_and_reloads_equal(tmp_path):
    model = _model()
    out = tmp_path / "out.onnx"
    written = save_model(model, out, external_data=True)
    assert written == [out, tmp_path / "out.onnx.data"]
    assert _files(tmp_path) == {"out.onnx", "out.onnx.data"}
    assert out.stat().st_size < 4096  # the weight (16 KiB) is outside the protobuf
    assert (tmp_path / "out.onnx.data").stat().st_size >= 4096 * 4
    reloaded = load_model(out)
    np.testing.assert_array_equal(numpy_helper.to_array(reloaded.graph.initializer[0]),
                                  numpy_helper.to_array(model.graph.initializer[0]))
    # the model given to save_model is not modified
    assert not onnx.external_data_helper.uses_external_data(model.graph.initializer[0])
    feed = random_feed(model)
    np.testing.assert_array_equal(run_ort(reloaded, feed)["y"], run_ort(model, feed)["y"])


def test_save_external_data_can_overwrite_a_previous_external_save(tmp_path):
    out = tmp_path / "out.onnx"
    save_model(_model(), out, external_data=True)
    other = _model()
    other.graph.initializer[0].CopyFrom(numpy_helper.from_array(
        np.full((256, 16), 3.0, np.float32), "W"))
    save_model(other, out, external_data=True)
    assert (tmp_path / "out.onnx.data").stat().st_size == 256 * 16 * 4
    np.testing.assert_array_equal(numpy_helper.to_array(load_model(out).graph.initializer[0]), 3.0)


def _protected(tmp_path) -> Path:
    src = tmp_path / "in.onnx"
    src.write_bytes(_model().SerializeToString())
    return src


def test_save_refuses_to_overwrite_the_protected_file(tmp_path):
    src = _protected(tmp_path)
    before = src.read_bytes()
    for spelling in (src, str(src), tmp_path / "." / "in.onnx", tmp_path / "x" / ".." / "in.onnx"):
        (tmp_path / "x").mkdir(exist_ok=True)
        with pytest.raises(errors.UsageError, match="refusing to overwrite"):
            save_model(_model(8 * 16), spelling, protect=(src,))
    assert src.read_bytes() == before
    assert _files(tmp_path) == {"in.onnx", "x"}


def test_save_refuses_to_overwrite_the_protected_file_through_a_symlink_or_hard_link(tmp_path):
    src = _protected(tmp_path)
    before = src.read_bytes()
    os.symlink(src, tmp_path / "link.onnx")
    os.link(src, tmp_path / "hard.onnx")
    for target in ("link.onnx", "hard.onnx"):
        with pytest.raises(errors.UsageError):
            save_model(_model(8 * 16), tmp_path / target, protect=(src,))
    # and the other way round: the protected path is the link
    with pytest.raises(errors.UsageError):
        save_model(_model(8 * 16), src, protect=(tmp_path / "link.onnx",))
    assert src.read_bytes() == before


def test_save_to_another_file_with_protect_works(tmp_path):
    src = _protected(tmp_path)
    save_model(_model(), tmp_path / "out.onnx", protect=(src,))
    assert (tmp_path / "out.onnx").is_file()


# ----------------------------------------------------------------------------- errors

def test_exit_codes_of_the_error_types():
    assert errors.ValidationFailed.exit_code == 1
    assert errors.InputError.exit_code == 2
    assert errors.ModelLoadError.exit_code == 2
    assert errors.UsageError.exit_code == 2
    assert errors.PassError.exit_code == 3
    assert issubclass(errors.ModelLoadError, errors.InputError)
    assert issubclass(errors.UsageError, errors.InputError)
    for cls in (errors.InputError, errors.ValidationFailed, errors.PassError):
        assert issubclass(cls, errors.OnnxoptError)
    assert errors.ModelLoadError("x").exit_code == 2


def test_external_data_also_takes_weights_stored_in_typed_fields(tmp_path):
    """A weight in ``float_data`` (not ``raw_data``) moves to the data file like any other."""
    model = _model()
    w = model.graph.initializer[0]
    values = numpy_helper.to_array(w)
    w.ClearField("raw_data")
    w.float_data.extend(values.ravel().tolist())
    out = tmp_path / "out.onnx"
    assert save_model(model, out, external_data=True) == [out, tmp_path / "out.onnx.data"]
    assert out.stat().st_size < 1024
    np.testing.assert_array_equal(numpy_helper.to_array(load_model(out).graph.initializer[0]),
                                  values)


def test_data_files_beside_a_symlinked_model_are_protected(tmp_path):
    """External data is read beside the path given (the link), not beside the link's target:
    writing over that data file is refused as writing over the model is."""
    from onnxopt.io import protected_files

    (tmp_path / "real").mkdir()
    (tmp_path / "link").mkdir()
    save_model(_model(), tmp_path / "link" / "m.onnx", external_data=True)
    (tmp_path / "link" / "m.onnx").rename(tmp_path / "real" / "m.onnx")
    (tmp_path / "link" / "m.onnx").symlink_to(tmp_path / "real" / "m.onnx")
    data = tmp_path / "link" / "m.onnx.data"
    assert load_model(tmp_path / "link" / "m.onnx")  # the data is found beside the link
    assert data in protected_files(tmp_path / "link" / "m.onnx", [data])
    with pytest.raises(errors.UsageError, match="refusing to overwrite"):
        save_model(_model(), data, protect=tuple(protected_files(tmp_path / "link" / "m.onnx",
                                                                   [data])))
