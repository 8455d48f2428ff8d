"""The `cnnfast` command: count one architecture's layers, check the lecture's claims, write the report."""

import argparse
import json
import sys

import cnnfast
from cnnfast.analysis import analyze_arch, format_table
from cnnfast.analysis.claims import compute_claims
from cnnfast.models import ARCHITECTURES
from cnnfast.report import MIB, agreement_text, closed_form_value, write_report


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def text_table(headers, rows):
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows)]

    def line(cells):
        return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()

    return "\n".join([line(headers), line(["-" * width for width in widths])] + [line(row) for row in rows])


def summary_line(analysis):
    """Totals per image, like the table that follows."""
    totals = analysis.totals
    size, batch = analysis.input_size, analysis.batch
    return (
        f"{analysis.arch}: input 3x{size}x{size}, batch {batch} | per image: "
        f"{totals['macs'] / batch / 1e9:.3f} GMACs, {totals['params'] / 1e6:.2f} M params, "
        f"{totals['activation_bytes'] / batch / MIB:.1f} MB activations"
    )


def run_analyze(args):
    try:
        analysis = analyze_arch(args.arch, input_size=args.input_size, batch=args.batch)
    except ValueError as error:  # an input too small for some layer: the message names the layer
        print(f"cnnfast analyze: error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(analysis.to_dict(), indent=2))
    else:
        print(summary_line(analysis))
        print(format_table(analysis))
    return 0


def run_claims(args):
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
    return 0


def run_report(args):
    for path in write_report(args.out).values():
        print(path)
    return 0


def build_parser():
    parser = argparse.ArgumentParser(
        prog="cnnfast", description="Per-layer counts of the classic CNNs and the lecture's claims about them."
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
    claims.add_argument("--json", action="store_true", help="print the claims as a JSON list")
    claims.set_defaults(run=run_claims)

    report = commands.add_parser("report", help="write the HTML and Markdown report with its charts")
    report.add_argument("--out", default="report", metavar="DIR", help="output directory (default: report/)")
    report.set_defaults(run=run_report)
    return parser


def main(argv=None):
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:  # --help, --version and usage errors: hand back their status
        return exit_request.code
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
