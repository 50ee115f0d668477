"""Measured cost constants for the per-kernel roofline: one mechanism for every platform.

The roofline (roofline.py) prices one program call as

    call_overhead + Σ_kernels times · (kernel_overhead + max(F_k / P, B_k / W))
                  + loop iterations · loop_overhead          (+ collectives)

with the kernels, their FLOPs and bytes and the loop iterations counted from the optimized
HLO (hlo.HloProgram.kernel_profile). This module measures P, W and the three overheads on
the devices a program runs on, with small programs whose own kernels are counted by the
same HLO reader, so the model reproduces its calibration programs by construction:

  kernel and call   chains of 8 and 64 tiny dependent dots: the time per extra launch,
                    and what is left per call
  loop              the same tiny body in a `fori_loop` of 16 and 128 iterations: the time
                    per extra iteration beyond its kernels (0 if the compiler unrolled both)
  P                 a model-sized GEMM per device (f32 and bf16), net of the overheads; on a
                    CPU host a 512^3 one too (1024^3 on one device): a matmul kernel's rate
                    is interpolated for its size (1.6x between the two on 32 devices)
  W                 an elementwise add over a large array (read + write), net of them; on a
                    CPU host also an attention block (8x197x6x64 per device) written with its
                    tokens innermost (W for kernels that gather single elements)
                    and a skinny GEMM's bytes (1600x4x512 per device: W for every matmul
                    kernel that is not matrix-vector; XLA:CPU streams those at 0.4-0.5x the add)
  collectives       (several CPU devices) chains of tiny dependent all-gathers over all the
                    devices and over groups of 4, and of all-reduces: a fixed time per
                    collective, a time per hop, and an all-reduce's hops in all-gathers'

On a CPU host every simulated device works at once (they share the cores), so each figure
is per device with all of them busy, as the simulated mesh runs. A local GPU is measured on
one device. TPU entries are returned unchanged: no TPU is reachable from here, their peaks
are published figures and stay labelled unvalidated (hardware.TPU_CALIBRATION).

Results are cached per machine (host, device kind and count, jax version, this module's
CALIBRATION_VERSION) in $CAPIBARA_CALIBRATION_CACHE or ~/.cache/capibara-export/
calibration.json; CAPIBARA_RECALIBRATE=1 measures again. A cached figure is only as good as
the machine is steady: this 2-core VM ran 1.6x slower one hour than the hour before (GEMM
4.8e9 -> 3.0e9 FLOP/s per device, launch 10.7 -> 18.2 us), so the timed benchmarks always
measure afresh (bench/harness.py). Written by hand: no library measures XLA per-launch and
per-iteration overheads.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from dataclasses import fields, replace
from pathlib import Path

from .. import compiler_options
from .hardware import CPU_PLACEHOLDER, Hardware
from .hlo import COLLECTIVES, HloProgram

CALIBRATION_VERSION = 4  # 2: collectives as chains, a transposing copy's bandwidth, GEMM rates by size; 3: skinny GEMM;
# 4: the transposing rate on an attention-shaped block
SECONDS = 0.4  # per timed measurement


def calibrated(hardware: Hardware, devices: list, refresh: bool = False) -> Hardware:
    """`hardware` with the measured constants of `devices` (a CPU host's simulated devices, or
    a local GPU), from the per-machine cache when measured before, unless `refresh` (or
    CAPIBARA_RECALIBRATE) asks for a new measurement, which then replaces the cached one.
    Other entries (TPU targets, compiled on a host that is not the target) are returned as
    they are."""
    platform = devices[0].platform
    if platform == "cpu" and hardware.name == "cpu-host":
        measure = _measure_cpu
    elif platform == "gpu" and hardware.name.startswith("nvidia"):
        measure = _measure_gpu
    else:
        return hardware
    key = _machine_key(devices)
    cache = _cache_path()
    stored = {} if refresh or os.environ.get("CAPIBARA_RECALIBRATE") else _read(cache)
    known = {f.name for f in fields(Hardware)}
    if key in stored and set(stored[key]) <= known:
        return replace(hardware, **stored[key])
    figures = measure(hardware, devices)
    _write(cache, key, figures)
    return replace(hardware, **figures)


def calibrate_cpu(num_devices: int, refresh: bool = False) -> Hardware:
    """The CPU host entry measured on the first `num_devices` CPU devices (cached)."""
    import jax

    return calibrated(CPU_PLACEHOLDER, jax.devices("cpu")[:num_devices], refresh)


# ---------------------------------------------------------------------------- measuring
def _measure_cpu(hardware: Hardware, devices: list) -> dict:
    n = len(devices)
    over = _overheads(devices)
    size = 512 if n == 1 else 256
    # no smaller sizes: a 64^3 or 128^3 GEMM's time is mostly the call overhead subtracted from
    # it, and pricing tiny's kernels at those rates took its median error from 17% to 24%
    sizes = (256, 512) if n > 1 else (512, 1024)
    curve = tuple((2.0 * s ** 3, _gemm_rate(devices, s, "float32", over), _gemm_rate(devices, s, "bfloat16", over))
                  for s in sizes)
    f32, bf16 = next((f, b) for flops, f, b in curve if flops == 2.0 * size ** 3)
    bandwidth = _bandwidth(devices, 64 * 2 ** 20, over)
    transposing = _transpose_bandwidth(devices, over)
    skinny = _gemm_bandwidth(devices, over)
    coll = _collective_costs(devices, over) if n > 1 else {"hop": 0.0, "overhead": 0.0, "all_reduce": 2.0}
    hop_note = (f", collective {coll['overhead'] * 1e6:.0f} us + {coll['hop'] * 1e6:.1f} us per hop, all-reduce "
                f"{coll['all_reduce']:.2f}x an all-gather's hops (chains of tiny collectives over {n} devices and "
                f"groups of {coll['group']})") if n > 1 else ""
    note = (f"measured on {socket.gethostname()} at run time with all {n} devices at once: {size}^3 GEMM "
            f"f32 {f32:.3g} / bf16 {bf16:.3g} FLOP/s (f32 at {'/'.join(f'{s}^3' for s in sizes)}: "
            f"{' / '.join(f'{f:.2g}' for _, f, _ in curve)}), add over 64 MiB {bandwidth:.3g} B/s per device "
            f"(an element-gathering transpose of {'x'.join(map(str, TRANSPOSE_BLOCK))} {transposing:.3g}, "
            f"a 1600x4x512 GEMM's bytes {skinny:.3g}), "
            f"kernel {over['kernel'] * 1e6:.1f} us, loop iteration {over['loop'] * 1e6:.1f} us, "
            f"call {over['call'] * 1e6:.0f} us{hop_note}")
    return {"peak_bf16_flops": f32, "peak_fp32_flops": f32, "hbm_bandwidth": bandwidth,
            "achieved_fp32_flops": f32, "achieved_bf16_flops": bf16, "achieved_bandwidth": bandwidth,
            "transpose_bandwidth": transposing, "matmul_bandwidth": skinny, "gemm_rates": curve,
            "hbm_bytes": hardware.hbm_bytes // n,
            "ici_hop_latency": coll["hop"],
            "collective_overhead": coll["overhead"], "all_reduce_latency_factor": coll["all_reduce"],
            "overlaps_communication": False,
            "kernel_overhead": over["kernel"], "loop_overhead": over["loop"], "call_overhead": over["call"],
            "source": f"measured on this host at run time, divided by {n} simulated devices", "calibration": note}


def _measure_gpu(hardware: Hardware, devices: list) -> dict:
    one = devices[:1]
    _warm_up(one)
    over = _overheads(one)
    # 8 x 18464 rows: the vision MLP's fc1 at batch 32, 8 times over in one batched dot, so the
    # ~0.1 ms call overhead is a tenth of the time (one 8192-row GEMM was 1/3 and the rate
    # came out 3.8e14 to 9.0e14 on one H200, as the subtracted overhead wobbled)
    bf16 = _gemm_rate(one, (8 * 18464, 768, 3072), "bfloat16", over)
    f32 = _gemm_rate(one, (8 * 18464, 768, 3072), "float32", over)
    bandwidth = _bandwidth(one, 512 * 2 ** 20, over)
    note = (f"measured on the local {devices[0].device_kind} at run time: 147712x768x3072 GEMM bf16 {bf16:.3g} / "
            f"f32 {f32:.3g} FLOP/s, 512 MiB add {bandwidth:.3g} B/s, kernel {over['kernel'] * 1e6:.2f} us, "
            f"loop iteration {over['loop'] * 1e6:.1f} us, call {over['call'] * 1e6:.0f} us; peaks from the table")
    return {"achieved_bf16_flops": bf16, "achieved_fp32_flops": f32, "achieved_bandwidth": bandwidth,
            "kernel_overhead": over["kernel"], "loop_overhead": over["loop"], "call_overhead": over["call"],
            "calibration": note}


def _warm_up(devices: list, seconds: float = 1.0) -> None:
    """Keep the GPU busy with GEMMs for a second first: two fresh H200s measured GEMM rates
    1.6x apart without it (clocks and power state settle under load)."""
    import jax
    import jax.numpy as jnp

    a = _sharded(devices, (4096, 4096), jnp.bfloat16)
    square = jax.jit(lambda x: x @ x)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        jax.block_until_ready(square(a))


def _mesh(devices: list):
    import numpy as np
    from jax.sharding import Mesh

    return Mesh(np.array(devices), ("all",))


def _sharded(devices: list, shape_per_device: tuple, dtype):
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    shape = (shape_per_device[0] * len(devices), *shape_per_device[1:])
    return jax.device_put(jnp.ones(shape, dtype), NamedSharding(_mesh(devices), PartitionSpec("all")))


def _timed(fn, *args) -> tuple[float, HloProgram]:
    """Seconds per call of jit(fn)(*args), and the compiled program's HLO, compiled with the
    options the build gives programs on the devices `args` live on."""
    import jax

    devices = {d for a in jax.tree.leaves(args) for d in a.sharding.device_set}
    compiled = jax.jit(fn).lower(*args).compile(compiler_options=compiler_options.for_devices(devices))
    return _seconds_per_call(lambda a: compiled(*a), args), HloProgram(compiled.as_text())


def _seconds_per_call(fn, arg, seconds: float = SECONDS) -> float:
    import jax

    jax.block_until_ready(fn(arg))
    best = float("inf")
    for _ in range(3):  # the best of three windows: the least disturbed by other work on the host
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 3 or reps < 3:
            jax.block_until_ready(fn(arg))
            reps += 1
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def _overheads(devices: list) -> dict:
    """Seconds per kernel launch, per loop iteration and per call, on `devices` at once.
    The chain is tiny dots (8x32 by 32x32) each followed by a tanh: XLA fuses elementwise
    ops through optimization barriers on the CPU, but no backend fuses one dot into the
    next, so the launches grow with the chain (the HLO reader counts them)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    x = _sharded(devices, (8, 32), jnp.float32)
    w = jax.device_put(jnp.full((32, 32), 0.01, jnp.float32), NamedSharding(_mesh(devices), PartitionSpec()))

    def chain(k):
        def fn(v, m):
            for _ in range(k):
                v = jnp.tanh(v @ m)
            return v
        return fn

    (t1, p1), (t2, p2) = (_timed(chain(k), x, w) for k in (8, 64))
    l1, l2 = p1.kernel_profile().launches, p2.kernel_profile().launches
    kernel = max((t2 - t1) / (l2 - l1), 0.0) if l2 > l1 else 0.0
    call = max(t1 - l1 * kernel, 0.0)

    def loop(n):
        return lambda v, m: jax.lax.fori_loop(0, n, lambda i, u: jnp.tanh(u @ m), v)

    (t1, p1), (t2, p2) = (_timed(loop(n), x, w) for n in (16, 128))
    a, b = p1.kernel_profile(), p2.kernel_profile()
    if b.iterations > a.iterations:
        per_iteration = (t2 - t1 - (b.launches - a.launches) * kernel) / (b.iterations - a.iterations)
        loop_s = max(per_iteration, 0.0)
    else:  # the compiler unrolled both loops: no iteration left to pay for
        loop_s = 0.0
    return {"kernel": kernel, "call": call, "loop": loop_s}


def _net(seconds: float, program: HloProgram, over: dict) -> float:
    """A measurement's time less what the model books as overhead (never below 10% of it)."""
    profile = program.kernel_profile()
    overhead = over["call"] + profile.launches * over["kernel"] + profile.iterations * over["loop"]
    return max(seconds - overhead, 0.1 * seconds)


def _gemm_rate(devices: list, size, dtype: str, over: dict) -> float:
    """FLOP/s per device of one GEMM per device, every device at once."""
    import jax.numpy as jnp

    m, k, n = (size, size, size) if isinstance(size, int) else size
    a = _sharded(devices, (m, k), getattr(jnp, dtype))
    b = jnp.ones((k, n), getattr(jnp, dtype))
    seconds, program = _timed(lambda x, y: x @ y, a, b)
    return 2.0 * m * k * n / _net(seconds, program, over)


def _bandwidth(devices: list, total_bytes: int, over: dict) -> float:
    """Read + write B/s per device of an elementwise add over `total_bytes` spread over the
    devices (at least 1 MiB each). Measured on one simulated CPU device it was half the
    per-device share of all of them at once (5.2 vs 11.3 GB/s on the 2-core host): the
    devices run on every core together, so the share must come from the whole mesh."""
    import jax.numpy as jnp

    per_device = max(2 ** 20, total_bytes // len(devices)) // 4
    x = _sharded(devices, (per_device,), jnp.float32)
    seconds, program = _timed(lambda v: v + 1.0, x)
    return 2 * 4 * per_device / _net(seconds, program, over)


# An attention block per device, (batch, tokens, heads, head_dim), its keys written head-major
# with the tokens innermost: the element-gathering transpose XLA:CPU runs around attention
# (hlo._gathers_elements). A square 724^2 block, measured before, ran at 0.2x an add on one host
# and 0.4x on another while attention's transposes ran at 0.6-0.9x on both (docs/performance.md).
TRANSPOSE_BLOCK, TRANSPOSE_PERM = (8, 197, 6, 64), (0, 2, 3, 1)


def _transpose_bandwidth(devices: list, over: dict) -> float:
    """Read + write B/s per device of an element-gathering transpose (with an add, as XLA
    fuses one) of an attention-shaped block per device, every device at once."""
    import jax.numpy as jnp

    x = _sharded(devices, TRANSPOSE_BLOCK, jnp.float32)
    seconds, program = _timed(lambda v: jnp.transpose(v, TRANSPOSE_PERM) + 1.0, x)
    return 2 * 4 * math.prod(TRANSPOSE_BLOCK) / _net(seconds, program, over)


def _gemm_bandwidth(devices: list, over: dict, shape: tuple = (1600, 4, 512)) -> float:
    """B/s per device of a memory-bound GEMM (its operands read, its result written), every
    device at once. XLA:CPU's GEMMs of a few rows or a thin contraction (embed-sharded
    projections; a decode step's at batch 8) move their bytes at 0.4-0.5x an add's rate
    (1600x4x512 2.0-2.5e8 B/s, 8x768x3072 2.5e8, add 5.4-5.9e8 on the 2-core host), while
    one row (a matrix-vector product) streams at the add's: the roofline prices matmul
    kernels' bytes at this rate and matrix-vector kernels' at W."""
    import jax.numpy as jnp

    m, k, n = shape
    a = _sharded(devices, (m, k), jnp.float32)
    b = _sharded(devices, (k, n), jnp.float32)
    per = len(devices)
    seconds, program = _timed(lambda x, y: jnp.einsum("dmk,dkn->dmn", x.reshape(per, m, k), y.reshape(per, k, n)), a, b)
    return 4 * (m * k + k * n + m * n) / _net(seconds, program, over)


def _collective_costs(devices: list, over: dict) -> dict:
    """A collective's cost on the simulated CPU mesh: a fixed rendezvous time plus a time
    per hop (other group member), and an all-reduce's hops in all-gathers'. Each is the
    slope of a chain of dependent tiny collectives (4 vs 32 of them, less the chain's own
    kernel launches), over all devices and over groups of 4, as the kernel overhead is
    measured: one tiny all-gather timed alone (the figure before this) came out at half what
    the same collective costs inside a program, and varied 3x between calibrations (7 to 26
    us per hop), because a lone call starts with every device thread idle and in step."""
    n = len(devices)
    group = next((g for g in (4, 2) if n % g == 0 and g < n), n)
    full = _collective_slope(devices, n, "all-gather", over)
    part = _collective_slope(devices, group, "all-gather", over) if group < n else full
    hop = max((full - part) / (n - group), 0.0) if group < n else full / max(n - 1, 1)
    overhead = max(part - hop * (group - 1), 0.0) if group < n else 0.0
    reduce = _collective_slope(devices, n, "all-reduce", over)
    # between one rendezvous (1) and a ring's two passes (2): on 4 devices with the host busy
    # the quotient of these small slopes came out -0.51 to 0.79 (five tries; 1.0-1.05 on 32)
    factor = (reduce - overhead) / (hop * (n - 1)) if hop > 0 else 2.0
    return {"hop": hop, "overhead": overhead, "all_reduce": min(max(factor, 1.0), 2.0), "group": group}


def _collective_slope(devices: list, group: int, kind: str, over: dict) -> float:
    """Seconds per extra tiny `kind` collective over groups of `group` devices in a chain."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(devices).reshape(len(devices) // group, group), ("rest", "group"))
    spec = PartitionSpec(("rest", "group"))
    x = jax.device_put(jnp.ones((8 * len(devices),), jnp.float32), NamedSharding(mesh, spec))

    def chain(k):
        def body(v):
            for _ in range(k):  # each step needs the last: nothing runs two collectives at once
                if kind == "all-gather":
                    v = jnp.tanh(jax.lax.all_gather(v, "group", tiled=True)[: v.shape[0]] + 1.0)
                else:
                    v = jnp.tanh(jax.lax.psum(v, "group") * 0.01)
            return v
        return jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=spec)

    (t1, p1), (t2, p2) = (_timed(chain(k), x) for k in (4, 32))
    c1, c2 = (sum(1 for _, inst, _ in p.instructions() if inst.opcode.removesuffix("-start") in COLLECTIVES)
              for p in (p1, p2))
    l1, l2 = p1.kernel_profile().launches, p2.kernel_profile().launches
    return max(t2 - t1 - (l2 - l1) * over["kernel"], 0.0) / max(c2 - c1, 1)


# ---------------------------------------------------------------------------- the cache
def _machine_key(devices: list) -> str:
    """The host, its devices, the toolchain and the compile options the measurements ran under."""
    import jax

    options = sorted((compiler_options.for_devices(devices) or {}).items())
    return "|".join(str(p) for p in (socket.gethostname(), devices[0].platform, devices[0].device_kind,
                                      len(devices), os.cpu_count(), jax.__version__, CALIBRATION_VERSION)
                    + tuple(f"{k}={v}" for k, v in options))


def _cache_path() -> Path:
    if os.environ.get("CAPIBARA_CALIBRATION_CACHE"):
        return Path(os.environ["CAPIBARA_CALIBRATION_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "capibara-export" / "calibration.json"


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # no cache, or one we cannot read: measure again


def _write(path: Path, key: str, figures: dict) -> None:
    """Merge one machine's figures into the cache (atomically; a lost race only costs a
    measurement next time). A cache that cannot be written is not an error."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read(path)
        data[key] = figures
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass

