"""Pipelines: which passes run, with which options -- from names, pass objects or a TOML file.

A pipeline is a list of configured passes (``Pass`` instances, each holding its ``Options``).
The Python API accepts pass names, configured passes, or both; ``"default"`` stands for the
lossless pipeline (``onnxopt.passes.LOSSLESS_PIPELINE``). The CLI's flags (``--prune-threshold``,
``--quantize``, ``--fold-size-limit``) are sugar for pass options, and ``--config FILE.toml`` gives
the whole run in a file (stdlib ``tomllib``)::

    [pipeline]
    passes = ["default", "prune"]       # optional; default ["default"]
    skip = ["cse"]                      # optional
    max_iterations = 10                 # optional

    [pipeline.options.prune]            # one table per configured pass: its Options fields
    threshold = 1e-3

    [pipeline.options.fold_constants]
    size_limit = 1048576

    [validation]                        # optional; the keywords of ``onnxopt.optimize``
    inputs = "feeds.npz"                # relative to this file's folder
    calibration = "calibration/"        # feeds for activation statistics
    max_drift = 0.99
    metric = "cosine"

    [validation.input_shapes]           # dims of synthesized inputs
    x = [1, 3, 224, 224]

Options of a pass the pipeline does not run are an error, so a typo cannot be silently ignored;
so are unknown keys and values of the wrong type. Keywords (and command-line flags) given
explicitly win over the file, except ``skip``, whose names are added to the file's.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from typing import Any, Sequence, Union

from onnxopt.errors import UsageError
from onnxopt.pass_manager import REGISTRY, Pass, fits_type, get_pass
from onnxopt.validate import DEFAULT_ATOL, DEFAULT_MAX_DRIFT, DEFAULT_RTOL

PassSpec = Union[str, Pass]

#: ``--quantize`` modes: the passes each one runs, in order, with the options the mode sets
#: (options the user gives for the same pass win). Embedding tables (Gather data) are quantized
#: in every integer mode.
QUANTIZE_MODES: dict[str, dict[str, dict[str, Any]]] = {
    "int8-weight": {"quantize_weights": {}, "quantize_embeddings": {}},
    "int8-dynamic": {"quantize_dynamic": {}, "quantize_embeddings": {}},
    "int8-static": {"quantize_static": {}, "quantize_embeddings": {}},
    "int4-weight": {"quantize_int4": {}, "quantize_embeddings": {"bits": 4}},
    "float16": {"convert_float16": {}},
}

@dataclass
class Pipeline:
    """Configured passes in order, and the bound on lossless rounds.

    ``lossless`` are repeated to a fixed point; ``lossy`` run once each (see
    ``onnxopt.pass_manager.PassManager``).
    """

    passes: list[Pass] = field(default_factory=list)
    max_iterations: int = 10

    @property
    def lossless(self) -> list[Pass]:
        return [p for p in self.passes if p.lossless]

    @property
    def lossy(self) -> list[Pass]:
        return [p for p in self.passes if not p.lossless]

    def without(self, name: str) -> "Pipeline":
        """The same pipeline without the pass ``name`` (for rolling back)."""
        return Pipeline([p for p in self.passes if p.name != name], self.max_iterations)


def _default() -> list[str]:
    from onnxopt.passes import LOSSLESS_PIPELINE

    return list(LOSSLESS_PIPELINE)


def build_pipeline(passes: Sequence[PassSpec] | None = None, skip: Sequence[str] = (), *,
                   options: dict[str, dict[str, Any]] | None = None,
                   prune_threshold: float | None = None, quantize: str | None = None,
                   quantize_exclude: Sequence[str] | None = None,
                   quantize_ops: Sequence[str] | None = None,
                   max_iterations: int = 10) -> Pipeline:
    """The pipeline for the given passes and options.

    Args:
        passes: pass names (``"default"``: the lossless pipeline) or configured passes; None is
            ``["default"]``.
        skip: names of passes to leave out.
        options: ``{pass name: {option: value}}``; a named pass not yet in ``passes`` is added
            only by the sugar below, otherwise its options are an error.
        prune_threshold: sugar for ``prune`` with ``threshold`` (added to the pipeline).
        quantize: sugar for the passes of a ``QUANTIZE_MODES`` mode (added to the pipeline with
            the mode's options, under the user's).
        quantize_exclude, quantize_ops: sugar for the ``exclude`` / ``ops`` options of every
            pass of the ``quantize`` mode (op types or node names left float / op types
            quantized).
        max_iterations: bound on the rounds of the lossless passes (at least 1).

    Raises:
        UsageError: an unknown pass, mode or option, or options for a pass not run.
    """
    if isinstance(max_iterations, bool) or not isinstance(max_iterations, int) \
            or max_iterations < 1:
        raise UsageError(f"max_iterations must be an integer of at least 1, got "
                         f"{max_iterations!r}")
    if not isinstance(options or {}, dict) or not all(
            isinstance(v, dict) for v in (options or {}).values()):
        raise UsageError("options must map pass names to {option: value} tables")
    options = {k: dict(v) for k, v in (options or {}).items()}
    specs: list[PassSpec] = []
    for spec in (["default"] if passes is None else list(passes)):
        specs.extend(_default() if spec == "default" else [spec])
    if prune_threshold is not None:
        options.setdefault("prune", {})["threshold"] = prune_threshold
        specs.append("prune")
    if quantize is not None:
        if quantize not in QUANTIZE_MODES:
            raise UsageError(f"unknown quantization mode '{quantize}'; known: "
                             f"{', '.join(QUANTIZE_MODES)}")
        for name, defaults in QUANTIZE_MODES[quantize].items():
            given = options.get(name, {})
            mode_options = {**defaults, **given}
            if quantize_exclude is not None:
                mode_options["exclude"] = list(quantize_exclude)
            if quantize_ops is not None:
                mode_options["ops"] = list(quantize_ops)
            if mode_options:
                options[name] = mode_options
            specs.append(name)
    elif quantize_exclude is not None or quantize_ops is not None:
        raise UsageError("quantize_exclude and quantize_ops need a quantization mode (quantize)")
    for name in skip:
        get_pass(name)  # unknown names are an error
    # A pass asked for with options, as a configured object or by a flag, and also skipped or
    # configured a second time, is a contradiction: refused rather than settled silently.
    configured = [s.name for s in specs if isinstance(s, Pass)]
    twice = sorted({n for n in configured if configured.count(n) > 1}
                   | (set(configured) & set(options)))
    if twice:
        raise UsageError(f"pass(es) configured twice: {', '.join(twice)} (give one configured "
                         "pass, or options, per pass)")
    asked = (set(options) | set(configured) | ({"prune"} if prune_threshold is not None else set())
             | (set(QUANTIZE_MODES[quantize]) if quantize is not None else set()))
    contradicted = sorted(asked & set(skip))
    if contradicted:
        raise UsageError(f"pass(es) both asked for and skipped: {', '.join(contradicted)}")
    built: dict[str, Pass] = {}
    for spec in specs:
        if isinstance(spec, Pass):
            built[spec.name] = spec
        elif spec not in built:
            built[spec] = get_pass(spec, **options.get(spec, {}))
    unused = sorted(set(options) - set(built))
    if unused:
        for name in unused:
            if name not in REGISTRY:
                get_pass(name)  # raises: unknown pass
        raise UsageError(f"options given for pass(es) the pipeline does not run: "
                         f"{', '.join(unused)}")
    return Pipeline([p for name, p in built.items() if name not in set(skip)], max_iterations)


#: Every setting of a run a config file may give: key -> (its table, its TOML type (an integer
#: is a valid float), the default of ``onnxopt.optimize``).
SETTINGS: dict[str, tuple[str, type, Any]] = {
    "passes": ("pipeline", list, None), "skip": ("pipeline", list, ()),
    "options": ("pipeline", dict, None), "max_iterations": ("pipeline", int, 10),
    "validate": ("validation", bool, True), "inputs": ("validation", str, None),
    "calibration": ("validation", str, None), "input_shapes": ("validation", dict, None),
    "seed": ("validation", int, 0), "atol": ("validation", float, DEFAULT_ATOL),
    "rtol": ("validation", float, DEFAULT_RTOL),
    "max_drift": ("validation", float, DEFAULT_MAX_DRIFT),
    "metric": ("validation", str, "cosine"), "layerwise": ("validation", bool, False),
    "strict": ("validation", bool, False), "verify_each": ("validation", bool, False),
}
_TABLES = ("pipeline", "validation")
_TOML_TYPES = {list: "an array", dict: "a table", int: "an integer", float: "a number",
               bool: "true or false", str: "a string"}


def load_config(source: str | os.PathLike | dict) -> dict[str, Any]:
    """Read a TOML run configuration (see the module docstring) into ``onnxopt.optimize``
    keywords: ``passes``, ``skip``, ``options``, ``max_iterations`` and the ``[validation]``
    keys. Relative ``inputs`` and ``calibration`` paths are relative to the file's folder.

    Raises:
        UsageError: unreadable or invalid TOML, unknown tables or keys, values of the wrong
            type, options a pass does not have (the message names the file).
    """
    folder = None
    if isinstance(source, dict):
        data, where = source, "config"
    else:
        where, folder = str(source), os.path.dirname(os.path.abspath(source))
        try:
            with open(source, "rb") as f:
                data = tomllib.load(f)
        except OSError as err:
            raise UsageError(f"{where}: cannot read the config: {err.strerror}") from None
        except tomllib.TOMLDecodeError as err:
            raise UsageError(f"{where}: invalid TOML: {err}") from None
    unknown = sorted(set(data) - set(_TABLES))
    if unknown:
        raise UsageError(f"{where}: unknown table(s) {', '.join(unknown)}; known: "
                         f"{', '.join(_TABLES)}")
    settings: dict[str, Any] = {}
    for table in _TABLES:
        values = data.get(table, {})
        if not isinstance(values, dict):
            raise UsageError(f"{where}: {table} must be a table ([{table}])")
        keys = [k for k, (t, _, _) in SETTINGS.items() if t == table]
        bad = sorted(set(values) - set(keys))
        if bad:
            raise UsageError(f"{where}: unknown key(s) in [{table}]: {', '.join(bad)}; known: "
                             f"{', '.join(keys)}")
        for key, value in values.items():
            kind = SETTINGS[key][1]
            if not fits_type(value, (kind,)):
                raise UsageError(f"{where}: [{table}] {key} must be {_TOML_TYPES[kind]}, got "
                                 f"{value!r}")
            settings[key] = float(value) if kind is float else value
    for key in ("passes", "skip"):
        if not all(isinstance(v, str) for v in settings.get(key, [])):
            raise UsageError(f"{where}: [pipeline] {key} must be an array of pass names")
    for name, opts in settings.get("options", {}).items():
        if not isinstance(opts, dict):
            raise UsageError(f"{where}: [pipeline.options.{name}] must be a table of options")
        try:
            get_pass(name, **opts)
        except UsageError as err:
            raise UsageError(f"{where}: {err}") from None
    shapes = settings.get("input_shapes", {})
    if not all(isinstance(v, list) and all(isinstance(d, int) and not isinstance(d, bool)
                                           and d >= 0 for d in v) for v in shapes.values()):
        raise UsageError(f"{where}: [validation.input_shapes] maps input names to arrays of "
                         "dims (non-negative integers)")
    for key in ("inputs", "calibration"):
        if key in settings and folder is not None:
            settings[key] = os.path.join(folder, settings[key])
    return settings
