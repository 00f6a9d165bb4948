"""Shared pytest configuration: makes ``tests/helpers.py`` importable from every test folder and
sets a bounded hypothesis profile (few examples, no deadline: onnxruntime sessions are slow to
create)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).parent))

settings.register_profile("onnxopt", max_examples=30, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("onnxopt")


_REQUIRE_ZOO = os.environ.get("ONNXOPT_REQUIRE_ZOO") == "1"
#: Skip messages of tests that need a fetched real model (tools/fetch_models.py).
_ZOO_SKIPS = ("not fetched", "is absent")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With ONNXOPT_REQUIRE_ZOO=1 (CI), a test skipped for a missing real model fails instead, so
    a run without the models cannot pass by skipping them."""
    outcome = yield
    report = outcome.get_result()
    if _REQUIRE_ZOO and report.skipped and isinstance(report.longrepr, tuple) \
            and any(s in str(report.longrepr[2]) for s in _ZOO_SKIPS):
        report.outcome = "failed"


@pytest.fixture(autouse=True)
def _no_latency_retry(request, monkeypatch):
    """int8-static's latency retry (``onnxopt.api.RETRY_SLOWER``) decides by this machine's
    timings, and a test model of a few hundred weights runs faster float: tests would get a
    float model or a quantized one by chance. Off, except in tests marked ``latency_retry``
    (which replace the timings themselves)."""
    if request.node.get_closest_marker("latency_retry") is None:
        import onnxopt.api

        monkeypatch.setattr(onnxopt.api, "RETRY_SLOWER", float("inf"))
