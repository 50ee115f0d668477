"""Everything derived from a build folder's compile records: analysis, selection, report.

Run at the end of `build` (inside the staging folder, so it lands atomically) and by
`python -m capibara_export report BUILD_DIR`, which recomputes it from the saved records
and HLO text alone.
"""

from __future__ import annotations

from pathlib import Path

from .analysis import analyze_build, write_json
from .build_folder import read_build
from .report import render_summary, write_report
from .selection import select


def derive(folder: Path, name: str | None = None) -> tuple[dict, dict, str]:
    """Write analysis.json, selection.json, report.html and summary.md; return them. `name`
    is the folder's final name when `folder` is a staging folder (what the report shows)."""
    folder = Path(folder)
    if not (folder / "records.jsonl").is_file() or not (folder / "build.json").is_file():
        raise FileNotFoundError(f"{folder}: not a build folder (no records.jsonl and build.json); "
                                "run `python -m capibara_export build` first")
    build = read_build(folder)
    analysis = analyze_build(folder, name=name)
    selection = select(analysis)
    write_json(folder / "analysis.json", analysis)
    write_json(folder / "selection.json", selection)
    build["selection"] = selection["selections"]
    write_json(folder / "build.json", build)
    write_report(folder, analysis, selection)
    return analysis, selection, render_summary(analysis, selection)
