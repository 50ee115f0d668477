"""Hardware constants, per device as JAX sees it: the one table the roofline reads.

Figures from ../shared/REFERENCE.md ("Hardware" table), which cites Google's TPU v4/v5e
docs, the jax-ml scaling-book, and measurements on the lent H100/H200 machines. A CPU
host has no fixed figures; its entry is filled by a short calibration when asked for
(analysis/calibration.py, which also measures a local GPU's overheads), and says so in its
`source` and `calibration`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

GiB = 1024 ** 3
MEMORY_FRACTION = 0.9  # the seed's memory budget: a unit fits if its peak stays under 90% of HBM


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_bf16_flops: float      # FLOP/s per device, dense bf16 matmul
    peak_fp32_flops: float      # FLOP/s per device for f32 matmuls at JAX's default precision
    hbm_bytes: int              # memory per device
    hbm_bandwidth: float        # B/s per device
    ici_link_bandwidth: float   # one-way B/s per link (0: no interconnect)
    ici_hop_latency: float      # seconds per hop (the α of the α–β model)
    torus_dims: int             # 3 for v4, 2 for v5e, 0 for none
    source: str
    # False where a collective stalls every device until all arrive (the simulated CPU mesh:
    # 32 devices share 2 cores and rendezvous in host memory), so it adds to the compute
    # and memory time instead of hiding under it.
    overlaps_communication: bool = True
    # Between slices (multi-slice meshes): the data-centre network, per device. The jax-ml
    # scaling-book ("How to think about TPUs", TPU specs) gives DCN egress as ~6.25e9 B/s per
    # TPU chip and 3.125e9 for v5e; its per-hop latency is not published: 1e-5 s (a
    # datacentre round trip's order) is an assumption, and every DCN figure is unvalidated.
    dcn_bandwidth: float = 0.0
    dcn_latency: float = 0.0
    # What the per-kernel cost model adds to the peaks (analysis/calibration.py measures them
    # for a CPU host and a local GPU; 0 means "no figure": the peak is used, no overhead):
    achieved_bf16_flops: float = 0.0   # a model-sized GEMM's rate, FLOP/s per device
    achieved_fp32_flops: float = 0.0
    achieved_bandwidth: float = 0.0    # a large copy's rate (read + write), B/s per device
    transpose_bandwidth: float = 0.0   # an element-gathering transpose's rate (0: as achieved_bandwidth)
    matmul_bandwidth: float = 0.0      # a memory-bound (skinny) GEMM's rate, bytes (0: as achieved_bandwidth)
    # GEMM rate by size: (FLOPs of one GEMM, f32 FLOP/s, bf16 FLOP/s) points, smallest first;
    # a matmul kernel's FLOPs take the rate interpolated for its size (empty: the one rate above)
    gemm_rates: tuple = ()
    kernel_overhead: float = 0.0       # seconds per kernel launch beyond its work
    loop_overhead: float = 0.0         # seconds per while-loop iteration beyond its kernels
    call_overhead: float = 0.0         # seconds per program call (dispatch), once
    # Collectives beyond the α–β terms (calibration.py measures both on a CPU host, where a
    # collective is a rendezvous of the device threads that share the cores):
    collective_overhead: float = 0.0   # seconds per collective, whatever its group size
    all_reduce_latency_factor: float = 2.0  # an all-reduce's latency in all-gathers' (a ring: 2)
    calibration: str = "none: peak figures, no per-kernel or per-iteration overhead"
    # The core clock, to turn the TPU compiler's per-kernel `estimated_cycles` into seconds
    # (analysis/libtpu_estimate.py); 0 where no compiler estimate is read (CPU, GPU)
    clock_hz: float = 0.0

    def peak_flops(self, compute_dtype: str) -> float:
        return self.peak_bf16_flops if compute_dtype == "bfloat16" else self.peak_fp32_flops

    def achievable_flops(self, compute_dtype: str) -> float:
        achieved = self.achieved_bf16_flops if compute_dtype == "bfloat16" else self.achieved_fp32_flops
        return achieved or self.peak_flops(compute_dtype)

    def __post_init__(self):  # a JSON cache gives lists: keep the entry hashable and comparable
        object.__setattr__(self, "gemm_rates", tuple(tuple(p) for p in self.gemm_rates))

    def gemm_rate(self, flops: float, compute_dtype: str) -> float:
        """FLOP/s for one matmul kernel of `flops`: log-log interpolation between the measured
        sizes, the end points beyond them (on the 2-core host's 32 simulated devices a 512^3
        GEMM ran at 1.6x a 256^3 one's rate)."""
        column = 2 if compute_dtype == "bfloat16" else 1
        points = [(p[0], p[column]) for p in self.gemm_rates if p[0] > 0 and p[column] > 0]
        if not points or flops <= 0:
            return self.achievable_flops(compute_dtype)
        if flops <= points[0][0]:
            return points[0][1]
        for (f0, r0), (f1, r1) in zip(points, points[1:]):
            if flops <= f1:
                w = math.log(flops / f0) / math.log(f1 / f0)
                return math.exp(math.log(r0) * (1 - w) + math.log(r1) * w)
        return points[-1][1]

    def achievable_bandwidth(self, transposes: bool = False, gemm: bool = False) -> float:
        """B/s per device for a kernel's bytes; a kernel that gathers single elements (a
        transpose that changes the innermost dimension) gets the measured transposing rate where
        there is one (XLA:CPU, attention-shaped: 0.6-0.9x a streaming add's), a GEMM
        (a matmul that is not matrix-vector) the measured skinny GEMM's (XLA:CPU: 1600x4x512
        or 8x768x3072 dots stream their bytes at 0.4-0.5x the add's rate)."""
        plain = self.achieved_bandwidth or self.hbm_bandwidth
        rates = [r for r, use in ((self.transpose_bandwidth, transposes), (self.matmul_bandwidth, gemm)) if use and r]
        return min(rates, default=plain)


# No TPU is reachable from here: TPU entries keep the published peaks. No per-kernel figure is
# published either; the per-kernel overhead is the floor of the TPU compiler's own estimates:
# over the 7,000 kernels of the default build that move under 200 KB, libtpu 0.0.42.1's
# `estimated_cycles` never go below ~610 cycles (median 0.59 µs, 10th percentile 0.58 µs at
# 1.05 GHz), where the roofline had 0 (docs/measurements/2026-12-07-libtpu-estimates-beside-
# the-roofline.md). No per-iteration figure (0: not modelled).
TPU_KERNEL_OVERHEAD = 5.8e-7
TPU_CALIBRATION = ("unvalidated: published peak FLOP/s and HBM bandwidth; per-kernel overhead 0.58 µs from the "
                   "floor of libtpu's own per-kernel estimates; no per-iteration overhead (no figure)")
# Clocks: v4 1050 MHz (Jouppi et al., "TPU v4", ISCA 2023, table 1; also 275e12 FLOP/s / (2 cores x
# 4 MXUs x 128x128 x 2)); v5e 1.5 GHz, from its 197e12 FLOP/s / (4 MXUs x 128x128 x 2) (Google
# publishes no v5e clock).
V4_CLOCK, V5E_CLOCK = 1.05e9, 1.5e9
# A v4 chip's matmul rate by size, from the TPU compiler's own MXU model (cost_model_type
# CLASSIC): n^3 matmuls, n = 256 .. 4096, compiled for one chip, their estimated cycles at 1.05
# GHz less the per-kernel overhead above (python -m tools.studies.libtpu_estimates). Where the
# roofline priced every matmul at the peak, the compiler gives a 256^3 one 8% of it and a 4096^3
# one 88%: no TPU was measured, but the emitter's model of the MXU pipeline is better founded
# than the peak for the small per-device matmuls that sharding makes.
V4_CHIP_GEMM_RATES = ((3.355e7, 2.301e13, 2.301e13), (2.684e8, 6.703e13, 6.703e13), (2.147e9, 1.450e14, 1.545e14),
                      (1.718e10, 2.172e14, 2.251e14), (1.374e11, 2.414e14, 2.422e14))

HARDWARE: dict[str, Hardware] = {h.name: h for h in (
    # TPU f32 matmuls at DEFAULT precision run as one bf16 MXU pass: same peak as bf16.
    Hardware("tpu-v4-tensorcore", 1.375e14, 1.375e14, 16 * GiB, 0.6e12, 4.5e10, 1e-6, 3,
             "REFERENCE.md: half of a TPU v4 chip (v4-32 default chip config, 2 devices per chip); "
             "DCN: scaling-book, half a chip's 6.25e9 B/s", dcn_bandwidth=3.125e9, dcn_latency=1e-5,
             kernel_overhead=TPU_KERNEL_OVERHEAD, calibration=TPU_CALIBRATION, clock_hz=V4_CLOCK),
    Hardware("tpu-v4-chip", 2.75e14, 2.75e14, 32 * GiB, 1.2e12, 4.5e10, 1e-6, 3,
             "REFERENCE.md: TPU v4 chip in megacore mode (Google TPU v4 docs, scaling-book); "
             "DCN: scaling-book, 6.25e9 B/s per chip", dcn_bandwidth=6.25e9, dcn_latency=1e-5,
             kernel_overhead=TPU_KERNEL_OVERHEAD, gemm_rates=V4_CHIP_GEMM_RATES, clock_hz=V4_CLOCK,
             calibration=TPU_CALIBRATION + "; matmul rate by size from libtpu's own MXU model"),
    Hardware("tpu-v5e-chip", 1.97e14, 1.97e14, 16 * GiB, 8.1e11, 4.5e10, 1e-6, 2,
             "REFERENCE.md: TPU v5e chip (Google TPU v5e docs); DCN: scaling-book, 3.125e9 B/s per chip",
             dcn_bandwidth=3.125e9, dcn_latency=1e-5, kernel_overhead=TPU_KERNEL_OVERHEAD,
             calibration=TPU_CALIBRATION, clock_hz=V5E_CLOCK),
    # GPU f32 matmuls use TF32 by default in XLA: about half the bf16 dense rate.
    Hardware("nvidia-h100", 7.9e14, 3.95e14, 80 * GiB, 3.0e12, 0.0, 0.0, 0,
             "REFERENCE.md: measured on the lent H100 (8192^3 bf16 matmul, D2D copy)"),
    Hardware("nvidia-h200", 7.9e14, 3.95e14, 141 * GiB, 4.3e12, 0.0, 0.0, 0,
             "REFERENCE.md: measured on the lent H200"),
)}

def host_memory_bytes() -> int:
    """This host's physical memory (what the simulated devices share)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):  # not a POSIX host: the figure this project was measured on
        return 24 * GiB


def host_available_bytes() -> int:
    """Memory a new allocation can take now (MemAvailable), or the physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return host_memory_bytes()


# The simulated host mesh shares one host's cores and memory among all its devices.
CPU_PLACEHOLDER = Hardware("cpu-host", 0.0, 0.0, host_memory_bytes(), 0.0, 0.0, 0.0, 0, "uncalibrated")


def for_device_kind(kind: str) -> Hardware | None:
    """The table entry for a device kind string as JAX reports it (GPU names vary)."""
    k = kind.lower()
    if "h200" in k:
        return HARDWARE["nvidia-h200"]
    if "h100" in k:
        return HARDWARE["nvidia-h100"]
    return None
