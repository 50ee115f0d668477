"""XLA compile options by where a program runs: every compile in this package takes them from here.

One CPU device (serving on a CPU host: the `local` target there, a 1x1 `cpu` mesh, the semiotic
module, the runtime bench): dots go through XLA:CPU's Eigen path instead of YNNPACK fusions
(`xla_cpu_experimental_ynn_fusion_type=""`). Measured in turns against the default in one
process on this 2-core host (docs/performance.md, "XLA:CPU dots through Eigen on one CPU
device"): `small` encode_image fp32 batch 1 1.02-1.17x faster in seven runs, tiny 1.23x, caption,
decode_step and score within noise, outputs equal to 3e-12. At batch 8 XLA:CPU fuses no dot
into YNNPACK anyway.

Several CPU devices (the simulated mesh: 32 devices sharing the host's cores) keep the default:
there the Eigen path was 1.2-1.5x slower for the replicated, tp and hidden plans of tiny
encode_image (each device's dots split over the shared thread pool), 1.1-1.3x faster for dp.
TPU and GPU programs keep XLA's defaults.

The options are part of the compiled executable (a serialized one carries its code) and of the
build's result-cache key; StableHLO carries none (whoever compiles it chooses).
"""

from __future__ import annotations

from collections.abc import Iterable

ONE_CPU_DEVICE = {"xla_cpu_experimental_ynn_fusion_type": ""}


def for_devices(devices: Iterable) -> dict[str, str] | None:
    """The compile options for a program that runs on `devices` (jax Devices, or deviceless
    TPU topology devices): a new dict, or None for XLA's defaults."""
    devices = list(devices)
    if len(devices) == 1 and devices[0].platform == "cpu":
        return dict(ONE_CPU_DEVICE)
    return None
