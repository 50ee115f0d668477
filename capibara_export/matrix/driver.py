"""The compile matrix: every (entry × plan × precision × batch) unit for one target and mesh.

A build reads each unit from the result cache or compiles it, writes every result to the
cache as soon as it exists (so Ctrl-C loses at most the unit in flight), and assembles
the build folder under a temporary name that is renamed into place only when complete.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from jax.sharding import Mesh

from modelapi.family import ModelFamily
from sharding.plans import ShardingPlan, load_plans, select_plans
from sharding.precision import DEFAULT_PRECISIONS, get_policy

from .. import families, interrupts
from ..analysis.calibration import calibrated
from ..analysis.hardware import Hardware
from .cache import DerivedCache, ResultCache, cache_key
from .compile import Compiled, compile_unit, serialized
from .programs import ProgramError, ProgramOptions
from .records import CompileRecord, Unit, toolchain, write_records
from .staging import check_folder_name, check_output_folder, ensure_replaceable, folder_lock, staged_folder
from .targets import DEFAULT_TARGET, Target, describe, get_target, hardware_for, make_mesh
from .workers import CompilePool, outcome, resolve_jobs

DEFAULT_OUT = Path("artifacts")
DEFAULT_BATCHES = (32,)


@dataclass(frozen=True)
class BuildRequest:
    """What a build compiles: the target and mesh, the model (a preset or a checkpoint, of a
    built-in family or of a user's `--model-module`), and the entries, plans, precisions and
    batch sizes of its matrix; where it writes and whether it may use the result cache; and
    how many rounds of hotspot-derived plans it adds."""
    target: str = DEFAULT_TARGET
    mesh: tuple[int, int] = (4, 8)
    model: str = "base"
    checkpoint: str | None = None
    entries: tuple[str, ...] = ()          # empty: the model family's serving entries
    plans: tuple[str, ...] = ()            # empty: every plan known (shipped + plan files)
    plan_files: tuple[str, ...] = ()
    precisions: tuple[str, ...] = ()       # empty: the default precisions the family offers
    batches: tuple[int, ...] = DEFAULT_BATCHES
    options: ProgramOptions = field(default_factory=ProgramOptions)
    out: Path = DEFAULT_OUT
    use_cache: bool = True
    name: str | None = None
    kernel_layout: str = "auto"            # text kernels: auto (the platform's serving layout), in-out, out-in
    layer_storage: str = "auto"            # all towers' layers: auto (the platform's choice), stacked, per-layer
    derive_rounds: int = 1                 # rounds of plans proposed by the hotspots (plan_search.py); 0: none
    derive_budget: int = 4                 # at most this many derived units in all rounds
    model_module: str | None = None        # package.module:ATTR, a modelapi.family.ModelFamily

    def family(self) -> ModelFamily:
        """The model family: the --model-module's, the checkpoint's, or the one with the preset."""
        if self.model_module:
            return families.load_module(self.model_module)
        if self.checkpoint:
            return families.for_checkpoint(self.checkpoint)
        return families.for_preset(self.model)

    def resolved(self) -> BuildRequest:
        """This request with the family's defaults written out (entries, precisions)."""
        family = self.family()
        return replace(self, entries=self.entries or family.serving_entries,
                       precisions=self.precisions or tuple(p for p in DEFAULT_PRECISIONS if p in family.precisions))

    def folder_name(self) -> str:
        """The build folder's name inside `out`: `--name`, else MODEL-TARGET-DATAxMODEL."""
        return self.name or f"{self.model_name()}-{get_target(self.target).name}-{self.mesh[0]}x{self.mesh[1]}"

    def model_name(self) -> str:
        """The checkpoint folder's name, or the preset's."""
        return Path(self.checkpoint).name if self.checkpoint else self.model


@dataclass
class BuildResult:
    """A finished build: its folder, the model config, every unit's record, the programs compiled
    in this run, the mesh, the hardware constants and the plans it used."""
    folder: Path
    config: object
    records: list[CompileRecord]
    compiled: dict[str, Compiled]           # units compiled in this run (not cache hits), by unit id
    mesh: object
    hardware: Hardware
    plans: dict[str, ShardingPlan]
    # serialized executables of the units workers compiled in a --no-cache build (no result cache holds them)
    kept: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    seconds: float = 0.0

    def counts(self) -> dict[str, int]:
        """How many units ended in each status (ok, invalid, failed, ...), and how many came from the cache."""
        out: dict[str, int] = {}
        for r in self.records:
            out[r.status] = out.get(r.status, 0) + 1
        out["cached"] = sum(r.cached for r in self.records)
        return out


def model_config(request: BuildRequest):
    """The preset, or the config.json of --checkpoint (whose weights must also be there), in
    the canonical layout, as checkpoints hold it."""
    family = request.family()
    if not request.checkpoint:
        return family.preset(request.model)
    if family.checkpoint_config is None:
        raise ProgramError(f"--checkpoint: model {family.name} loads no checkpoints; use a preset "
                           f"({', '.join(sorted(family.presets))}) with --random-weights")
    return family.checkpoint_config(request.checkpoint)


def program_config(request: BuildRequest, platform: str):
    """The model as this build's programs take it: `model_config` in the serving form of the
    devices it compiles for (BLIP: model/layout.py), with the kernel layout and layer storage
    the request names instead of `auto`."""
    chosen = lambda value: None if value == "auto" else value  # noqa: E731
    return request.family().for_platform(model_config(request), platform, chosen(request.kernel_layout),
                                         chosen(request.layer_storage))


def validate(request: BuildRequest) -> None:
    """Reject bad names before any compile: one clear error each."""
    family = request.family()
    for entry in request.entries:
        family.entry(entry)
    for precision in request.precisions:
        get_policy(precision)
        if precision not in family.precisions:
            raise ProgramError(f"--precision {precision}: model {family.name} offers "
                               f"{', '.join(family.precisions)}")
    if request.kernel_layout not in ("auto", *family.kernel_layouts):
        raise ProgramError(f"--kernel-layout {request.kernel_layout}: choose auto"
                           + "".join(f", {k}" for k in family.kernel_layouts))
    if request.layer_storage not in ("auto", *family.layer_storages):
        raise ProgramError(f"--layer-storage {request.layer_storage}: choose auto"
                           + "".join(f", {k}" for k in family.layer_storages))
    if any(b <= 0 for b in request.batches):
        raise ProgramError(f"--batch sizes must be positive, got {list(request.batches)}")
    check_folder_name(request.name)
    check_output_folder(Path(request.out))
    ensure_replaceable(Path(request.out) / request.folder_name())


def keyed_config(cfg) -> dict:
    """What names a config in hashes and cache keys: BLIP's dict as it always was (so its
    records and caches stay as they were), any other family's with the family's name, since
    two families' configs may be the same dict."""
    family = families.for_config(cfg)
    as_dict = family.config_to_dict(cfg)
    return as_dict if family is families.DEFAULT else {"family": family.name, "config": as_dict}


def config_hash(cfg) -> str:
    return hashlib.sha256(json.dumps(keyed_config(cfg), sort_keys=True).encode()).hexdigest()[:16]


def make_unit(request: BuildRequest, cfg, entry: str, plan: str, precision: str, batch: int) -> Unit:
    return Unit(request.target, f"{request.mesh[0]}x{request.mesh[1]}", request.model_name(), config_hash(cfg),
                entry, plan, precision, batch, asdict(request.options))


def units(request: BuildRequest, cfg, plans: list[ShardingPlan]) -> list[Unit]:
    return [make_unit(request, cfg, entry, plan.name, precision, batch)
            for entry in request.entries for plan in plans for precision in request.precisions
            for batch in request.batches]


ProgressFn = Callable[[int, int, Unit, CompileRecord | None], None]
ExecutableSource = Callable[[str], "tuple[bytes, str] | None"]


def kept_executables(folder: Path, compiled: dict[str, Compiled] | None = None,
                     kept: dict[str, tuple[bytes, str]] | None = None) -> ExecutableSource:
    """Where an export finds a build's executables without compiling: the build's result
    cache (by each record's cache key), then the ones compiled in this process (`compiled`)
    or serialized by its workers (`kept`)."""
    from .folder import read_build, read_records

    request = read_build(folder)["request"]
    cache = ResultCache(Path(request["out"]) / ".cache", enabled=request["use_cache"])
    keys = {r.unit.id: r.cache_key for r in read_records(folder) if r.cache_key}
    compiled = compiled or {}

    def find(unit_id: str) -> tuple[bytes, str] | None:
        found = cache.executable(keys[unit_id]) if unit_id in keys else None
        if found is None and unit_id in compiled:  # a --no-cache build: serialize it now
            found = serialized(compiled[unit_id], unit_id)
        return found if found is not None else (kept or {}).get(unit_id)
    return find


def run_build(request: BuildRequest, progress: ProgressFn | None = None,
              finish: Callable[[Path, BuildResult], None] | None = None, jobs: int | None = 1) -> BuildResult:
    """Compile (or read from cache) every unit and write the build folder.

    `progress(i, n, unit, record)` is called before (record None) and after each unit.
    `finish(staging_folder, result)` runs before the folder is renamed into place, so later
    stages (analysis, report, export) land in the same all-or-nothing folder.
    `jobs`: worker processes that compile (workers.py); None picks by target and unit count
    (the CLI's default), 1 compiles in this process. It changes no record's content, only how
    long a build takes. Workers are spawned processes: a script that calls this with jobs != 1
    needs the usual `if __name__ == "__main__":` guard (multiprocessing imports the script).
    """
    started = time.perf_counter()
    request = request.resolved()
    validate(request)
    if jobs is not None and jobs < 1:
        raise ProgramError(f"--jobs {jobs}: give a positive number of worker processes (1: compile in this process)")
    # the plans, the target and the mesh are accepted before anything is written: a refused
    # request leaves no folder and no lock file behind
    plans = select_plans(load_plans(list(request.plan_files)), list(request.plans) or None)
    target = get_target(request.target)
    mesh = make_mesh(target, request.mesh)
    plans = [p.for_mesh(tuple(mesh.axis_names)) for p in plans]  # a multi-slice mesh adds `dcn`
    cfg = program_config(request, mesh.devices.flat[0].platform)   # reads --checkpoint's config
    with folder_lock(Path(request.out) / request.folder_name()):
        return _build(request, plans, target, mesh, cfg, progress, finish, started, jobs)


def _build(request: BuildRequest, plans: list[ShardingPlan], target: Target, mesh: Mesh, cfg,
           progress: ProgressFn | None, finish: Callable[[Path, BuildResult], None] | None, started: float,
           jobs: int | None) -> BuildResult:
    # a CPU host or a local GPU is measured (once per machine, cached); TPU entries are published figures
    hardware = calibrated(hardware_for(target, mesh), list(mesh.devices.flat))
    mesh_info = describe(mesh, target)
    cache_root = Path(request.out) / ".cache"
    cache = ResultCache(cache_root, enabled=request.use_cache)
    cache.sweep()
    analyses = DerivedCache(cache_root, "analysis") if request.use_cache else None  # what workers analysed

    todo = units(request, cfg, plans)
    records: list[CompileRecord] = []
    compiled: dict[str, Compiled] = {}
    from_workers: dict[str, tuple[bytes, str]] = {}   # executables a worker compiled, for an uncached export
    texts: dict[str, dict[str, str]] = {}
    plan_of = {p.name: p for p in plans}
    platform = mesh.devices.flat[0].platform
    family = families.for_config(cfg)

    def compile_all(batch: list[Unit], origins: dict[str, dict] | None = None) -> None:
        keys = [cache_key(u.to_dict(), keyed_config(cfg), plan_of[u.plan].to_dict(), mesh_info, request.model_module)
                for u in batch]
        hits = [cache.get(key) for key in keys]
        misses = [(u, key) for u, key, hit in zip(batch, keys, hits) if hit is None]
        workers = resolve_jobs(jobs, platform, len(misses))
        if workers > 1:
            with CompilePool(workers, request.target, request.mesh, platform, mesh.devices.size, cfg,
                             hardware, request.options, request.model_module) as pool:
                pending = {u.id: pool.submit(u, plan_of[u.plan], key, mesh_info, (origins or {}).get(u.plan),
                                             analyses is not None) for u, key in misses}
                try:
                    collect(batch, keys, hits, origins, pending)
                except BaseException:  # Ctrl-C or an error: cache what the workers finished, then stop
                    for future in pending.values():
                        if future.done() and not future.cancelled() and future.exception() is None:
                            keep(*future.result())
                    raise
        else:
            collect(batch, keys, hits, origins, {})

    def keep(record: CompileRecord, unit_texts: dict[str, str], kept: tuple[bytes, str] | None,
             analysis: tuple[str, bytes] | None) -> tuple[CompileRecord, dict[str, str]]:
        """Store what a worker sent back: the result cache entry, the unit's analysis, and in
        an uncached build the executable (for `build --export`)."""
        cache.put(record.cache_key, record, unit_texts, kept)
        if analysis is not None and analyses is not None:
            analyses.put(analysis[0], "json", analysis[1])
        if kept is not None and not request.use_cache:
            from_workers[record.unit.id] = kept
        return record, unit_texts

    def collect(batch: list[Unit], keys: list[str], hits: list, origins: dict[str, dict] | None,
                pending: dict) -> None:
        done = len(records)
        total = done + len(batch)
        for i, (unit, key, hit) in enumerate(zip(batch, keys, hits), start=done):
            interrupts.check()
            if progress:
                progress(i, total, unit, None)
            if hit is not None:
                record, unit_texts = hit
                record.cached = True
            else:
                if unit.id in pending:
                    record, unit_texts = keep(*outcome(pending.pop(unit.id)))
                else:
                    record, fresh = compile_unit(cfg, unit, plan_of[unit.plan], mesh, hardware, request.options)
                    unit_texts = {"hlo": fresh.hlo_text, "pre": fresh.pre_hlo_text} if fresh else {}
                    kept = serialized(fresh, unit.id) if fresh and request.use_cache and record.status == "ok" else None
                    if fresh:
                        compiled[unit.id] = fresh
                    record.cache_key, record.mesh = key, mesh_info
                    cache.put(key, record, unit_texts, kept)
            record.origin = (origins or {}).get(unit.plan)
            if unit_texts:
                texts[unit.id] = unit_texts
                record.hlo_file, record.pre_hlo_file = f"hlo/{unit.id}.hlo.gz", f"hlo/{unit.id}.pre.hlo.gz"
            records.append(record)
            if progress:
                progress(i + 1, total, unit, record)

    def write(staging: Path) -> None:
        for unit_id in [u for u in texts if not (staging / "hlo" / f"{u}.hlo.gz").exists()]:
            for name, text in texts[unit_id].items():
                suffix = "hlo.gz" if name == "hlo" else "pre.hlo.gz"
                (staging / "hlo" / f"{unit_id}.{suffix}").write_bytes(gzip.compress(text.encode(), compresslevel=6))
        write_records(staging / "records.jsonl", records)
        (staging / "build.json").write_text(json.dumps({
            "request": {**asdict(request), "out": str(request.out)},
            "model_config": family.config_to_dict(cfg), "model_hash": config_hash(cfg),
            "model_family": family.name, "model_module": families.module_of(family),
            "target": asdict(target), "mesh": mesh_info, "hardware": asdict(hardware),
            "plans": {p.name: p.to_dict() for p in plan_of.values()}, "toolchain": toolchain(),
        }, indent=2, default=str))

    with interrupts.watched(defer=True):
        compile_all(todo)
        interrupts.check()

    result = BuildResult(Path(request.out) / request.folder_name(), cfg, records, compiled, mesh, hardware, plan_of,
                         from_workers)
    with staged_folder(result.folder) as staging:
        (staging / "hlo").mkdir()
        write(staging)
        budget = request.derive_budget
        for round_no in range(1, request.derive_rounds + 1):
            derived = derived_units(request, cfg, staging, hardware, plan_of, round_no, budget)
            if not derived:
                break
            with interrupts.watched(defer=True):
                compile_all([u for u, _ in derived], {u.plan: origin for u, origin in derived})
                interrupts.check()
            budget -= len(derived)
            write(staging)
        result.seconds = time.perf_counter() - started
        if finish:
            finish(staging, result)
    return result


def derived_units(request: BuildRequest, cfg, staging: Path, hardware: Hardware,
                  plan_of: dict[str, ShardingPlan], round_no: int, budget: int) -> list[tuple[Unit, dict]]:
    """The units of the plans the hotspots propose (plan_search.py), within the unit budget;
    each new plan is added to `plan_of`. Reads the analysis of what is compiled so far
    (kept in the derived cache, so the build's own analysis after this reads it back)."""
    from ..matrix.analyze import analyze_build
    from ..analysis.plan_search import propose

    cache_root = Path(request.out) / ".cache"
    cache = DerivedCache(cache_root, "analysis") if request.use_cache and cache_root.is_dir() else None
    analysis = analyze_build(staging, hardware, cache=cache)
    out: list[tuple[Unit, dict]] = []
    known = [p.for_mesh(tuple(analysis["build"]["mesh"]["axis_names"]))
             for p in load_plans(list(request.plan_files)).values()]
    for proposal in propose(analysis, plan_of, hardware, round_no, known, families.for_config(cfg).scopes):
        if len(out) + len(proposal.groups) > budget:
            continue
        plan_of[proposal.plan.name] = proposal.plan
        out += [(make_unit(request, cfg, entry, proposal.plan.name, precision, batch), proposal.origin)
                for entry, precision, batch in proposal.groups]
    return out

