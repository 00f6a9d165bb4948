"""Opset upgrade: convert a model to a newer default-domain (ai.onnx) opset with
``onnx.version_converter`` (the ONNX project's adapters, one per op change between versions;
docs/VersionConverter.md).

A pass declares the opset it would upgrade a model to (``Pass.upgrade_opset``) when its
``min_opset`` is above the model's: per-channel QuantizeLinear/DequantizeLinear need opset 13,
blocked ones 21. ``onnxopt.optimize`` then converts the model before the pipeline and keeps
validating against the untouched original; when conversion fails, the pass is refused with the
reason (:func:`upgrade` raises it).

The converter is not trusted blindly: the result must pass ``onnx.checker`` (shape inference
off: real exports often carry stale value_info), and carry the requested opset.
"""

from __future__ import annotations

import onnx
import onnx.version_converter

from onnxopt import external
from onnxopt.errors import ModelLoadError


class OpsetUpgradeError(ModelLoadError):
    """A model cannot be converted to the opset a pass needs (the message says why)."""


def default_opset(model: onnx.ModelProto) -> int:
    """The model's default-domain (``""`` or ``ai.onnx``) opset, 1 when it imports none."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def upgrade(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """``model`` converted to default-domain opset ``target`` (a new ModelProto; ``model`` is
    not modified). A model already at ``target`` or above is returned as a copy.

    Raises:
        OpsetUpgradeError: the converter has no adapter for an op of the model, fails, or
            produces a model the checker rejects; the one-line message names the opsets and
            the reason.
    """
    source = default_opset(model)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    if source >= target:
        return copy
    try:
        converted = onnx.version_converter.convert_version(copy, target)
        if external.has_external_data(converted):  # data left in its files: check beside them
            external.check_with_references(converted)
        else:
            onnx.checker.check_model(converted)
    except Exception as err:  # the converter raises RuntimeError, ValidationError, IndexError...
        text = str(err).strip()
        first = next((line.strip() for line in text.splitlines() if line.strip()),
                     type(err).__name__)
        raise OpsetUpgradeError(f"cannot convert opset {source} to {target}: {first}") from None
    # The converter keeps the IR version; newer opsets (and their types: int4 needs IR 10) need
    # the IR version that introduced them.
    # (only the default domain: the helper knows no contrib domains such as com.microsoft)
    default = [o for o in converted.opset_import if o.domain in ("", "ai.onnx")]
    converted.ir_version = max(converted.ir_version,
                               onnx.helper.find_min_ir_version_for(default))
    if default_opset(converted) != target:
        raise OpsetUpgradeError(f"cannot convert opset {source} to {target}: the converter "
                                f"produced opset {default_opset(converted)}")
    return converted
