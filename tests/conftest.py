"""Shared pytest configuration: makes ``tests/helpers.py`` importable from every test folder and
sets a bounded hypothesis profile (few examples, no deadline: onnxruntime sessions are slow to
create)."""

from __future__ import annotations

import sys
from pathlib import Path

from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).parent))

settings.register_profile("onnxopt", max_examples=30, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("onnxopt")
