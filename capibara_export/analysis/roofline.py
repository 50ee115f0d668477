"""Roofline latency model for one compiled unit (per device; every figure is `model`).

    compute  = F / P              F: loop-corrected FLOPs per device (optimized HLO),
                                  P: the device's peak FLOP/s for the compute dtype
    memory   = B / W_hbm          B: loop-corrected bytes accessed per device
    comm     = Σ_axes Σ_c t(c)    over the collectives c on each mesh axis, with the
                                  α–β model of the jax-ml scaling-book / Alpa:
        all-gather, reduce-scatter   t = V·(n−1)/n / W + α·(n−1)
        all-reduce                   t = 2·V·(n−1)/n / W + r·α·(n−1)    (r = 2 for a ring)
        all-to-all                   t = V·(n−1)/n / (4·W) + α·(n−1)
        collective-permute           t = V / W + α
      V: bytes per device, n: group size, α: per-hop latency (~1 µs); on the simulated CPU
      mesh each collective also costs a measured fixed rendezvous time, and r is measured.
      W: one-way ICI link bandwidth times the number of torus dimensions the group spans
      (a group over x, y and z drives three links at once). TPU slices smaller than a
      full cube (v4 under 4x4x4, v5e under 16x16) have no wraparound links, so rings run
      one way: W uses one link's one-way figure per dimension, not twice it. On a host
      CPU, collectives are memory copies: W is the host memory bandwidth share of a device.
      Across slices (a collective whose group spans the `dcn` axis) the algorithm is
      hierarchical: the ICI part runs over the group's devices within a slice (V, n/s), and
      the DCN part moves `Collective.dcn_bytes` per device at the DCN bandwidth per device,
      with α_dcn per slice hop: t_dcn = dcn_bytes / W_dcn + α_dcn·(s−1). Its time is
      booked under the axis "dcn" (DCN constants are unvalidated: hardware.py).
    latency  = max(compute, memory, comm): the binding term is named. Overlap is
               assumed perfect, so this is a lower bound. Where the hardware says
               collectives do not overlap (the simulated CPU mesh, whose α is measured
               by calibration.py), latency = max(compute, memory) + comm.

With the program's kernel profile (hlo.HloProgram.kernel_profile) the compute and memory
part is priced per kernel instead of for the program as a whole:

    kernels  = call + Σ_k times_k · (κ + max(F_k / P', B_k / W')) + iterations · λ

where P' and W' are the achievable GEMM rate (a matmul kernel's at its size, where the
calibration measured several) and copy bandwidth (a transposing kernel's
W' is the measured transposing copy's, a GEMM's that is not matrix-vector the measured
skinny GEMM's, where there is one: XLA:CPU moves a few-row or thin GEMM's bytes at 0.4-0.5x
an add's rate) and κ, λ and call the
per-kernel, per-loop-iteration and per-call overheads (calibration.py measures all five on
a CPU host and a local GPU; TPU entries have the published peaks, κ from the floor of
the TPU compiler's own per-kernel estimates (hardware.TPU_KERNEL_OVERHEAD) and no other
overhead). A
kernel that is memory-bound no longer hides under another that is compute-bound, and a
batch-1 decode of thousands of tiny kernels costs what its launches cost. Then
latency = max(kernels, comm), or kernels + comm where collectives do not overlap, and
the binding term is the largest of compute, memory, overhead (κ, λ and call summed) and
communication.
    MFU      = (model FLOPs / devices) / (latency · P): useful work only, so replicated
               or redundant compute lowers it.

Constants come from hardware.HARDWARE (../shared/REFERENCE.md). The TPU compiler's own
`optimal_seconds` is reported beside this only when it is positive: for several f32 and
2-D plans libtpu 0.0.42.1 returned large negative numbers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from .collectives import Collective, dims_spanned
from .hardware import Hardware
from .hlo import Kernel, KernelProfile


@dataclass
class Roofline:
    compute_s: float
    memory_s: float
    comm_s: float
    comm_s_by_axis: dict[str, float]
    latency_s: float
    binding: str
    mfu: float
    peak_flops: float
    link_bandwidth: float
    compiler_optimal_s: float | None = None
    overhead_s: float = 0.0          # launches, loop iterations and the call (per-kernel model only)
    kernels: float = 0.0             # kernel launches per call (per-kernel model only)

    def to_dict(self) -> dict:
        return {"source": "model", **asdict(self)}


def collective_seconds(c: Collective, bandwidth: float, hop_latency: float, overhead: float = 0.0,
                       all_reduce_factor: float = 2.0) -> float:
    """One collective's seconds per run: α–β plus a fixed `overhead` per collective (0 on
    TPU and GPU entries; measured for the simulated CPU mesh, calibration.py). An
    all-reduce's latency is `all_reduce_factor` all-gathers' (2 for a ring's reduce-scatter
    then all-gather; about 1 for the CPU's single rendezvous, measured)."""
    n = max(c.group_size, 1)
    if c.axis == "none" or n <= 1 or bandwidth <= 0:
        return 0.0
    frac = (n - 1) / n
    if c.kind == "all-reduce":
        t = 2 * c.bytes * frac / bandwidth + all_reduce_factor * hop_latency * (n - 1)
    elif c.kind == "all-to-all":
        t = c.bytes * frac / (4 * bandwidth) + hop_latency * (n - 1)
    elif c.kind == "collective-permute":
        t = c.bytes / bandwidth + hop_latency
    else:  # all-gather, reduce-scatter
        t = c.bytes * frac / bandwidth + hop_latency * (n - 1)
    return (t + overhead) * c.times


def dcn_seconds(c: Collective, hardware: Hardware) -> float:
    """The DCN part of a collective that spans slices (0 when DCN has no figure)."""
    if c.slices_spanned <= 1 or hardware.dcn_bandwidth <= 0:
        return 0.0
    hops = 1 if c.kind == "collective-permute" else (c.slices_spanned - 1) * (2 if c.kind == "all-reduce" else 1)
    return c.dcn_bytes / hardware.dcn_bandwidth + hardware.dcn_latency * hops * c.times


def collective_times(c: Collective, hardware: Hardware, coords: list[list[int]] | None = None) -> dict[str, float]:
    """One collective's modelled seconds per run, by the axis they are booked under (its
    ICI axes, and "dcn" for the part between slices); empty when it costs nothing."""
    link = hardware.ici_link_bandwidth or hardware.hbm_bandwidth
    width = dims_spanned(c, coords or []) if hardware.ici_link_bandwidth else 1
    s = c.slices_spanned
    if s > 1:  # the ICI part: the same collective within one slice
        ici_axes = "+".join(a for a in c.axis.split("+") if a != "dcn") or "none"
        c_ici = replace(c, group_size=max(c.group_size // s, 1), axis=ici_axes, slices_spanned=1)
    else:
        c_ici = c
    out = {}
    t = collective_seconds(c_ici, link * width, hardware.ici_hop_latency, hardware.collective_overhead,
                           hardware.all_reduce_latency_factor)
    if t:
        out[c_ici.axis] = t
    if s > 1:
        out["dcn"] = out.get("dcn", 0.0) + dcn_seconds(c, hardware)
    return out


def roofline(flops: float, bytes_accessed: float, found: list[Collective], hardware: Hardware, compute_dtype: str,
             model_flops: float, num_devices: int, compiler_optimal: float | None = None,
             coords: list[list[int]] | None = None, profile: KernelProfile | None = None) -> Roofline:
    peak = hardware.peak_flops(compute_dtype)
    link = hardware.ici_link_bandwidth or hardware.hbm_bandwidth
    by_axis: dict[str, float] = {}
    for c in found:
        for axis, t in collective_times(c, hardware, coords).items():
            by_axis[axis] = by_axis.get(axis, 0.0) + t
    comm = sum(by_axis.values())
    if profile is None:
        compute = flops / peak if peak else 0.0
        memory = bytes_accessed / hardware.hbm_bandwidth if hardware.hbm_bandwidth else 0.0
        overhead, launches, work = 0.0, 0.0, max(compute, memory)
    else:
        compute, memory, overhead, work, launches = _per_kernel(profile, hardware, compute_dtype)
    terms = {"compute": compute, "memory": memory, "overhead": overhead, "communication": comm}
    binding = max(terms, key=terms.get)
    latency = max(work, comm) if hardware.overlaps_communication else work + comm
    mfu = (model_flops / num_devices) / (latency * peak) if latency > 0 and peak else 0.0
    optimal = compiler_optimal if compiler_optimal is not None and compiler_optimal > 0 else None
    return Roofline(compute, memory, comm, by_axis, latency, binding, mfu, peak, link, optimal, overhead, launches)


class KernelPricer:
    """The per-kernel model's price of one kernel: (compute, memory) seconds for one run at
    the achievable rates (the kernel overhead κ is added by the caller, once per launch)."""

    def __init__(self, hardware: Hardware, compute_dtype: str):
        self.hardware, self.compute_dtype = hardware, compute_dtype
        self.rate = hardware.achievable_flops(compute_dtype)
        self.bandwidth = {(t, gemm): hardware.achievable_bandwidth(t, gemm) for t in (False, True)
                          for gemm in (False, True)}

    def __call__(self, k: Kernel) -> tuple[float, float]:
        p = self.hardware.gemm_rate(k.flops, self.compute_dtype) if k.matmul else self.rate
        w = self.bandwidth[k.transposes, k.matmul and not k.matvec]
        return (k.flops / p if p else 0.0), (k.bytes / w if w else 0.0)

    def seconds(self, k: Kernel) -> float:
        """One run of the kernel, its launch overhead included."""
        return self.hardware.kernel_overhead + max(self(k))


def _per_kernel(profile: KernelProfile, hardware: Hardware, compute_dtype: str) -> tuple[float, ...]:
    """(compute, memory, overhead, total) seconds of the kernels and the launch count."""
    price = KernelPricer(hardware, compute_dtype)
    compute = memory = work = 0.0
    for k in profile.kernels:
        c, m = price(k)
        compute += k.times * c
        memory += k.times * m
        work += k.times * max(c, m)
    launches = profile.launches
    overhead = (hardware.call_overhead + launches * hardware.kernel_overhead
                + profile.iterations * hardware.loop_overhead)
    return compute, memory, overhead, work + overhead, launches
