"""Hardware constants, per device as JAX sees it: the one table the roofline reads.

Figures from ../shared/REFERENCE.md ("Hardware" table), which cites Google's TPU v4/v5e
docs, the jax-ml scaling-book, and measurements on the lent H100/H200 machines. A CPU
host has no fixed figures; its entry is filled by a short calibration when asked for
(`calibrate_cpu`), and says so in its `source`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace

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

    def peak_flops(self, compute_dtype: str) -> float:
        return self.peak_bf16_flops if compute_dtype == "bfloat16" else self.peak_fp32_flops


HARDWARE: dict[str, Hardware] = {h.name: h for h in (
    # TPU f32 matmuls at DEFAULT precision run as one bf16 MXU pass: same peak as bf16.
    Hardware("tpu-v4-tensorcore", 1.375e14, 1.375e14, 16 * GiB, 0.6e12, 4.5e10, 1e-6, 3,
             "REFERENCE.md: half of a TPU v4 chip (v4-32 default chip config, 2 devices per chip); "
             "DCN: scaling-book, half a chip's 6.25e9 B/s", dcn_bandwidth=3.125e9, dcn_latency=1e-5),
    Hardware("tpu-v4-chip", 2.75e14, 2.75e14, 32 * GiB, 1.2e12, 4.5e10, 1e-6, 3,
             "REFERENCE.md: TPU v4 chip in megacore mode (Google TPU v4 docs, scaling-book); "
             "DCN: scaling-book, 6.25e9 B/s per chip", dcn_bandwidth=6.25e9, dcn_latency=1e-5),
    Hardware("tpu-v5e-chip", 1.97e14, 1.97e14, 16 * GiB, 8.1e11, 4.5e10, 1e-6, 2,
             "REFERENCE.md: TPU v5e chip (Google TPU v5e docs); DCN: scaling-book, 3.125e9 B/s per chip",
             dcn_bandwidth=3.125e9, dcn_latency=1e-5),
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


def calibrate_cpu(num_devices: int, seconds: float = 0.5) -> Hardware:
    """Measure this host's f32 matmul rate and its copy bandwidth with every simulated device
    working at once, split evenly over the devices (they share the cores), and, with more than one device, the fixed
    cost of a collective among them: a tiny all-gather over every device minus a tiny
    elementwise program on the same devices, divided by the n-1 hops of the α-β model.
    Figures are `measured`, not datasheet."""
    import jax
    import jax.numpy as jnp

    cpu = jax.devices("cpu")[0]
    n = 512
    a = jax.device_put(jnp.ones((n, n), jnp.float32), cpu)
    flops = 2 * n ** 3 / _seconds_per_call(jax.jit(lambda x: x @ x), a, seconds)
    bandwidth = _mesh_bandwidth(jax.devices("cpu")[:num_devices], seconds)
    hop, hop_note = 0.0, ""
    if num_devices > 1:
        hop = _collective_hop_seconds(jax.devices("cpu")[:num_devices], seconds)
        hop_note = f", collective hop {hop * 1e6:.0f} us (tiny all-gather over {num_devices} devices)"
    return replace(CPU_PLACEHOLDER, peak_bf16_flops=flops / num_devices, peak_fp32_flops=flops / num_devices,
                   hbm_bandwidth=bandwidth / num_devices, hbm_bytes=CPU_PLACEHOLDER.hbm_bytes // num_devices,
                   ici_hop_latency=hop, overlaps_communication=False,
                   source=f"measured on this host at run time ({n}^3 f32 matmul; 64 MiB add spread over the "
                          f"{num_devices} devices at once{hop_note}), divided by {num_devices} simulated devices")


def _seconds_per_call(fn, arg, seconds: float) -> float:
    fn(arg).block_until_ready()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn(arg).block_until_ready()
        reps += 1
    return (time.perf_counter() - t0) / reps


def _mesh_bandwidth(devices: list, seconds: float) -> float:
    """Copy bandwidth (read + write, B/s) of all `devices` working at once: an elementwise add
    over a 64 MiB array sharded across them (at least 1 MiB each). Measured on one device
    it was half this on the 2-core host (5.2 vs 11.3 GB/s): the simulated devices run on
    every core together, so the roofline's per-device share must come from the whole mesh."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    per_device = max(2 ** 20, 64 * 2 ** 20 // len(devices)) // 4
    mesh = Mesh(np.array(devices), ("all",))
    x = jax.device_put(jnp.ones((per_device * len(devices),), jnp.float32), NamedSharding(mesh, PartitionSpec("all")))
    return 2 * x.nbytes / _seconds_per_call(jax.jit(lambda v: v + 1.0), x, seconds)


def _collective_hop_seconds(devices: list, seconds: float) -> float:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(devices), ("all",))
    x = jax.device_put(jnp.ones((len(devices), 8), jnp.float32), NamedSharding(mesh, PartitionSpec("all")))
    gather = jax.jit(lambda v: jax.lax.with_sharding_constraint(v, NamedSharding(mesh, PartitionSpec())))
    local = jax.jit(lambda v: v + 1.0)
    extra = _seconds_per_call(gather, x, seconds) - _seconds_per_call(local, x, seconds)
    return max(extra, 0.0) / (len(devices) - 1)
