"""Exception types of onnxopt.

Every error a user can cause is one of these, with a one-line message that names the file, node or
tensor concerned. ``exit_code`` is what the CLI returns for it:

* 1 -- validation failed (:class:`ValidationFailed`),
* 2 -- bad input or usage (:class:`InputError` and subclasses),
* 3 -- an internal error: a pass produced an invalid model (:class:`PassError`).
"""

from __future__ import annotations

#: The advice when onnxruntime fails to run a model on inputs onnxopt synthesized (random values
#: that can index out of range, dynamic dims set to 1).
SYNTHESIZED_INPUTS_HINT = ("the inputs were synthesized: give real ones with --inputs, or fix "
                           "dynamic dims with --input-shape")


def first_line(err: BaseException, default: str | None = None) -> str:
    """The first line of ``err``'s message, for a one-line error or warning; ``default`` (the
    exception's type name when None) when the message is empty."""
    text = str(err).strip()
    return text.splitlines()[0] if text else (type(err).__name__ if default is None
                                              else default)


class OnnxoptError(Exception):
    """Base class of every error onnxopt raises on purpose."""

    exit_code = 2


class InputError(OnnxoptError):
    """The user's input (a model, a feed file, an argument) is unusable."""

    exit_code = 2


class ModelLoadError(InputError):
    """A model cannot be read: missing file, invalid protobuf, unsafe or missing external data."""


class UnsupportedModel(InputError):
    """The model is valid, but holds something onnxopt's graph cannot represent (optional or map
    types): ``optimize`` writes it unchanged, with a warning."""


class UsageError(InputError):
    """An option or a combination of options is invalid (unknown pass, malformed shape, ...)."""


class ValidationFailed(OnnxoptError):
    """The optimized model does not compute the same outputs as the original, within tolerance."""

    exit_code = 1


class PassError(OnnxoptError):
    """A pass left the graph in a state that fails verification (a bug in onnxopt)."""

    exit_code = 3


class OnnxoptWarning(UserWarning):
    """What the Python API warns about (synthesized inputs that make an output constant, a
    drift estimate that missed, ...), worded in API terms; the CLI prints the same warnings in
    its own terms instead."""
