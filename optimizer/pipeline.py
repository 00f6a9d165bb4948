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
    inputs = "feeds.npz"
    max_drift = 0.99
    metric = "cosine"

Options of a pass the pipeline does not run are an error, so a typo cannot be silently ignored.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from typing import Any, Sequence, Union

from onnxopt.errors import UsageError
from onnxopt.pass_manager import REGISTRY, Pass, get_pass

PassSpec = Union[str, Pass]

#: ``--quantize`` modes and the pass each one runs.
QUANTIZE_MODES = {"int8-weight": "quantize_weights"}

#: Keys of the ``[validation]`` table (keywords of ``onnxopt.optimize``).
VALIDATION_KEYS = frozenset({"validate", "inputs", "input_shapes", "seed", "atol", "rtol",
                             "max_drift", "metric", "layerwise", "strict", "verify_each"})


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
                   max_iterations: int = 10) -> Pipeline:
    """The pipeline for the given passes and options.

    Args:
        passes: pass names (``"default"``: the lossless pipeline) or configured passes; None is
            ``["default"]``.
        skip: names of passes to leave out.
        options: ``{pass name: {option: value}}``; a named pass not yet in ``passes`` is added
            only by the sugar below, otherwise its options are an error.
        prune_threshold: sugar for ``prune`` with ``threshold`` (added to the pipeline).
        quantize: sugar for the pass of a ``QUANTIZE_MODES`` mode (added to the pipeline).
        max_iterations: bound on the rounds of the lossless passes (at least 1).

    Raises:
        UsageError: an unknown pass, mode or option, or options for a pass not run.
    """
    if max_iterations < 1:
        raise UsageError(f"--max-iterations must be at least 1, got {max_iterations}")
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
        specs.append(QUANTIZE_MODES[quantize])
    for name in skip:
        get_pass(name)  # unknown names are an error
    built: dict[str, Pass] = {}
    for spec in specs:
        if isinstance(spec, Pass):
            built.setdefault(spec.name, spec)
        elif spec not in built:
            built[spec] = get_pass(spec, **options.get(spec, {}))
        else:
            continue
    unused = sorted(set(options) - set(built))
    if unused:
        for name in unused:
            if name not in REGISTRY:
                get_pass(name)  # raises: unknown pass
        raise UsageError(f"options given for pass(es) the pipeline does not run: "
                         f"{', '.join(unused)}")
    return Pipeline([p for name, p in built.items() if name not in set(skip)], max_iterations)


def load_config(source: str | os.PathLike | dict) -> dict[str, Any]:
    """Read a TOML run configuration (see the module docstring) into ``onnxopt.optimize``
    keywords: ``passes``, ``skip``, ``options``, ``max_iterations`` and the ``[validation]``
    keys.

    Raises:
        UsageError: unreadable or invalid TOML, unknown tables or keys.
    """
    if isinstance(source, dict):
        data, where = source, "config"
    else:
        where = str(source)
        try:
            with open(source, "rb") as f:
                data = tomllib.load(f)
        except OSError as err:
            raise UsageError(f"{where}: cannot read the config: {err.strerror}") from None
        except tomllib.TOMLDecodeError as err:
            raise UsageError(f"{where}: invalid TOML: {err}") from None
    unknown = sorted(set(data) - {"pipeline", "validation"})
    if unknown:
        raise UsageError(f"{where}: unknown table(s) {', '.join(unknown)}; known: pipeline, "
                         "validation")
    pipeline = dict(data.get("pipeline", {}))
    bad = sorted(set(pipeline) - {"passes", "skip", "options", "max_iterations"})
    if bad:
        raise UsageError(f"{where}: unknown key(s) in [pipeline]: {', '.join(bad)}")
    validation = dict(data.get("validation", {}))
    bad = sorted(set(validation) - VALIDATION_KEYS)
    if bad:
        raise UsageError(f"{where}: unknown key(s) in [validation]: {', '.join(bad)}")
    for key, kind in (("passes", list), ("skip", list), ("options", dict)):
        if key in pipeline and not isinstance(pipeline[key], kind):
            raise UsageError(f"{where}: [pipeline] {key} must be a {kind.__name__}")
    return {**pipeline, **validation}
