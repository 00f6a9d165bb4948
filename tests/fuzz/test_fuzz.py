"""Differential fuzzing in CI: random valid models (``strategies.models``) through the default
pipeline, with validation off and on, compared with the original on onnxruntime
(``differential.check``): the outputs must match, or onnxopt must refuse the model with an
InputError.

Deterministic (``derandomize``, no example database): CI runs the same 2,000 models every time
(1,200 of up to 5 operator steps, 800 of up to 12), about a minute on one core. The long run
with other seeds is ``python tools/fuzz.py``; what it finds becomes a regression test in
``tests/test_regressions.py`` or ``tests/passes/``.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings

from differential import FAILED, check, describe
from strategies import Case, models

_SETTINGS = dict(derandomize=True, database=None, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                        HealthCheck.filter_too_much])


def _check(case: Case) -> None:
    outcome = check(case)
    assert outcome.status != FAILED, f"{outcome.reason}\n{describe(case.model)}"


@settings(max_examples=1200, **_SETTINGS)
@given(models(max_ops=5))
def test_small_models_keep_their_outputs(case):
    _check(case)


@settings(max_examples=800, **_SETTINGS)
@given(models(max_ops=12))
def test_larger_models_keep_their_outputs(case):
    _check(case)
