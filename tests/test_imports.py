"""The house has floors, and imports go down (docs/design.md, "The house").

Every import is read, at module level and inside function bodies (a deferred import is still
a dependency: it only hides it from a tool that reads the top of the file). Each module's
floor is named below; a module may import its own floor's modules or any floor beneath, and
no chain of imports comes back to where it started."""

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# lowest first; a module belongs to the first floor one of whose prefixes it starts with
FLOORS = (
    ("modelapi",),                       # the model interface, logical axes, int8 values, the bad-input error
    ("model",),
    ("sharding",),
    ("capibara_export.errors", "capibara_export.interrupts", "capibara_export.compiler_options",
     "capibara_export.environment", "capibara_export.bundle_error", "capibara_export.data",
     "capibara_export.families"),        # the registry: the only pipeline module that imports model/
    ("capibara_export.analysis",),       # HLO, roofline, hotspots, selection: pure, reads dicts
    ("capibara_export.matrix",),         # targets, programs, compile, cache, records, the build folder, driver
    ("capibara_export.export",),         # bundles: formats, manifest, trust, verify, serve
    ("capibara_export.semiotic",),       # the application of a bundle
    ("capibara_export.server",),         # the live server (its caption_text view uses semiotic's processor)
    ("capibara_export.cli", "capibara_export.console", "capibara_export.bench_report", "capibara_export.__main__",
     "capibara_export"),
)


def modules() -> dict[str, Path]:
    found = {}
    for package in ("capibara_export", "model", "modelapi", "sharding"):
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `name` imports anywhere in its file (a package: its __init__)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            candidates = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in candidates:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):   # a package's own __init__
                targets.add(target)
    return targets


def floor_of(name: str) -> int:
    for level, prefixes in enumerate(FLOORS):
        if any(name == p or name.startswith(p + ".") or (p == "capibara_export.cli" and name.startswith(p))
               for p in prefixes):
            return level
    raise AssertionError(f"{name}: not on any floor of FLOORS; add it to the floor it belongs to")


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_the_scan_sees_imports_inside_function_bodies():
    deps = graph()
    assert "capibara_export.matrix.analyze" in deps["capibara_export.matrix.driver"]   # only inside a function
    assert "model.state" in deps["model.layout"] and len(deps) > 100


def test_every_import_goes_to_the_same_floor_or_down():
    upward = sorted(f"{a} (floor {floor_of(a)}) imports {b} (floor {floor_of(b)})"
                    for a, targets in graph().items() for b in targets if floor_of(b) > floor_of(a))
    assert upward == []


def test_the_pipeline_reads_models_only_through_their_family():
    """Only the registration of the built-in models (capibara_export/families.py) imports a
    model package; build, analysis, selection, plan search, export, verify, serving and the
    sharding plans read a model through modelapi.family.ModelFamily (docs/models.md)."""
    deps = graph()
    pipeline = [name for name in deps if name.split(".")[0] in ("capibara_export", "sharding")]
    assert len(pipeline) > 90
    reaching = sorted(f"{name} imports {target}" for name in pipeline for target in deps[name]
                      if target.split(".")[0] == "model")
    assert reaching == ["capibara_export.families imports model.family", "capibara_export.families imports model.gpt2.family"]
    assert "modelapi.family" in deps["capibara_export.matrix.programs"]


def test_no_module_imports_come_back_in_a_circle():
    try:
        tuple(graphlib.TopologicalSorter(graph()).static_order())
    except graphlib.CycleError as err:
        raise AssertionError(f"an import cycle: {' -> '.join(err.args[1])}") from None


def test_no_package_imports_come_back_in_a_circle():
    def package(name: str) -> str:
        parts = name.split(".")
        return ".".join(parts[:2]) if parts[0] == "capibara_export" else parts[0]
    packages: dict[str, set[str]] = {}
    for a, targets in graph().items():
        packages.setdefault(package(a), set()).update(package(b) for b in targets if package(b) != package(a))
    try:
        tuple(graphlib.TopologicalSorter(packages).static_order())
    except graphlib.CycleError as err:
        raise AssertionError(f"a package cycle: {' -> '.join(err.args[1])}") from None


def test_the_analysis_loads_nothing_above_it_in_a_clean_process():
    code = ("import sys\n"
            "import capibara_export.analysis.plan_search, capibara_export.analysis.report\n"
            "import capibara_export.analysis.selection, capibara_export.analysis.hotspots\n"
            "print(sorted(m for m in sys.modules if m.startswith(('capibara_export.export', "
            "'capibara_export.semiotic', 'capibara_export.matrix', 'capibara_export.server', "
            "'capibara_export.cli'))))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]", result.stdout


def test_every_source_file_a_cache_key_hashes_exists():
    """The result and derived caches hash named source files; a file that moved must move
    there too (or an edit to it would not invalidate the cache, and a missing one fails builds)."""
    from capibara_export.matrix.analyze import ANALYSIS_SOURCES
    from capibara_export.matrix.derive import REPORT_SOURCES

    missing = [name for name in (*ANALYSIS_SOURCES, *REPORT_SOURCES) if not (ROOT / name).is_file()]
    assert missing == []
    assert "capibara_export/matrix/analyze.py" in ANALYSIS_SOURCES
