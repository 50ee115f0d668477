"""The per-kernel cost model: kernel launches counted from HLO, the roofline's per-kernel
terms, and the calibration that measures them once per machine (cached)."""

from dataclasses import replace

import jax
import jax.numpy as jnp
import pytest

from capibara_export.analysis import calibration
from capibara_export.analysis.hardware import CPU_PLACEHOLDER, HARDWARE
from capibara_export.analysis.hlo import HloProgram, Kernel, KernelProfile
from capibara_export.analysis.roofline import roofline
from tests.test_hlo import loop_module


def test_kernel_profile_counts_launches_and_iterations():
    """The hand-written loop: one dot per iteration, 12 iterations; constants, tuples,
    parameters and the loop itself launch nothing."""
    profile = HloProgram(loop_module(limit=12)).kernel_profile()
    assert profile.iterations == 12
    dots = [k for k in profile.kernels if k.name == "d"]
    assert len(dots) == 1 and dots[0].times == 12 and dots[0].flops == 2 * 8 * 16 * 16
    # the counter increment is the other kernel of the body; nothing else launches
    assert sorted(k.name for k in profile.kernels) == ["d", "n"]
    assert profile.launches == 24


def test_kernel_profile_marks_kernels_that_gather_elements():
    """A kernel with a transpose that changes the innermost dimension (or fused into it) is
    marked; the add next to it is not, and neither is attention's (B, T, H, D) -> (B, H, T, D),
    which keeps the innermost dimension and moves whole rows."""
    def fn(x):
        return jnp.swapaxes(x, 0, 1) * 2.0 + 1.0, jnp.tanh(x) + 1.0

    program = HloProgram(jax.jit(fn).lower(jnp.ones((64, 48), jnp.float32)).compile().as_text())
    marked = {k.transposes for k in program.kernel_profile().kernels if k.bytes}
    assert marked == {True, False}

    def heads(x):   # (B, T, H, D): heads first (rows of D move), then keys transposed (elements move)
        return jnp.transpose(x, (0, 2, 1, 3)) * 2.0, jnp.transpose(x, (0, 2, 3, 1)) * 3.0

    program = HloProgram(jax.jit(heads).lower(jnp.ones((2, 17, 4, 8), jnp.float32)).compile().as_text())
    kernels = [k for k in program.kernel_profile().kernels if k.bytes]
    # XLA:CPU computes each product into a transposed layout, then copies it to row-major:
    # of those copies only the keys' (tokens innermost) gathers elements
    assert len(kernels) >= 2 and sum(k.transposes for k in kernels) == 1


LAYOUT_MODULE = """HloModule m

ENTRY main {
  p = f32[4,16,1,8]{3,2,1,0} parameter(0)
  t = f32[4,8,1,16]{1,2,3,0} transpose(p), dimensions={0,3,2,1}
  q = f32[4,16,8]{2,1,0} parameter(1)
  rows = f32[16,4,8]{2,1,0} transpose(q), dimensions={1,0,2}
  c = f32[4,8,1,16]{3,2,1,0} copy(t)
  ROOT out = (f32[4,8,1,16]{1,2,3,0}, f32[4,8,1,16]{3,2,1,0}, f32[16,4,8]{2,1,0}) tuple(t, c, rows)
}
"""


def test_gathering_follows_layouts():
    """XLA writes a transpose into its output's layout (physically a copy of whole rows) and
    lets a copy change the layout: the physical innermost dimension decides, size-1 ones aside."""
    kernels = {k.name: k.transposes for k in HloProgram(LAYOUT_MODULE).kernel_profile().kernels}
    assert kernels == {"t": False, "c": True, "rows": False}


def test_kernel_profile_marks_matrix_vector_products():
    """A dot of one row (a batch-1 decode step's projection), bare or batched, is marked
    matrix-vector; the same dot of 8 rows is a GEMM; an elementwise kernel is neither."""
    def marks(rows):
        x, w = jnp.ones((4, rows, 64), jnp.float32), jnp.ones((4, 64, 32), jnp.float32)
        fns = (lambda x, w: jnp.tanh(x[0] @ w[0]), lambda x, w: jnp.einsum("bmk,bkn->bmn", x, w) + 1.0)
        found = set()
        for fn in fns:
            kernels = HloProgram(jax.jit(fn).lower(x, w).compile().as_text()).kernel_profile().kernels
            found |= {(k.matmul, k.matvec) for k in kernels if k.matmul}
            assert not any(k.matvec for k in kernels if not k.matmul)
        return found

    assert marks(1) == {(True, True)}
    assert marks(8) == {(True, False)}


def test_kernel_profile_agrees_with_program_totals():
    """On a compiled program (a scanned MLP in a fori_loop): the kernels' FLOPs and bytes,
    summed with their run counts, are the program's loop-corrected totals."""
    w = jnp.ones((4, 64, 64), jnp.float32)

    def fn(x, w):
        def layer(h, wi):
            return jnp.tanh(h @ wi), None

        return jax.lax.fori_loop(0, 3, lambda i, h: jax.lax.scan(layer, h, w)[0], x)

    text = jax.jit(fn).lower(jnp.ones((8, 64), jnp.float32), w).compile().as_text()
    program = HloProgram(text)
    profile, totals = program.kernel_profile(), program.costs()
    assert profile.iterations >= 3  # the fori_loop at least (the compiler may unroll the scan)
    assert sum(k.flops * k.times for k in profile.kernels) == pytest.approx(totals.flops, rel=1e-9)
    assert sum(k.bytes * k.times for k in profile.kernels) == pytest.approx(totals.bytes, rel=1e-9)
    assert sum(k.flops * k.times for k in profile.kernels) >= 3 * 4 * 2 * 8 * 64 * 64


def test_per_kernel_roofline_terms():
    """call + Σ times·(κ + max(F/P', B/W')) + iterations·λ, priced with the achievable
    rates; a memory-bound kernel does not hide under a compute-bound one."""
    hw = replace(HARDWARE["nvidia-h200"], achieved_bf16_flops=1e12, achieved_bandwidth=1e9, kernel_overhead=1e-6,
                 loop_overhead=5e-6, call_overhead=4e-5)
    profile = KernelProfile([Kernel("mm", 2e9, 1e6, 1.0),       # 2 ms of compute, 1 ms of memory
                             Kernel("copy", 0.0, 3e6, 10.0)],   # 10 x 3 ms of memory
                            iterations=10)
    r = roofline(2e9, 3.1e7, [], hw, "bfloat16", 2e9, 1, profile=profile)
    overhead = 4e-5 + 11 * 1e-6 + 10 * 5e-6
    assert r.overhead_s == pytest.approx(overhead)
    assert r.kernels == 11
    assert r.compute_s == pytest.approx(2e-3) and r.memory_s == pytest.approx(1e-3 + 30e-3)
    assert r.latency_s == pytest.approx(2e-3 + 30e-3 + overhead)   # not max(2, 31) ms
    assert r.binding == "memory"
    # thousands of tiny kernels: the launches bind
    tiny = KernelProfile([Kernel("k", 10.0, 10.0, 5000.0)], iterations=19)
    r = roofline(5e4, 5e4, [], hw, "bfloat16", 5e4, 1, profile=tiny)
    assert r.binding == "overhead" and r.latency_s == pytest.approx(4e-5 + 5000 * (1e-6 + 1e-8) + 19 * 5e-6)
    # a transposing kernel is priced at the measured transposing rate, where there is one
    moved = KernelProfile([Kernel("t", 0.0, 3e6, 1.0, transposes=True), Kernel("c", 0.0, 3e6, 1.0)], iterations=0)
    assert roofline(0, 6e6, [], hw, "bfloat16", 0, 1, profile=moved).memory_s == pytest.approx(6e-3)  # no figure: W'
    slow = replace(hw, transpose_bandwidth=2.5e8)
    assert roofline(0, 6e6, [], slow, "bfloat16", 0, 1, profile=moved).memory_s == pytest.approx(12e-3 + 3e-3)
    # a GEMM's bytes at the measured skinny GEMM's rate; a matrix-vector product's at W'
    gemms = KernelProfile([Kernel("g", 1e3, 3e6, 1.0, matmul=True),
                           Kernel("v", 1e3, 3e6, 1.0, matmul=True, matvec=True)], iterations=0)
    assert roofline(0, 6e6, [], hw, "bfloat16", 0, 1, profile=gemms).memory_s == pytest.approx(6e-3)  # no figure
    skinny = replace(hw, matmul_bandwidth=5e8)
    assert roofline(0, 6e6, [], skinny, "bfloat16", 0, 1, profile=gemms).memory_s == pytest.approx(6e-3 + 3e-3)
    both = KernelProfile([Kernel("gt", 0.0, 3e6, 1.0, transposes=True, matmul=True)], iterations=0)
    assert roofline(0, 3e6, [], replace(slow, matmul_bandwidth=5e8), "bfloat16", 0, 1,
                    profile=both).memory_s == pytest.approx(12e-3)   # the slower of its two rates
    # without a profile: the whole-program roofline as before (peaks, no overheads)
    whole = roofline(2e9, 3.1e7, [], hw, "bfloat16", 2e9, 1)
    assert whole.latency_s == pytest.approx(max(2e9 / hw.peak_bf16_flops, 3.1e7 / hw.hbm_bandwidth))
    assert whole.overhead_s == 0.0


def test_collectives_priced_with_a_fixed_rendezvous_and_a_measured_all_reduce_factor():
    """On the simulated CPU mesh a collective costs a fixed time plus α per other member, and
    an all-reduce is one rendezvous (its factor measured, about 1), not a ring's two."""
    from capibara_export.analysis.collectives import Collective
    from capibara_export.analysis.roofline import collective_seconds

    def one(kind, n, times=3.0):
        return Collective(kind, "c", 8e3, times, [list(range(n))], "model", n, "")

    gather = collective_seconds(one("all-gather", 8), 1e9, 2e-5, overhead=6e-5, all_reduce_factor=1.0)
    assert gather == pytest.approx(3 * (8e3 * 7 / 8 / 1e9 + 7 * 2e-5 + 6e-5))
    reduce = collective_seconds(one("all-reduce", 8), 1e9, 2e-5, overhead=6e-5, all_reduce_factor=1.0)
    assert reduce == pytest.approx(3 * (2 * 8e3 * 7 / 8 / 1e9 + 7 * 2e-5 + 6e-5))
    ring = collective_seconds(one("all-reduce", 8), 1e9, 2e-5)    # TPU and GPU: no overhead, factor 2
    assert ring == pytest.approx(3 * (2 * 8e3 * 7 / 8 / 1e9 + 2 * 7 * 2e-5))
    assert collective_seconds(one("all-gather", 1), 1e9, 2e-5, overhead=6e-5) == 0.0   # a group of one moves nothing
    assert HARDWARE["tpu-v4-chip"].collective_overhead == 0.0 and HARDWARE["tpu-v4-chip"].all_reduce_latency_factor == 2


def test_calibration_is_measured_once_per_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPIBARA_CALIBRATION_CACHE", str(tmp_path / "calibration.json"))
    monkeypatch.delenv("CAPIBARA_RECALIBRATE", raising=False)
    devices = jax.devices("cpu")[:4]
    first = calibration.calibrated(CPU_PLACEHOLDER, devices)
    assert first.kernel_overhead > 0 and first.call_overhead >= 0 and first.loop_overhead >= 0
    assert first.achieved_fp32_flops > 0 and first.achieved_bf16_flops > 0 and first.achievable_bandwidth() > 0
    assert first.peak_fp32_flops == first.achieved_fp32_flops   # a host's peak is what it measures
    assert "measured" in first.calibration and "4 devices" in first.calibration
    assert not first.overlaps_communication and first.ici_hop_latency >= 0 and first.collective_overhead >= 0
    assert first.ici_hop_latency + first.collective_overhead > 0     # a rendezvous of 4 threads is not free
    assert 1.0 <= first.all_reduce_latency_factor <= 2.0 and "per hop" in first.calibration
    assert 0 < first.transpose_bandwidth and "element-gathering transpose" in first.calibration
    assert 0 < first.matmul_bandwidth and "GEMM's bytes" in first.calibration
    assert len(first.gemm_rates) == 2 and all(f > 0 and b > 0 for _, f, b in first.gemm_rates)
    assert (tmp_path / "calibration.json").is_file()

    def no_measuring(*_):
        raise AssertionError("measured again although this machine's figures are cached")

    monkeypatch.setattr(calibration, "_measure_cpu", no_measuring)
    assert calibration.calibrated(CPU_PLACEHOLDER, devices) == first
    # a different device count is a different machine key: measured (here: refused)
    with pytest.raises(AssertionError, match="measured again"):
        calibration.calibrated(CPU_PLACEHOLDER, devices[:2])
    monkeypatch.setenv("CAPIBARA_RECALIBRATE", "1")
    with pytest.raises(AssertionError, match="measured again"):
        calibration.calibrated(CPU_PLACEHOLDER, devices)
    monkeypatch.delenv("CAPIBARA_RECALIBRATE")
    with pytest.raises(AssertionError, match="measured again"):   # what the timed benchmarks ask for
        calibration.calibrated(CPU_PLACEHOLDER, devices, refresh=True)


def test_tpu_entries_keep_published_figures(tmp_path, monkeypatch):
    """A TPU target compiled on this host is not measured here: its entry comes back as the
    table has it, labelled unvalidated: no loop or call overhead, and the per-kernel one from
    the floor of the TPU compiler's own estimates (nothing measured on a TPU)."""
    monkeypatch.setenv("CAPIBARA_CALIBRATION_CACHE", str(tmp_path / "calibration.json"))
    tpu = HARDWARE["tpu-v4-chip"]
    assert calibration.calibrated(tpu, jax.devices("cpu")[:4]) is tpu
    assert tpu.loop_overhead == tpu.call_overhead == 0.0 and tpu.kernel_overhead == 5.8e-7
    assert "unvalidated" in tpu.calibration and "libtpu's own per-kernel estimates" in tpu.calibration
    assert not (tmp_path / "calibration.json").exists()


def test_unreadable_cache_is_measured_again(tmp_path, monkeypatch):
    cache = tmp_path / "calibration.json"
    cache.write_text("{not json")
    monkeypatch.setenv("CAPIBARA_CALIBRATION_CACHE", str(cache))
    monkeypatch.setattr(calibration, "_measure_cpu", lambda hw, devices: {"kernel_overhead": 1e-6,
                                                                          "calibration": "measured (stub)"})
    got = calibration.calibrated(CPU_PLACEHOLDER, jax.devices("cpu")[:1])
    assert got.kernel_overhead == 1e-6
    assert calibration._read(cache) != {}   # rewritten as JSON with this machine's figures


def test_matmul_kernels_take_the_rate_measured_for_their_size():
    """Between two measured GEMM sizes a matmul kernel's rate is interpolated (log-log);
    beyond them the end points hold; other kernels keep the single rate."""
    hw = replace(CPU_PLACEHOLDER, achieved_fp32_flops=3e9, achieved_bandwidth=1e12,
                 gemm_rates=[[2 * 256 ** 3, 3e9, 2e9], [2 * 512 ** 3, 6e9, 4e9]])    # a JSON cache's lists
    assert hash(hw) and hw.gemm_rates == ((2 * 256 ** 3, 3e9, 2e9), (2 * 512 ** 3, 6e9, 4e9))
    middle = 2 * 256 ** 3 * 2 ** 1.5                   # halfway in log
    assert hw.gemm_rate(middle, "float32") == pytest.approx((3e9 * 6e9) ** 0.5)
    assert hw.gemm_rate(1e3, "float32") == 3e9 and hw.gemm_rate(1e12, "bfloat16") == 4e9
    big = KernelProfile([Kernel("mm", 2 * 512 ** 3, 0.0, 1.0, matmul=True), Kernel("add", 2 * 512 ** 3, 0.0, 1.0)], 0)
    r = roofline(0, 0, [], hw, "float32", 0, 1, profile=big)
    assert r.compute_s == pytest.approx(2 * 512 ** 3 / 6e9 + 2 * 512 ** 3 / 3e9)
    assert replace(hw, gemm_rates=()).gemm_rate(middle, "float32") == 3e9    # no curve: the one rate


def test_kernel_profile_marks_matmul_kernels():
    def fn(x, w):
        return jnp.tanh(x @ w) + 1.0, x * 2.0

    program = HloProgram(jax.jit(fn).lower(jnp.ones((64, 48), jnp.float32), jnp.ones((48, 32))).compile().as_text())
    kernels = program.kernel_profile().kernels
    assert any(k.matmul and k.flops >= 2 * 64 * 48 * 32 for k in kernels)
    assert any(not k.matmul and k.bytes for k in kernels)
