"""Compile units in worker processes (`build --jobs N`).

Each worker is a fresh (spawned) Python process that sets up the same JAX environment as
the build's own process (JAX on the host CPU, libtpu shareable, the same number of
simulated CPU devices), makes the same mesh and compiles the units it is handed with the
same `compile_unit`. It sends back what the build keeps of a unit (the record, the HLO
texts and the serialized executable); the build's process alone writes the result cache
and the build folder, in the matrix's order, so a parallel build's records equal a
sequential one's except for timings (tests/test_build_jobs.py).

Why processes: the TPU compiler keeps ~1.6 of this host's 2 cores busy on one unit, and
tracing, lowering and serializing hold the GIL; two compile threads in one process gained
6% (docs/design.md), two processes 1.3x (docs/performance.md). Each worker costs a few
seconds to start (importing JAX, libtpu and the model), so `auto` uses them only for
enough TPU units to pay that back; a local GPU always compiles in the build's process
(workers would each claim the device).

concurrent.futures.ProcessPoolExecutor does the pooling; what is written here is the
worker set-up and the shutdown that stops in-flight compiles on Ctrl-C (the executor of
Python 3.11 has no way to stop a running task but to end its process).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from modelapi.errors import UserError
from sharding.plans import ShardingPlan

from ..analysis.hardware import Hardware
from .compile import compile_unit
from .folder import ordered_shape
from .programs import ProgramOptions
from .records import CompileRecord, Unit

# `auto` starts workers only when at least this many units per worker are to be compiled for a
# TPU target: a worker takes ~4 s to start here, a `base` unit 3-6 s to compile.
AUTO_MIN_UNITS_PER_WORKER = 4

Kept = tuple[CompileRecord, dict[str, str], "tuple[bytes, str] | None", "tuple[str, bytes] | None"]


def cores() -> int:
    """The cores this process may run on (its affinity mask, where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def auto_jobs(platform: str, units: int) -> int:
    """How many workers `--jobs auto` uses: the core count for TPU targets when there are
    enough units to compile, else none (compile in the build's process)."""
    if platform != "tpu":
        return 1
    return max(1, min(cores(), units // AUTO_MIN_UNITS_PER_WORKER))


def resolve_jobs(jobs: int | None, platform: str, units: int) -> int:
    """The number of worker processes for this many units to compile (1: none)."""
    if platform not in ("tpu", "cpu"):
        return 1   # a local GPU: each worker would claim the device
    if jobs is None:
        return auto_jobs(platform, units)
    return max(1, min(jobs, units))


class WorkerError(UserError):
    """A compile worker ended without sending its unit back (killed, or out of memory)."""


def outcome(future: Future) -> Kept:
    """A unit's result from its worker, or one clear error when the worker died."""
    try:
        return future.result()
    except BrokenProcessPool:
        raise WorkerError("a compile worker process ended without its result (killed, or out of memory: each "
                          "worker holds its own JAX and model); the units finished before it are cached: run the "
                          "same command with --jobs 1 to compile in this process") from None


_state: dict = {}


def _start_worker(target: str, mesh_shape: tuple[int, int], cpu_devices: int, cfg, hardware: Hardware,
                  options: ProgramOptions, model_module: str | None = None) -> None:
    # Ctrl-C reaches the whole process group; the build's process decides what it means
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from .. import environment

    environment.prepare(target, cpu_devices if cpu_devices else None)
    from .targets import get_target, make_mesh

    mesh = make_mesh(get_target(target), mesh_shape)
    if model_module:   # a user's family: registered here too, so its configs find it
        from .. import families
        families.load_module(model_module)
    _state.update(cfg=cfg, mesh=mesh, hardware=hardware, options=options)


def _compile(unit: Unit, plan: ShardingPlan, key: str, mesh_info: dict, origin: dict | None,
             analyse: bool) -> Kept:
    """Compile one unit; the executable comes back serialized (it cannot cross processes
    otherwise), for the result cache or, in an uncached build, for its export. With
    `analyse`, also the unit's analysis, keyed as the build's analysis will look it up
    (the record carries what the build's process would set on it), so that process
    parses no HLO: the parsing runs here, beside the other worker's compile."""
    from ..matrix.analyze import analyze_texts, encode_unit, unit_key
    from .compile import serialized

    hardware = _state["hardware"]
    record, fresh = compile_unit(_state["cfg"], unit, plan, _state["mesh"], hardware, _state["options"])
    record.cache_key, record.mesh, record.origin = key, mesh_info, origin
    texts = {"hlo": fresh.hlo_text, "pre": fresh.pre_hlo_text} if fresh else {}
    kept = serialized(fresh, unit.id) if fresh and record.status == "ok" else None
    analysis = None
    if analyse and record.status == "ok":
        analysis = (unit_key(record, hardware, ordered_shape(mesh_info), mesh_info.get("device_coords")),
                    encode_unit(analyze_texts(record, texts, hardware, mesh_info)))
    return record, texts, kept, analysis


class CompilePool:
    """`jobs` worker processes compiling units for one build's target, mesh and model."""

    def __init__(self, jobs: int, target: str, mesh_shape: tuple[int, int], mesh_platform: str,
                 cpu_devices: int, cfg, hardware: Hardware, options: ProgramOptions, model_module: str | None = None):
        self.jobs = jobs
        self._pool = ProcessPoolExecutor(
            max_workers=jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
            initargs=(target, mesh_shape, cpu_devices if mesh_platform == "cpu" else 0, cfg, hardware, options,
                      model_module))

    def submit(self, unit: Unit, plan: ShardingPlan, key: str, mesh_info: dict, origin: dict | None,
               analyse: bool) -> Future:
        """A future of (record, HLO texts, serialized executable or None, (analysis key,
        encoded analysis) or None)."""
        return self._pool.submit(_compile, unit, plan, key, mesh_info, origin, analyse)

    def close(self, finished: bool) -> None:
        """Wait for idle workers to exit; after an interruption or error, end the ones still
        compiling (their units are not cached, so the next build compiles them)."""
        processes = list(getattr(self._pool, "_processes", {}).values())
        if not finished:
            # Python 3.11's executor has no public way to stop running tasks (3.14 adds terminate_workers)
            for process in processes:
                process.terminate()
        self._pool.shutdown(wait=finished, cancel_futures=True)
        if not finished:   # the build exits only once its workers are gone (a test caught one outliving it)
            for process in processes:
                process.join(timeout=10)
                if process.is_alive():
                    process.kill()
                    process.join(timeout=5)

    def __enter__(self) -> CompilePool:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(finished=exc_type is None)
