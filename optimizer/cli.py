"""The ``onnxopt`` command: parse arguments, call the Python API, print tables.

Exit codes: 0 success, 1 validation failed, 2 bad input or usage, 3 internal error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from optimizer import __version__, api, io
from optimizer.errors import OnnxoptError, UsageError, ValidationFailed
from optimizer.graph import ModelStats, model_stats
from optimizer.inputs import parse_input_shapes
from optimizer.report import Report, pass_summary
from optimizer.validate import DEFAULT_ATOL, DEFAULT_MAX_DRIFT, DEFAULT_RTOL


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _size_table(before: ModelStats, after: ModelStats, seconds: float | None) -> Table:
    table = Table(title="Model before and after", show_lines=False)
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("change", justify="right")
    ops = sorted(set(before.op_counts) | set(after.op_counts))
    for op in ops:
        b, a = before.op_counts.get(op, 0), after.op_counts.get(op, 0)
        table.add_row(op, str(b), str(a), f"{a - b:+d}" if a != b else "")
    table.add_section()

    def row(label, b, a, fmt=str):
        change = "" if b == a else (f"{(a - b) / b:+.1%}" if b else "")
        table.add_row(label, fmt(b), fmt(a), change)

    row("nodes (main graph)", before.nodes, after.nodes)
    row("nodes (with subgraphs)", before.nodes_total, after.nodes_total)
    row("parameters", before.parameters, after.parameters, lambda v: f"{v:,}")
    row("parameter bytes", before.parameter_bytes, after.parameter_bytes, _human_bytes)
    row("file size", before.file_bytes, after.file_bytes, _human_bytes)
    if seconds is not None:
        table.add_row("time", "", f"{seconds:.2f} s", "")
    return table


def _pass_table(report: Report) -> Table:
    table = Table(title="Passes")
    table.add_column("pass")
    table.add_column("runs", justify="right")
    table.add_column("statistics")
    table.add_column("time", justify="right")
    for name, runs, stats, secs in pass_summary(report.passes):
        shown = ", ".join(f"{k}={v}" for k, v in stats.items() if not isinstance(v, (list, dict)))
        table.add_row(name, str(runs), shown, f"{secs * 1000:.0f} ms")
    return table


def _validation_table(report: Report) -> Table:
    v = report.validation
    table = Table(title=f"Validation ({v.mode}, {v.feeds} feed{'s' if v.feeds != 1 else ''})")
    for col in ("output", "shape", "max abs", "max rel", "mean abs", "cosine", "SNR dB", "ok"):
        table.add_column(col, justify="left" if col in ("output", "shape") else "right")
    for m in v.outputs:
        table.add_row(m.name, f"{m.dtype}{m.shape}", f"{m.max_abs:.3g}", f"{m.max_rel:.3g}",
                      f"{m.mean_abs:.3g}", f"{m.cosine:.6f}", f"{m.snr_db:.1f}",
                      "yes" if m.passed else f"NO: {m.reason}")
    return table


def _verdict_line(report: Report) -> str:
    v = report.validation
    if v is None:
        return "[yellow]not validated[/] (--no-validate)"
    if v.passed:
        crit = (f"cosine >= {v.max_drift}" if v.mode == "lossy"
                else f"atol {v.atol:g} + rtol {v.rtol:g} of range")
        return f"[green]validation passed[/] ({crit})"
    return f"[red]validation FAILED[/]: {v.reason}"


def _common_input_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--inputs", metavar="PATH",
                   help=".npz whose keys are input names, or a folder of .npz files (one feed each)")
    p.add_argument("--input-shape", action="append", metavar="NAME:DIMS",
                   help="shape for synthesized input NAME, e.g. x:1x3x224x224 (repeatable); "
                        "dynamic dims default to 1")
    p.add_argument("--seed", type=int, default=0, help="seed for synthesized inputs (default 0)")
    p.add_argument("--atol", type=float, default=DEFAULT_ATOL,
                   help=f"absolute tolerance of lossless validation (default {DEFAULT_ATOL})")
    p.add_argument("--rtol", type=float, default=DEFAULT_RTOL,
                   help=f"tolerance relative to each output's range (default {DEFAULT_RTOL})")
    p.add_argument("--max-drift", type=float, default=DEFAULT_MAX_DRIFT, metavar="COSINE",
                   help="minimum cosine similarity per output after lossy passes "
                        f"(default {DEFAULT_MAX_DRIFT})")
    p.add_argument("--report", metavar="FILE.json", help="write the report as JSON")
    p.add_argument("--quiet", action="store_true", help="print only the verdict line")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onnxopt", description="Optimize ONNX models and prove they compute the same thing.")
    parser.add_argument("--version", action="version", version=f"onnxopt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("optimize", help="optimize a model and validate the result")
    p.add_argument("model", help="input .onnx model")
    p.add_argument("-o", "--output", required=True, help="output .onnx path (never the input)")
    p.add_argument("--passes", help="comma-separated passes to run instead of the default "
                                    "lossless pipeline (see `onnxopt passes`)")
    p.add_argument("--skip", action="append", default=[], metavar="PASS",
                   help="leave out a pass (repeatable, or comma-separated)")
    p.add_argument("--prune-threshold", type=float, metavar="T",
                   help="set weight values with |w| < T to zero (lossy)")
    p.add_argument("--quantize", choices=sorted(api.QUANTIZE_MODES),
                   help="int8-weight: per-channel int8 weights through DequantizeLinear (lossy)")
    p.add_argument("--no-validate", action="store_true", help="skip validation on onnxruntime")
    p.add_argument("--strict", action="store_true",
                   help="fail (exit 1) when a pass had to be rolled back to pass validation")
    p.add_argument("--keep-invalid", action="store_true",
                   help="write the output even when validation fails (exit code stays 1)")
    p.add_argument("--verify-each", action="store_true",
                   help="run the ONNX checker and an onnxruntime load after every pass")
    p.add_argument("--external-data", action="store_true",
                   help="store tensors in OUTPUT.data beside the model (automatic over 2 GiB)")
    p.add_argument("--max-iterations", type=int, default=10,
                   help="bound on rounds of the lossless passes (default 10)")
    p.add_argument("--fold-size-limit", type=int, default=1 << 20, metavar="BYTES",
                   help="largest tensor constant folding may create (default 1048576)")
    _common_input_args(p)

    p = sub.add_parser("validate", help="compare a candidate model with its reference")
    p.add_argument("reference")
    p.add_argument("candidate")
    p.add_argument("--lossy", action="store_true",
                   help="judge by --max-drift (cosine similarity) instead of --atol/--rtol")
    _common_input_args(p)

    p = sub.add_parser("inspect", help="show versions, inputs, outputs, ops and parameters")
    p.add_argument("model")

    sub.add_parser("passes", help="list the registered passes")
    return parser


def _split(values: list[str]) -> list[str]:
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def _refuse_overwriting(inputs: list[str], outputs: list[str | None]) -> None:
    """Raise UsageError when an output path names an input file (also through links)."""
    for out in filter(None, outputs):
        for inp in inputs:
            p, q = Path(out), Path(inp)
            if p.exists() and q.exists() and (p.resolve() == q.resolve() or p.samefile(q)):
                raise UsageError(f"{out}: refusing to overwrite the input {inp}")


def _cmd_optimize(args, console: Console) -> int:
    _refuse_overwriting([args.model], [args.output, args.report])
    if args.report and Path(args.report).resolve() == Path(args.output).resolve():
        raise UsageError(f"{args.report}: the report and the model output are the same file")
    passes = _split([args.passes]) if args.passes else None
    with console.status("optimizing", spinner="dots") if console.is_terminal and not args.quiet \
            else _null():
        model, report = api.optimize(
            args.model, passes=passes, skip=_split(args.skip),
            prune_threshold=args.prune_threshold, quantize=args.quantize,
            validate=not args.no_validate, inputs=args.inputs,
            input_shapes=parse_input_shapes(args.input_shape), seed=args.seed, atol=args.atol,
            rtol=args.rtol, max_drift=args.max_drift, verify_each=args.verify_each,
            fold_size_limit=args.fold_size_limit, max_iterations=args.max_iterations,
            raise_on_failure=False)
    passed = (report.validation is None or report.validation.passed) and \
        not (args.strict and report.rolled_back)
    if passed or args.keep_invalid:
        io.save_model(model, args.output, external_data=True if args.external_data else None,
                      protect=(args.model,))
        report.output = args.output
        report.after.file_bytes = Path(args.output).stat().st_size
    report.before.file_bytes = Path(args.model).stat().st_size
    if not args.quiet:
        console.print(_size_table(report.before, report.after, report.seconds))
        console.print(_pass_table(report))
        if report.validation is not None:
            console.print(_validation_table(report))
    if args.report:
        report.write_json(args.report)
    for rb in report.rolled_back:
        console.print(f"[yellow]rolled back[/] pass {rb['pass']}: {rb['reason']}",
                      markup=True, highlight=False)
    console.print(_verdict_line(report))
    if not passed:
        console.print(f"output {'written anyway (--keep-invalid)' if args.keep_invalid else 'not written'}: {args.output}")
        return ValidationFailed.exit_code
    console.print(f"wrote {args.output}")
    return 0


def _cmd_validate(args, console: Console) -> int:
    _refuse_overwriting([args.reference, args.candidate], [args.report])
    report = api.validate(args.reference, args.candidate, inputs=args.inputs,
                          input_shapes=parse_input_shapes(args.input_shape), seed=args.seed,
                          atol=args.atol, rtol=args.rtol, max_drift=args.max_drift,
                          lossy=args.lossy)
    if not args.quiet:
        console.print(_validation_table(report))
    if args.report:
        report.write_json(args.report)
    console.print(_verdict_line(report))
    return 0 if report.validation.passed else ValidationFailed.exit_code


def _cmd_inspect(args, console: Console) -> int:
    model = io.load_model(args.model)
    stats = model_stats(model)
    opsets = ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in model.opset_import)
    console.print(f"[bold]{args.model}[/]: IR version {model.ir_version}; opsets: {opsets}; "
                  f"producer: {model.producer_name or '-'} {model.producer_version}")
    io_table = Table(title="Inputs and outputs")
    for col in ("", "name", "dtype", "shape"):
        io_table.add_column(col)
    for kind, values in (("input", stats.inputs), ("output", stats.outputs)):
        for v in values:
            shape = "?" if v["shape"] is None else "[" + ", ".join(
                "?" if d is None else str(d) for d in v["shape"]) + "]"
            io_table.add_row(kind, v["name"], str(v["dtype"]), shape)
    console.print(io_table)
    ops = Table(title="Ops (main graph)")
    ops.add_column("op")
    ops.add_column("count", justify="right")
    for op, n in sorted(stats.op_counts.items(), key=lambda kv: (-kv[1], kv[0])):
        ops.add_row(op, str(n))
    console.print(ops)
    console.print(f"nodes: {stats.nodes} in the main graph, {stats.nodes_total} with "
                  f"{stats.subgraphs} subgraph(s); parameters: {stats.parameters:,} "
                  f"({_human_bytes(stats.parameter_bytes)}); file: "
                  f"{_human_bytes(Path(args.model).stat().st_size)}")
    return 0


def _cmd_passes(args, console: Console) -> int:
    from optimizer.pass_manager import REGISTRY
    import passes

    table = Table(title="Passes")
    table.add_column("name")
    table.add_column("kind")
    table.add_column("default")
    table.add_column("description")
    for name, cls in REGISTRY.items():
        table.add_row(name, "lossless" if cls.lossless else "lossy",
                      "yes" if name in passes.LOSSLESS_PIPELINE else "", cls.description)
    console.print(table)
    return 0


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``onnxopt`` console script; returns the exit code."""
    args = _parser().parse_args(argv)
    console = Console(highlight=False)
    commands = {"optimize": _cmd_optimize, "validate": _cmd_validate, "inspect": _cmd_inspect,
                "passes": _cmd_passes}
    try:
        return commands[args.command](args, console)
    except OnnxoptError as e:
        message = " ".join(str(e).split())
        print(f"onnxopt: error: {message}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("onnxopt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
