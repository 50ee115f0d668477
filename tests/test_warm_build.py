"""A build in which nothing changed recomputes nothing: units come from the result cache,
each unit's analysis and the report from the derived caches, and what it writes is
byte-identical to the cold build's. A change to the analysis code recomputes the analysis."""

from __future__ import annotations

from pathlib import Path

import pytest

from capibara_export.matrix import analyze as analysis_module
from capibara_export.analysis import report as report_module
from capibara_export.matrix.driver import BuildRequest, run_build
from capibara_export.matrix.derive import derive

DERIVED = ("analysis.json", "selection.json", "report.html", "summary.md")


def _build(out: Path) -> Path:
    request = BuildRequest(model="tiny", entries=("encode_image", "caption"), plans=("dp", "fsdp"),
                           precisions=("fp32",), batches=(32,), out=out)
    return run_build(request, finish=lambda staging, result: derive(staging, name=result.folder.name)).folder


class Counter:
    def __init__(self, monkeypatch, module, name):
        self.calls, real = 0, getattr(module, name)

        def counted(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)
        monkeypatch.setattr(module, name, counted)


@pytest.fixture(scope="module")
def cold(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    out = tmp_path_factory.mktemp("out")
    folder = _build(out)
    return out, {name: (folder / name).read_bytes() for name in DERIVED}


def test_a_warm_build_parses_no_hlo_draws_nothing_and_writes_the_same_files(cold, monkeypatch):
    out, first = cold
    parsed = Counter(monkeypatch, analysis_module, "HloProgram")
    drawn = Counter(monkeypatch, report_module, "render_html")
    folder = _build(out)
    assert (parsed.calls, drawn.calls) == (0, 0)
    assert {name: (folder / name).read_bytes() for name in DERIVED} == first


def test_a_change_to_the_analysis_code_recomputes_the_analysis(cold, monkeypatch):
    out, first = cold
    monkeypatch.setattr(analysis_module, "ANALYSIS_SOURCES", (*analysis_module.ANALYSIS_SOURCES, "README.md"))
    parsed = Counter(monkeypatch, analysis_module, "HloProgram")
    folder = _build(out)
    assert parsed.calls == 2 * 4  # optimized and pre-partition text of each of the 4 units
    assert (folder / "analysis.json").read_bytes() == first["analysis.json"]


def test_a_damaged_cache_entry_is_recomputed(cold, monkeypatch):
    out, first = cold
    for entry in (out / ".cache" / "analysis").rglob("*.json"):
        entry.write_bytes(b"\x00 not json")
    for entry in (out / ".cache" / "report").rglob("*.html"):
        entry.unlink()
    drawn = Counter(monkeypatch, report_module, "render_html")
    folder = _build(out)
    assert drawn.calls == 1
    assert {name: (folder / name).read_bytes() for name in DERIVED} == first
