"""External data kept where it is: lazy, memory-mapped reading and streamed writing.

A model with external data (ONNX external-data spec, onnx/docs/ExternalData.md: a tensor's
``external_data`` entries ``location``, ``offset``, ``length``) is loaded without its data. Its
tensors keep their references, relative to the model's folder, for the whole run:

* the folder is the *external-data folder* of the run (:func:`external_folder`, a context
  variable set by the API around a run), which every onnxruntime session, checker run and save of
  the run uses;
* a pass that reads a weight gets a read-only ``numpy.memmap`` of the file (:class:`ExternalValues`,
  onnx-graphsurgeon's ``LazyValues`` for external tensors); the pages it touches are the page
  cache's, not copies. A weight read but not changed is written back as the reference it was
  (:func:`restore_references`), so only what changed is ever held in memory;
* saving streams each unchanged tensor's bytes from the input's data file to the output's
  (``os.copy_file_range``: in-kernel, no buffer in this process) and appends the changed ones
  (:func:`write_external`). The whole model is never serialized into one protobuf, so models
  over the 2 GiB protobuf limit need nothing special.

Offsets in files this module writes are multiples of :data:`ALIGNMENT`, so onnxruntime can
memory-map the tensors instead of reading them (it maps an external tensor whose offset is a
multiple of the page size).

What passes *make* for such a model follows the same rule (:func:`spill`): a large array a pass
computes (quantized codes, a calibration Gram matrix) is written to the run's *spill file* -- an
unlinked temporary file, gone with the process whatever happens -- and kept as
:class:`SpilledValues`, mapped only while it is read. Without it, a pass quantizing every weight
of a 4 GiB decoder holds the 1 GiB of codes in memory beside the 4 GiB of float values the drift
budget feeds onnxruntime, and GPTQ holds 7.7 GiB of Gram matrices (22 layers of 5632 x 5632 and
2048 x 2048, float64) before it quantizes the first weight.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues
from onnx import external_data_helper

from onnxopt import progress
from onnxopt.errors import ModelLoadError

#: Offsets of tensors in written data files are multiples of this (the page size).
ALIGNMENT = 4096
#: Tensors of this many bytes or more are stored outside the protobuf when a model is saved with
#: external data (onnx's own default threshold).
EXTERNAL_THRESHOLD = 1024
_CHUNK = 1 << 24

_FOLDER: contextvars.ContextVar[Path | None] = contextvars.ContextVar(
    "onnxopt_external_folder", default=None)


@contextlib.contextmanager
def external_folder(folder: str | os.PathLike | None) -> Iterator[None]:
    """Within the block, external-data locations of the models handled are relative to
    ``folder`` (None: models hold their data in memory)."""
    token = _FOLDER.set(None if folder is None else Path(folder))
    try:
        yield
    finally:
        _FOLDER.reset(token)


def use_folder(folder: str | os.PathLike | None) -> None:
    """Make ``folder`` the external-data folder of the current context (the API runs each call
    in a context of its own, see :func:`external_folder` for a scoped setting)."""
    _FOLDER.set(None if folder is None else Path(folder))


def current_folder() -> Path | None:
    """The external-data folder of the run (see :func:`external_folder`), or None."""
    return _FOLDER.get()


#: Arrays of this many bytes or more go to the spill file (see :func:`spill`).
SPILL_THRESHOLD = 1 << 20

_SPILL: contextvars.ContextVar["_SpillFile | None"] = contextvars.ContextVar(
    "onnxopt_spill", default=None)


class _SpillFile:
    """The run's spill file: an unlinked temporary file (``TMPDIR``) arrays are appended to, at
    offsets that are multiples of :data:`ALIGNMENT`."""

    def __init__(self) -> None:
        self.file = tempfile.TemporaryFile(prefix="onnxopt-spill-")
        self.end = 0

    def append(self, data) -> int:
        """Write ``data`` (a buffer) at the next aligned offset; returns the offset."""
        offset = -(-self.end // ALIGNMENT) * ALIGNMENT
        self.file.seek(offset)
        self.file.write(data)
        self.file.flush()
        self.end = offset + memoryview(data).nbytes
        return offset


class SpilledValues(LazyValues):
    """An array kept in the run's spill file (see :func:`spill`): onnx-graphsurgeon lazy values
    whose ``load`` maps it afresh, read-only.

    Attributes:
        shape, dtype: the tensor's (onnx-graphsurgeon's dtype for the ONNX type ``data_type``).
        nbytes: bytes stored (a 4-bit tensor: two values a byte).
        data_type: the ONNX element type of the exported TensorProto.
    """

    def __init__(self, spill: _SpillFile, offset: int, nbytes: int, shape: tuple[int, ...],
                 data_type: int) -> None:
        from onnx_graphsurgeon.importers.onnx_importer import get_onnx_tensor_dtype

        # not LazyValues.__init__: there is no TensorProto until export asks for one
        self._spill, self._offset, self.nbytes = spill, offset, nbytes
        self.shape, self.data_type = tuple(int(d) for d in shape), data_type
        self._digest: bytes | None = None
        stub = onnx.TensorProto(data_type=data_type, dims=self.shape)
        self.dtype = get_onnx_tensor_dtype(stub)

    def load(self) -> np.ndarray:
        """A read-only ``numpy.memmap`` of the array (unmapped when dropped).

        Raises:
            TypeError: a 4-bit tensor (numpy has no such type; export writes its bytes).
        """
        if self.data_type in _PACKED_4BIT:
            raise TypeError("4-bit spilled values have no numpy form")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(self.data_type)
        if self.nbytes == 0:
            return np.zeros(self.shape, dtype)
        array = np.memmap(self._spill.file, dtype=dtype, mode="r", offset=self._offset,
                          shape=self.shape if self.shape else (1,))
        if not self.shape:
            array = array.reshape(())
        array._onnxopt_spilled = self  # see restore_references
        return array

    def add(self, delta: np.ndarray) -> None:
        """Add ``delta`` (same shape) to the stored array in place: an accumulator's update,
        mapped for the update only."""
        array = np.memmap(self._spill.file, dtype=onnx.helper.tensor_dtype_to_np_dtype(
            self.data_type), mode="r+", offset=self._offset, shape=self.shape)
        array += delta
        array.flush()
        del array

    @property
    def tensor(self) -> onnx.TensorProto:
        """What onnx-graphsurgeon exports: a TensorProto without data, marked so that
        :func:`fill_spilled` writes the bytes into the finished model. Protobuf arenas keep
        every copy of a message alive as long as the model they were merged into, so bytes
        passed through gs's intermediate protos would stay resident three times."""
        return onnx.TensorProto(data_type=self.data_type, dims=self.shape,
                                doc_string=f"{_SPILL_MARK}{self._offset}:{self.nbytes}")

    def digest(self) -> bytes:
        """BLAKE2b digest (16 bytes) of the stored bytes, read in chunks (see
        :meth:`ExternalValues.digest`)."""
        if self._digest is None:
            self._digest = _file_digest(self._spill.file, self._offset, self.nbytes)
        return self._digest

    def __str__(self) -> str:
        return f"SpilledValues (shape={self.shape}, dtype={self.dtype})"


_SPILL_MARK = "onnxopt-spilled:"


def fill_spilled(model: onnx.ModelProto) -> None:
    """Write the bytes of every spilled tensor of ``model`` (exported from
    :class:`SpilledValues`) into it, in place.

    Raises:
        RuntimeError: a marked tensor but no spill file in this context (a model exported in
            one run and filled in another).
    """
    for tensor in all_tensors(model):
        if not tensor.doc_string.startswith(_SPILL_MARK):
            continue
        store = _SPILL.get()
        if store is None:
            raise RuntimeError(f"tensor '{tensor.name}': its spilled data belongs to another run")
        offset, nbytes = (int(v) for v in tensor.doc_string[len(_SPILL_MARK):].split(":"))
        store.file.seek(offset)
        tensor.raw_data = store.file.read(nbytes)
        tensor.ClearField("doc_string")


def spilling() -> bool:
    """Whether large arrays passes make go to the spill file: in a run whose model keeps its
    data in external files (:func:`current_folder`), that is a model too large to hold twice."""
    return current_folder() is not None


def spill(array: np.ndarray, data_type: int | None = None,
          shape: tuple[int, ...] | None = None):
    """``array`` kept in the run's spill file when :func:`spilling` and it holds
    :data:`SPILL_THRESHOLD` bytes or more (a :class:`SpilledValues`), else ``array`` itself.

    Args:
        array: the values (a numeric numpy array; a 4-bit tensor as its packed uint8 bytes,
            with ``data_type`` and ``shape``).
        data_type: the ONNX element type of the exported tensor (default: ``array``'s).
        shape: the tensor's shape when it is not ``array``'s (4-bit).
    """
    array = np.asarray(array)
    if not spilling() or array.nbytes < SPILL_THRESHOLD or array.dtype.kind not in "biuf":
        return array
    store = _SPILL.get()
    if store is None:
        store = _SpillFile()
        _SPILL.set(store)
    offset = store.append(np.ascontiguousarray(array).data)
    return SpilledValues(store, offset, array.nbytes, array.shape if shape is None else shape,
                         onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
                         if data_type is None else data_type)


def accumulate(total, delta: np.ndarray):
    """``total + delta``, in place: ``total`` an array or a :class:`SpilledValues` (updated in
    its file); returns ``total``."""
    if isinstance(total, SpilledValues):
        total.add(delta)
    else:
        total += delta
    return total


def unspill(values) -> np.ndarray:
    """The array of ``values``: a :class:`SpilledValues` mapped (drop it to unmap), an array
    returned as is."""
    return values.load() if isinstance(values, SpilledValues) else values


def all_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Every TensorProto of ``model``: initializers and tensor attributes, in every graph."""
    return list(external_data_helper._get_all_tensors(model))


def is_external(tensor: onnx.TensorProto) -> bool:
    return external_data_helper.uses_external_data(tensor)


def has_external_data(model: onnx.ModelProto) -> bool:
    """True when a tensor of ``model`` refers to external data (not loaded)."""
    return any(is_external(t) for t in all_tensors(model))


def external_bytes(model: onnx.ModelProto) -> int:
    """Bytes of tensor data ``model`` refers to in external files."""
    return sum(_location(t)[2] for t in all_tensors(model) if is_external(t))


def _location(tensor: onnx.TensorProto) -> tuple[str, int, int]:
    """(location, offset, length) of an external tensor; length -1 when not given."""
    info = external_data_helper.ExternalDataInfo(tensor)
    return info.location, int(info.offset or 0), -1 if info.length is None else int(info.length)


def _expected_bytes(tensor: onnx.TensorProto) -> int | None:
    """The bytes the data of ``tensor`` takes, or None for types without a fixed size."""
    if tensor.data_type == onnx.TensorProto.STRING:
        return None
    count = int(np.prod(tensor.dims, dtype=np.int64))
    if tensor.data_type in _PACKED_4BIT:
        return (count + 1) // 2
    return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


_PACKED_4BIT = {getattr(onnx.TensorProto, n) for n in
                ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(onnx.TensorProto, n)}


def check_ranges(model: onnx.ModelProto, folder: Path, source: str) -> None:
    """Check every external tensor's bytes lie inside its file, and fill in missing lengths.

    Raises:
        ModelLoadError: a data file is shorter than a tensor's offset + length, or a length
            disagrees with the tensor's shape and type.
    """
    sizes: dict[str, int] = {}
    for tensor in all_tensors(model):
        if not is_external(tensor):
            continue
        location, offset, length = _location(tensor)
        if location not in sizes:
            sizes[location] = os.path.getsize(folder / location)
        expected = _expected_bytes(tensor)
        if length < 0:
            if expected is None:
                raise ModelLoadError(f"{source}: tensor '{tensor.name}' has external data without "
                                     "a length")
            length = expected
            entry = tensor.external_data.add()
            entry.key, entry.value = "length", str(length)
        elif expected is not None and length != expected:
            raise ModelLoadError(
                f"{source}: tensor '{tensor.name}' has {length} bytes of external data, its "
                f"shape {list(tensor.dims)} needs {expected}")
        if offset + length > sizes[location]:
            raise ModelLoadError(
                f"{source}: external data file '{location}' is too short for tensor "
                f"'{tensor.name}' (needs bytes {offset}..{offset + length}, the file has "
                f"{sizes[location]})")


def check_with_references(model: onnx.ModelProto | bytes) -> None:
    """``onnx.checker.check_model`` on a model that refers to external data: the checker wants
    each location to name a file beside the model, so the model is checked from a temporary
    folder holding it and an empty file per location (the data itself is not checked, as the
    checker does not read it either). The main graph's initializers of 1 KiB or more are
    checked as such references too (:func:`_without_data`): a large model is never serialized
    whole to be checked.

    Raises:
        onnx.checker.ValidationError: as the checker.
    """
    if isinstance(model, bytes):
        model = onnx.load_model_from_string(model)
    stub = _without_data(model)
    locations = {_location(t)[0] for t in all_tensors(stub) if is_external(t)}
    with tempfile.TemporaryDirectory(prefix="onnxopt-check-") as folder:
        for location in locations:
            placeholder = Path(folder, location)
            placeholder.parent.mkdir(parents=True, exist_ok=True)
            placeholder.touch()
        path = Path(folder, "model.onnx")
        path.write_bytes(stub.SerializeToString())
        onnx.checker.check_model(str(path))


#: Location the data-less copies of :func:`_without_data` point their large tensors at.
_STUB_LOCATION = "onnxopt-stub.data"


def _without_data(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose main-graph initializers of ``EXTERNAL_THRESHOLD`` bytes or more
    refer to external data (their own location, or an empty stand-in) instead of holding it:
    what the checker sees of them (name, type, dims, location) is unchanged."""
    stub = onnx.ModelProto()
    for descriptor, value in model.ListFields():
        if descriptor.name != "graph":
            _copy_field(stub, descriptor, value)
    for descriptor, value in model.graph.ListFields():
        if descriptor.name != "initializer":
            _copy_field(stub.graph, descriptor, value)
    for tensor in model.graph.initializer:
        if is_external(tensor) or tensor.ByteSize() < EXTERNAL_THRESHOLD:
            stub.graph.initializer.add().CopyFrom(tensor)
            continue
        light = stub.graph.initializer.add(name=tensor.name, data_type=tensor.data_type,
                                           dims=tensor.dims)
        _point(light, _STUB_LOCATION, 0, _expected_bytes(tensor) or 0)
    return stub


def _copy_field(target, descriptor, value) -> None:
    if isinstance(value, (list, tuple)) or hasattr(value, "extend"):  # a repeated field
        getattr(target, descriptor.name).extend(value)
    elif descriptor.type == descriptor.TYPE_MESSAGE:
        getattr(target, descriptor.name).CopyFrom(value)
    else:
        setattr(target, descriptor.name, value)


class ExternalValues(LazyValues):
    """onnx-graphsurgeon lazy values of an external tensor: ``load`` memory-maps its bytes.

    Args:
        tensor: the TensorProto (with ``external_data`` entries; it is not modified).
        folder: the folder its location is relative to.
    """

    def __init__(self, tensor: onnx.TensorProto, folder: Path):
        super().__init__(tensor)
        self.folder = folder
        self.location, self.offset, self.length = _location(tensor)
        self._digest: bytes | None = None

    @property
    def path(self) -> Path:
        return self.folder / self.location

    def load(self) -> np.ndarray:
        """The values: a read-only ``numpy.memmap`` (shape and dtype of the tensor), or an array
        read into memory for types numpy cannot map (bfloat16, 4-bit, strings)."""
        dtype = onnx.helper.tensor_dtype_to_np_dtype(self.tensor.data_type) \
            if self.tensor.data_type not in _PACKED_4BIT else None
        native = dtype is not None and dtype.kind in "biufc" and \
            self.tensor.data_type != getattr(onnx.TensorProto, "BFLOAT16", -1)
        if not native or self.length == 0:
            copy = onnx.TensorProto()
            copy.CopyFrom(self.tensor)
            copy.raw_data = self.read()
            copy.data_location = onnx.TensorProto.DEFAULT
            del copy.external_data[:]
            return onnx.numpy_helper.to_array(copy)
        shape = tuple(int(d) for d in self.tensor.dims)
        array = np.memmap(self.path, dtype=dtype.newbyteorder("<"), mode="r",
                          offset=self.offset, shape=shape if shape else (1,))
        if not shape:
            array = array.reshape(())
        array._onnxopt_source = self  # see restore_references
        return array

    def read(self) -> bytes:
        """The tensor's bytes, read from the file."""
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            return f.read(self.length)

    def digest(self) -> bytes:
        """BLAKE2b digest (16 bytes) of the tensor's bytes, read in chunks (not mapped: the pages
        read stay in the page cache, out of this process's resident memory)."""
        if self._digest is None:
            with open(self.path, "rb") as f:
                self._digest = _file_digest(f, self.offset, self.length)
        return self._digest

    def sketch(self) -> bytes:
        """Up to four 4 KiB windows of the tensor's bytes (start, thirds, end): equal tensors
        have equal sketches; different weights almost never do."""
        window = 4096
        if self.length <= 4 * window:
            return self.read()
        # starts at multiples of 16 bytes, so the windows hold whole elements (see sample)
        starts = (0, self.length // 48 * 16, self.length // 24 * 16, self.length - window)
        with open(self.path, "rb") as f:
            parts = []
            for start in starts:
                f.seek(self.offset + start)
                parts.append(f.read(window))
        return b"".join(parts)

    def sample(self) -> np.ndarray | None:
        """The elements of :meth:`sketch` (a flat array of the tensor's dtype), or None for types
        numpy cannot hold: enough to tell that a weight is not all zeros without reading it."""
        if self.tensor.data_type in _PACKED_4BIT or self.tensor.data_type in (
                onnx.TensorProto.STRING, getattr(onnx.TensorProto, "BFLOAT16", -1)):
            return None
        dtype = onnx.helper.tensor_dtype_to_np_dtype(self.tensor.data_type).newbyteorder("<")
        data = self.sketch()
        return np.frombuffer(data[:len(data) // dtype.itemsize * dtype.itemsize], dtype)

    def renamed(self, name: str) -> "ExternalValues":
        """The same reference under another tensor name (export writes the name into the
        TensorProto, which constants sharing it must not see)."""
        copy = onnx.TensorProto()
        copy.CopyFrom(self.tensor)
        copy.name = name
        values = ExternalValues(copy, self.folder)
        values._digest = self._digest
        return values


def _file_digest(f, offset: int, length: int) -> bytes:
    """BLAKE2b digest (16 bytes) of ``length`` bytes of open file ``f`` at ``offset``, read in
    chunks (the pages read stay in the page cache, out of this process's resident memory)."""
    h = hashlib.blake2b(digest_size=16)
    f.seek(offset)
    left = length
    while left > 0:
        chunk = f.read(min(_CHUNK, left))
        if not chunk:
            break
        h.update(chunk)
        left -= len(chunk)
    return h.digest()


def stored_digest(values) -> bytes | None:
    """The digest of ``values`` read from their file -- an unchanged external tensor's
    (:meth:`ExternalValues.digest`) or a spilled array's (:meth:`SpilledValues.digest`), loaded
    or not -- or None for values held in memory."""
    source = source_of(values)
    if source is not None:
        return source.digest()
    spilled = values if isinstance(values, SpilledValues) else \
        getattr(values, "_onnxopt_spilled", None)
    return spilled.digest() if spilled is not None else None


def source_of(values) -> ExternalValues | None:
    """The external tensor ``values`` are the unchanged, mapped data of, or None."""
    if isinstance(values, ExternalValues):
        return values
    source = getattr(values, "_onnxopt_source", None)
    if source is not None and values.shape == tuple(int(d) for d in source.tensor.dims):
        return source
    return None


def attach(graph: gs.Graph, folder: Path) -> None:
    """Give every external constant of ``graph`` (and its subgraphs), tensor attributes
    included, :class:`ExternalValues` reading from ``folder``."""
    from onnxopt.graph import iter_graphs
    for g in iter_graphs(graph):
        attributes = [v for n in g.nodes for v in n.attrs.values()]  # Constant nodes' values
        for tensor in [*g.tensors().values(), *attributes]:
            if isinstance(tensor, gs.Constant) and type(tensor._values) is LazyValues \
                    and is_external(tensor._values.tensor):
                tensor._values = ExternalValues(tensor._values.tensor, folder)


def restore_references(graph: gs.Graph) -> None:
    """Before export: a constant whose values are an unchanged external tensor's mapping is
    written as that reference again; a constant with new values loses the external marking
    onnx-graphsurgeon would otherwise copy onto it. A spilled array's mapping is unmapped (the
    constant holds its :class:`SpilledValues` again)."""
    from onnxopt.graph import iter_graphs
    for g in iter_graphs(graph):
        for tensor in g.tensors().values():
            if not isinstance(tensor, gs.Constant):
                continue
            spilled = getattr(tensor._values, "_onnxopt_spilled", None)
            if spilled is not None and tensor._values.shape == spilled.shape:
                tensor._values = spilled
                continue
            source = source_of(tensor._values)
            if source is not None:
                if source.tensor.name != tensor.name or tensor._values is not source:
                    tensor._values = source.renamed(tensor.name) \
                        if source.tensor.name != tensor.name else source
                tensor.data_location = onnx.TensorProto.EXTERNAL
            elif tensor.data_location == onnx.TensorProto.EXTERNAL:
                tensor.data_location = None


def _copy_range(src, dst, offset: int, length: int) -> None:
    """Copy ``length`` bytes at ``offset`` of file ``src`` to the current end of ``dst``: in the
    kernel (``os.copy_file_range``) when it can, else through a bounded buffer."""
    out = dst.tell()
    dst.flush()
    left = length
    while left > 0:
        try:
            n = os.copy_file_range(src.fileno(), dst.fileno(), min(left, 1 << 30), offset, out)
        except OSError:  # not supported for this pair of files (another file system, ...)
            src.seek(offset)
            dst.seek(out)
            n = dst.write(src.read(min(left, _CHUNK)))
            dst.flush()
        if n == 0:
            raise ModelLoadError(f"external data file '{src.name}' ended before {length} bytes "
                                 f"at offset {offset - (length - left)}")
        offset, out, left = offset + n, out + n, left - n
    dst.seek(out)


def _start_writeback(out, start: int) -> None:
    """Start writing ``out``'s bytes from ``start`` to its end to disk, without waiting: Linux
    writes dirty pages back asynchronously on ``posix_fadvise(POSIX_FADV_DONTNEED)``
    (mm/fadvise.c; PostgreSQL's ``pg_flush_data`` falls back on the same call), so the disk
    works while the next tensors are copied and the final ``fsync`` has little left to wait for
    (3 GiB data file: about 1 s of the fsync otherwise). A no-op where the call is missing."""
    if hasattr(os, "posix_fadvise"):
        out.flush()
        with contextlib.suppress(OSError):
            os.posix_fadvise(out.fileno(), start, out.tell() - start, os.POSIX_FADV_DONTNEED)


def peek(constant: gs.Constant) -> np.ndarray:
    """The values of ``constant`` without caching them in it: an external tensor is mapped
    afresh, and unmapped when the caller drops the array (reading every weight of a large model
    through ``constant.values`` would keep them all mapped, and resident); a tensor not loaded
    yet stays so (onnx-graphsurgeon writes loaded 4-bit values wrongly, one byte each)."""
    source = source_of(constant._values)
    if source is not None:
        return source.load()
    if isinstance(constant._values, LazyValues):
        return constant._values.load()
    return constant.values


def write_external(model: onnx.ModelProto, data_path: Path, source: Path | None,
                   threshold: int = EXTERNAL_THRESHOLD) -> list:
    """Write the data of ``model``'s external tensors (from ``source``, the folder they are
    relative to) and of its in-memory tensors of ``threshold`` bytes or more to ``data_path``,
    and point the tensors at it (location ``data_path.name``, page-aligned offsets).

    The model is changed in place; the returned undo list restores it
    (:func:`undo_external`), which reads the moved in-memory tensors back from ``data_path``.

    Raises:
        ModelLoadError: an external tensor's file is missing or too short.
    """
    undo = []
    handles: dict[str, object] = {}
    tensors = all_tensors(model)
    total = sum(_location(t)[2] if is_external(t) else t.ByteSize() for t in tensors)
    done = 0
    progress.report(f"writing {data_path.name}", done, total)
    try:
        with open(data_path, "wb") as out:
            for tensor in tensors:
                step = _location(tensor)[2] if is_external(tensor) else tensor.ByteSize()
                if step >= _CHUNK:  # the large ones, as they go
                    progress.report(f"writing {data_path.name}", done, total)
                done += step
                if is_external(tensor):
                    location, offset, length = _location(tensor)
                    if source is None:
                        raise ModelLoadError(f"tensor '{tensor.name}' refers to external data "
                                             f"'{location}' and the model's folder is unknown: pass "
                                             "base_dir (the folder of the model it came from)")
                    if location not in handles:
                        handles[location] = open(source / location, "rb")
                    out.write(b"\0" * (-out.tell() % ALIGNMENT))
                    start = out.tell()
                    _copy_range(handles[location], out, offset, length)
                    if length >= _CHUNK:
                        _start_writeback(out, start)
                    undo.append((tensor, [(e.key, e.value) for e in tensor.external_data]))
                    _point(tensor, data_path.name, start, length)
                    continue
                if tensor.data_type == onnx.TensorProto.STRING:
                    continue
                if not tensor.HasField("raw_data"):
                    if _typed_bytes(tensor) < threshold:
                        continue
                    array = onnx.numpy_helper.to_array(tensor)
                    converted = onnx.numpy_helper.from_array(array, tensor.name)
                    tensor.CopyFrom(converted)  # the same values as raw bytes; not undone
                raw = tensor.raw_data
                if len(raw) < threshold:
                    continue
                out.write(b"\0" * (-out.tell() % ALIGNMENT))
                start = out.tell()
                out.write(raw)
                if len(raw) >= _CHUNK:
                    _start_writeback(out, start)
                del raw
                tensor.ClearField("raw_data")
                undo.append((tensor, tensor.HasField("data_location")))
                _point(tensor, data_path.name, start, _expected_bytes(tensor) or 0)
            out.flush()
            os.fsync(out.fileno())
    except FileNotFoundError as err:
        undo_external(undo, data_path)
        raise ModelLoadError(f"external data file '{err.filename}' not found") from None
    finally:
        for f in handles.values():
            f.close()
    return undo


def undo_external(undo: list, data_path: Path) -> None:
    """Restore the tensors :func:`write_external` pointed at ``data_path``."""
    with contextlib.ExitStack() as stack:
        data = None
        for tensor, entries in reversed(undo):
            if isinstance(entries, list):
                del tensor.external_data[:]
                for key, value in entries:
                    e = tensor.external_data.add()
                    e.key, e.value = key, value
                continue
            if data is None:
                data = stack.enter_context(open(data_path, "rb"))
            _, offset, length = _location(tensor)
            data.seek(offset)
            tensor.raw_data = data.read(length)
            del tensor.external_data[:]
            if entries:  # whether data_location was set (to DEFAULT) before
                tensor.data_location = onnx.TensorProto.DEFAULT
            else:
                tensor.ClearField("data_location")


def _point(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = tensor.external_data.add()
        e.key, e.value = key, value


def _typed_bytes(tensor: onnx.TensorProto) -> int:
    return 8 * (len(tensor.float_data) + len(tensor.int32_data) + len(tensor.int64_data)
                + len(tensor.double_data) + len(tensor.uint64_data))
