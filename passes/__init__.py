"""The passes of onnxopt, one per module; importing this package registers them all.

See ``onnxopt.pass_manager`` for the contract. Every module of this package but the private ones (``_conv``)
is imported, so a new pass only needs its module; to run by default it must also be named in
``LOSSLESS_PIPELINE``, whose order is the order of each round.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

#: The default, lossless pipeline, repeated to a fixed point.
LOSSLESS_PIPELINE = [
    "fold_constants", "inline_if", "if_rank_condition", "fold_not_into_if", "fuse_if",
    "sink_into_if", "hoist_loop_invariants", "remove_identity", "remove_noop", "fold_zero",
    "elide_shape_casts",
    "sink_transpose", "merge_transpose", "reshape_from_shape",
    "merge_reshape", "merge_concat", "merge_slice", "merge_scalar_mul", "fuse_hard_swish",
    "fuse_space_to_depth",
    "fuse_pad", "fuse_conv_affine", "fuse_conv_input_scale", "fuse_conv_bn",
    "elide_zero_rnn_inputs",
    "fold_attention_bias", "fuse_matmul_add", "fuse_shape_gather", "cse", "dedup_initializers",
    "eliminate_dead",
]
