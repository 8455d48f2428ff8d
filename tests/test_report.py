import html
import json
import time

import pytest

from cnnfast.analysis.claims import compute_claims
from cnnfast.models import ARCHITECTURE_NOTES, ARCHITECTURES
from cnnfast.report import LAYER_CHART_ARCHS, markdown_escape, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def timed_once(fn, device, **kwargs) -> float:
    """One run's milliseconds: these tests check the pages, not the figures (the timer's own tests
    are in test_roofline.py), and the full report's warm-ups and repeats take minutes here."""
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from cnnfast import bench
    from cnnfast.analysis import measure

    out_dir = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(measure, "time_ms", timed_once)
        patch.setattr(bench, "time_ms", timed_once)
        PROGRESS.clear()  # pytest-xdist may build this module fixture again in the same worker
        return out_dir, write_report(out_dir, progress=PROGRESS.append)


PROGRESS = []  # the report fixture's progress lines

def test_progress_says_each_section_as_it_is_written(report):
    from cnnfast.report import MEASURED_SECTIONS, SECTIONS

    assert len(PROGRESS) == len(SECTIONS)
    assert PROGRESS[0].startswith(f"[1/{len(SECTIONS)}] Summary (") and PROGRESS[0].endswith(" s elapsed)")
    last_measured = MEASURED_SECTIONS[-1].__name__.removesuffix("_section")
    assert PROGRESS[-1].startswith(f"[{len(SECTIONS)}/{len(SECTIONS)}] ")
    assert last_measured in PROGRESS[-1].lower()


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



@pytest.mark.parametrize("page, escape", [("index.html", html.escape), ("report.md", markdown_escape)])
def test_pages_hold_the_benchmark_tables_and_the_environment(report, page, escape):
    """The benchmark tables (per backend, per layer, end to end), labelled with the machine they were
    measured on, and the versions the figures depend on."""
    _, written = report
    text = written[page].read_text(encoding="utf-8")
    assert "Benchmarks (measured on CPU" in text and "CPU timings, not GPU speeds" in text
    for heading in ("Per backend, the layers", "Per layer", "End to end, resnet50 at batch 1", "images/s",
                    "speedup vs eager", "speedup vs torch", "skipped triton"):
        assert escape(heading) in text
    for item in ("torchvision", "triton", "cuDNN", "git commit"):
        assert item in text
    assert escape("GPU results filed in bench/results") in text and "h200-2026-11-28-run1" in text


def test_agreement_with_the_closed_form_is_relative_to_the_closed_form():
    from types import SimpleNamespace

    from cnnfast.report import agreement_text

    assert agreement_text(SimpleNamespace(predicted=1.1, closed_form=1.0)) == "10.00% apart"
    assert agreement_text(SimpleNamespace(predicted=1.0005, closed_form=1.0)) == "0.05% apart"
    assert agreement_text(SimpleNamespace(predicted=17 / 288, closed_form=17 / 288)) == "exact"
    assert agreement_text(SimpleNamespace(predicted=2.0, closed_form=None)) == "no closed form"


def test_a_window_is_one_number_when_square():
    from cnnfast.report import format_window

    assert [format_window(w) for w in ([3, 3], [1, 7], [2, 1], None)] == ["3", "1x7", "2x1", ""]


def test_committed_runs_are_listed_oldest_first(tmp_path):
    from cnnfast.report import committed_runs

    # The a100 run sorts first by name but is the newest.
    for name, date in (("h200-2026-12-02-run1", "2026-12-02T10:00:00+00:00"),
                       ("h200-2026-11-28-run1", "2026-11-28T17:25:44+00:00"),
                       ("a100-2026-12-03-run1", "2026-12-03T09:00:00+00:00")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "env.json").write_text(json.dumps(
            {"gpu": "NVIDIA H200", "torch": "2.11.0", "triton": "3.6.0", "date": date, "commit": "abc1234"}))
    assert committed_runs(tmp_path) == [
        ("h200-2026-11-28-run1", "NVIDIA H200", "2.11.0", "3.6.0", "2026-11-28", "abc1234"),
        ("h200-2026-12-02-run1", "NVIDIA H200", "2.11.0", "3.6.0", "2026-12-02", "abc1234"),
        ("a100-2026-12-03-run1", "NVIDIA H200", "2.11.0", "3.6.0", "2026-12-03", "abc1234"),
    ]
    assert committed_runs(tmp_path / "none") == []


def test_the_commit_is_the_one_named_where_the_tree_has_no_git(monkeypatch):
    from cnnfast.report import git_commit

    monkeypatch.setenv("CNNFAST_COMMIT", "0123abc")
    assert git_commit() == "0123abc"


def test_a_report_stopped_in_a_measured_section_keeps_the_counted_ones(tmp_path, monkeypatch):
    """The pages are written again after each section, the measured ones last: a report cut short
    (by device_check.sh's time limit, say) still holds every counted section."""
    from cnnfast import report as report_module

    def interrupted(data):
        raise KeyboardInterrupt

    monkeypatch.setattr(report_module, "MEASURED_SECTIONS", (interrupted,))
    monkeypatch.setattr(report_module, "SECTIONS", (*report_module.SECTIONS[:1], interrupted,
                                                   *report_module.SECTIONS[-2:]))
    with pytest.raises(KeyboardInterrupt):
        write_report(tmp_path)
    text = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "## Summary" in text and "## Counting conventions" in text and "## Environment" in text
