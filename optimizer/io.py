"""Model I/O: load from a path, bytes or a ModelProto; save atomically, with external data if needed.

Loading checks every external-data location before reading it: a location must be relative and stay
inside the model's folder (no absolute paths, no ``..`` escape), as the ONNX external-data spec
(onnx/docs/ExternalData.md) requires. Saving never writes over the input, never leaves a partial
file: everything is written to a temporary file (or folder) beside the target, then renamed.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Union

import onnx
from google.protobuf.message import DecodeError, EncodeError
from onnx import external_data_helper

from onnxopt import external
from onnxopt.errors import ModelLoadError, UsageError

ModelSource = Union[str, os.PathLike, bytes, onnx.ModelProto]

#: Protocol buffers cannot serialize a message of 2 GiB or more; leave headroom for the graph.
PROTOBUF_LIMIT = 2**31 - 1
_EXTERNAL_DATA_MARGIN = 64 * 2**20


def _external_tensors(model: onnx.ModelProto):
    return [t for t in external_data_helper._get_all_tensors(model)
            if external_data_helper.uses_external_data(t)]


def _check_external_locations(model: onnx.ModelProto, base_dir: Path, source: str) -> None:
    base = base_dir.resolve()
    for tensor in _external_tensors(model):
        try:
            info = external_data_helper.ExternalDataInfo(tensor)
        except ValueError as err:  # an offset or length that is no non-negative integer
            raise ModelLoadError(f"{source}: tensor '{tensor.name}' has invalid external data "
                                 f"({err})") from None
        location = info.location
        if not location or os.path.isabs(location) or Path(location).is_absolute():
            raise ModelLoadError(
                f"{source}: tensor '{tensor.name}' has external data at absolute location "
                f"'{location}'; only paths relative to the model's folder are allowed")
        target = (base / location).resolve()
        if os.path.commonpath([base, target]) != str(base):
            raise ModelLoadError(
                f"{source}: tensor '{tensor.name}' has external data at '{location}', "
                f"which escapes the model's folder {base}")
        if not target.is_file():
            raise ModelLoadError(
                f"{source}: external data file '{location}' of tensor '{tensor.name}' not found")


def load_model(source: ModelSource, lazy: bool = False) -> onnx.ModelProto:
    """Load an ONNX model with all its external data in memory (``lazy``: left in its files).

    Args:
        source: a file path, the serialized bytes of a ModelProto, or a ModelProto (returned as is).

        lazy: keep external data in its files: tensors keep their references, relative to the
            model's folder (``onnxopt.external``: the run's external-data folder must be that
            folder wherever the model is used).

    Returns:
        The model, with external data (if any) loaded into the tensors unless ``lazy``.

    Raises:
        ModelLoadError: the file is missing, a folder or not an ONNX model, or an external-data
            location is absolute, escapes the model's folder, is missing or too short; bytes
            refer to external data.
    """
    return load_model_and_bytes(source, lazy)[0]


def load_model_and_bytes(source: ModelSource, lazy: bool = False
                         ) -> tuple[onnx.ModelProto, bytes | None]:
    """:func:`load_model`, also returning the serialized model when it is at hand without
    serializing: the bytes given, or the file read (None for a ModelProto, or a file with
    external data, whose bytes are not the whole model).

    Raises:
        ModelLoadError: as :func:`load_model`.
    """
    if isinstance(source, onnx.ModelProto):
        return source, None
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
        try:
            model = onnx.load_model_from_string(data)
        except (DecodeError, ValueError) as err:
            raise ModelLoadError(f"<bytes>: not a valid ONNX model ({err})") from None
        if _external_tensors(model):
            raise ModelLoadError("<bytes>: the model refers to external data, which needs its "
                                 "folder: load it from a path instead")
        return model, data
    path = Path(source)
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a folder, not an ONNX model file")
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file")
    try:
        data = path.read_bytes()
        model = onnx.load_model_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as err:
        raise ModelLoadError(f"{path}: not a valid ONNX model ({type(err).__name__})") from None
    except OSError as err:
        raise ModelLoadError(f"{path}: cannot read the file ({err.strerror or err})") from None
    if not model.HasField("graph"):
        raise ModelLoadError(f"{path}: not a valid ONNX model (no graph)")
    if _external_tensors(model):
        _check_external_locations(model, path.parent, str(path))
        external.check_ranges(model, path.parent, str(path))
        if lazy:
            return model, None
        try:
            external_data_helper.load_external_data_for_model(model, str(path.parent))
        except (ValueError, OSError) as err:
            raise ModelLoadError(f"{path}: cannot read external data ({err})") from None
        for tensor in external_data_helper._get_all_tensors(model):
            # loaded, a tensor is as if it had never been external (onnx sets the default)
            if tensor.HasField("data_location") \
                    and tensor.data_location == onnx.TensorProto.DEFAULT:
                tensor.ClearField("data_location")
        return model, None
    return model, data


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def external_data_files(path: str | os.PathLike) -> list[Path]:
    """The external data files a model file refers to (resolved against its folder); [] when the
    file cannot be read as a model."""
    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
        files = {external_data_helper.ExternalDataInfo(t).location
                 for t in _external_tensors(model)}
    except Exception:  # noqa: BLE001 -- not a model: it has no data files to protect
        return []
    return [path.parent / f for f in sorted(files) if f]


def stored_bytes(path: str | os.PathLike, data: list[Path] | None = None) -> int:
    """Bytes of the model file at ``path`` and of its external data files (``data``; None: read
    from the model, :func:`external_data_files`), as stored on disk."""
    files = [Path(path), *(external_data_files(path) if data is None else data)]
    return sum(f.stat().st_size for f in files if f.is_file())


def protected_files(model_path: str | os.PathLike,
                    targets: list[str | os.PathLike | None]) -> list[Path]:
    """The files that writing ``targets`` must not overwrite: the model file and, when one of
    the targets already exists inside the model's folder, its external data files (external
    data cannot live elsewhere, so the model is only parsed for them when that can matter)."""
    model_path = Path(model_path)
    # external data is read beside the path as given (a symlinked model: beside the link), and
    # the path may be resolved elsewhere: either folder may hold it
    folders = {model_path.parent.resolve(), model_path.resolve().parent}
    existing = [Path(t).resolve() for t in targets if t is not None and Path(t).exists()]
    if any(f == t.parent or f in t.parents for t in existing for f in folders):
        return [model_path, *external_data_files(model_path)]
    return [model_path]


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _tensor_payload_bytes(model: onnx.ModelProto) -> int:
    """The serialized bytes of the tensors in ``model`` (all graphs), tensor by tensor: the
    whole model's ``ByteSize`` fails past the 2 GiB protobuf limit."""
    return sum(t.ByteSize() for t in external_data_helper._get_all_tensors(model))


def needs_external_data(model: onnx.ModelProto) -> bool:
    """True when the serialized model would not fit in one protobuf message (2 GiB limit)."""
    payload = _tensor_payload_bytes(model)
    if payload < PROTOBUF_LIMIT // 2:  # the rest of a model is far smaller
        return False
    if payload > PROTOBUF_LIMIT - _EXTERNAL_DATA_MARGIN:
        return True
    try:
        return model.ByteSize() > PROTOBUF_LIMIT - _EXTERNAL_DATA_MARGIN
    except (ValueError, EncodeError):
        return True


def serialize(model: onnx.ModelProto) -> bytes | None:
    """``model`` serialized, or None when it needs external data (see
    :func:`needs_external_data`)."""
    if needs_external_data(model):
        return None
    try:
        data = model.SerializeToString()
    except (ValueError, EncodeError):  # over the protobuf limit after all
        return None
    return data if len(data) <= PROTOBUF_LIMIT - _EXTERNAL_DATA_MARGIN else None


def save_model(model: onnx.ModelProto, path: Union[str, os.PathLike], *,
               external_data: bool | None = None,
               protect: tuple[Union[str, os.PathLike], ...] = (),
               serialized: bytes | None = None,
               base_dir: Union[str, os.PathLike, None] = None) -> list[Path]:
    """Write ``model`` to ``path`` atomically: :func:`stage_model`, then
    :meth:`StagedModel.commit`.

    A model that refers to external data (loaded lazily, see :func:`load_model`) is written with
    external data: the bytes of its tensors are streamed from the folder its locations are
    relative to (``base_dir``, or the run's external-data folder
    ``onnxopt.external.current_folder``) to ``<name>.data``, never held in memory.

    Args:
        model: the model; it is not modified (tensors moved out while writing are put back).
        path: target ``.onnx`` file. With external data, tensors of 1 KiB or more go to
            ``<name>.data`` beside it, at page-aligned offsets.
        external_data: True to always store tensors of 1 KiB or more outside the protobuf, False to
            never, None (default) to do so only when the model exceeds the 2 GiB protobuf limit
            or refers to external data.
        protect: files that must not be overwritten (the input model and its external data:
            see :func:`external_data_files`).
        serialized: ``model`` already serialized (by :func:`serialize`), written as is unless
            the model is written with external data; it must be the serialization of ``model``.
        base_dir: the folder the external data locations of ``model`` are relative to (the
            folder of the model file it was loaded from); default: the run's folder.

    Returns:
        The files written.

    Raises:
        UsageError: ``path`` is one of ``protect`` (or its external data file would be), the
            model is over 2 GiB or refers to external data and ``external_data`` is False, or
            the folder cannot be written to.
        ModelLoadError: external data the model refers to cannot be read, or its folder is
            unknown (no ``base_dir`` outside a run).
    """
    return stage_model(model, path, external_data=external_data, protect=protect,
                       serialized=serialized, base_dir=base_dir).commit()


#: Characters of the target's name in its staging folder's name: a name near the file
#: system's 255-byte limit still gets a folder (the file inside keeps the whole name).
_STAGING_NAME_CHARS = 64


def staging_prefix(target: Union[str, os.PathLike]) -> str:
    """The name prefix of a hidden temporary file or folder beside ``target`` (``tempfile``'s
    ``prefix``): a dot and the start of the target's name."""
    return f".{Path(target).name[:_STAGING_NAME_CHARS]}."


def remove_stale_staging(target: Union[str, os.PathLike]) -> None:
    """Remove the staging folders of ``target`` (:class:`StagedModel`) and staged files (a
    report's) that a process killed before it could (SIGKILL: a batch's time limit, the
    out-of-memory killer; a crash) left beside it. Only for a target no other process is
    writing."""
    target = Path(target)
    for staged in target.parent.glob(glob.escape(staging_prefix(target)) + "*.tmp"):
        if staged.is_dir():
            shutil.rmtree(staged, ignore_errors=True)
        else:
            staged.unlink(missing_ok=True)


class StagedModel:
    """A model written in full to a hidden temporary folder beside its target
    (:func:`stage_model`), not yet in place: ``path`` loads as a model file (its external data,
    if any, beside it), :meth:`commit` renames it to the target, :meth:`discard` removes it and
    the folders made for it. Should neither be called, the temporary folder is removed when the
    object is collected or the interpreter exits (``tempfile.TemporaryDirectory``)."""

    def __init__(self, target: Path, external_data: bool):
        folder = target.parent if str(target.parent) else Path(".")
        #: Folders made for the target, deepest first: removed again unless committed.
        self._made = [f for f in (folder, *folder.parents) if not f.exists()]
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self._tmp = tempfile.TemporaryDirectory(
                prefix=staging_prefix(target), suffix=".tmp", dir=folder,
                ignore_cleanup_errors=True)
        except OSError as err:
            self._remove_made()
            raise UsageError(f"{target}: cannot write to the folder {folder} "
                             f"({err.strerror or err})") from None
        self.target = target
        #: The staged model file.
        self.path = Path(self._tmp.name) / target.name
        #: Its external data file (written only when ``external_data``).
        self.data_path = Path(self._tmp.name) / (target.name + ".data")
        self.external_data = external_data

    def commit(self) -> list[Path]:
        """Rename the staged files to the target and remove the temporary folder. With external
        data, the data file goes first (the model never refers to missing data); an existing
        data file of the target is kept aside until the model is in place and put back when the
        model's rename fails, so a failed commit leaves the old output whole (between the two
        renames a killed process leaves the new data beside the old model: POSIX renames one
        file at a time).

        Returns:
            The files written: the model, then its external data file if any.

        Raises:
            UsageError: a rename fails.
        """
        written = [self.target]
        data_target = self.target.with_name(self.target.name + ".data")
        previous = self.data_path.with_name(".previous.data")
        aside = False
        try:
            if self.data_path.exists() and self.data_path.stat().st_size:
                if data_target.exists():
                    os.replace(data_target, previous)
                    aside = True
                os.replace(self.data_path, data_target)
                written.append(data_target)
            os.replace(self.path, self.target)
        except OSError as err:
            with contextlib.suppress(OSError):  # the old output as it was
                if aside:
                    os.replace(previous, data_target)
                elif len(written) > 1:
                    os.unlink(data_target)
            self.discard()
            raise UsageError(f"{self.target}: cannot write the model ({err.strerror or err})") \
                from None
        self._made = []
        self._tmp.cleanup()
        return written

    def discard(self) -> None:
        """Remove the temporary folder, whatever is still in it, and the folders made for the
        target when they are empty."""
        self._tmp.cleanup()
        self._remove_made()

    def _remove_made(self) -> None:
        for folder in self._made:
            with contextlib.suppress(OSError):  # not empty: something else was put there
                folder.rmdir()
        self._made = []


def stage_model(model: onnx.ModelProto, path: Union[str, os.PathLike], *,
                external_data: bool | None = None,
                protect: tuple[Union[str, os.PathLike], ...] = (),
                serialized: bytes | None = None,
                base_dir: Union[str, os.PathLike, None] = None) -> StagedModel:
    """Write ``model`` in full to a temporary folder beside ``path``, to be put in place by
    :meth:`StagedModel.commit` (arguments and errors as :func:`save_model`, which is this and
    the commit). What onnxruntime loads from the staged file is byte for byte what the commit
    puts at ``path``: a result can be validated from its file before it is in place, without
    holding its serialization in memory."""
    path = Path(path)
    data_path = path.with_name(path.name + ".data")
    for p in protect:
        for target in (path, data_path):
            if _same_file(target, Path(p)):
                raise UsageError(f"{target}: refusing to overwrite the input model")
    referring = external.has_external_data(model)
    if external_data is None:
        external_data = referring or (serialized is None and needs_external_data(model))
    elif not external_data and (referring or needs_external_data(model)):
        raise UsageError(f"{path}: the model exceeds the 2 GiB protobuf limit or refers to "
                         "external data; save it with external data")
    staged = StagedModel(path, external_data)
    try:
        undo = external.write_external(
            model, staged.data_path,
            external.current_folder() if base_dir is None else Path(base_dir)) \
            if external_data else []
        try:
            data = model.SerializeToString() if external_data or serialized is None \
                else serialized
        finally:
            external.undo_external(undo, staged.data_path)
        with open(staged.path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        del data
        # the file mode of the output replaced, else a new file's (mkstemp-style 0600 is not
        # for a model file)
        mode = stat.S_IMODE(path.stat().st_mode) if path.is_file() else 0o666 & ~_umask()
        for f in (staged.path, staged.data_path):
            if f.exists():
                os.chmod(f, mode)
        return staged
    except OSError as err:
        staged.discard()
        raise UsageError(f"{path}: cannot write the model ({err.strerror or err})") from None
    except BaseException:
        staged.discard()
        raise
