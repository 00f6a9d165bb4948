"""The passes of onnxopt, one per module; importing this package registers them all.

See ``optimizer.pass_manager`` for the contract. ``LOSSLESS_PIPELINE`` is the default pipeline.
"""

from passes import (  # noqa: F401  (imported to register)
    cse,
    dedup_initializers,
    eliminate_dead,
    fold_constants,
    prune,
    quantize_weights,
    remove_identity,
)

#: The default, lossless pipeline, repeated to a fixed point.
LOSSLESS_PIPELINE = ["fold_constants", "remove_identity", "cse", "dedup_initializers",
                     "eliminate_dead"]
