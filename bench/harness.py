"""Shared pieces of the benchmark suite: compiled programs on real inputs, timing rounds
that end in block_until_ready, and the extra_info every benchmark carries.

extra_info fields (all benchmarks): unit (entry, plan, precision, batch, target, model),
memory_peak_bytes (compiled), flops (compiled, loop-corrected, per device) and
analytic_flops (model), predicted_s (roofline, model), p50/p90/p99_s of the timed rounds
(measured), achieved_flops_per_s and mfu against the device's peak (measured), items_per_s
(images/s or tokens/s, measured), and for runtime benchmarks peer_ratio = peer median /
our median (how many times faster than Hugging Face eager on the same config and inputs).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from capibara_export.analysis.calibration import calibrate_cpu, calibrated
from capibara_export.analysis.hardware import Hardware, for_device_kind
from capibara_export.analysis.hlo import HloProgram, KernelProfile
from capibara_export.analysis.roofline import roofline
from capibara_export.matrix.programs import ProgramOptions, build_program
from capibara_export.compiler_options import for_devices as options_for_devices
from model import get_preset
from model.layout import for_platform
from model.random_params import init_params
from sharding.precision import get_policy
from model.family import FAMILY
from sharding.storage import stored_params

NEW_TOKENS = 20
TEXT_LEN = 16
OPTIONS = ProgramOptions(max_new_tokens=NEW_TOKENS, text_len=TEXT_LEN)


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


# Set by bench/conftest.py when benchmarks are timed: predictions then use constants measured
# in the same run as the timings (this VM's speed drifts by 1.5x within an hour, so a cached
# calibration from earlier predicted 2x under). The fresh figures also refresh the cache.
FRESH_CALIBRATION = False


@functools.lru_cache(maxsize=4)
def hardware(devices: int = 1) -> Hardware:
    """The local device's constants: the table for a known GPU, a measurement for a CPU."""
    found = for_device_kind(jax.devices()[0].device_kind)
    if found is not None:
        return calibrated(found, jax.devices()[:devices], refresh=FRESH_CALIBRATION)
    return calibrate_cpu(devices, refresh=FRESH_CALIBRATION)


@dataclass
class Runnable:
    """A compiled program with its real inputs, ready to time."""
    entry: str
    model: str
    precision: str
    batch: int
    compiled: jax.stages.Compiled
    args: tuple
    flops: float            # per device, loop-corrected from the optimized HLO
    bytes_accessed: float
    analytic_flops: int
    memory_peak: int
    profile: KernelProfile | None = None   # kernels and loop iterations (the per-kernel roofline)

    def __call__(self):
        return jax.block_until_ready(self.compiled(*self.args))


def real_inputs(entry: str, program, seed: int = 0) -> tuple:
    cfg = program.config
    rng = np.random.default_rng(seed)
    if entry == "decode_step":
        cache = jax.tree.map(lambda s: (0.5 * rng.normal(size=s.shape)).astype(s.dtype), program.args[3])
        return (rng.integers(5, 100, size=program.args[1].shape).astype(np.int32), np.int32(1), cache)
    pixels = rng.normal(size=program.args[1].shape).astype(np.float32)
    if entry == "encode_image":
        return (pixels,)
    if entry == "caption":
        return pixels, np.full(program.args[2].shape, cfg.text.bos_token_id, np.int32), np.ones(program.args[3].shape,
                                                                                                np.int32)
    ids = rng.integers(5, min(cfg.text.vocab_size, 1000), size=program.args[2].shape).astype(np.int32)
    return pixels, ids, np.ones_like(ids)


def pixels(model: str, batch: int) -> np.ndarray:
    """The image batch `runnable(model, "encode_image", ...)` times, for the peer's inputs."""
    program = build_program(get_preset(model).with_towers("caption"), "encode_image", get_policy("fp32"), batch,
                            OPTIONS)
    return real_inputs("encode_image", program)[0]


@functools.lru_cache(maxsize=8)
def float_params(model: str, seed: int = 0):
    return init_params(get_preset(model), seed)


def runnable(model: str, entry: str, precision: str, batch: int, params=None,
             towers: tuple[str, ...] | None = None, compiler_options: dict | None = None,
             layout: str | None = None, storage: str | None = None, cross_cache: str | None = None) -> Runnable:
    """Compile one entry for the first local device (outside any timed region), with XLA
    `compiler_options` when given (tools/studies/gpu_decode.py compares them), else the options this
    package serves one such device with (capibara_export/compiler_options.py). `params` are canonical;
    the program takes them in the local platform's serving layout (model/layout.py), with
    the kernel `layout`, layer `storage` and `cross_cache` given instead where given."""
    cfg = get_preset(model) if towers is None else get_preset(model).with_towers(*towers)
    cfg = for_platform(cfg, jax.default_backend(), layout, storage, cross_cache)
    policy = get_policy(precision)
    program = build_program(cfg, entry, policy, batch, OPTIONS)
    params = stored_params(FAMILY, params if params is not None else float_params(model), cfg, policy)
    device = jax.devices()[0]
    args = jax.device_put((params, *real_inputs(entry, program)), device)
    if compiler_options is None:
        compiler_options = options_for_devices([device])
    compiled = jax.jit(program.fn, donate_argnums=()).lower(*args).compile(compiler_options=compiler_options)
    hlo = HloProgram(compiled.as_text())
    costs = hlo.costs()
    stats = compiled.memory_analysis()
    peak = int(getattr(stats, "peak_memory_in_bytes", 0) or 0) if stats is not None else 0
    return Runnable(entry, model, precision, batch, compiled, args, costs.flops, costs.bytes,
                    program.analytic_flops, peak, hlo.kernel_profile())


def percentiles(rounds: list[float]) -> dict:
    data = np.asarray(rounds)
    return {f"p{q}_s": float(np.percentile(data, q)) for q in (50, 90, 99)}


def attach(benchmark, *, entry: str, plan: str, precision: str, batch: int, target: str, model: str,
           flops: float, analytic_flops: float, memory_peak: int, predicted_s: float, items: float,
           item_name: str, devices: int = 1, compute_dtype: str = "float32", peer_s: float | None = None,
           runs_the_program: bool = True) -> None:
    """Fill benchmark.extra_info; the measured fields only when timing is enabled. Achieved
    FLOP/s and MFU only where the timed rounds run the program (not compiles or loads)."""
    hw = hardware(devices)
    info = benchmark.extra_info
    info.update(unit={"entry": entry, "plan": plan, "precision": precision, "batch": batch, "target": target,
                      "model": model},
                memory_peak_bytes=memory_peak, flops=flops, analytic_flops=analytic_flops,
                predicted_s=predicted_s, hardware=hw.name, peak_flops_per_s=hw.peak_flops(compute_dtype),
                item=item_name)
    stats = getattr(benchmark, "stats", None)
    if stats is None or not getattr(stats, "stats", None):
        info["timed"] = False  # --benchmark-disable: ran once as a test, nothing measured
        return
    rounds = list(stats.stats.data)
    median = float(np.median(rounds))
    peak = hw.peak_flops(compute_dtype) * devices
    runs = runs_the_program and analytic_flops > 0
    info.update(timed=True, rounds_s=[float(r) for r in rounds], **percentiles(rounds),
                achieved_flops_per_s=flops * devices / median if runs else None,
                mfu=(analytic_flops / median) / peak if peak and runs else None, items_per_s=items / median,
                peer_ratio=(peer_s / median) if peer_s else None)


def predicted(run: Runnable, devices: int = 1, collectives=()) -> float:
    policy = get_policy(run.precision)
    return roofline(run.flops, run.bytes_accessed, list(collectives), hardware(devices), policy.compute_dtype,
                    run.analytic_flops, devices, profile=run.profile).latency_s


def to_jnp(tree):
    return jax.tree.map(jnp.asarray, tree)
