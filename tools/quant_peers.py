"""Quantization recipes for ``tools/quant_benchmark.py``: onnxopt's modes and its peers', one
function per row of the benchmark table, each run in a process of its own.

    <python> tools/quant_peers.py RECIPE --model IN.onnx --output OUT.onnx
                                  --calibration DIR_OR_NPZ [--family transformer|cnn|other]

``<python>`` is the interpreter of the venv the recipe needs (``Recipe.venv``): the project's for
onnxopt, ``/work/peers/.venv`` for onnxruntime, NNCF and AMD Quark, ``/work/peers/.venv-inc`` for
Intel Neural Compressor (its numpy pin conflicts with Quark's), see ``tools/quant_peers.txt``.
The process writes ``OUT.onnx`` and ``OUT.onnx.json`` (``{"notes": [...], ...}``: the hand work
a user has to do for that toolkit, and what the toolkit reported); the benchmark measures the
model in its own process, so no toolkit grades itself.

Calibration data is a folder of ``.npz`` feeds (one feed per file, ``tools/calibration_data.py``)
or one ``.npz`` file holding one feed. Only this module imports the toolkits, and only inside the
recipe that needs them, so each venv needs only its own toolkit.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

REPO_ROOT = Path(__file__).resolve().parent.parent
PEERS_DIR = Path("/work/peers")
#: The interpreters of the peers' venvs; "main" (onnxopt) is the benchmark's own interpreter.
VENVS = {"peers": PEERS_DIR / ".venv" / "bin" / "python",
         "inc": PEERS_DIR / ".venv-inc" / "bin" / "python"}


def feed_files(source: Path) -> list[Path]:
    """The ``.npz`` feeds of ``source``: the sorted files of a folder, or the file itself."""
    source = Path(source)
    return sorted(source.glob("*.npz")) if source.is_dir() else [source]


def load_feeds(source: Path, names: list[str] | None = None) -> list[dict[str, np.ndarray]]:
    """Every feed of ``source`` (see :func:`feed_files`), keeping only ``names`` when given."""
    feeds = []
    for path in feed_files(source):
        with np.load(path) as npz:
            feeds.append({k: npz[k] for k in npz.files if names is None or k in names})
    return feeds


def graph_input_names(model: onnx.ModelProto) -> list[str]:
    initializers = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in initializers]


def opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def ort_reader(feeds: list[dict[str, np.ndarray]], base: type | None = None):
    """A ``CalibrationDataReader`` (onnxruntime's, or ``base``) over ``feeds`` (rewindable)."""
    if base is None:
        from onnxruntime.quantization import CalibrationDataReader as base

    class Reader(base):
        def __init__(self):
            self.position = 0

        def get_next(self):
            if self.position >= len(feeds):
                return None
            self.position += 1
            return feeds[self.position - 1]

        def rewind(self):
            self.position = 0

        def __iter__(self) -> Iterator[dict]:
            return iter(list(feeds))

    return Reader()


def to_opset13(model: onnx.ModelProto, notes: list[str],
               fold_casts: bool = False) -> onnx.ModelProto:
    """The hand work NNCF and Quark need for per-channel weights on older models: convert to
    opset 13 (onnx's version converter) and move Constant-node tensors into initializers, where
    the toolkits look for weights."""
    if opset(model) < 13:
        notes.append(f"converted opset {opset(model)} -> 13 by hand (onnx.version_converter)")
        model = onnx.version_converter.convert_version(model, 13)
    model = constants_to_initializers(model, notes)
    return fold_initializer_casts(model, notes) if fold_casts else model


def _nodes_to_initializers(model: onnx.ModelProto, notes: list[str], lift, note: str
                           ) -> onnx.ModelProto:
    """Replace each main-graph node for which ``lift(node)`` returns a TensorProto (named as the
    node's output) by that initializer (in place); ``note`` gets the count."""
    kept, lifted = [], 0
    for node in model.graph.node:
        tensor = lift(node)
        if tensor is None:
            kept.append(node)
        else:
            model.graph.initializer.append(tensor)
            lifted += 1
    if lifted:
        del model.graph.node[:]
        model.graph.node.extend(kept)
        notes.append(note.format(lifted))
    return model


def constants_to_initializers(model: onnx.ModelProto, notes: list[str]) -> onnx.ModelProto:
    """Move the tensors of main-graph Constant nodes into initializers (in place)."""
    def lift(node):
        value = next((a for a in node.attribute if a.name == "value"), None)
        if node.op_type != "Constant" or value is None or len(node.attribute) != 1:
            return None
        tensor = onnx.TensorProto()
        tensor.CopyFrom(value.t)
        tensor.name = node.output[0]
        return tensor
    return _nodes_to_initializers(model, notes, lift,
                                  "moved {} Constant-node tensors to initializers by hand")


def fold_initializer_casts(model: onnx.ModelProto, notes: list[str]) -> onnx.ModelProto:
    """Replace each Cast of an initializer by the cast initializer: NNCF's preprocessing looks
    the Cast's input up as a value_info and crashes on an initializer (``AttributeError: type``)."""
    from onnx import numpy_helper

    initializers = {t.name: t for t in model.graph.initializer}

    def lift(node):
        if node.op_type != "Cast" or node.input[0] not in initializers:
            return None
        to = onnx.helper.get_attribute_value(node.attribute[0])
        value = numpy_helper.to_array(initializers[node.input[0]])
        return numpy_helper.from_array(value.astype(onnx.helper.tensor_dtype_to_np_dtype(to)),
                                       node.output[0])
    return _nodes_to_initializers(model, notes, lift, "folded {} Cast nodes of initializers by "
                                  "hand (NNCF crashes on them)")


# --- onnxopt (project venv) -------------------------------------------------------------------

ONNXOPT_MODES = ("int8-weight", "int8-dynamic", "int8-static", "int4-weight", "float16")


#: ``quantize_static`` options of the ``int8-static-uint8`` recipe: every MatMul weight on the
#: exact uint8 grid (slower u8u8 kernels) rounded to nearest -- the mode's default before mixed
#: weight grids with GPTQ rounding, and its second decision's options (passes/quantize_static.py,
#: "Mixed weight grids").
UINT8_GRID = {"uint8_weights": True, "uint8_fraction": None, "rounding": "nearest"}
#: ``quantize_static`` options of the ``int8-static-int8`` recipe: every weight on the full int8
#: grid (``reduce_range`` off: u8s8 kernels, which saturate on AVX2 without VNNI -- the drift
#: budget's check on the real model measures what they compute), no uint8 weights.
INT8_GRID = {"reduce_range": False, "uint8_fraction": None}


def onnxopt_mode(mode: str, max_drift: float | None = None,
                 static_options: dict | None = None) -> Callable:
    def run(model: Path, output: Path, calibration: Path, family: str, notes: list[str]) -> dict:
        import onnxopt
        import onnxopt.passes  # noqa: F401  (registers every pass)
        from onnxopt.pass_manager import REGISTRY
        from onnxopt.pipeline import QUANTIZE_MODES

        wanted = QUANTIZE_MODES[mode]
        missing = [name for name in wanted if name not in REGISTRY]
        primary = next(iter(wanted))
        if primary in missing:
            raise RuntimeError(f"pass '{primary}' of mode {mode} is not in this onnxopt")
        kwargs: dict = {"inputs": str(calibration), "calibration": str(calibration),
                        "output": str(output)}
        if max_drift is not None:
            kwargs["max_drift"] = max_drift
        if static_options:
            kwargs["options"] = {"quantize_static": dict(static_options)}
            notes.append(", ".join(f"{k} = {v}" for k, v in static_options.items()))
        inputs = [i.name for i in onnx.load(str(model), load_external_data=False).graph.input]
        if "attention_mask" in inputs:  # padding tokens are not judged (as the task metric)
            kwargs["drift_mask"] = "attention_mask"
            notes.append("--drift-mask attention_mask")
        if missing:
            from onnxopt.pass_manager import get_pass

            notes.append(f"without {', '.join(missing)} (pass not in this onnxopt)")
            kwargs["passes"] = ["default"] + [get_pass(name, **options)
                                              for name, options in wanted.items()
                                              if name not in missing]
        else:
            kwargs["quantize"] = mode
        _, report = onnxopt.optimize(str(model), **kwargs)
        retry = (getattr(report, "latency", None) or {}).get("retry")
        if retry:  # slower than the float result: placed by measured latency (onnxopt.api)
            versus = retry["versus_first"]
            notes.append(
                f"decided again with latency_guided ({retry['versus_float']:.2f}x the float "
                f"model's time; {retry['sites_float']} sites float"
                + ("" if retry["quantized"] else ", none quantized: a float model")
                + (f"; {versus:.2f}x the first result's time" if versus is not None else "")
                + ("; written" if retry["kept"] else "; the first result written") + ")")
        data = report.to_dict() if hasattr(report, "to_dict") else {}
        summary = {"validation": _jsonable(getattr(report, "validation", None))}
        for record in data.get("passes", []) or []:
            if record.get("name") in wanted:
                summary.setdefault("passes", {})[record["name"]] = record.get("stats")
        return summary
    return run


def _jsonable(value):
    try:
        json.dumps(value)
        return value
    except TypeError:
        if hasattr(value, "__dict__"):
            return {k: _jsonable(v) for k, v in vars(value).items()}
        return str(value)


# --- onnxruntime.quantization (peers venv) ----------------------------------------------------

def ort_dynamic(per_channel: bool) -> Callable:
    def run(model, output, calibration, family, notes):
        from onnxruntime.quantization import QuantType, quantize_dynamic

        try:
            quantize_dynamic(str(model), str(output), per_channel=per_channel,
                             weight_type=QuantType.QInt8)
        except ValueError as exc:  # "Expected <weight> to be an initializer": Constant nodes
            if "to be an initializer" not in str(exc):
                raise
            notes.append(f"failed as given ({' '.join(str(exc).split())[:120]})")
            prepared = output.with_suffix(".input.onnx")
            onnx.save(constants_to_initializers(onnx.load(str(model)), notes), str(prepared))
            quantize_dynamic(str(prepared), str(output), per_channel=per_channel,
                             weight_type=QuantType.QInt8)
            prepared.unlink()
        notes.append("weights QInt8, defaults otherwise")
    return run


def ort_static(method: str, per_channel: bool = True) -> Callable:
    def run(model, output, calibration, family, notes):
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

        proto = onnx.load(str(model))
        feeds = load_feeds(calibration, graph_input_names(proto))
        extra = {"CalibPercentile": 99.999} if method == "percentile" else {}
        quantize_static(str(model), str(output), ort_reader(feeds), quant_format=QuantFormat.QDQ,
                        per_channel=per_channel,
                        calibrate_method={"minmax": CalibrationMethod.MinMax,
                                          "percentile": CalibrationMethod.Percentile}[method],
                        extra_options=extra)
        notes.append(f"QDQ, defaults (S8S8), {len(feeds)} calibration feeds, no pre_process")
    return run


def ort_int4(algorithm: str) -> Callable:
    def run(model, output, calibration, family, notes):
        from onnxruntime.quantization import matmul_nbits_quantizer as nbits

        proto = onnx.load(str(model))
        if algorithm == "hqq":
            config = nbits.HQQWeightOnlyQuantConfig(block_size=32, bits=4)
        elif algorithm == "gptq":
            feeds = load_feeds(calibration, graph_input_names(proto))
            config = nbits.GPTQWeightOnlyQuantConfig(calibration_data_reader=ort_reader(feeds))
        else:
            config = None  # DefaultWeightOnlyQuantConfig: onnxruntime's own RTN
        quantizer = nbits.MatMulNBitsQuantizer(proto, bits=4, block_size=32, is_symmetric=True,
                                               accuracy_level=4, algo_config=config)
        quantizer.process()
        quantizer.model.save_model_to_file(str(output), use_external_data_format=False)
        notes.append("MatMulNBits block 32 symmetric, accuracy_level=4 (set by hand: the default "
                     "is slower)")
    return run


# --- NNCF (peers venv) ------------------------------------------------------------------------

def nncf_ptq(smooth_quant: bool) -> Callable:
    def run(model, output, calibration, family, notes):
        import nncf
        from nncf.quantization.advanced_parameters import (AdvancedQuantizationParameters,
                                                           AdvancedSmoothQuantParameters)

        proto = to_opset13(onnx.load(str(model)), notes, fold_casts=True)
        feeds = load_feeds(calibration, graph_input_names(proto))
        kwargs = {}
        if family == "transformer":
            kwargs["model_type"] = nncf.ModelType.TRANSFORMER
            if not smooth_quant:
                kwargs["advanced_parameters"] = AdvancedQuantizationParameters(
                    smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1))
        elif smooth_quant:
            raise RuntimeError("SmoothQuant is the transformer preset's; not for this model")
        quantized = nncf.quantize(proto, nncf.Dataset(feeds), subset_size=len(feeds), **kwargs)
        onnx.save(quantized, str(output))
        notes.append(f"{'transformer' if family == 'transformer' else 'default'} preset, "
                     f"{len(feeds)} calibration feeds")
    return run


def nncf_int4(model, output, calibration, family, notes):
    import nncf

    proto = to_opset13(onnx.load(str(model)), notes, fold_casts=True)
    compressed = nncf.compress_weights(proto, mode=nncf.CompressWeightsMode.INT4_ASYM,
                                       group_size=128, ratio=1.0)
    onnx.save(compressed, str(output))
    notes.append("INT4_ASYM group 128, ratio 1.0, data-free")


# --- AMD Quark ONNX (peers venv) --------------------------------------------------------------

def quark_static(cle: bool) -> Callable:
    def run(model, output, calibration, family, notes):
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
        from quark.onnx import ModelQuantizer
        from quark.onnx.quantization.config.config import Config, QuantizationConfig

        proto = to_opset13(onnx.load(str(model)), notes)
        prepared = output.with_suffix(".input.onnx")
        onnx.save(proto, str(prepared))
        feeds = load_feeds(calibration, graph_input_names(proto))
        config = Config(global_quant_config=QuantizationConfig(
            calibrate_method=CalibrationMethod.Percentile, quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
            include_cle=cle, print_summary=False))
        ModelQuantizer(config).quantize_model(str(prepared), str(output), ort_reader(feeds))
        prepared.unlink(missing_ok=True)
        notes.append(f"U8S8 QDQ per-channel, percentile, CLE {'on' if cle else 'off'}")
    return run


# --- Intel Neural Compressor (its own venv) ---------------------------------------------------

def inc_static(model, output, calibration, family, notes):
    from onnx_neural_compressor.data_reader import CalibrationDataReader
    from onnx_neural_compressor.quantization import QuantFormat, quantize
    from onnx_neural_compressor.quantization import config as inc_config

    proto = onnx.load(str(model))
    feeds = load_feeds(calibration, graph_input_names(proto))
    quantize(str(model), str(output), inc_config.StaticQuantConfig(
        ort_reader(feeds, CalibrationDataReader), quant_format=QuantFormat.QDQ, per_channel=True))
    notes.append("onnx-neural-compressor StaticQuantConfig QDQ per-channel")


def inc_dynamic(model, output, calibration, family, notes):
    from onnx_neural_compressor.quantization import config as inc_config
    from onnx_neural_compressor.quantization import quantize

    quantize(str(model), str(output), inc_config.DynamicQuantConfig(per_channel=True))
    notes.append("onnx-neural-compressor DynamicQuantConfig per-channel")


@dataclass(frozen=True)
class Recipe:
    """One row: ``run(model, output, calibration, family, notes)`` writes ``output``."""

    name: str
    label: str
    venv: str  # "main" | "peers" | "inc"
    run: Callable
    families: tuple[str, ...] = ("transformer", "cnn", "other")
    int4: bool = False  # applies only to models with MatMul weights


ALL = ("transformer", "cnn", "other")
RECIPES = {r.name: r for r in (
    *(Recipe(f"onnxopt:{m}", f"onnxopt `{m}`", "main", onnxopt_mode(m), int4=m == "int4-weight")
      for m in ONNXOPT_MODES),
    Recipe("onnxopt:int8-static@0.999", "onnxopt `int8-static`, max drift cosine 0.999", "main",
           onnxopt_mode("int8-static", 0.999), families=("transformer",)),
    Recipe("onnxopt:int8-static-uint8", "onnxopt `int8-static`, every MatMul weight uint8, "
           "nearest rounding", "main", onnxopt_mode("int8-static", static_options=UINT8_GRID)),
    Recipe("onnxopt:int8-static-int8", "onnxopt `int8-static`, every weight on the full int8 "
           "grid", "main", onnxopt_mode("int8-static", static_options=INT8_GRID)),
    Recipe("ort:dynamic-tensor", "onnxruntime `quantize_dynamic` per-tensor", "peers",
           ort_dynamic(False)),
    Recipe("ort:dynamic-channel", "onnxruntime `quantize_dynamic` per-channel", "peers",
           ort_dynamic(True)),
    Recipe("ort:static-minmax", "onnxruntime `quantize_static` QDQ per-channel minmax", "peers",
           ort_static("minmax")),
    Recipe("ort:static-percentile", "onnxruntime `quantize_static` QDQ per-channel percentile",
           "peers", ort_static("percentile")),
    Recipe("ort:int4-rtn", "onnxruntime MatMulNBits int4 b32 RTN", "peers", ort_int4("rtn"),
           int4=True),
    Recipe("ort:int4-hqq", "onnxruntime MatMulNBits int4 b32 HQQ", "peers", ort_int4("hqq"),
           int4=True),
    Recipe("ort:int4-gptq", "onnxruntime MatMulNBits int4 b32 GPTQ", "peers", ort_int4("gptq"),
           int4=True),
    Recipe("nncf:ptq-sq", "NNCF PTQ, transformer preset (SmoothQuant)", "peers", nncf_ptq(True),
           families=("transformer",)),
    Recipe("nncf:ptq", "NNCF PTQ (no SmoothQuant)", "peers",
           nncf_ptq(False)),
    Recipe("nncf:int4", "NNCF int4 weights asym group 128", "peers", nncf_int4, int4=True),
    Recipe("quark:percentile", "AMD Quark per-channel percentile", "peers", quark_static(False)),
    Recipe("quark:percentile-cle", "AMD Quark per-channel percentile + CLE", "peers",
           quark_static(True)),
    Recipe("inc:dynamic", "Intel Neural Compressor dynamic per-channel", "inc", inc_dynamic),
    Recipe("inc:static", "Intel Neural Compressor static QDQ per-channel", "inc", inc_static),
)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", choices=sorted(RECIPES))
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--calibration", type=Path, required=True)
    parser.add_argument("--family", default="other", choices=ALL)
    args = parser.parse_args(argv)
    notes: list[str] = []
    sidecar = Path(f"{args.output}.json")
    try:
        extra = RECIPES[args.recipe].run(args.model, args.output, args.calibration, args.family,
                                         notes) or {}
    except Exception as exc:  # the benchmark shows the failure as the row's verdict
        sidecar.write_text(json.dumps({"notes": notes, "error": f"{type(exc).__name__}: "
                                       + " ".join(str(exc).split())[:400],
                                       "traceback": traceback.format_exc()[-3000:]}))
        return 1
    sidecar.write_text(json.dumps({"notes": notes, **extra}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
