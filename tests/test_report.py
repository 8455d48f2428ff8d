import html

import pytest

from cnnfast.analysis.claims import compute_claims
from cnnfast.models import ARCHITECTURE_NOTES, ARCHITECTURES
from cnnfast.report import LAYER_CHART_ARCHS, markdown_escape, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("report")
    return out_dir, write_report(out_dir)


def test_writes_the_pages_and_charts(report):
    out_dir, written = report
    charts = {"macs_vs_params.png"} | {f"layers_{name}.png" for name in LAYER_CHART_ARCHS}
    expected = {"index.html", "report.md", "roofline.png"} | charts
    assert set(written) == expected
    for name, path in written.items():
        assert path == out_dir / name
        assert path.stat().st_size > 0


def test_charts_are_png(report):
    _, written = report
    charts = [path for name, path in written.items() if name.endswith(".png")]
    assert charts
    for path in charts:
        assert path.read_bytes().startswith(PNG_MAGIC)


@pytest.mark.parametrize("page, escape", [("index.html", html.escape), ("report.md", markdown_escape)])
def test_pages_name_every_architecture_and_claim(report, page, escape):
    _, written = report
    text = written[page].read_text(encoding="utf-8")
    for name in ARCHITECTURES:
        assert escape(name) in text
    for claim in compute_claims():
        assert escape(claim.title) in text
        assert escape(claim.statement) in text
        if claim.lecture_note:
            assert escape(claim.lecture_note) in text
    for note in ARCHITECTURE_NOTES.values():
        assert escape(note) in text


def test_markdown_escape_keeps_formulas_literal():
    assert markdown_escape("(H*W*C) | a_b") == "(H\\*W\\*C) \\| a_b"


@pytest.mark.parametrize("page", ["index.html", "report.md"])
def test_pages_reference_every_chart(report, page):
    _, written = report
    text = written[page].read_text(encoding="utf-8")
    for name in written:
        if name.endswith(".png"):
            assert name in text


def test_html_is_self_contained(report):
    _, written = report
    text = written["index.html"].read_text(encoding="utf-8")
    assert "<style>" in text
    assert "http://" not in text and "https://" not in text
    assert text.count("<details>") == len(ARCHITECTURES)

