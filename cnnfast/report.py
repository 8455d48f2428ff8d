"""The cnnfast report: every architecture's counts, the lecture's claims and charts.

The report is a list of sections. Each section function takes the ReportData and returns a
Section holding its HTML, its Markdown and the chart files it wrote; a new section is one
more function in SECTIONS. Everything is counted on the meta device; the claims' time ratios and
the roofline are measured when the report is written (CPU timings on a CPU).
"""

import datetime
import html
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import cnnfast
from cnnfast import json_file
from cnnfast.analysis import MEMORY_TYPES, analyze_arch
from cnnfast.analysis.claims import compute_claims
from cnnfast.models import ARCHITECTURE_NOTES, ARCHITECTURES
from cnnfast.roofline import device_name

KIB = 1024
MIB = 1024**2
LAYER_CHART_ARCHS = ("alexnet", "vgg16", "resnet50")
CHART_DPI = 120

CSS = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2em; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #fafafa; }
details { margin: 0.4em 0; }
summary { cursor: pointer; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #555; }
"""


@dataclass
class ReportData:
    out_dir: Path
    analyses: dict  # architecture name -> ModelAnalysis at the architecture's default input size
    claims: list
    bench_result: dict | None = None  # measured once, for the benchmark and roofline sections

    def bench(self) -> dict:
        """The report's benchmark run: BENCH_ARCH's first BENCH_LAYERS distinct conv layers on every
        backend that runs here, and the whole model eager and optimized, at batch 1."""
        if self.bench_result is None:
            from cnnfast.bench import run_bench

            self.bench_result = run_bench(BENCH_ARCH, batch=1, max_layers=BENCH_LAYERS)
        return self.bench_result


@dataclass
class Section:
    title: str
    html: str
    markdown: str
    files: list = field(default_factory=list)  # chart files the section wrote


# ---------------------------------------------------------------- formatting


def agreement_text(claim):
    """How close the counted ratio is to the lecture's closed form."""
    if claim.closed_form is None:
        return "no closed form"
    if math.isclose(claim.predicted, claim.closed_form, rel_tol=1e-9):
        return "exact"
    relative = abs(claim.predicted - claim.closed_form) / abs(claim.closed_form)
    return f"{relative:.2%} apart"


def closed_form_value(claim):
    return "-" if claim.closed_form is None else f"{claim.closed_form:.4g}"


def format_shape(shape):
    return "x".join(str(size) for size in shape)


def format_window(value):
    """Kernel size, stride or padding ([h, w] or None): '3' for 3x3, '1x7' otherwise, '' when absent."""
    if value is None:
        return ""
    if len(set(value)) == 1:
        return str(value[0])
    return "x".join(str(v) for v in value)


def html_table(headers, rows, align):
    """align holds one letter a column: 'l' for text, 'r' for numbers."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="num">{html.escape(cell)}</td>' if a == "r" else f"<td>{html.escape(cell)}</td>"
            for cell, a in zip(row, align)
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody>\n</table>"


def markdown_escape(text):
    """Backslash what Markdown would read as emphasis, code or a table border (H*W*C, a|b).

    Underscores stay: inside a word (vgg16_bn) they are literal.
    """
    return re.sub(r"([\\`*|])", r"\\\1", text)


def markdown_table(headers, rows, align):
    def line(cells):
        return "| " + " | ".join(markdown_escape(cell) for cell in cells) + " |"

    rule = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
    return "\n".join([line(headers), rule] + [line(row) for row in rows])


def html_list(items):
    return "<ul>\n" + "\n".join(f"<li>{html.escape(item)}</li>" for item in items) + "\n</ul>"


def markdown_list(items):
    return "\n".join(f"- {markdown_escape(item)}" for item in items)


def html_figure(path, caption):
    return (
        f'<figure><img src="{html.escape(path.name)}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def markdown_figure(path, caption):
    return f"![{caption}]({path.name})\n\n*{caption}*"


def timings_label(device_type: str) -> str:
    return "CPU timings, not GPU speeds" if device_type == "cpu" else "GPU timings"


def slug(title):
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


# ---------------------------------------------------------------- charts


def new_figure(**kwargs):
    # matplotlib is an optional dependency: only the charts need it, not the rest of the CLI.
    from matplotlib.figure import Figure

    return Figure(layout="constrained", **kwargs)


def save_figure(figure, path):
    figure.savefig(path, dpi=CHART_DPI)
    return path


def crowded_on_the_right(xy, others):
    """Whether another point sits just right of xy on the log-log chart, where its label would go."""
    x, y = xy
    return any(0 < math.log10(ox / x) < 0.15 and abs(math.log10(oy / y)) < 0.1 for ox, oy in others)


def macs_vs_params_chart(analyses, path):
    """Every architecture as one point; architectures that land on the same spot share a label."""
    largest_memory = max(a.totals["activation_bytes"] for a in analyses.values())

    def marker_area(activation_bytes):
        return 30 + 1200 * activation_bytes / largest_memory

    figure = new_figure(figsize=(9, 6))
    axes = figure.add_subplot()
    points = {}  # rounded (params, macs) -> names, so vgg16 and vgg16_bn get one label
    for name, analysis in analyses.items():
        xy = (analysis.totals["params"] / 1e6, analysis.totals["macs"] / 1e9)
        axes.scatter(*xy, s=marker_area(analysis.totals["activation_bytes"]), alpha=0.45, color="tab:blue",
                     edgecolors="navy")
        key = (round(xy[0]), round(xy[1], 1))
        points.setdefault(key, {"xy": xy, "names": []})["names"].append(name)
    others = [point["xy"] for point in points.values()]
    for point in points.values():
        on_the_left = crowded_on_the_right(point["xy"], others)
        axes.annotate(
            ", ".join(point["names"]), point["xy"], xytext=(-8 if on_the_left else 8, 6),
            textcoords="offset points", ha="right" if on_the_left else "left", fontsize=9,
            bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.7},
        )
    for megabytes in (25, 100):  # empty scatters: legend entries for the marker sizes
        axes.scatter([], [], s=marker_area(megabytes * MIB), alpha=0.45, color="tab:blue", edgecolors="navy",
                     label=f"{megabytes} MB activations")
    axes.legend(loc="upper left", labelspacing=2.2, borderpad=1.2, handletextpad=1.5)
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("Parameters (M, log scale)")
    axes.set_ylabel("GMACs per image (log scale)")
    axes.set_title("Compute vs parameters at each architecture's default input size")
    axes.grid(True, which="both", alpha=0.3)
    axes.margins(0.15)
    return save_figure(figure, path)


def layer_chart(analysis, path):
    """Memory, parameters and MACs of each conv and linear layer, one panel each."""
    layers = [layer for layer in analysis.layers if layer.type in ("conv", "linear")]
    panels = (
        ("Memory (KB)", [layer.activation_bytes / KIB for layer in layers], "tab:green"),
        ("Params (k)", [layer.params / 1e3 for layer in layers], "tab:orange"),
        ("MACs (M)", [layer.macs / 1e6 for layer in layers], "tab:blue"),
    )
    few_layers = len(layers) <= 24
    figure = new_figure(figsize=(max(8, 0.25 * len(layers) + 2), 9))
    axes_list = figure.subplots(3, 1, sharex=True)
    positions = range(len(layers))
    for axes, (label, values, color) in zip(axes_list, panels):
        bars = axes.bar(positions, values, color=color)
        axes.set_ylabel(label)
        axes.yaxis.set_major_formatter("{x:,.0f}")
        axes.grid(True, axis="y", alpha=0.3)
        if few_layers:  # value labels as in the lecture's AlexNet figure; too crowded beyond that
            axes.bar_label(bars, fmt="{:,.0f}", fontsize=7, padding=1)
            axes.margins(y=0.15)
    axes_list[-1].set_xticks(
        positions,
        [layer.name for layer in layers],
        rotation=45 if few_layers else 90,
        ha="right" if few_layers else "center",
        fontsize=8 if few_layers else 7,
    )
    figure.suptitle(
        f"{analysis.arch}, 3x{analysis.image_text}, batch {analysis.batch}: "
        "memory, parameters and MACs of each conv and linear layer"
    )
    return save_figure(figure, path)


# ---------------------------------------------------------------- sections


def summary_section(data):
    headers = ("Architecture", "Input", "Params (M)", "GMACs", "GFLOPs", "Activations (MB)", "Pool ops (M)",
               "Pool ops / MACs")
    rows = []
    for name, analysis in data.analyses.items():
        totals = analysis.totals
        rows.append((
            name,
            f"3x{analysis.image_text}",
            f"{totals['params'] / 1e6:.2f}",
            f"{totals['macs'] / 1e9:.3f}",
            f"{totals['flops'] / 1e9:.3f}",
            f"{totals['activation_bytes'] / MIB:.1f}",
            f"{analysis.pool_ops / 1e6:.2f}",
            f"{analysis.pool_ops / totals['macs']:.3%}",
        ))
    align = "llrrrrrr"
    chart = macs_vs_params_chart(data.analyses, data.out_dir / "macs_vs_params.png")
    caption = "GMACs vs parameters; marker area grows with activation memory."
    intro = "Counted per image (batch 1) at each architecture's default input size."
    notes = [f"{name}: {note}." for name, note in ARCHITECTURE_NOTES.items() if name in data.analyses]
    html_notes = "".join(f"<p>{html.escape(note)}</p>\n" for note in notes)
    markdown_notes = "".join(f"{markdown_escape(note)}\n\n" for note in notes)
    return Section(
        "Summary",
        f"<p>{intro}</p>\n{html_table(headers, rows, align)}\n{html_notes}{html_figure(chart, caption)}",
        f"{intro}\n\n{markdown_table(headers, rows, align)}\n\n{markdown_notes}{markdown_figure(chart, caption)}",
        [chart],
    )


LECTURE_NOTES_INTRO = "Where the lecture's own figures differ from the counts:"


def claims_section(data):
    from cnnfast.analysis.measure import measure_claims, measured_on, range_text

    measured = measure_claims(claims=data.claims)
    by_key = {row["key"]: row for row in measured["claims"]}
    timings = timings_label(measured["device_type"])
    headers = ("Claim", "Quantity", "Predicted (counted) ratio", "Measured time ratio", "Verdict",
               "cnnfast time ratio", "cnnfast verdict", "Closed form", "Formula", "Agreement")
    rows = []
    for claim in data.claims:
        row = by_key.get(claim.key)
        timed = (f"{row['measured']:.4g} ({range_text(row['measured_range'])})", row["verdict"],
                 f"{row['cnnfast']['measured']:.4g} ({range_text(row['cnnfast']['measured_range'])})",
                 row["cnnfast"]["verdict"]) if row else ("not a time", "-", "not a time", "-")
        rows.append((claim.title, claim.quantity, f"{claim.predicted:.4g}", *timed, closed_form_value(claim),
                     claim.closed_form_text or "", agreement_text(claim)))
    align = "llrrlrlrll"
    intro = (
        "Each ratio is counted on real layer shapes and set against the lecture's closed form where it gives one. "
        "Where the quantity is time (MACs, pooling operations), both sides of the ratio were also timed when this "
        f"report was written ({timings}): {measured_on(measured)}. A measured ratio is that of the sides' median "
        f"times over the rounds (the range of one round's ratio in brackets). Verdict: {measured['verdict_rule']}. "
        "Full runs: cnnfast claims --measure."
    )
    notes = [f"{row['key']} ({row['verdict']}): {row['explanation']['cause']}: {row['explanation']['text']}"
             for row in measured["claims"] if row["explanation"]]
    statements = list(dict.fromkeys(claim.statement for claim in data.claims))  # several claims share one
    outro = "What the lecture says, in the order of the table:"
    lecture_notes = [f"{claim.key}: {claim.lecture_note}" for claim in data.claims if claim.lecture_note]
    return Section(
        "The lecture's claims",
        f"<p>{html.escape(intro)}</p>\n{html_table(headers, rows, align)}\n<p>Where the measured ratio departs "
        f"from the counted one:</p>\n{html_list(notes)}\n<p>{LECTURE_NOTES_INTRO}</p>\n{html_list(lecture_notes)}\n"
        f"<p>{outro}</p>\n{html_list(statements)}",
        f"{markdown_escape(intro)}\n\n{markdown_table(headers, rows, align)}\n\nWhere the measured ratio departs "
        f"from the counted one:\n\n{markdown_list(notes)}\n\n{LECTURE_NOTES_INTRO}\n\n{markdown_list(lecture_notes)}"
        f"\n\n{outro}\n\n{markdown_list(statements)}",
    )


def layer_charts_section(data):
    html_parts, markdown_parts, files = [], [], []
    for name in LAYER_CHART_ARCHS:
        chart = layer_chart(data.analyses[name], data.out_dir / f"layers_{name}.png")
        caption = f"{name}: memory (KB), parameters (k) and MACs (M) of each conv and linear layer."
        html_parts.append(html_figure(chart, caption))
        markdown_parts.append(markdown_figure(chart, caption))
        files.append(chart)
    return Section("Per-layer charts", "\n".join(html_parts), "\n\n".join(markdown_parts), files)


def layer_rows(analysis):
    return [
        (
            layer.name,
            layer.type,
            format_shape(layer.input_shape),
            format_shape(layer.output_shape),
            format_window(layer.kernel_size),
            format_window(layer.stride),
            format_window(layer.padding),
            f"{layer.activation_bytes / KIB:,.1f}" if layer.type in MEMORY_TYPES else "-",
            f"{layer.params:,}",
            f"{layer.macs:,}",
            f"{layer.pool_ops:,}",
        )
        for layer in analysis.layers
    ]


def layer_tables_section(data):
    headers = ("Layer", "Type", "Input", "Output", "Kernel", "Stride", "Pad", "Memory (KB)", "Params", "MACs",
               "Pool ops")
    align = "lllllllrrrr"
    html_parts, markdown_parts = [], []
    for name, analysis in data.analyses.items():
        rows = layer_rows(analysis)
        totals = analysis.totals
        summary = html.escape(
            f"{name}: {len(rows)} rows, {totals['params'] / 1e6:.2f} M params, {totals['macs'] / 1e9:.3f} GMACs"
        )
        html_parts.append(f"<details><summary>{summary}</summary>\n{html_table(headers, rows, align)}\n</details>")
        # Markdown tables inside <details> need blank lines around them to render.
        markdown_parts.append(
            f"<details><summary>{summary}</summary>\n\n{markdown_table(headers, rows, align)}\n\n</details>"
        )
    intro = "Shapes are C x H x W of one image; memory is shown for the rows the memory total sums."
    return Section(
        "Layers of each architecture",
        f"<p>{intro}</p>\n" + "\n".join(html_parts),
        f"{intro}\n\n" + "\n\n".join(markdown_parts),
    )


CONVENTIONS = (
    "MAC: one multiply-add. The lecture's \"FLOP\" is a MAC.",
    "FLOPs = 2 x MACs.",
    "Params: weights and biases, and BatchNorm's gamma and beta where a BatchNorm exists.",
    "Memory: the output activation of a layer, 4 bytes an element; KB = 1024 bytes, MB = 1024 KB. "
    "As in the lecture's tables, the totals sum the conv, linear and pooling outputs only "
    "(BatchNorm and ReLU outputs are not counted).",
    "Pooling does no MACs: its operations (output elements x window) are counted apart, as pool ops.",
)


def conventions_section(data):
    return Section("Counting conventions", html_list(CONVENTIONS), markdown_list(CONVENTIONS))


def git_commit():
    """The commit of the code that wrote the report: CNNFAST_COMMIT where set (a copy of the tree
    without .git, as on a lent GPU machine), else git's, "+dirty" when the tree has changes."""
    if os.environ.get("CNNFAST_COMMIT"):
        return os.environ["CNNFAST_COMMIT"]

    def git(*args):
        return subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True,
                              timeout=10)

    try:
        head, changes = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unavailable"
    if head.returncode != 0:
        return "unavailable"
    return head.stdout.strip() + ("+dirty" if changes.returncode == 0 and changes.stdout.strip() else "")


def environment_section(data):
    import torchvision
    import triton

    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    rows = [
        ("cnnfast", cnnfast.__version__),
        ("torch", torch.__version__),
        ("torchvision", torchvision.__version__),
        ("triton", triton.__version__),
        ("CUDA (torch built with)", torch.version.cuda or "none"),
        ("cuDNN", str(cudnn) if cudnn else "none"),
        ("python", sys.version.split()[0]),
        ("device", device_name("cuda" if torch.cuda.is_available() else "cpu")),
        ("platform", platform.platform()),
        ("git commit", git_commit()),
        ("date", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
    ]
    headers = ("Item", "Value")
    return Section("Environment", html_table(headers, rows, "ll"), markdown_table(headers, rows, "ll"))


BENCH_ARCH = "resnet50"
BENCH_LAYERS = 5  # the first distinct conv layers only: the whole report stays within a minute or so on a CPU
RESULTS_DIR = Path(__file__).resolve().parent.parent / "bench" / "results"  # in a source checkout


def committed_runs(results_dir=RESULTS_DIR) -> list[tuple]:
    """(run, GPU, torch, triton, date, commit) of each GPU run filed under bench/results, oldest first."""
    rows = []
    for env_path in sorted(Path(results_dir).glob("*/env.json")):
        env = json.loads(env_path.read_text())
        rows.append((env_path.parent.name, str(env.get("gpu")), str(env.get("torch")), str(env.get("triton")),
                     str(env.get("date", ""))[:10], str(env.get("commit"))))
    return sorted(rows, key=lambda row: (row[4], row[0]))


def benchmarks_section(data):
    from cnnfast.bench import end_to_end_rows, layer_rows, skipped_lines, summary_rows

    result = data.bench()
    timings = timings_label(result["device_type"])
    intro = (
        f"Measured when this report was written, on {result['device']} ({timings}; {result['timer']}): "
        f"the first {len(result['layers'])} distinct conv layers of {BENCH_ARCH} (each with its folded BatchNorm "
        f"and epilogue) at batch 1, {result['dtype']}, channels_last, on every backend that runs here, then the "
        f"whole model, eager PyTorch against cnnfast.optimize. Full runs: cnnfast bench ARCH."
    )
    tables = [("Per backend, the layers' calls summed", *summary_rows(result), "lrrr"),
              ("Per layer", *layer_rows(result), "lllrrrr"),
              (f"End to end, {BENCH_ARCH} at batch 1", *end_to_end_rows(result), "llrrr")]
    runs = committed_runs()
    runs_headers = ("run", "GPU", "torch", "triton", "date", "commit")
    runs_text = ("GPU results filed in bench/results (the README's measured results are generated from them; "
                 "each folder's summary.md has every case):" if runs else
                 "No GPU results are filed in bench/results beside this copy of cnnfast.")
    html_parts = [f"<p>{html.escape(intro)}</p>", html_list(skipped_lines(result))]
    markdown_parts = [markdown_escape(intro), markdown_list(skipped_lines(result))]
    for title, headers, rows, align in tables:
        html_parts += [f"<h3>{html.escape(title)}</h3>", html_table(headers, rows, align)]
        markdown_parts += [f"### {title}", markdown_table(headers, rows, align)]
    html_parts.append(f"<p>{html.escape(runs_text)}</p>")
    markdown_parts.append(markdown_escape(runs_text))
    if runs:
        html_parts.append(html_table(runs_headers, runs, "llllll"))
        markdown_parts.append(markdown_table(runs_headers, runs, "llllll"))
    return Section(f"Benchmarks (measured on {result['device']})", "\n".join(html_parts),
                   "\n\n".join(markdown_parts))


def roofline_section(data):
    from cnnfast.bench import roofline_points_under_ceilings, skipped_lines
    from cnnfast.roofline import rate_unit, ridge_intensity, roofline_plot, roofline_rows

    result = data.bench()
    points, ceiling = roofline_points_under_ceilings(result)
    rate = rate_unit(result["device_type"])
    unit, scale = rate
    chart = roofline_plot(points, ceiling, data.out_dir / "roofline.png",
                          subject=f"{BENCH_ARCH}, first {len(result['layers'])} conv layers, batch 1", rate=rate)
    timings = timings_label(result["device_type"])
    intro = (
        f"A reduced set, measured when this report was written: the first {len(result['layers'])} distinct conv "
        f"layers of {BENCH_ARCH} at batch 1, {result['dtype']}, channels_last, on {result['device']} "
        f"({timings}; {result['timer']}). Ceilings: matmul {ceiling['matmul_flop_per_s'] / scale:,.1f} {unit} "
        f"({ceiling['matmul_op']}), copy {ceiling['copy_bytes_per_s'] / 1e9:,.1f} GB/s (bytes read + written), ridge "
        f"{ridge_intensity(ceiling):.1f} FLOP/byte. Traffic counts input, weights, output and the residual a layer adds once each; "
        "% of bound is the roofline's time over the measured time. Full runs: cnnfast roofline ARCH."
    )
    skipped = skipped_lines(result)
    headers, rows = roofline_rows(points, rate)
    align = "llrrrrrll"
    caption = f"Roofline of {BENCH_ARCH}'s first conv layers, {result['dtype']}, {result['device']}."
    return Section(
        f"Roofline (measured on {result['device']})",
        f"<p>{html.escape(intro)}</p>\n{html_list(skipped)}\n{html_figure(chart, caption)}\n"
        f"{html_table(headers, rows, align)}",
        f"{markdown_escape(intro)}\n\n{markdown_list(skipped)}\n\n{markdown_figure(chart, caption)}\n\n"
        f"{markdown_table(headers, rows, align)}",
        [chart],
    )


SECTIONS = (
    summary_section,
    claims_section,
    layer_charts_section,
    benchmarks_section,
    roofline_section,
    layer_tables_section,
    conventions_section,
    environment_section,
)
# The sections that time something: made last, so that the pages (written again after each
# section) already hold every counted section when a time limit stops the report; the claims
# last of all, since on a GPU their cnnfast side may tune kernels for shapes not seen before.
MEASURED_SECTIONS = (benchmarks_section, roofline_section, claims_section)

TITLE = "cnnfast: the classic CNNs counted"


# ---------------------------------------------------------------- assembly


def render_html(sections):
    contents = "\n".join(
        f'<li><a href="#{slug(section.title)}">{html.escape(section.title)}</a></li>' for section in sections
    )
    bodies = "\n".join(
        f'<section id="{slug(section.title)}">\n<h2>{html.escape(section.title)}</h2>\n{section.html}\n</section>'
        for section in sections
    )
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{html.escape(TITLE)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f"<h1>{html.escape(TITLE)}</h1>\n<nav><ul>\n{contents}\n</ul></nav>\n{bodies}\n</body>\n</html>\n"
    )


def render_markdown(sections):
    bodies = "\n\n".join(f"## {section.title}\n\n{section.markdown}" for section in sections)
    return f"# {TITLE}\n\n{bodies}\n"


def write_report(out_dir="report", progress=None):
    """Write index.html, report.md and the charts into out_dir; return {file name: path}. progress,
    when given, is called with a line as each section is written (the measured ones take minutes)."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = ReportData(
        out_dir=out_dir,
        analyses={name: analyze_arch(name) for name in ARCHITECTURES},
        claims=compute_claims(),
    )
    html_path = out_dir / "index.html"
    markdown_path = out_dir / "report.md"
    made = {}
    order = [make for make in SECTIONS if make not in MEASURED_SECTIONS] + list(MEASURED_SECTIONS)
    for make_section in order:
        made[make_section] = make_section(data)
        sections = [made[make] for make in SECTIONS if make in made]  # in the page's order
        # Replaced whole: a report stopped while writing keeps its last whole page.
        json_file.replace_text(html_path, render_html(sections))
        json_file.replace_text(markdown_path, render_markdown(sections))
        if progress:
            elapsed = time.perf_counter() - start
            progress(f"[{len(made)}/{len(order)}] {made[make_section].title} ({elapsed:.0f} s elapsed)")
    written = {path.name: path for path in (html_path, markdown_path)}
    written.update({path.name: path for section in sections for path in section.files})
    return written
