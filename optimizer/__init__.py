"""onnxopt: an ONNX graph optimizer that proves, on onnxruntime, that its output computes the same.

Python API::

    from onnxopt import get_pass, optimize, optimize_many
    model, report = optimize("model.onnx", prune_threshold=1e-3)
    model, report = optimize("model.onnx", passes=["default", get_pass("prune", threshold=1e-3)])
    for result in optimize_many(["a.onnx", "models/"], "out/", jobs=2):  # one per model, in order
        print(result.model, result.exit_code)
"""

__version__ = "0.1.0"

from onnxopt.api import optimize, validate  # noqa: E402
from onnxopt.batch import optimize_many  # noqa: E402
from onnxopt.errors import (  # noqa: E402
    InputError, ModelLoadError, OnnxoptError, PassError, UsageError, ValidationFailed)
from onnxopt.io import load_model, save_model  # noqa: E402
from onnxopt.pass_manager import get_pass  # noqa: E402

__all__ = ["optimize", "optimize_many", "validate", "get_pass", "load_model", "save_model",
           "OnnxoptError", "InputError", "ModelLoadError", "UsageError", "ValidationFailed", "PassError",
           "__version__"]
