"""Study (issue 40 items 1 and 4): what libtpu's per-kernel `estimated_cycles` mean, and whether
anything a deviceless TPU compile returns estimates a collective. The answers are in
capibara_export/analysis/libtpu_estimate.py's docstring and in
docs/measurements/2026-12-07-libtpu-estimates-beside-the-roofline.md.

Compiles, deviceless for one v4-8 slice (4 chips, megacore), single kernels whose work is
known and prints, per kernel, the compiler's cycles beside the ideal at the chip's peak:

- bf16 and f32 matmuls n x n x n, n = 256 .. 4096 (ideal: 2n^3 FLOPs at 262,144 FLOP/cycle);
- an f32 `exp(x) * 2 + 1` over 2^20 .. 2^24 elements (ideal: its bytes at 1.2e12 B/s, 1.05 GHz);
- an f32 chain of k multiply-adds over 2^21 elements, k = 1 .. 64 (the VPU's rate, from the slope);
- an f32 all-reduce of 256 KiB .. 64 MiB over 8 chips of a v4-16: its backend config and what
  `cost_analysis()` makes of it (`optimal_seconds`), beside the ICI time the roofline gives it.

    python -m tools.studies.libtpu_estimates          (from the repository root; about a minute)
"""

from __future__ import annotations

from capibara_export import environment

environment.prepare("tpu-v4-8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from capibara_export.analysis.hardware import V4_CLOCK  # noqa: E402
from capibara_export.analysis.hlo import HloProgram  # noqa: E402
from capibara_export.analysis.libtpu_estimate import read_estimate, window_config  # noqa: E402
from capibara_export.matrix.targets import get_target, make_mesh  # noqa: E402

CHIP_FLOPS_PER_CYCLE = 2 * 4 * 128 * 128 * 2   # two TensorCores x four 128x128 MXUs x a multiply-add
HBM = 1.2e12


def _compile(mesh, fn, *shapes):
    replicated = NamedSharding(mesh, P())
    return jax.jit(fn, in_shardings=tuple(replicated for _ in shapes), out_shardings=replicated).lower(
        *shapes).compile()


def _estimate(compiled):
    program = HloProgram(compiled.as_text())
    estimate = read_estimate(program)
    windows = [window_config(i.attrs) for _, i, _ in program.instructions() if window_config(i.attrs)]
    return estimate, windows


def main() -> None:
    mesh = make_mesh(get_target("tpu-v4-8"), (1, 4))
    S = jax.ShapeDtypeStruct
    print("matmul n^3: cycles, ideal at peak, efficiency, iteration_bounds, cost model")
    for dtype in (jnp.bfloat16, jnp.float32):
        for n in (256, 512, 1024, 2048, 4096):
            estimate, windows = _estimate(_compile(mesh, lambda a, b: a @ b, S((n, n), dtype), S((n, n), dtype)))
            ideal = 2 * n ** 3 / CHIP_FLOPS_PER_CYCLE
            w = windows[-1]
            print(f"  {dtype.__name__:8s} {n:5d}  {estimate.cycles:10.0f}  {ideal:10.0f}  {ideal / estimate.cycles:5.0%}  "
                  f"{w.get('iteration_bounds')}  {w.get('cost_model_type')}")
    print("f32 exp(x)*2+1: cycles, ideal at HBM bandwidth, fraction of it")
    for n in (1 << 20, 1 << 22, 1 << 24):
        estimate, windows = _estimate(_compile(mesh, lambda x: jnp.exp(x) * 2 + 1, S((n,), jnp.float32)))
        ideal = 8 * n / HBM * V4_CLOCK
        print(f"  {n:9d}  {estimate.cycles:9.0f}  {ideal:9.0f}  {ideal / estimate.cycles:5.0%}  "
              f"{windows[-1].get('cost_model_type')}")
    print("f32 chain of k multiply-adds over 2^21 elements: cycles")
    chain = {}
    for k in (1, 4, 16, 64):
        def fn(x, k=k):
            for _ in range(k):
                x = x * 1.0001 + 0.5
            return x
        chain[k] = _estimate(_compile(mesh, fn, S((2048, 1024), jnp.float32)))[0].cycles
        print(f"  k={k:3d}  {chain[k]:9.0f}")
    slope = (chain[64] - chain[16]) / (48 * 2 * 2048 * 1024)
    print(f"  VPU f32 rate from the slope: {1 / slope:.0f} FLOP/cycle = {V4_CLOCK / slope:.3g} FLOP/s per chip")
    print("f32 all-reduce over 8 chips (v4-16): optimal_seconds, implied B/s, ICI ring time, estimate on it")
    ring = make_mesh(get_target("tpu-v4-16"), (1, 8))
    for n in (1 << 16, 1 << 20, 1 << 22, 1 << 24):
        fn = jax.shard_map(lambda x: jax.lax.psum(x, "model"), mesh=ring, in_specs=P(), out_specs=P())
        compiled = jax.jit(fn).lower(S((n,), jnp.float32)).compile()
        optimal = compiled.cost_analysis().get("optimal_seconds", 0.0)
        estimate, windows = _estimate(compiled)
        ici = 2 * 4 * n * 7 / 8 / (4.5e10 * 3)
        print(f"  {4 * n / 2**20:6.2f} MiB  {optimal * 1e6:8.1f} µs  {8 * n / optimal:.3g} B/s  {ici * 1e6:8.1f} µs  "
              f"collectives {len(estimate.collectives)}, kernels with an estimate {len(estimate.covered)}")


if __name__ == "__main__":
    main()
