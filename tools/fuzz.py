"""The long differential-fuzzing run: many random models through ``onnxopt.optimize``.

The same strategy and property as the CI test (``tests/fuzz/strategies.py``,
``tests/fuzz/differential.py``: the default pipeline, validation off and on, outputs compared
with the original on onnxruntime on several feeds, other values of the symbolic dims included),
with another seed and as many examples as asked. The run does not stop at a failure: each kind of
failure (its message with names and numbers left out) is reduced to a small reproducer -- a
sub-model from the graph inputs to a few tensors (``onnx.utils.Extractor``) that still fails the
same way, found greedily -- saved as ``<out>/<k>.onnx`` next to the generated model
(``<k>.original.onnx``), and printed as ONNX text. Passes that validation had to roll back are
counted (``notes``): the result was right, an optimization was lost.

Usage::

    python tools/fuzz.py --examples 20000 --seed 7 [--max-ops 12] [--out fuzz-failures]

Exits 1 when any example failed. A failure becomes a plain regression test with a hand-built
model (``tests/test_regressions.py`` or ``tests/passes/test_<pass>.py``).
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import time
from pathlib import Path

import onnx
from hypothesis import HealthCheck, given, seed, settings
from onnx.utils import Extractor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "fuzz"))

from differential import FAILED, Outcome, check, describe  # noqa: E402
from strategies import Case, models  # noqa: E402


def signature(outcome: Outcome) -> str:
    """The kind of a failure: its reason without tensor names, node names and numbers."""
    text = re.sub(r"'[^']*'", "'_'", outcome.reason)
    text = re.sub(r"\([^)]*\)", "(_)", text)
    text = re.sub(r"\[[^\]]*\]", "[_]", text)
    return re.sub(r"\d+(\.\d+)?(e-?\d+)?", "#", text).split(" on ")[0]


def reduce_case(case: Case, kind: str) -> Case:
    """A smaller sub-model of ``case`` that fails with the same :func:`signature` (``case``
    itself when none does).

    The sub-model computes a set of main-graph tensors (its outputs) from the graph inputs
    (``onnx.utils.Extractor``, types from ONNX shape inference). It starts from every tensor no
    node reads (dead ends included: a pass may act on them before ``eliminate_dead``) and the
    graph outputs, then greedily drops an output, or replaces one by the inputs of the node
    computing it, while the failure stays.
    """
    graph = case.model.graph
    try:
        inferred = onnx.shape_inference.infer_shapes(case.model, strict_mode=True)
        extractor = Extractor(inferred)
    except Exception:  # noqa: BLE001 -- nothing to reduce with
        return case
    inputs = [i.name for i in graph.input]
    typed = {v.name for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    producers = {t: n for n in graph.node for t in n.output}
    read = {t for n in graph.node for t in n.input}

    def attempt(outputs: list[str]) -> Case | None:
        try:
            sub = extractor.extract_model(inputs, outputs)
            sub.ir_version = case.model.ir_version
            onnx.checker.check_model(sub, full_check=True)
        except Exception:  # noqa: BLE001 -- not a valid model on its own
            return None
        names = {i.name for i in sub.graph.input}
        candidate = Case(sub, case.symbols, tuple(o for o in case.overridable if o in names))
        outcome = check(candidate)
        return candidate if outcome.status == FAILED and signature(outcome) == kind else None

    frontier = list(dict.fromkeys([o.name for o in graph.output] + [
        t for n in graph.node for t in n.output if t not in read and t in typed]))
    best = attempt(frontier) or case
    changed = best is not case
    while changed:
        changed = False
        for t in frontier:
            rest = [o for o in frontier if o != t]
            node = producers.get(t)
            trials = [rest] if rest else []
            if node is not None:
                trials.append(list(dict.fromkeys(rest + [i for i in node.input
                                                         if i in producers and i in typed])))
            for outputs in (o for o in trials if o):
                found = attempt(outputs)
                if found is not None:
                    frontier, best, changed = outputs, found, True
                    break
            if changed:
                break
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=20000, help="models to try (20000)")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed (0)")
    parser.add_argument("--max-ops", type=int, default=12,
                        help="operator steps per model at most (12)")
    parser.add_argument("--out", default="fuzz-failures",
                        help="folder for the failing models (fuzz-failures)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    counts: collections.Counter[str] = collections.Counter()
    notes: collections.Counter[str] = collections.Counter()
    kinds: dict[str, int] = {}
    start = time.perf_counter()

    @seed(args.seed)
    @settings(max_examples=args.examples, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(models(max_ops=args.max_ops))
    def run(case: Case) -> None:
        outcome = check(case)
        counts[outcome.status] += 1
        for note in outcome.notes:
            notes[re.sub(r"\d+(\.\d+)?(e-?\d+)?", "#", note)] += 1
        done = sum(counts.values())
        if done % 500 == 0:
            print(f"  {done} examples, {counts[FAILED]} failed, "
                  f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        if outcome.status != FAILED:
            return
        kind = signature(outcome)
        kinds[kind] = kinds.get(kind, 0) + 1
        if kinds[kind] > 1:
            return
        k = len(kinds)
        reduced = reduce_case(case, kind)
        out.mkdir(parents=True, exist_ok=True)
        onnx.save(case.model, out / f"{k}.original.onnx")
        onnx.save(reduced.model, out / f"{k}.onnx")
        again = check(reduced)
        print(f"\nFAILURE {k}: {again.reason or outcome.reason}\n"
              f"symbols {reduced.symbols}; saved {out / f'{k}.onnx'}\n"
              f"{describe(reduced.model)}", flush=True)

    run()
    print(f"\n{sum(counts.values())} examples in {time.perf_counter() - start:.0f} s (seed "
          f"{args.seed}): " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    for kind, n in kinds.items():
        print(f"  failed {n}x: {kind}")
    for note, n in notes.most_common():
        print(f"  noted {n}x: {note}")
    return 1 if counts[FAILED] else 0


if __name__ == "__main__":
    sys.exit(main())
