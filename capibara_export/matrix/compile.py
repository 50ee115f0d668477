"""Compile one unit: check the plan, lower, compile, and record what the program is.

The program compiled is the unit's serving function (flat parameter dict first, the
calling convention every bundle format shares), so the executable a build compiles is the
one an export writes: `build --export` and `export` never compile a selected unit again.

Every outcome is a record, never an exception: a plan that does not divide is `invalid`
with its reason, a program over the memory budget is `does-not-fit` with the bytes it
needs, and a compiler failure is `compile-error` with the compiler's first line.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from sharding.plans import ShardingPlan
from sharding.precision import get_policy
from sharding.validity import check

from .. import compiler_options, families
from ..analysis.hardware import MEMORY_FRACTION, GiB, Hardware
from . import executable_format
from .programs import Program, ProgramError, ProgramOptions, in_specs
from .records import CompileRecord, Unit
from .serving import serving_function, sharded_jit


@dataclass
class Compiled:
    """What a successful compile leaves behind besides the record."""
    program: Program
    executable: jax.stages.Compiled
    hlo_text: str            # optimized, per device (after SPMD partitioning)
    pre_hlo_text: str        # before optimization: global shapes, the model's own FLOPs


def argument_bytes(program: Program, plan: ShardingPlan, mesh, argument_total: int) -> dict:
    """Per-device argument bytes split into parameters and other inputs. Inputs come from
    their shardings; parameters are the rest of the compiler's argument size, since jit
    drops parameters an entry does not use (encode_image never reads the text towers).
    For train_step "params" includes the optimizer state."""
    inputs = 0
    for names, arg, specs in zip(program.arg_names, program.args, in_specs(program, plan)):
        if isinstance(names, str):  # "params" / "opt_state": parameter-sized, counted below
            continue
        for leaf, spec in zip(jax.tree.leaves(arg), jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))):
            shard = NamedSharding(mesh, spec).shard_shape(tuple(leaf.shape))
            inputs += int(np.prod(shard, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return {"params": max(argument_total - inputs, 0), "inputs": inputs}


def memory_stats(executable: jax.stages.Compiled) -> dict | None:
    stats = executable.memory_analysis()
    if stats is None:
        return None
    out = {name: int(getattr(stats, f"{name}_size_in_bytes"))
           for name in ("argument", "output", "alias", "temp", "generated_code")}
    reported_peak = int(getattr(stats, "peak_memory_in_bytes", 0) or 0)
    derived = out["argument"] + out["output"] - out["alias"] + out["temp"] + out["generated_code"]
    out["peak"] = reported_peak if reported_peak > 0 else derived
    out["peak_source"] = "peak_memory_in_bytes" if reported_peak > 0 else "arguments+outputs-aliased+temp+code"
    return out


def cost_stats(executable: jax.stages.Compiled) -> dict | None:
    cost = executable.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost:
        return None
    return {k: float(v) for k, v in cost.items() if isinstance(v, (int, float))}


# XLA's text records each op's Python call stack: tables of file names, functions and
# frames after the module header, and a stack_frame_id in each op's metadata. The stack runs
# through whoever called the compiler (the CLI, a build worker, a test) and the checkout's
# absolute path, so the same program would hash differently by who compiled it and where.
# The build folder keeps the text without them (the op_name scopes the analysis reads stay).
_STACK_TABLE = re.compile(r"^(?:FileNames|FunctionNames|FileLocations|StackFrames)\n(?:\d+ [^\n]*\n)*\n?", re.M)
_STACK_ID = re.compile(r"\s*stack_frame_id=\d+")


def without_python_stacks(hlo_text: str) -> str:
    return _STACK_ID.sub("", _STACK_TABLE.sub("", hlo_text)).replace(", metadata={}", "")


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def fits(memory: dict, hardware: Hardware) -> tuple[bool, str]:
    budget = hardware.hbm_bytes * MEMORY_FRACTION
    if memory["peak"] <= budget:
        return True, ""
    return False, (f"needs {_gib(memory['peak'])} of {_gib(hardware.hbm_bytes)} per device "
                   f"(budget {_gib(budget)} at memory_fraction {MEMORY_FRACTION})")


_OOM = re.compile(r"RESOURCE_EXHAUSTED|[Rr]an out of memory|exceeds the .*memory|Out of memory")
# "... required for HLO temporaries (24.44G) exceeds available HBM (15.25G)."
_OOM_SIZES = re.compile(r"\(([\d.]+)([KMGT])\)\s*exceeds available HBM\s*\(([\d.]+)([KMGT])\)")
_UNIT = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4}


def out_of_memory_reason(message: str) -> tuple[str, int | None]:
    """The compiler's out-of-memory message as "needs X GiB of Y GiB", and the bytes needed."""
    match = _OOM_SIZES.search(message)
    if not match:
        return message, None
    need = float(match[1]) * _UNIT[match[2]]
    have = float(match[3]) * _UNIT[match[4]]
    return f"needs {_gib(need)} of {_gib(have)} per device (TPU compiler: {message})", int(need)


def compile_unit(cfg, unit: Unit, plan: ShardingPlan, mesh, hardware: Hardware,
                 options: ProgramOptions) -> tuple[CompileRecord, Compiled | None]:
    record = CompileRecord(unit=unit, status="invalid", plan_description=plan.description, hardware=hardware.name)
    try:
        serving = serving_function(cfg, unit.entry, get_policy(unit.precision), unit.batch, options)
        program = serving.program
    except ProgramError as err:
        record.reason = str(err)
        return record, None
    record.analytic_flops = int(program.analytic_flops)
    family = families.for_config(cfg)
    validity = check(plan, family.logical_names(cfg), family.abstract_params(cfg), program.axis_sizes,
                     dict(mesh.shape), family.name, family.scopes, family.logical_axes)
    if not validity.ok:
        record.reason = validity.reason
        return record, None

    t0 = time.perf_counter()
    try:
        _, lower, abstract = sharded_jit(serving, plan, mesh)
        lowered = lower(*abstract)
        t1 = time.perf_counter()
        executable = lowered.compile(compiler_options=compiler_options.for_devices(mesh.devices.flat))
    except Exception as err:  # XLA reports every failure as an exception; the record keeps its first line
        message = (str(err).strip().splitlines() or [type(err).__name__])[0][:500]
        if _OOM.search(message):
            record.status = "does-not-fit"
            record.reason, record.needed_bytes = out_of_memory_reason(message)
        else:
            record.status, record.reason = "compile-error", message
        return record, None
    t2 = time.perf_counter()
    record.lower_s, record.compile_s = round(t1 - t0, 3), round(t2 - t1, 3)
    record.memory = memory_stats(executable)
    if record.memory is not None:
        record.memory["arguments_by_kind"] = argument_bytes(program, plan, mesh, record.memory["argument"])
    record.cost = cost_stats(executable)
    hlo_text = without_python_stacks(executable.as_text())
    record.hlo_sha256 = hashlib.sha256(hlo_text.encode()).hexdigest()
    record.status = "ok"
    if record.memory is not None:
        ok, why = fits(record.memory, hardware)
        if not ok:
            record.status, record.reason, record.needed_bytes = "does-not-fit", why, record.memory["peak"]
    return record, Compiled(program, executable, hlo_text, without_python_stacks(lowered.as_text(dialect="hlo")))


def serialized(fresh: Compiled, unit_id: str) -> tuple[bytes, str] | None:
    """A unit's executable as the bundle stores it, or None if it cannot be serialized (then
    an export compiles it again and reports the reason there, where it matters)."""
    try:
        return executable_format.serialize(fresh.executable, unit_id)
    except Exception:  # noqa: BLE001 - keeping the executable is an optimisation, never a build failure
        return None
