"""Analyses: facts about the graph, computed on demand and cached by :class:`AnalysisManager`.

* :class:`TensorTypes` -- dtypes and shapes from ONNX shape inference over every scope, and
  which values are not tensors (sequences, optionals, maps);
* :class:`UseDef` -- the scope of every node and the interface of every scope;
* :class:`ActivationStats` -- ranges, histograms and per-channel norms of activations, from one
  instrumented onnxruntime run that streams over the calibration feeds.
"""

from onnxopt.analyses.activations import ActivationStats, TensorStats
from onnxopt.analyses.manager import Analysis, AnalysisManager
from onnxopt.analyses.types import TensorTypes, infer_tensor_types
from onnxopt.analyses.usedef import UseDef

__all__ = ["Analysis", "AnalysisManager", "ActivationStats", "TensorStats", "TensorTypes",
           "UseDef", "infer_tensor_types"]
