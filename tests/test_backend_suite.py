"""The ONNX backend test suite (``tools/backend_suite.py``) through the default pipeline.

By default: a deterministic 1-in-8 sample of the cases (by crc32 of the name) plus hand-picked
cases of the operators our passes touch most (control flow, shape arithmetic, constants). The full
suite (about 2,000 cases) is marked slow::

    python -m pytest -m slow tests/test_backend_suite.py      # one process, per-case report
    python tools/backend_suite.py --jobs 2                     # parallel, blames each failure

A case onnxruntime itself fails is skipped, as is one ``optimize`` rejects with an InputError (the
reason is in the skip message: ``pytest -rs``).
"""

from __future__ import annotations

import pytest

from onnxopt.errors import InputError
from tools import backend_suite
from tools.backend_suite import FAILED, ORT_FAILS, PASSED, REJECTED

SAMPLE_MODULUS = 8

#: Always run: the operators constant folding, CSE and identity removal meet most often.
IMPORTANT = [
    "test_if", "test_if_seq", "test_if_opt", "test_loop11", "test_loop13_seq",
    "test_loop16_seq_none", "test_scan_sum", "test_scan9_sum", "test_shape",
    "test_shape_start_1_end_negative_1", "test_slice", "test_slice_neg_steps",
    "test_slice_default_axes", "test_reshape_negative_dim", "test_reshape_zero_and_negative_dim",
    "test_reshape_allowzero_reordered", "test_transpose_default",
    "test_transpose_all_permutations_3", "test_cast_FLOAT_to_FLOAT16",
    "test_cast_FLOAT_to_BFLOAT16", "test_cast_DOUBLE_to_FLOAT",
    "test_castlike_FLOAT_to_DOUBLE_expanded", "test_constant_pad", "test_constant_pad_axes",
    "test_edge_pad", "test_reflect_pad", "test_resize_upsample_scales_nearest",
    "test_resize_downsample_sizes_linear_antialias", "test_resize_upsample_sizes_nearest_axes_2_3",
    "test_conv_with_strides_padding", "test_conv_with_autopad_same", "test_batchnorm_example",
    "test_batchnorm_epsilon_training_mode", "test_matmul_2d", "test_matmul_1d_3d",
    "test_gemm_default_scalar_bias", "test_gemm_all_attributes", "test_dropout_default",
    "test_dropout_default_mask_ratio", "test_training_dropout_zero_ratio", "test_identity",
    "test_identity_sequence", "test_identity_opt", "test_split_variable_parts_2d_opset18",
    "test_split_zero_size_splits_opset13", "test_concat_2d_axis_negative_1", "test_squeeze",
    "test_squeeze_negative_axes", "test_unsqueeze_two_axes", "test_unsqueeze_negative_axes",
    "test_expand_dim_changed", "test_expand_dim_unchanged", "test_constantofshape_float_ones",
    "test_constantofshape_int_shape_zero", "test_range_float_type_positive_delta_expanded",
    "test_range_int32_type_negative_delta_expanded", "test_layer_normalization_4d_axis1_expanded",
    "test_softmax_axis_0_expanded", "test_gather_0", "test_where_example",
    "test_affine_grid_2d_expanded", "simple/test_expand_shape_model1",
    "simple/test_sequence_model1", "pytorch-operator/test_operator_view",
    "pytorch-converted/test_BatchNorm2d_eval", "light/test_squeezenet",
]

CASES = {case.name: case for case in backend_suite.load_cases()}
QUICK = sorted({name for name in CASES if backend_suite.in_sample(name, SAMPLE_MODULUS)}
               | (set(IMPORTANT) & set(CASES)))


def _run(name: str) -> None:
    result = backend_suite.evaluate(CASES[name])
    if result.status == ORT_FAILS:
        pytest.skip(f"onnxruntime fails the original model: {result.reason}")
    if result.status == REJECTED:
        pytest.skip(result.reason)
    if result.status != PASSED:
        pytest.fail(result.reason, pytrace=False)


@pytest.mark.parametrize("name", QUICK)
def test_backend_case(name):
    _run(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_backend_case_full(name):
    _run(name)


def test_important_cases_exist():
    """A renamed case upstream must not silently leave the hand-picked list."""
    assert sorted(set(IMPORTANT) - set(CASES)) == []


# The harness itself: a wrong optimized model must fail, a model onnxruntime fails must be skipped.

def _identity_case() -> backend_suite.Case:
    return CASES["test_identity"]


def test_wrong_values_fail(monkeypatch):
    def negate(model, **_):
        broken = type(model)()
        broken.CopyFrom(model)
        broken.graph.node[0].op_type = "Neg"
        return broken, None

    monkeypatch.setattr(backend_suite.onnxopt, "optimize", negate)
    result = backend_suite.evaluate(_identity_case())
    assert result.status == FAILED
    assert "Mismatch" in result.reason or "Not equal" in result.reason


def test_renamed_output_fails(monkeypatch):
    def rename(model, **_):
        broken = type(model)()
        broken.CopyFrom(model)
        broken.graph.node[0].output[0] = broken.graph.output[0].name = "renamed"
        return broken, None

    monkeypatch.setattr(backend_suite.onnxopt, "optimize", rename)
    result = backend_suite.evaluate(_identity_case())
    assert result.status == FAILED and "outputs changed" in result.reason


def test_modifying_the_input_fails(monkeypatch):
    def mutate(model, **_):
        model.graph.node[0].name = "touched"
        return model, None

    monkeypatch.setattr(backend_suite.onnxopt, "optimize", mutate)
    result = backend_suite.evaluate(_identity_case())
    assert result.status == FAILED and "modified the model" in result.reason


def test_exception_fails_and_input_error_is_rejected(monkeypatch):
    def crash(model, **_):
        raise RuntimeError("boom")

    def reject(model, **_):
        raise InputError("model.onnx: unusable")

    monkeypatch.setattr(backend_suite.onnxopt, "optimize", crash)
    assert backend_suite.evaluate(_identity_case()).status == FAILED
    monkeypatch.setattr(backend_suite.onnxopt, "optimize", reject)
    assert backend_suite.evaluate(_identity_case()).status == REJECTED


def test_case_onnxruntime_fails_is_not_passed():
    case = _identity_case()
    (feed, expected), = case.data_sets
    wrong = backend_suite.Case(case.name, case.kind, case.model, [(feed, [expected[0] + 1])])
    result = backend_suite.evaluate(wrong)
    assert result.status == ORT_FAILS and "Mismatch" in result.reason
