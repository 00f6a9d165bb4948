"""Tests of the pruning and clustering sugar (CLI flags, ``build_pipeline`` / ``optimize``
keywords) and of how a strength search shows in the CLI, the JSON and the HTML report. The real
``prune`` pass is replaced, for these tests only, by a stand-in with the options of the shared
contract (``monkeypatch`` on the registry), so the machinery is tested on its own."""

from __future__ import annotations

import json
from dataclasses import dataclass
import zlib

import numpy as np
import onnx
import pytest
from onnx import helper

from helpers import make_model, random_feed
from onnxopt.api import optimize
from onnxopt.budget import Proposal
from onnxopt.cli import _parser, _sugar, main
from onnxopt.errors import UsageError
from onnxopt.pass_manager import REGISTRY, Pass, PassResult
from onnxopt.passes.prune import PruneOptions
from onnxopt.pipeline import OPTION_SUGAR, build_pipeline

RNG = np.random.default_rng(2)
WEIGHTS = {n: RNG.normal(size=(8, 8)).astype(np.float32) for n in ("A", "B")}
NOISE = {n: RNG.normal(size=(8, 8)).astype(np.float32) for n in ("A", "B")}


@dataclass(frozen=True)
class StandInOptions(PruneOptions):
    """The real pass's options, so that every prune flag maps onto the stand-in, without its
    checks (the pipeline's own refusals are tested)."""

    def check(self) -> str | None:
        return None


class StandInPrune(Pass):
    """Proposes ``W + sparsity * noise`` (drift grows with the strength)."""

    name = "prune"
    description = "test stand-in"
    Options = StandInOptions
    lossless = False
    weights = "original"
    strength = "sparsity"
    ladder = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)

    def run(self, graph, ctx):
        level = self.options.sparsity or 0.0
        proposals = []
        for t in graph.tensors().values():
            if t.name in WEIGHTS:
                value = WEIGHTS[t.name] + np.float32(level) * NOISE[t.name]

                def apply(t=t, value=value):
                    t.values = value
                proposals.append(Proposal(t, value, apply))
        return PassResult(False, {"sparsity": level}, proposals=proposals)


@pytest.fixture
def stand_in(monkeypatch):
    import onnxopt.passes  # noqa: F401  (the real passes register first)

    monkeypatch.setitem(REGISTRY, "prune", StandInPrune)


def _model():
    nodes = [helper.make_node("MatMul", ["x", "A"], ["h"]),
             helper.make_node("MatMul", ["h", "B"], ["y"])]
    return make_model(nodes, [("x", np.float32, [16, 8])], [("y", np.float32, [16, 8])],
                      dict(WEIGHTS))


@pytest.fixture
def files(tmp_path):
    model = _model()
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "feeds.npz", **random_feed(model, 0))
    return tmp_path


FLAGS = [
    (["--prune-threshold", "0.1"], {"prune_threshold": 0.1}),
    (["--prune-relative", "0.5"], {"prune_relative": 0.5}),
    (["--prune-sparsity", "auto"], {"prune_sparsity": "auto"}),
    (["--prune-sparsity", "0.5", "--prune-scope", "global"],
     {"prune_sparsity": 0.5, "prune_scope": "global"}),
    (["--prune-pattern", "2:4", "--prune-importance", "activation", "--prune-reconstruct",
      "--prune-allocation", "sensitivity", "--sparse-storage"],
     {"prune_pattern": "2:4", "prune_importance": "activation", "prune_reconstruct": True,
      "prune_allocation": "sensitivity", "sparse_storage": True}),
    (["--prune-channels", "0.2"], {"prune_channels": 0.2}),
    (["--prune-channels", "auto"], {"prune_channels": "auto"}),
    (["--cluster-weights", "16", "--cluster-per-channel", "--cluster-method", "gptvq"],
     {"cluster_weights": 16, "cluster_per_channel": True, "cluster_method": "gptvq"}),
    (["--cluster-weights", "auto"], {"cluster_weights": "auto"}),
]


@pytest.mark.parametrize("flags, keywords", FLAGS)
def test_flags_map_to_the_optimize_keywords(flags, keywords):
    args = _parser().parse_args(["optimize", "m.onnx", "-o", "o.onnx", *flags])
    assert _sugar(args) == keywords


def test_prune_flags_set_the_prune_options(stand_in):
    sugar = {k: v for _, kw in FLAGS[:5] for k, v in kw.items() if OPTION_SUGAR[k][0] == "prune"}
    pipeline = build_pipeline([], **sugar)
    (prune,) = pipeline.passes
    for key, value in sugar.items():
        assert getattr(prune.options, OPTION_SUGAR[key][1]) == value


def test_a_keyword_wins_over_the_options_table(stand_in):
    pipeline = build_pipeline([], options={"prune": {"sparsity": 0.3, "scope": "row"}},
                              prune_sparsity=0.6)
    assert (pipeline.passes[0].options.sparsity, pipeline.passes[0].options.scope) == (0.6, "row")


@pytest.mark.parametrize("argv", [["--prune-importance", "activation"],
                                  ["--passes", "prune"]])
def test_prune_without_a_strength_is_a_one_line_usage_error(stand_in, files, capsys, argv):
    code = main(["optimize", str(files / "m.onnx"), "-o", str(files / "o.onnx"), *argv])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and not (files / "o.onnx").exists()
    assert "would change nothing" in err and "--prune-sparsity" in err


def test_a_strength_that_is_neither_a_number_nor_auto_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_:
        _parser().parse_args(["optimize", "m.onnx", "-o", "o.onnx", "--prune-sparsity", "fifty"])
    assert exit_.value.code == 2
    assert "expected a number or 'auto', got 'fifty'" in capsys.readouterr().err


def test_the_real_prune_pass_without_a_strength_is_refused_too():
    with pytest.raises(UsageError, match="pass 'prune' would change nothing"):
        build_pipeline(["prune"])


def test_auto_without_max_drift_is_a_usage_error_naming_it(stand_in, files, capsys):
    base = ["optimize", str(files / "m.onnx"), "-o", str(files / "o.onnx"),
            "--prune-sparsity", "auto", "--inputs", str(files / "feeds.npz")]
    assert main(base) == 2
    assert "--max-drift" in capsys.readouterr().err
    assert main([*base, "--max-drift", "0.99", "--no-validate"]) == 2
    assert "--max-drift" in capsys.readouterr().err


def test_auto_with_no_validate_says_to_drop_it(stand_in, files, capsys):
    """--max-drift was given: the message must not ask for it, but name --no-validate."""
    base = ["optimize", str(files / "m.onnx"), "-o", str(files / "o.onnx"),
            "--prune-sparsity", "auto", "--inputs", str(files / "feeds.npz"), "--no-validate"]
    assert main([*base, "--max-drift", "0.99"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "drop --no-validate" in err
    assert "give --max-drift" not in err and "--prune-sparsity auto" in err
    assert main(base) == 2
    assert "drop --no-validate and give --max-drift" in capsys.readouterr().err
    assert not (files / "o.onnx").exists()


def test_a_ray_address_without_the_ray_executor_is_a_one_line_usage_error(stand_in, files,
                                                                          capsys):
    argv = ["optimize", str(files / "m.onnx"), "-o", str(files / "o.onnx"), "--prune-sparsity",
            "auto", "--inputs", str(files / "feeds.npz"), "--max-drift", "0.99",
            "--ray-address", "127.0.0.1:6379"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "give --executor ray" in err
    assert not (files / "o.onnx").exists()


@pytest.mark.parametrize("flag", [["--prune-scope", "row"], ["--prune-allocation", "sensitivity"]])
def test_prune_flags_beside_prune_channels_name_the_pass_they_feed(stand_in, files, capsys, flag):
    """These flags set options of ``prune`` only: beside --prune-channels the message says so
    (it blamed "pass 'prune': option scope=row needs sparsity")."""
    code = main(["optimize", str(files / "m.onnx"), "-o", str(files / "o.onnx"),
                 "--prune-channels", "0.3", *flag])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and not (files / "o.onnx").exists()
    assert err.startswith(f"onnxopt: error: {flag[0]} applies to pass 'prune'")
    assert "not to --prune-channels" in err and "--config" in err
    assert "--prune-sparsity" in err and "needs sparsity" not in err


def test_the_real_prune_checks_see_the_same_message():
    """Without the stand-in: the real pass's option check is not what the user reads."""
    with pytest.raises(UsageError, match="--prune-scope applies to pass 'prune'.*not to "
                                         "--prune-channels"):
        build_pipeline([], prune_channels=0.3, prune_scope="row")
    # with a strength of its own, prune takes the flag
    pipeline = build_pipeline([], prune_channels=0.3, prune_sparsity=0.5, prune_scope="row")
    assert sorted(p.name for p in pipeline.passes) == ["prune", "prune_channels"]


@pytest.mark.parametrize("strengths, fed", [
    ({"prune_channels": 0.3}, ["prune_channels"]),
    ({"prune_channels": "auto"}, ["prune_channels"]),
    ({"prune_sparsity": 0.5}, ["prune"]),
    ({"prune_channels": 0.3, "prune_sparsity": 0.5}, ["prune", "prune_channels"])])
def test_importance_and_reconstruct_feed_every_pruning_pass_with_a_strength(strengths, fed):
    """--prune-importance and --prune-reconstruct set the options of each pruning pass the run
    gives a strength (they were refused beside --prune-channels, whose pass has the same two
    options); the other pass keeps its defaults."""
    pipeline = build_pipeline([], prune_importance="activation", prune_reconstruct=True,
                              **strengths)
    by_name = {p.name: p.options for p in pipeline.passes}
    assert sorted(by_name) == sorted(fed)
    for name in fed:
        assert by_name[name].importance == "activation" and by_name[name].reconstruct is True


def test_importance_reaches_prune_channels_with_its_strength_from_a_config(files):
    """The CLI's flags (parsed to sugar) beside the strength of prune_channels given in a
    --config file's options: the options table of the pass takes the flag's value."""
    args = _parser().parse_args(["optimize", str(files / "m.onnx"), "-o", str(files / "o.onnx"),
                                 "--prune-importance", "activation"])
    assert _sugar(args) == {"prune_importance": "activation"}
    pipeline = build_pipeline([], options={"prune_channels": {"flops": 0.3}}, **_sugar(args))
    assert [(p.name, p.options.importance) for p in pipeline.passes[-1:]] == [
        ("prune_channels", "activation")]


@pytest.mark.parametrize("argv, expected", [
    (["--cluster-weights", "16.5"], "argument --cluster-weights: expected an integer or 'auto', "
                                    "got '16.5'"),
    (["--prune-scope", "bogus", "--prune-sparsity", "0.5"], "argument --prune-scope: invalid "
                                                            "choice: 'bogus'"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_argument_errors_are_one_line(files, capsys, argv, expected):
    """Like every other usage error: one ``onnxopt: error:`` line (no usage dump), exit 2."""
    assert main(["optimize", str(files / "m.onnx"), "-o", str(files / "o.onnx"), *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("onnxopt: error: ")
    assert expected in captured.err and "usage:" not in captured.err
    assert not (files / "o.onnx").exists()


def test_help_still_prints_the_usage(capsys):
    assert main(["optimize", "--help"]) == 0
    assert "--cluster-weights K|auto" in capsys.readouterr().out


def test_a_searched_run_reports_its_path_in_the_cli_json_and_html(stand_in, files, capsys):
    out = files / "o.onnx"
    base = ["optimize", str(files / "m.onnx"), "-o", str(out), "--prune-sparsity", "auto",
            "--inputs", str(files / "feeds.npz"), "--max-drift", "0.99"]
    assert main([*base, "--report", str(files / "r.json")]) == 0
    stdout = capsys.readouterr().out
    assert "Strength search of prune (sparsity)" in stdout
    report = json.loads((files / "r.json").read_text())
    record = next(r for r in report["passes"] if r["name"] == "prune")
    search = record["stats"]["search"]
    assert search["chosen"] in StandInPrune.ladder and search["path"]
    assert all({"setting", "cosine", "within", "size_bytes"} <= set(row)
               for row in search["path"])
    # the compressed sizes are those of the files, at level 6
    packed = report["compressed"]
    assert packed["level"] == 6
    assert packed["after"] == len(zlib.compress(out.read_bytes(), 6))
    assert packed["before"] == len(zlib.compress((files / "m.onnx").read_bytes(), 6))
    assert main([*base, "--report", str(files / "r.html")]) == 0
    page = (files / "r.html").read_text()
    assert "Strength search" in page and 'aria-label="cosine per setting"' in page
    for row in search["path"]:
        assert f"{row['setting']}: cosine" in page
    assert "compressed file (zlib 6)" in page


def test_the_api_takes_the_same_keywords(stand_in):
    model = _model()
    _, report = optimize(model, passes=[], prune_sparsity="auto", max_drift=0.99,
                         inputs=random_feed(model, 0))
    record = next(r for r in report.passes if r.name == "prune")
    assert record.stats["search"]["option"] == "sparsity"
    with pytest.raises(UsageError, match="unknown keyword"):
        optimize(model, prune_sparsty=0.5)
