"""The `cnnfast` command: count one architecture's layers, check the lecture's claims, write the report."""

import argparse
import json
import os
import sys
from pathlib import Path

import cnnfast
from cnnfast.analysis import analyze_arch, format_table
from cnnfast.analysis.claims import compute_claims
from cnnfast.json_file import write_problem
from cnnfast.models import ARCHITECTURE_NOTES, ARCHITECTURES
from cnnfast.report import LECTURE_NOTES_INTRO, MIB, agreement_text, closed_form_value, write_report


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    if value >= 2**63:  # PyTorch's sizes are int64
        raise argparse.ArgumentTypeError(f"must be below 2^63, got {value}")
    return value


def text_table(headers, rows):
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows)]

    def line(cells):
        return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()

    return "\n".join([line(headers), line(["-" * width for width in widths])] + [line(row) for row in rows])


def summary_line(analysis):
    """Totals per image, like the table that follows."""
    totals = analysis.totals
    batch = analysis.batch
    return (
        f"{analysis.arch}: input 3x{analysis.image_text}, batch {batch} | per image: "
        f"{totals['macs'] / batch / 1e9:.3f} GMACs, {totals['params'] / 1e6:.2f} M params, "
        f"{totals['activation_bytes'] / batch / MIB:.1f} MB activations"
    )


def fail(args, message) -> int:
    """Prints `cnnfast COMMAND: error: message` to stderr; the exit status of a bad request."""
    print(f"cnnfast {args.command}: error: {message}", file=sys.stderr)
    return 2


def output_problem(json_file=None, out_dir=None) -> str | None:
    """Why the command could not write its outputs (checked before it measures anything), or None.
    The output directory is created here."""
    if out_dir is not None:
        if not str(out_dir):
            return "--out needs a directory name"
        try:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
        except OSError as error:
            return f"cannot create the output directory {out_dir}: {error.strerror}"
        problem = write_problem(Path(out_dir), directory=True)
        if problem:
            return f"cannot write in the output directory {out_dir}: {problem}"
    if json_file is not None:
        if not str(json_file):
            return "--json needs a file name"
        path = Path(json_file)
        try:  # is_dir() passes on some errors only: a name too long for the filesystem raises
            if path.is_dir():
                return f"--json {json_file} is a directory"
            if not path.parent.is_dir():
                return f"cannot write --json {json_file}: no directory {path.parent}"
        except OSError as error:
            return f"cannot write --json {json_file}: {error.strerror or error}"
        problem = write_problem(path)
        if problem:
            return f"cannot write --json {json_file}: {problem}"
    return None


def run_analyze(args):
    try:
        analysis = analyze_arch(args.arch, input_size=args.input_size, batch=args.batch)
    except ValueError as error:  # an input too small for some layer: the message names the layer
        return fail(args, error)
    if args.json:
        print(json.dumps(analysis.to_dict(), indent=2))
    else:
        print(summary_line(analysis))
        if args.arch in ARCHITECTURE_NOTES:
            print(f"note: {ARCHITECTURE_NOTES[args.arch]}")
        print(format_table(analysis))
    return 0


def run_claims(args):
    if args.measure:
        return run_measured_claims(args)
    given = [option for option, value in (("--batch", args.batch), ("--dtype", args.dtype), ("--only", args.only))
             if value is not None]
    if given:
        return fail(args, f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} with --measure only")
    claims = compute_claims()
    if args.json:
        print(json.dumps([claim.to_dict() for claim in claims], indent=2))
        return 0
    headers = ("Claim", "Quantity", "Counted ratio", "Closed form", "Agreement")
    rows = [
        (
            claim.title,
            claim.quantity,
            f"{claim.predicted:.4g}",
            closed_form_value(claim),
            agreement_text(claim),
        )
        for claim in claims
    ]
    print(text_table(headers, rows))
    # The formulas are too long for a column: list them after the table.
    print("\nClosed forms:")
    for claim in claims:
        if claim.closed_form_text:
            print(f"  {claim.title}: {claim.closed_form_text}")
    print(f"\n{LECTURE_NOTES_INTRO}")
    for claim in claims:
        if claim.lecture_note:
            print(f"  {claim.title}: {claim.lecture_note}")
    return 0


def key_list(text):
    keys = [key.strip() for key in text.split(",") if key.strip()]
    if not keys:
        raise argparse.ArgumentTypeError(f"expected comma-separated claim keys, got {text!r}")
    return keys


def run_measured_claims(args):
    from cnnfast.analysis.measure import measure_claims, measured_on, measured_rows

    try:
        result = measure_claims(batch=args.batch or 1, dtype=args.dtype, keys=args.only)
    except ValueError as error:
        return fail(args, error)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(measured_on(result))
    for backend, reason in result["skipped"].items():
        print(f"skipped {backend}: {reason}")
    print(f"verdict: {result['verdict_rule']}\n")
    print(text_table(*measured_rows(result)))
    print()
    for row in result["claims"]:
        sides = " / ".join(side["label"] for side in row["sides"].values())
        print(f"  {row['key']}: {sides}")
        if row["explanation"]:
            print(f"    {row['explanation']['cause']}: {row['explanation']['text']}")
    return 0


def run_report(args):
    problem = output_problem(out_dir=args.out)
    if problem:
        return fail(args, problem)
    def progress(line):
        print(f"report: {line}", file=sys.stderr, flush=True)

    for path in write_report(args.out, progress=progress).values():
        print(path)
    return 0


# bench and roofline load cnnfast.ops (and with it the CUDA extension) only when they run: `analyze` stays light.


def backend_list(text):
    from cnnfast.bench import BACKENDS

    names = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))  # each once, in order
    unknown = [name for name in names if name not in BACKENDS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {','.join(BACKENDS)}, got {text!r}")
    return names


def measure_layers(args, end_to_end, json_file=None, out_dir=None):
    """run_bench's result for the command's options; a ValueError when it cannot run: an output
    that cannot be written (checked first, output_problem) or an input too small for the architecture."""
    from cnnfast.bench import run_bench

    problem = output_problem(json_file=json_file, out_dir=out_dir)
    if problem:
        raise ValueError(problem)
    return run_bench(args.arch, batch=args.batch, dtype=args.dtype, backends=args.backends,
                     input_size=args.input_size, max_layers=args.max_layers, end_to_end=end_to_end,
                     show_progress=True)


def measured_on(result):
    size = result["input_size"]
    where = f"{result['device']}: CPU timings" if result["device_type"] == "cpu" else result["device"]
    return (f"{result['arch']}: batch {result['batch']}, {result['dtype']}, input 3x{size}x{size}, "
            f"{len(result['layers'])} distinct conv layers, measured on {where} ({result['timer']})")


def print_measured_on(result) -> None:
    """What a bench result measured and where, then what it skipped and why."""
    from cnnfast.bench import skipped_lines

    print(measured_on(result))
    for line in skipped_lines(result):
        print(line)


def write_result(args, result) -> int:
    """result as JSON in args.json (when the command was given one), and the path printed; the
    exit status (a file that the check before measuring let through can still fail here)."""
    if not args.json:
        return 0
    try:
        Path(args.json).write_text(json.dumps(result, indent=2))
    except OSError as error:
        return fail(args, f"cannot write --json {args.json}: {error.strerror or error}")
    print(f"\n{args.json}")
    return 0


def run_benchmarks(args):
    from cnnfast.bench import end_to_end_rows, layer_rows, summary_rows

    try:
        result = measure_layers(args, end_to_end=True, json_file=args.json)
    except ValueError as error:
        return fail(args, error)
    print_measured_on(result)
    tables = [summary_rows(result), end_to_end_rows(result)] + ([layer_rows(result)] if args.layers else [])
    for headers, rows in tables:
        print()
        print(text_table(headers, rows))
    return write_result(args, result)


def tune_table(result):
    """(headers, rows) of `cnnfast tune`'s table: per layer its times, the backend=None choice and
    the kernels that ran (the tuned Triton config, the CUTLASS kernel and tile)."""
    from cnnfast.bench import layer_choice

    headers = ("layer", "problem", *(f"{backend} ms" for backend in result["backends"]), "backend=None", "kernels")
    rows = []
    for layer in result["layers"]:
        key, chosen = layer_choice(layer)
        kernels = ", ".join(f"{backend} {figures['kernel']}" for backend, figures in layer["results"].items()
                            if figures.get("kernel"))
        times = (f"{layer['results'][b]['ms']:.3f}" if b in layer["results"] else "-" for b in result["backends"])
        rows.append((layer["layer"], key, *times, str(chosen), kernels))
    return headers, rows


def run_tune(args):
    from cnnfast.bench import TUNED_BACKENDS, default_device, layer_choices
    from cnnfast.tuning import local_table_problem, save_local_choices

    if default_device().type != "cuda":
        return fail(args, "needs a CUDA device (on a CPU, backend=None always runs torch)")
    problem = None if args.dry_run else local_table_problem()
    if problem:  # found before minutes of measuring, not after
        return fail(args, f"{problem} (--dry-run prints the choices without saving them)")
    args.backends = list(TUNED_BACKENDS)
    try:
        result = measure_layers(args, end_to_end=False, json_file=args.json)
    except ValueError as error:
        return fail(args, error)
    print_measured_on(result)
    print()
    print(text_table(*tune_table(result)))
    status = write_result(args, result)
    if not args.dry_run:
        print(f"\nsaved to {save_local_choices(layer_choices(result))}")
    return status


def run_roofline(args):
    from cnnfast.bench import roofline_points_under_ceilings, skipped_lines
    from cnnfast.roofline import rate_unit, ridge_intensity, roofline_json, roofline_plot, roofline_rows

    try:
        result = measure_layers(args, end_to_end=False, out_dir=args.out)
    except ValueError as error:
        return fail(args, error)
    if not any(layer["results"] for layer in result["layers"]):  # no point to plot: say why, write nothing
        return fail(args, "no layer was timed on any backend asked for; " + "; ".join(skipped_lines(result)))
    points, ceiling = roofline_points_under_ceilings(result)
    rate = rate_unit(result["device_type"])
    out = Path(args.out)
    subject = f"{args.arch}, batch {result['batch']}, 3x{result['input_size']}x{result['input_size']}"
    chart = roofline_plot(points, ceiling, out / "roofline.png", subject=subject, rate=rate)
    data = out / "roofline.json"
    summary = roofline_json(args.arch, result["batch"], result["input_size"], ceiling, points)
    data.write_text(json.dumps(summary, indent=2))
    print_measured_on(result)
    unit, scale = rate
    print(f"ceilings: matmul {ceiling['matmul_flop_per_s'] / scale:,.1f} {unit} ({ceiling['matmul_op']}), copy "
          f"{ceiling['copy_bytes_per_s'] / 1e9:,.1f} GB/s, ridge {ridge_intensity(ceiling):.1f} FLOP/byte\n")
    print(text_table(*roofline_rows(points, rate)))
    print(f"\n{chart}\n{data}")
    return 0


def add_measurement_options(command, backends=True):
    command.add_argument(
        "arch", choices=list(ARCHITECTURES), metavar="ARCH", help="one of: " + ", ".join(ARCHITECTURES)
    )
    command.add_argument("--batch", type=positive_int, default=1, metavar="B", help="images per batch (default: 1)")
    command.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="default: bf16 on a GPU, fp32 on a CPU")
    if backends:
        command.add_argument(
            "--backends", type=backend_list, metavar="LIST",
            help="comma-separated, from torch,eager,torch_folded,compile,triton,cuda,torch_triton,cudnn_fused "
            "(default: all; any that cannot run here is listed as skipped, with the reason)",
        )
    command.add_argument(
        "--input-size", type=positive_int, metavar="N", help="image height and width (default: the architecture's own)"
    )
    command.add_argument(
        "--max-layers", type=positive_int, metavar="N", help="time only the first N distinct conv layers"
    )


def build_parser():
    parser = argparse.ArgumentParser(
        prog="cnnfast", description="Counts, benchmarks and rooflines of the classic CNNs and of cnnfast's fused kernels."
    )
    parser.add_argument("--version", action="version", version=f"cnnfast {cnnfast.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    analyze = commands.add_parser("analyze", help="shapes, parameters, MACs and memory of each layer")
    analyze.add_argument(
        "arch", choices=list(ARCHITECTURES), metavar="ARCH", help="one of: " + ", ".join(ARCHITECTURES)
    )
    analyze.add_argument(
        "--input-size",
        type=positive_int,
        metavar="N",
        help="image height and width in pixels (default: the architecture's own)",
    )
    analyze.add_argument(
        "--batch", type=positive_int, default=1, metavar="B", help="images per batch (default: 1)"
    )
    analyze.add_argument("--json", action="store_true", help="print the analysis as JSON")
    analyze.set_defaults(run=run_analyze)

    claims = commands.add_parser("claims", help="the lecture's claims, counted and set against closed forms")
    claims.add_argument(
        "--json", action="store_true", help="print the claims (or, with --measure, the measurements) as JSON"
    )
    claims.add_argument(
        "--measure", action="store_true",
        help="time both sides of each time-relevant claim, on the torch backend and through cnnfast.optimize "
             "(schema: cnnfast.claims_measure)",
    )
    claims.add_argument(
        "--batch", type=positive_int, metavar="B", help="with --measure: images per batch (default: 1)"
    )
    claims.add_argument(
        "--dtype", choices=("bf16", "fp16", "fp32"), help="with --measure: default bf16 on a GPU, fp32 on a CPU"
    )
    claims.add_argument(
        "--only", type=key_list, metavar="KEYS",
        help="with --measure: comma-separated claim keys to time (default: every time-relevant claim)",
    )
    claims.set_defaults(run=run_claims)

    report = commands.add_parser("report", help="write the HTML and Markdown report with its charts")
    report.add_argument("--out", default="report", metavar="DIR", help="output directory (default: report/)")
    report.set_defaults(run=run_report)

    bench = commands.add_parser("bench", help="time each distinct conv layer on each backend, and the whole model")
    add_measurement_options(bench)
    bench.add_argument("--layers", action="store_true", help="print the per-layer table too")
    bench.add_argument("--json", metavar="FILE", help="write the results as JSON (schema: cnnfast.bench)")
    bench.set_defaults(run=run_benchmarks)

    tune = commands.add_parser(
        "tune",
        help="time each distinct conv layer on torch, triton, cuda, torch_triton and cudnn_fused and keep the fastest "
        "for backend=None",
    )
    add_measurement_options(tune, backends=False)
    tune.add_argument("--dry-run", action="store_true", help="print the choices without saving them")
    tune.add_argument("--json", metavar="FILE", help="write the measurements as JSON (schema: cnnfast.bench)")
    tune.set_defaults(run=run_tune)

    roofline = commands.add_parser("roofline", help="place each conv layer under the measured roofline")
    add_measurement_options(roofline)
    roofline.add_argument("--out", default="roofline", metavar="DIR", help="output directory (default: roofline/)")
    roofline.set_defaults(run=run_roofline)
    return parser


def main(argv=None):
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:  # --help, --version and usage errors: hand back their status
        return exit_request.code
    try:
        return args.run(args)
    except BrokenPipeError:  # `cnnfast analyze vgg16 | head`: the reader has gone; nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that exit's flush does not fail
        return 141


if __name__ == "__main__":
    sys.exit(main())
