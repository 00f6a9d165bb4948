"""Tests of optimizer/html_report.py: the page of a real run (op table, verdict, drift chart with
one SVG element per plotted point), escaping of hostile names, atomic writes."""

from __future__ import annotations

import math
import os
import re

import numpy as np
import onnx
import pytest
from helpers import make_model
from onnx import helper

from onnxopt import api
from onnxopt.html_report import render_html, write_html

HOSTILE = "<script>alert('x')</script>"


def _model(scale: float = 1.0) -> onnx.ModelProto:
    """Identity and a foldable Add (removed by the passes); two outputs, one with a hostile name."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Identity", ["x"], ["xi"]),
             helper.make_node("Add", ["A", "B"], ["ab"]),
             helper.make_node("MatMul", ["xi", "ab"], ["m"]),
             helper.make_node("Relu", ["m"], [HOSTILE]),
             helper.make_node("Neg", ["m"], ["neg"])]
    return make_model(nodes, [("x", np.float32, [2, 4])],
                      [(HOSTILE, np.float32, [2, 3]), ("neg", np.float32, [2, 3])],
                      {"A": rng.normal(size=(4, 3)).astype(np.float32) * scale,
                       "B": rng.normal(size=(4, 3)).astype(np.float32)})


@pytest.fixture(scope="module")
def report():
    return api.optimize(_model())[1]


def _points(page: str) -> list[str]:
    svg = re.search(r"<svg.*?</svg>", page, re.DOTALL).group(0)
    return re.findall(r'<(?:circle|rect) class="pt[^"]*"', svg)


def test_page_has_the_op_table_the_verdict_and_the_validation(report):
    page = render_html(report)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    for op, before, after in (("Identity", 1, 0), ("Add", 1, 0), ("MatMul", 1, 1)):
        assert re.search(rf"<tr><td>{op}</td><td class=\"n\">{before}</td>"
                         rf"<td class=\"n\">{after}</td>", page), op
    assert re.search(r"nodes \(main graph\)</td><td class=\"n\">5</td><td class=\"n\">3</td>",
                     page)
    assert 'class="verdict v-passed">passed<' in page
    assert report.verdict == "passed"
    assert "lossless" in page and "∞" in page  # identical outputs: infinite SNR
    assert "fold_constants" in page  # the passes table


def test_output_bars_one_element_per_output(report):
    assert len(_points(render_html(report))) == len(report.validation.outputs) == 2


def test_hostile_names_are_escaped(report):
    page = render_html(report)
    assert "<script" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page


def test_layerwise_tensors_are_plotted_in_order_one_point_each(report):
    snrs = [math.inf, math.inf, 48.0, 31.5, "inf", None]
    report.layerwise = {
        "mode": "lossy", "compared": [{"tensor": f"t{i}", "metrics": {"snr_db": s, "max_abs": 0.1}}
                                      for i, s in enumerate(snrs)],
        "first_divergence": {"tensor": "t3", "reference_node": {"name": "n3", "op": "Conv"},
                             "candidate_node": {"name": HOSTILE, "op": "Conv"},
                             "metrics": {"snr_db": 31.5, "cosine": 0.97, "max_abs": 0.2}},
        "ranking": []}
    try:
        page = render_html(report)
    finally:
        report.layerwise = None
    points = _points(page)
    assert len(points) == 5  # the entry without a value is not plotted
    assert [bool(re.search("exact", p)) for p in points] == [True, True, False, False, True]
    assert 'class="pt bad"' in points[3] and 'class="marker"' in page
    assert "First divergence" in page and "<script" not in page


def test_real_layerwise_result_gets_its_section(tmp_path):
    report = api.validate(_model(), _model(scale=1.01), layerwise=True)
    page = render_html(report)
    assert 'class="verdict v-failed">failed<' in page
    assert "Layer by layer" in page and "First divergence" in page
    assert report.layerwise.first_divergence.tensor == "ab"
    assert "<td>ab</td>" in page


def test_write_is_atomic_and_leaves_no_temporary_file(report, tmp_path, monkeypatch):
    path = tmp_path / "reports" / "r.html"
    write_html(report, path)
    assert [p.name for p in path.parent.iterdir()] == ["r.html"]
    first = path.read_text(encoding="utf-8")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        write_html(report, path)
    assert [p.name for p in path.parent.iterdir()] == ["r.html"]
    assert path.read_text(encoding="utf-8") == first


def test_warnings_and_latency_are_on_the_page(report):
    """The run's warnings (inputs first, escaped) and a speed mode's latency, as the CLI prints
    them; neither section without them."""
    import dataclasses

    quiet = render_html(dataclasses.replace(report, warnings=[], inputs={}))
    assert "<h2>Warnings</h2>" not in quiet and "the original&#x27;s" not in quiet
    shown = dataclasses.replace(report, warnings=[f"slower {HOSTILE}"],
                                inputs={**report.inputs, "warnings": ["dims set to 1"]},
                                latency={"latency_ratio": 0.52,
                                         "latency_ms": {"before": 10.0, "after": 5.2},
                                         "latency_note": "median of 5 timings"})
    page = render_html(shown)
    section = re.search(r"<h2>Warnings</h2>\n<ul>(.*?)</ul>", page).group(1)
    assert section.index("dims set to 1") < section.index("slower &lt;script&gt;")
    assert "0.52× the original&#x27;s (10 → 5.2 ms per run; median of 5 timings)" in page
