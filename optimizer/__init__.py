"""onnxopt: an ONNX graph optimizer that proves, on onnxruntime, that its output computes the same.

Python API::

    from optimizer import optimize
    model, report = optimize("model.onnx", prune_threshold=1e-3)
"""

__version__ = "0.1.0"

from optimizer.api import optimize, validate  # noqa: E402
from optimizer.errors import (  # noqa: E402
    InputError, ModelLoadError, OnnxoptError, PassError, UsageError, ValidationFailed)
from optimizer.io import load_model, save_model  # noqa: E402

__all__ = ["optimize", "validate", "load_model", "save_model", "OnnxoptError", "InputError",
           "ModelLoadError", "UsageError", "ValidationFailed", "PassError", "__version__"]
