"""Everything derived from a build folder's compile records: analysis, selection, report.

Run at the end of `build` (inside the staging folder, so it lands atomically) and by
`python -m capibara_export report BUILD_DIR`, which recomputes it from the saved records
and HLO text alone. Each unit's analysis and the rendered report are kept in the build's
cache (`--out/.cache/analysis`, `.cache/report`) under a hash of their inputs and code, so a
build in which nothing changed parses no HLO and draws no figure.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..analysis.report import render_summary, write_report
from ..analysis.selection import select
from .analyze import analyze_build, write_json
from .cache import DerivedCache, key_of, source_hash
from .folder import read_build

REPORT_SOURCES = ("capibara_export/analysis/report.py", "capibara_export/analysis/selection.py",
                  "capibara_export/analysis/model_agreement.py")


def derive(folder: Path, name: str | None = None) -> tuple[dict, dict, str]:
    """Write analysis.json, selection.json, report.html and summary.md; return them. `name`
    is the folder's final name when `folder` is a staging folder (what the report shows)."""
    folder = Path(folder)
    if not (folder / "records.jsonl").is_file() or not (folder / "build.json").is_file():
        raise FileNotFoundError(f"{folder}: not a build folder (no records.jsonl and build.json); "
                                "run `python -m capibara_export build` first")
    build = read_build(folder)
    cache_root = Path(build["request"]["out"]) / ".cache"
    use_cache = build["request"]["use_cache"] and cache_root.is_dir()  # never create one where none was
    analysis = analyze_build(folder, name=name, cache=DerivedCache(cache_root, "analysis") if use_cache else None)
    selection = select(analysis)
    write_json(folder / "analysis.json", analysis)
    write_json(folder / "selection.json", selection)
    build["selection"] = selection["selections"]
    write_json(folder / "build.json", build)
    write_derived_plans(folder, build, selection)
    if not use_cache:
        write_report(folder, analysis, selection)
        return analysis, selection, render_summary(analysis, selection)
    return analysis, selection, _cached_report(folder, analysis, selection, DerivedCache(cache_root, "report"))


DERIVED_PLANS = "derived-plans.toml"


def write_derived_plans(folder: Path, build: dict, selection: dict) -> None:
    """The derived plans that some selection took, as a plan file (`--plan-file` next time)."""
    from sharding.plans import ShardingPlan

    from ..analysis.plan_search import SOURCE, plans_toml

    chosen = {s["plan"] for s in selection["selections"] if s.get("plan")}
    derived = [ShardingPlan.from_dict(d) for name, d in sorted(build["plans"].items())
               if name in chosen and d.get("source") == SOURCE]
    path = folder / DERIVED_PLANS
    if derived:
        path.write_text(plans_toml(derived))
    elif path.exists():
        path.unlink()


def _cached_report(folder: Path, analysis: dict, selection: dict, cache: DerivedCache) -> str:
    """The report and summary from the cache when analysis, selection and report code are
    unchanged (matplotlib drawing ~20 figures is most of a warm build otherwise)."""
    import matplotlib

    key = key_of({"analysis": json.loads(json.dumps(analysis, default=float)), "selection": selection,
                  "code": source_hash(*REPORT_SOURCES), "matplotlib": matplotlib.__version__})
    page, summary = cache.get(key, "html"), cache.get(key, "md")
    if page is None or summary is None:
        html_path, md_path = write_report(folder, analysis, selection)
        cache.put(key, "html", html_path.read_bytes())
        cache.put(key, "md", md_path.read_bytes())
        return md_path.read_text()
    (folder / "report.html").write_bytes(page)
    (folder / "summary.md").write_bytes(summary)
    return summary.decode()
