"""The TPU compiler's own per-kernel cost estimates, read from optimized TPU HLO.

A deviceless TPU compile annotates each kernel it emits (fusions, convolutions, unfused
element-wise ops, copies) with `backend_config.window_config`:

  estimated_cycles   the whole kernel's cycles for one run, not one window iteration's:
                     a 4096^3 bf16 matmul on a v4 chip carries 596,564 cycles with
                     iteration_bounds [4, 5, 4] (80 iterations), and 2·4096^3 FLOPs at the
                     chip's 262,144 FLOP/cycle are 524,288 cycles: 88% of peak. Counted per
                     iteration it would be 45 ms, 70x the chip's peak time. An f32
                     exp·2+1 over 2^24 elements (128 MiB moved) carries 152,594 cycles:
                     0.92e12 B/s at 1.05 GHz, 77% of the 1.2e12 B/s HBM figure. Both
                     scale linearly with the work over 256..4096 (docs/measurements/
                     2026-12-07-libtpu-estimates-beside-the-roofline.md). Sure: measured on
                     twelve shapes; no public XLA source documents the field (the TPU backend
                     is closed).
  iteration_bounds   the kernel's window grid; does not multiply the cycles (above).
  cost_model_type    CLASSIC for the MXU (convolution) emitter's analytic model; INVALID for
                     every other kernel, which still carries a non-zero estimate (the
                     element-wise example above is INVALID): INVALID names the model that did
                     not run, not an absent estimate. A kernel counts as covered when its
                     estimated_cycles is positive, whatever its cost_model_type.
  ml_estimated_microseconds  0 on every kernel libtpu 0.0.42.1 emitted here (unused).

Collectives carry no estimate: their backend_config holds only the algorithm
(`collective_algorithm_config`: emitter, ring strategy). Neither does anything else a
deviceless compile returns: `cost_analysis()`'s `optimal_seconds` prices an all-reduce as
its HBM traffic (a 64 MiB f32 all-reduce over 8 v4 chips: 137 µs = 134 MB at 0.98e12 B/s,
where the ICI ring needs 0.87 ms), and libtpu's static LLO profiler
(`--xla_jf_dump_static_llo_profile_to`) aborts on v4 ("Dma latency model is currently only
supported on VF/VL/GF/GL") and gives an all-reduce 0 cycles on v5e. So the roofline's
collective term stays the only one, and it is unvalidated.

Cycles become seconds at the generation's clock (hardware.Hardware.clock_hz).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from .hardware import Hardware
from .hlo import COLLECTIVES, HloProgram, Kernel
from .roofline import KernelPricer

_WINDOW_CONFIG = re.compile(r'"window_config":(\{[^{}]*\})')   # its fields hold lists, never objects
TOP_DIFFERENCES = 5      # kernels listed per unit where the two models differ most
LISTED_NOT_COVERED = 8   # kernels without an estimate listed per unit (all are counted)


@dataclass(frozen=True)
class KernelEstimate:
    """One kernel's run count and the compiler's cycles for one run (0: not estimated)."""
    name: str
    opcode: str
    times: float
    cycles: float
    cost_model: str


@dataclass
class LibtpuEstimate:
    """The compiler's estimate of a program's kernels, loop-corrected, and what it leaves out."""
    kernels: list[KernelEstimate] = field(default_factory=list)
    collectives: list[tuple[str, str, float]] = field(default_factory=list)   # (name, opcode, times)

    @property
    def covered(self) -> list[KernelEstimate]:
        return [k for k in self.kernels if k.cycles > 0]

    @property
    def not_covered(self) -> list[KernelEstimate]:
        return [k for k in self.kernels if k.cycles <= 0]

    @property
    def cycles(self) -> float:
        """Cycles of one program call: each kernel's cycles times its runs."""
        return sum(k.cycles * k.times for k in self.kernels)


def window_config(attrs: str) -> dict | None:
    """An instruction's `backend_config.window_config`, parsed (None where it has none)."""
    found = _WINDOW_CONFIG.search(attrs)
    if not found:
        return None
    try:
        return json.loads(found.group(1))
    except ValueError:
        return None


def _cycles(config: dict) -> float:
    try:
        return max(float(config.get("estimated_cycles", 0) or 0), 0.0)
    except (TypeError, ValueError):
        return 0.0


def read_estimate(program: HloProgram, kernels: list[Kernel] | None = None) -> LibtpuEstimate:
    """Every kernel of one call (those hlo.HloProgram.kernel_profile prices, in its order,
    `kernels` when already profiled) with the compiler's cycles, and every collective."""
    out = LibtpuEstimate()
    by_name = {inst.name: inst for _, inst, _ in program.instructions()}
    for k in program.kernel_profile().kernels if kernels is None else kernels:
        inst = by_name[k.name]
        config = window_config(inst.attrs) or {}
        cost_model = str(config.get("cost_model_type", "none")).removeprefix("COST_MODEL_TYPE_")
        out.kernels.append(KernelEstimate(k.name, inst.opcode, k.times, _cycles(config), cost_model))
    for _, inst, times in program.instructions():
        if inst.opcode.removesuffix("-start") in COLLECTIVES and not inst.opcode.endswith("-done"):
            out.collectives.append((inst.name, inst.opcode, times))
    return out


def kernel_kind(k: Kernel) -> str:
    """Which unit of a TensorCore does the kernel's work: the MXU (a matmul), the VPU
    reducing (a reduce; the compiler's batch-1 matvecs are multiply-reduces), the VPU
    element-wise, or no arithmetic at all (copies, slices, layout changes)."""
    if k.matmul:
        return "matmul"
    if k.reduces:
        return "reduce"
    return "element-wise" if k.flops > 0 else "data movement"


def estimate_record(program: HloProgram, hardware: Hardware, compute_dtype: str, comm_s: float,
                    kernels: list[Kernel] | None = None) -> dict:
    """A unit's `libtpu_estimate`: the compiler's seconds for the kernels it estimates, what
    it leaves out, and the roofline's per-kernel price of the same kernels beside it.

    `compute_s` is the compiler's view of the whole compute part: its estimate where it has
    one, the roofline's price of the kernels it has none for. `latency_s` combines that with
    the roofline's communication term (the compiler estimates no collective) the way the
    roofline combines its own kernels: max, or sum where collectives do not overlap."""
    kernels = program.kernel_profile().kernels if kernels is None else kernels
    estimate = read_estimate(program, kernels)
    price = KernelPricer(hardware, compute_dtype)
    clock = hardware.clock_hz
    kinds: dict[str, dict] = {}
    rows, missing = [], []
    roofline_s = libtpu_s = not_covered_s = 0.0
    for k, e in zip(kernels, estimate.kernels):
        ours = price.seconds(k)
        if e.cycles <= 0:
            not_covered_s += k.times * ours
            missing.append((k.times * ours, e))
            continue
        theirs = e.cycles / clock
        roofline_s += k.times * ours
        libtpu_s += k.times * theirs
        kind = kernel_kind(k)
        row = kinds.setdefault(kind, {"kernels": 0, "roofline_s": 0.0, "libtpu_s": 0.0})
        row["kernels"] += 1
        row["roofline_s"] += k.times * ours
        row["libtpu_s"] += k.times * theirs
        rows.append({"kernel": k.name, "opcode": e.opcode, "kind": kind, "times": k.times, "cost_model": e.cost_model,
                     "flops": k.flops, "bytes": k.bytes, "roofline_s": ours, "libtpu_s": theirs})
    rows.sort(key=lambda r: -abs(r["libtpu_s"] - r["roofline_s"]) * r["times"])
    missing.sort(key=lambda m: -m[0])
    compute = libtpu_s + not_covered_s
    kinds_of_collectives: dict[str, int] = {}
    for _, opcode, _ in estimate.collectives:
        kinds_of_collectives[opcode] = kinds_of_collectives.get(opcode, 0) + 1
    return {
        "source": "compiled", "clock_hz": clock, "cycles": estimate.cycles, "seconds": libtpu_s,
        "kernels": len(kernels), "kernels_covered": len(estimate.covered),
        "kernels_not_covered": len(estimate.not_covered),
        "not_covered": [{"kernel": e.name, "opcode": e.opcode, "times": e.times, "roofline_s": t / e.times}
                        for t, e in missing[:LISTED_NOT_COVERED]],
        "not_covered_roofline_s": not_covered_s,
        "collectives_not_covered": len(estimate.collectives), "collectives_by_kind": kinds_of_collectives,
        "roofline_s": roofline_s, "ratio": libtpu_s / roofline_s if roofline_s else None,
        "compute_s": compute, "roofline_compute_s": roofline_s + not_covered_s,
        "latency_s": max(compute, comm_s) if hardware.overlaps_communication else compute + comm_s,
        "by_kind": kinds, "largest_differences": rows[:TOP_DIFFERENCES],
    }
