"""Export Keras vision models (NHWC, random weights with a fixed seed) to ONNX the ways Keras users
do, into ``<dest>/<name>.onnx`` with validation inputs ``<dest>/<name>.inputs.npz``.

    /work/tfenv/bin/python tools/export_keras.py [--model resnet50|mobilenetv2]
        [--backend torch|tensorflow] [--dest models/zoo] [--seed 0]

Run it with a separate environment holding Keras, so onnxopt's own stays clean::

    python3 -m venv /work/tfenv
    /work/tfenv/bin/pip install tensorflow-cpu==2.21.0 tf2onnx==1.17.0 torch==2.13.0+cpu \\
        onnxscript==0.7.2 onnxruntime==1.32.0

(Keras 3.15.1 comes with tensorflow-cpu; these versions work together.) Two exports, both
through Keras 3's own ``model.export(path, format="onnx")`` with a dynamic batch:

* ``--backend torch`` (default), ``keras_<model>.onnx``: Keras on PyTorch runs every NHWC Conv as
  ``permute(0,3,1,2)`` -> NCHW conv -> ``permute(0,2,3,1)``, and BatchNormalization as
  ``(x - mean) * (rsqrt(var + eps) * gamma) + beta`` in NHWC; Keras exports it with the
  TorchScript exporter (opset 20). The result is the NHWC-wrapped graph of issue 12: a
  Transpose pair around every Conv and a per-channel Sub/Mul/Add after it (ResNet50: 775 nodes,
  110 Transposes; MobileNetV2: 801 nodes, 109 Transposes).
* ``--backend tensorflow``, ``keras_<model>_tf2onnx.onnx``: Keras on TensorFlow converts through
  tf2onnx, whose own optimizers already cancel the Transposes (ResNet50: 232 nodes, 1
  Transpose; the batch norms stay as Mul/Add): the baseline the torch export should reach.

Weights: Keras' initializers under ``keras.utils.set_random_seed(seed)``, then every
BatchNormalization's gamma, beta, moving mean and variance and every Conv/Dense bias drawn from
a seeded numpy generator, so the batch norms are not the identity they are at initialization
(trained models' are not). The export is checked before it is written: onnxruntime on the ONNX
file must match Keras' own prediction (max abs difference 1e-4 relative to the output scale) on
the inputs, and the inputs file holds one batch of ``[1, 224, 224, 3]`` normal floats keyed by
the ONNX input name. Exits 1 with a hint when Keras or the backend is missing.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
MODELS = {"resnet50": "ResNet50", "mobilenetv2": "MobileNetV2"}
BACKENDS = ("torch", "tensorflow")
SHAPE = (224, 224, 3)


def output_name(model: str, backend: str) -> str:
    """The zoo name of an export: ``keras_<model>``, with ``_tf2onnx`` for the TF backend."""
    return f"keras_{model}" + ("_tf2onnx" if backend == "tensorflow" else "")


def randomize(model, seed: int) -> None:
    """Give the batch norms and biases of a Keras ``model`` seeded random values (in place)."""
    import keras

    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape).astype(np.float32),
                               rng.normal(0, 0.1, beta.shape).astype(np.float32),
                               rng.normal(0, 0.1, mean.shape).astype(np.float32),
                               rng.uniform(0.5, 1.5, var.shape).astype(np.float32)])
        elif getattr(layer, "use_bias", False) and len(layer.get_weights()) == 2:
            kernel, bias = layer.get_weights()
            layer.set_weights([kernel, rng.normal(0, 0.01, bias.shape).astype(np.float32)])


def export(model_name: str, backend: str, dest: Path, seed: int) -> Path:
    """Build, randomize, export and check one model; return the ONNX path.

    Raises:
        RuntimeError: onnxruntime's output differs from Keras'.
    """
    os.environ["KERAS_BACKEND"] = backend
    import keras
    import onnxruntime as ort

    keras.utils.set_random_seed(seed)
    model = getattr(keras.applications, MODELS[model_name])(weights=None, input_shape=SHAPE)
    randomize(model, seed)
    x = np.random.default_rng(seed).normal(size=(1, *SHAPE)).astype(np.float32)
    expected = np.asarray(model.predict(x, verbose=0))
    name = output_name(model_name, backend)
    path = dest / f"{name}.onnx"
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        staged = Path(tmp) / path.name
        spec = [keras.InputSpec(shape=(None, *SHAPE), dtype="float32")]
        model.export(str(staged), format="onnx", input_signature=spec, verbose=False)
        session = ort.InferenceSession(str(staged), providers=["CPUExecutionProvider"])
        feed_name = session.get_inputs()[0].name
        got = session.run(None, {feed_name: x})[0]
        error = float(np.max(np.abs(got - expected)))
        if error > 1e-4 * max(1.0, float(np.max(np.abs(expected)))):
            raise RuntimeError(f"{path}: onnxruntime differs from Keras by {error:.3g}")
        staged.replace(path)
    np.savez(dest / f"{name}.inputs.npz", **{feed_name: x})
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="resnet50")
    parser.add_argument("--backend", choices=BACKENDS, default="torch",
                        help="Keras backend: torch (NHWC-wrapped export) or tensorflow "
                             "(tf2onnx)")
    parser.add_argument("--dest", type=Path, default=REPO / "models" / "zoo")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        path = export(args.model, args.backend, args.dest, args.seed)
    except ImportError as err:
        print(f"export_keras: {err.name or err} is missing; install Keras and the {args.backend} "
              "backend in a separate venv (see this file's docstring)", file=sys.stderr)
        return 1
    except RuntimeError as err:
        print(f"export_keras: {err}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
