"""The compile matrix: every (entry × plan × precision × batch) unit for one target and mesh.

A build reads each unit from the result cache or compiles it, writes every result to the
cache as soon as it exists (so Ctrl-C loses at most the unit in flight), and assembles
the build folder under a temporary name that is renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from model import BlipConfig, get_preset
from model.hf import checkpoint_config
from sharding.plans import ShardingPlan, load_plans, select_plans
from sharding.precision import DEFAULT_PRECISIONS, get_policy

from .cache import ResultCache, cache_key
from .compile import Compiled, compile_unit
from .hardware import Hardware, calibrate_cpu
from .programs import ENTRIES, SERVING_ENTRIES, ProgramError, ProgramOptions
from .records import CompileRecord, Unit, read_records, toolchain, write_records
from .targets import describe, get_target, hardware_for, make_mesh

DEFAULT_OUT = Path("artifacts")
DEFAULT_BATCHES = (32,)


@dataclass(frozen=True)
class BuildRequest:
    target: str = "tpu-v4-32"
    mesh: tuple[int, int] = (4, 8)
    model: str = "base"
    checkpoint: str | None = None
    entries: tuple[str, ...] = SERVING_ENTRIES
    plans: tuple[str, ...] = ()            # empty: every plan known (shipped + plan files)
    plan_files: tuple[str, ...] = ()
    precisions: tuple[str, ...] = DEFAULT_PRECISIONS
    batches: tuple[int, ...] = DEFAULT_BATCHES
    options: ProgramOptions = field(default_factory=ProgramOptions)
    out: Path = DEFAULT_OUT
    use_cache: bool = True
    name: str | None = None

    def folder_name(self) -> str:
        return self.name or f"{self.model_name()}-{self.target}-{self.mesh[0]}x{self.mesh[1]}"

    def model_name(self) -> str:
        return Path(self.checkpoint).name if self.checkpoint else self.model


@dataclass
class BuildResult:
    folder: Path
    config: BlipConfig
    records: list[CompileRecord]
    compiled: dict[str, Compiled]           # units compiled in this run (not cache hits), by unit id
    mesh: object
    hardware: Hardware
    plans: dict[str, ShardingPlan]
    seconds: float = 0.0

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.records:
            out[r.status] = out.get(r.status, 0) + 1
        out["cached"] = sum(r.cached for r in self.records)
        return out


def model_config(request: BuildRequest) -> BlipConfig:
    """The preset, or the config.json of --checkpoint (whose weights must also be there)."""
    return checkpoint_config(request.checkpoint) if request.checkpoint else get_preset(request.model)


def validate(request: BuildRequest) -> None:
    """Reject bad names before any compile: one clear error each."""
    for entry in request.entries:
        if entry not in ENTRIES:
            raise ProgramError(f"unknown entry {entry!r}; choose from {', '.join(ENTRIES)}")
    for precision in request.precisions:
        get_policy(precision)
    if any(b <= 0 for b in request.batches):
        raise ProgramError(f"--batch sizes must be positive, got {list(request.batches)}")
    check_folder_name(request.name)
    check_output_folder(Path(request.out))
    ensure_replaceable(Path(request.out) / request.folder_name())


MIN_FREE_BYTES = 256 * 2 ** 20  # a build writes records, gzipped HLO and a report: tens of MB for base


def check_output_folder(out: Path) -> None:
    """--out must be (or be creatable as) a writable folder with room, checked before the
    first unit compiles rather than after minutes of compiling."""
    here = Path(out).absolute()
    while not here.exists() and here != here.parent:
        here = here.parent
    if not here.is_dir():
        raise ProgramError(f"--out {out}: {here} is a file, not a folder; choose a folder")
    if not os.access(here, os.W_OK | os.X_OK):
        raise ProgramError(f"--out {out}: {here} is not writable; choose a writable folder")
    free = shutil.disk_usage(here).free
    if free < MIN_FREE_BYTES:
        raise ProgramError(f"--out {out}: only {free / 2 ** 20:.0f} MiB free on that disk; a build needs at least "
                           f"{MIN_FREE_BYTES / 2 ** 20:.0f} MiB: free some space or choose another --out")


def config_hash(cfg: BlipConfig) -> str:
    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def units(request: BuildRequest, cfg: BlipConfig, plans: list[ShardingPlan]) -> list[Unit]:
    mesh = f"{request.mesh[0]}x{request.mesh[1]}"
    options = asdict(request.options)
    return [Unit(request.target, mesh, request.model_name(), config_hash(cfg), entry, plan.name, precision, batch,
                 options)
            for entry in request.entries for plan in plans for precision in request.precisions
            for batch in request.batches]


@contextlib.contextmanager
def interrupt_between_units() -> Iterator[dict]:
    """The first Ctrl-C becomes a request honoured between units; a second one interrupts
    at once. (A KeyboardInterrupt that lands in a garbage-collection callback, such as
    XLA's, is printed and swallowed by Python, so a plain Ctrl-C could be lost.)"""
    state = {"requested": False}
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def handler(signum, frame):
        if state["requested"]:
            signal.default_int_handler(signum, frame)
        state["requested"] = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield state
    finally:
        signal.signal(signal.SIGINT, previous)


# Written into every folder the tool creates; a folder is only ever replaced if it holds
# this marker (or, from before the marker, a build's build.json or a bundle's manifest.json).
MARKER = ".capibara-export"
_LEGACY_SIGNS = ("build.json", "manifest.json")


def ensure_replaceable(final: Path, flag: str = "--out/--name") -> None:
    """Refuse, before any work, to replace a folder the tool did not write."""
    final = Path(final)
    if not os.path.lexists(final):
        return
    if final.is_symlink() or not final.is_dir():
        raise ProgramError(f"{final}: exists and is not a folder capibara-export wrote; refusing to replace it: "
                           f"choose another {flag}")
    if not any((final / sign).is_file() for sign in (MARKER, *_LEGACY_SIGNS)):
        raise ProgramError(f"{final}: exists and was not written by capibara-export; refusing to replace it: "
                           f"choose another {flag}, or remove it yourself")


def check_folder_name(name: str | None) -> None:
    """`--name` becomes one folder inside --out: one plain path component."""
    if name is None:
        return
    if (not name or name in (".", "..") or name.startswith(".") or any(c in name for c in "/\\\0")
            or len(name) > 200):
        raise ProgramError(f"--name {name!r}: must be one folder name (no '/', not '.' or '..', not hidden), "
                           "e.g. --name base-v4-32-run2")


@contextlib.contextmanager
def staged_folder(final: Path) -> Iterator[Path]:
    """A temporary sibling folder that replaces `final` only if the block completes, and
    only if `final` is absent or a folder this tool wrote (ensure_replaceable)."""
    ensure_replaceable(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    (tmp / MARKER).write_text("written by capibara-export; this folder may be replaced by the next run\n")
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.parent / f".old-{final.name}-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


ProgressFn = Callable[[int, int, Unit, CompileRecord | None], None]
ExecutableSource = Callable[[str], "tuple[bytes, str] | None"]


def serialized(fresh: Compiled, unit_id: str) -> tuple[bytes, str] | None:
    """A unit's executable as the bundle stores it, or None if it cannot be serialized (then
    an export compiles it again and reports the reason there, where it matters)."""
    from .export import executables

    try:
        return executables.serialize(fresh.executable, unit_id)
    except Exception:  # noqa: BLE001 - keeping the executable is an optimisation, never a build failure
        return None


def kept_executables(folder: Path, compiled: dict[str, Compiled] | None = None) -> ExecutableSource:
    """Where an export finds a build's executables without compiling: the ones compiled in
    this process (`compiled`), then the build's result cache (by each record's cache key)."""
    build = json.loads((Path(folder) / "build.json").read_text())
    request = build["request"]
    cache = ResultCache(Path(request["out"]) / ".cache", enabled=bool(request.get("use_cache", True)))
    keys = {r.unit.id: r.cache_key for r in read_records(Path(folder) / "records.jsonl") if r.cache_key}
    compiled = compiled or {}

    def find(unit_id: str) -> tuple[bytes, str] | None:
        kept = cache.executable(keys[unit_id]) if unit_id in keys else None
        if kept is None and unit_id in compiled:  # a --no-cache build: serialize it now
            kept = serialized(compiled[unit_id], unit_id)
        return kept
    return find


def run_build(request: BuildRequest, progress: ProgressFn | None = None,
              finish: Callable[[Path, "BuildResult"], None] | None = None) -> BuildResult:
    """Compile (or read from cache) every unit and write the build folder.

    `progress(i, n, unit, record)` is called before (record None) and after each unit.
    `finish(staging_folder, result)` runs before the folder is renamed into place, so later
    stages (analysis, report, export) land in the same all-or-nothing folder.
    """
    started = time.perf_counter()
    validate(request)
    cfg = model_config(request)
    plans_by_name = load_plans(list(request.plan_files))
    plans = select_plans(plans_by_name, list(request.plans) or None)
    target = get_target(request.target)
    mesh = make_mesh(target, request.mesh)
    hardware = hardware_for(target, mesh)
    if hardware.name == "cpu-host":  # no datasheet for a host: measure it once per build
        hardware = calibrate_cpu(mesh.devices.size)
    mesh_info = describe(mesh)
    cache_root = Path(request.out) / ".cache"
    cache = ResultCache(cache_root, enabled=request.use_cache)

    todo = units(request, cfg, plans)
    records: list[CompileRecord] = []
    compiled: dict[str, Compiled] = {}
    texts: dict[str, dict[str, str]] = {}
    plan_of = {p.name: p for p in plans}
    with interrupt_between_units() as interrupt:
        for i, unit in enumerate(todo):
            if interrupt["requested"]:
                raise KeyboardInterrupt
            if progress:
                progress(i, len(todo), unit, None)
            plan = plan_of[unit.plan]
            key = cache_key(unit.to_dict(), cfg.to_dict(), plan.to_dict(), mesh_info)
            hit = cache.get(key)
            if hit is not None:
                record, unit_texts = hit
                record.cached = True
            else:
                record, fresh = compile_unit(cfg, unit, plan, mesh, hardware, request.options)
                record.cache_key, record.mesh = key, mesh_info
                unit_texts = {"hlo": fresh.hlo_text, "pre": fresh.pre_hlo_text} if fresh else {}
                kept = serialized(fresh, unit.id) if fresh and request.use_cache and record.status == "ok" else None
                cache.put(key, record, unit_texts, kept)
                if fresh:
                    compiled[unit.id] = fresh
            if unit_texts:
                texts[unit.id] = unit_texts
                record.hlo_file, record.pre_hlo_file = f"hlo/{unit.id}.hlo.gz", f"hlo/{unit.id}.pre.hlo.gz"
            records.append(record)
            if progress:
                progress(i + 1, len(todo), unit, record)
        if interrupt["requested"]:
            raise KeyboardInterrupt

    result = BuildResult(Path(request.out) / request.folder_name(), cfg, records, compiled, mesh, hardware,
                         {p.name: p for p in plans})
    with staged_folder(result.folder) as staging:
        (staging / "hlo").mkdir()
        for unit_id, unit_texts in texts.items():
            for name, text in unit_texts.items():
                suffix = "hlo.gz" if name == "hlo" else "pre.hlo.gz"
                (staging / "hlo" / f"{unit_id}.{suffix}").write_bytes(gzip.compress(text.encode(), compresslevel=6))
        write_records(staging / "records.jsonl", records)
        (staging / "build.json").write_text(json.dumps({
            "request": {**asdict(request), "out": str(request.out)},
            "model_config": cfg.to_dict(), "model_hash": config_hash(cfg),
            "target": asdict(target), "mesh": mesh_info, "hardware": asdict(hardware),
            "plans": {p.name: p.to_dict() for p in plans}, "toolchain": toolchain(),
        }, indent=2, default=str))
        result.seconds = time.perf_counter() - started
        if finish:
            finish(staging, result)
    return result

