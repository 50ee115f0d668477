"""Study (issue 14): which kernel choices and XLA options make the caption decode loop fastest
on a GPU? Variants side by side in one process, with the Hugging Face peer in the same run
and a profile of the caption program. The answers are written in
docs/measurements/ (the GPU decode-loop, cuDNN cross-attention, hoisted-layer, kernel-layout
and Pallas studies), and the winners are the `fused` default in model/layers.py.

On a GPU host, from the repository root (JAX with CUDA, torch and transformers installed):

    JAX_PLATFORMS=cuda,cpu XLA_PYTHON_CLIENT_PREALLOCATE=false CAPIBARA_STUDY=loop \
        python -m tools.studies.gpu_decode

CAPIBARA_STUDY picks the plan: `loop` (loop unrolling, Triton GEMM, the peer; ~8 min on an
H100), `flat` (flattened dots, one-pass layer norms; ~1.5 min), `settle` (the default's
candidates, round-robin; ~2.5 min), `layout`/`layout2` (text kernels out-in), `hoist`
(layer slices hoisted out of the decode loop; layout None = the platform's default), `attn`
(the decoder's cross-attention as a cuDNN kernel over a kv-major cross cache; Triton-only
GEMMs), `pallas` (each decode-step attention as one Pallas kernel; ~3 min), `graphs` (the
decode loop's while captured in CUDA graphs; ~2 min), `cache` (the self-attention kernel reading
the stacked cache in place, `pallas-cache`; ~2 min).
CAPIBARA_STUDY_BUDGET_S stops starting new variants.

Each variant is one `CAPIBARA_GPU_KERNELS` value (model.layers.gpu_kernels: `cudnn`,
`unroll-layers`, `unroll-decode`) and optionally XLA compiler options passed to
`Lowered.compile(compiler_options=...)`, so no variant needs a new process. Every variant
of an entry is timed in the same way (2 warm-ups, then the median of `ROUNDS` calls ending
in block_until_ready) and checked against the default variant's output. Results are
appended to $OUT/gpu-decode.json as they come, so a run cut short keeps what it measured;
the profiles (jax.profiler, CUPTI) are summarised here (kernels per call, GPU busy time)
and their trace.json.gz copied to $OUT for reading afterwards.

Written by hand because no benchmark library compares trace-time kernel choices inside one
process; the timing itself is the same rounds/median bench/harness.py uses.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import pathlib
import sys
import time

import jax
import numpy as np

from bench import harness, peer
from bench.gpu_timing import median_s, trace_summary
from bench.harness import NEW_TOKENS, hardware, runnable

MODEL = os.environ.get("CAPIBARA_STUDY_MODEL", "base")   # "tiny" for a dry run on a CPU
ROUNDS = int(os.environ.get("CAPIBARA_STUDY_ROUNDS", "20"))
OUT = pathlib.Path(os.environ.get("OUT", "/tmp/capibara-gpu"))
BUDGET_S = float(os.environ.get("CAPIBARA_STUDY_BUDGET_S", "480"))
START = time.perf_counter()
RESULTS = OUT / "gpu-decode.json"
TRITON_OFF = {"xla_gpu_enable_triton_gemm": False}
TRITON_ON = {"xla_gpu_enable_triton_gemm": True}
TRITON_ONLY = {"xla_gpu_enable_triton_gemm": True, "xla_gpu_cublas_fallback": False}
BEFORE_PALLAS = "cudnn+unroll-layers+flat-dots+fast-ln+hoist-layers"   # the `fused` preset until 2026-11-28
DEFAULT = BEFORE_PALLAS + "+pallas-decode"                             # the `fused` preset, spelled out
WHILE_GRAPHS = {"xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"}
STUDY = os.environ.get("CAPIBARA_STUDY", "loop")

# (entry, batch, kernels, compiler options, label), most informative first: the budget may
# cut the tail. "fused" is today's default (cudnn+unroll-layers). Rows in PROFILE are also
# traced with jax.profiler, reusing the timed executable.
PLANS = {"loop": [
    ("caption", 1, "fused", None, "default"),
    ("caption", 1, "cudnn+unroll-layers+unroll-decode", None, "+ unroll-decode"),
    ("caption", 1, "xla", None, "xla (nothing fused, loops rolled)"),
    ("caption", 1, "cudnn", None, "cudnn only"),
    ("caption", 1, "cudnn+unroll-decode", None, "cudnn + unroll-decode, layers rolled"),
    ("caption", 1, "cudnn+unroll-layers+unroll-decode", TRITON_OFF, "+ unroll-decode, triton gemm off"),
    ("caption", 1, "cudnn+unroll-layers+unroll-decode", TRITON_ON, "+ unroll-decode, triton gemm on"),
    ("encode_image", 32, "fused", None, "default"),
    ("encode_image", 32, "xla", None, "xla"),
    ("encode_image", 32, "cudnn", None, "cudnn only"),
    ("encode_image", 32, "fused", TRITON_OFF, "default, triton gemm off"),
    ("encode_image", 32, "fused", TRITON_ON, "default, triton gemm on"),
    ("caption", 32, "fused", None, "default"),
    ("caption", 32, "cudnn+unroll-layers+unroll-decode", None, "+ unroll-decode"),
    ("caption", 32, "xla", None, "xla"),
], "flat": [   # third: one contracting dim per dot, one-pass layer-norm statistics
    ("caption", 1, "cudnn", None, "cudnn, layers rolled"),
    ("caption", 1, "cudnn+flat-dots", None, "cudnn+flat-dots"),
    ("caption", 1, "cudnn+flat-dots+fast-ln", None, "cudnn+flat-dots+fast-ln"),
    ("encode_image", 32, "cudnn", None, "cudnn, layers rolled"),
    ("encode_image", 32, "cudnn+flat-dots+fast-ln", None, "cudnn+flat-dots+fast-ln"),
    ("caption", 32, "cudnn", None, "cudnn, layers rolled"),
    ("caption", 32, "cudnn+flat-dots+fast-ln", None, "cudnn+flat-dots+fast-ln"),
    ("caption", 1, "cudnn+unroll-layers+flat-dots+fast-ln", None, "fused+flat-dots+fast-ln"),
], "settle": [   # fourth: the candidates for the default, compiled first, timed round-robin
    ("caption", 1, "cudnn", None, "cudnn"),
    ("caption", 1, "cudnn+flat-dots+fast-ln", None, "cudnn+flat-dots+fast-ln"),
    ("caption", 1, "cudnn+unroll-layers", None, "cudnn+unroll-layers (fused today)"),
    ("caption", 1, "cudnn+unroll-layers+flat-dots+fast-ln", None, "cudnn+unroll-layers+flat-dots+fast-ln"),
    ("caption", 32, "cudnn+flat-dots+fast-ln", None, "cudnn+flat-dots+fast-ln"),
    ("caption", 32, "cudnn+unroll-layers+flat-dots+fast-ln", None, "cudnn+unroll-layers+flat-dots+fast-ln"),
], "layout": [   # fifth: the text towers' kernels stored out-in (model/layout.py), round-robin
    ("caption", 1, "fused", None, "default, in-out"),
    ("caption", 1, "fused", None, "default, text out-in", "out-in"),
    ("caption", 1, "cudnn+fast-ln", None, "cudnn+fast-ln, layers rolled, text out-in", "out-in"),
    ("caption", 32, "fused", None, "default, in-out"),
    ("caption", 32, "fused", None, "default, text out-in", "out-in"),
], "layout2": [   # sixth: which kernel choices go with out-in text kernels
    ("caption", 1, "cudnn+fast-ln", None, "cudnn+fast-ln, out-in", "out-in"),
    ("caption", 1, "cudnn+fast-ln+unroll-decode", None, "cudnn+fast-ln+unroll-decode, out-in", "out-in"),
    ("caption", 1, "cudnn+fast-ln+flat-dots", None, "cudnn+fast-ln+flat-dots, out-in", "out-in"),
    ("caption", 1, "fused", None, "fused, out-in", "out-in"),
    ("caption", 32, "fused", None, "fused, in-out"),
    ("caption", 32, "cudnn+fast-ln", None, "cudnn+fast-ln, out-in", "out-in"),
    ("caption", 32, "cudnn+fast-ln+flat-dots", None, "cudnn+fast-ln+flat-dots, out-in", "out-in"),
    ("encode_image", 32, "fused", None, "fused"),
    ("encode_image", 32, "cudnn+fast-ln+flat-dots", None, "cudnn+fast-ln+flat-dots, layers rolled"),
], "hoist": [   # seventh: the decoder's layer slices taken once before the decode loop (model.layers.hoisted_layers)
    ("caption", 1, "cudnn+unroll-layers+flat-dots+fast-ln", None, "default", None),
    ("caption", 1, "cudnn+unroll-layers+flat-dots+fast-ln+hoist-layers", None, "default + hoist-layers", None),
    ("caption", 32, "cudnn+unroll-layers+flat-dots+fast-ln", None, "default", None),
    ("caption", 32, "cudnn+unroll-layers+flat-dots+fast-ln+hoist-layers", None, "default + hoist-layers", None),
    ("encode_image", 32, "cudnn+unroll-layers+flat-dots+fast-ln", None, "default", None),
    ("encode_image", 32, "cudnn+unroll-layers+flat-dots+fast-ln", TRITON_ON, "default, triton gemm on", None),
], "attn": [   # eighth: the decoder's cross-attention as a cuDNN kernel, the cross cache kv-major (one
    # contiguous (B, P, N, H) array each for keys and values, so cuDNN reads them without a copy)
    ("caption", 1, BEFORE_PALLAS, None, "default", None, None),
    ("caption", 1, BEFORE_PALLAS + "+cudnn-cross", None, "+ cudnn-cross, kv-major", None, "kv-major"),
    ("caption", 1, BEFORE_PALLAS, None, "default, kv-major", None, "kv-major"),
    ("caption", 32, BEFORE_PALLAS, None, "default", None, None),
    ("caption", 32, BEFORE_PALLAS + "+cudnn-cross", None, "+ cudnn-cross, kv-major", None, "kv-major"),
    ("encode_image", 32, BEFORE_PALLAS, None, "default", None, None),
    ("encode_image", 32, BEFORE_PALLAS, TRITON_ONLY, "default, Triton GEMMs only (no cuBLAS fallback)", None, None),
], "pallas": [   # ninth: each decode-step attention (self and cross) as one Pallas kernel (model/decode_attention.py)
    ("caption", 1, BEFORE_PALLAS, None, "default", None, None),
    ("caption", 1, BEFORE_PALLAS + "+pallas-decode", None, "+ pallas-decode", None, None),
    ("caption", 32, BEFORE_PALLAS, None, "default", None, None),
    ("caption", 32, BEFORE_PALLAS + "+pallas-decode", None, "+ pallas-decode", None, None),
], "cache": [   # eleventh (not run yet): the self-attention kernel reads the stacked cache in place
    ("caption", 1, DEFAULT, None, "default", None, None),
    ("caption", 1, DEFAULT + "+pallas-cache", None, "+ pallas-cache", None, None),
    ("caption", 32, DEFAULT, None, "default", None, None),
    ("caption", 32, DEFAULT + "+pallas-cache", None, "+ pallas-cache", None, None),
], "graphs": [   # tenth: the decode loop's while and conditionals captured in CUDA graphs (command buffers)
    ("caption", 1, DEFAULT, None, "default", None, None),
    ("caption", 1, DEFAULT, WHILE_GRAPHS, "+ while/conditional command buffers", None, None),
    ("caption", 1, DEFAULT, {"xla_gpu_graph_min_graph_size": 1}, "graph min size 1", None, None),
    ("caption", 32, DEFAULT, None, "default", None, None),
    ("caption", 32, DEFAULT, WHILE_GRAPHS, "+ while/conditional command buffers", None, None),
]}
PLAN = [(*row, "in-out", None)[:7] if len(row) == 5 else (*row, None)[:7] for row in PLANS[STUDY]]
PROFILE = {("caption", 32, "default + hoist-layers"), ("caption", 1, "+ pallas-decode"),
           ("caption", 1, "+ pallas-cache"),
           ("caption", 32, "+ pallas-decode"), ("caption", 1, "+ cudnn-cross, kv-major"),
           ("caption", 1, "cudnn+fast-ln+unroll-decode, out-in"), ("caption", 1, "default"),
           ("caption", 1, "default, in-out"), ("caption", 1, "default, text out-in"), ("caption", 1, "+ unroll-decode"),
           ("caption", 1, "xla (nothing fused, loops rolled)"), ("caption", 1, "cudnn+flat-dots+fast-ln")}
PEER = {"loop": [("caption", 1), ("caption", 32), ("encode_image", 32)], "layout": [("caption", 1)],
        "attn": [("caption", 1), ("caption", 32), ("encode_image", 32)]}.get(STUDY, [])

results: list[dict] = []


def left_s() -> float:
    return BUDGET_S - (time.perf_counter() - START)


def record(row: dict) -> None:
    results.append(row)
    RESULTS.write_text(json.dumps({"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                                   "rounds": ROUNDS, "new_tokens": NEW_TOKENS, "rows": results}, indent=1))
    print(json.dumps(row), flush=True)


def compile_variant(entry: str, batch: int, kernels: str, options: dict | None, layout: str | None = "in-out",
                    cross_cache: str | None = None):
    """The variant compiled by bench/harness.runnable on the peer's weights, and its compile time."""
    os.environ["CAPIBARA_GPU_KERNELS"] = kernels
    from model import decode_attention
    for which in ("self", "cross"):   # the probe's fastest kernel settings for this batch, if it ran
        decode_attention.OVERRIDE.pop(which, None)
        if (batch, which) in TUNED:
            decode_attention.OVERRIDE[which] = TUNED[(batch, which)]
    t0 = time.perf_counter()
    run = runnable(MODEL, entry, "bf16", batch, params=peer.our_params(MODEL), towers=("caption",),
                   compiler_options=options, layout=layout, cross_cache=cross_cache)
    return run, time.perf_counter() - t0


def profile_if_listed(run, entry: str, batch: int, label: str) -> None:
    """Profile a variant listed in PROFILE while the budget lasts; a failed profile is a row."""
    if (entry, batch, label) in PROFILE and left_s() > 45:
        try:
            profile(run, entry, batch, label)
        except Exception as err:
            record({"profile": label, "error": f"{type(err).__name__}: {str(err)[:300]}"})


def done() -> int:
    print(f"gpu_decode: done in {time.perf_counter() - START:.0f} s", flush=True)
    return 0


def profile(run, entry: str, batch: int, label: str, calls: int = 3) -> None:
    target = OUT / f"prof-{entry}-b{batch}-{len(list(OUT.glob('prof-*')))}.trace.json.gz"
    record({"profile": label, "entry": entry, "batch": batch, "calls": calls, **trace_summary(run, calls, target)})


TUNED: dict = {}   # (batch, "self" | "cross") -> the fastest decode_attention tuning in attention_probe


def attention_probe(chain: int = 32, budget_s: float = 100.0) -> None:
    """Decode-step attention alone (base: 12 heads of 64; the self cache after a 4-token prompt
    and 20 new tokens, the cross cache over 577 image tokens), XLA's against the Pallas kernel
    at a few tunings: `chain` dependent calls in one program (the output is the next query),
    so per-call time is kernel time, not dispatch. Stops starting variants after `budget_s`."""
    import jax.numpy as jnp

    from model.decode_attention import decode_attention, key_bias

    def chained(attend):
        def run(q, kv, bias):
            for _ in range(chain):
                q = attend(q, kv, bias)
            return q
        return jax.jit(run)

    xla = chained(lambda q, kv, bias: jax.nn.dot_product_attention(
        q, kv[:, :, 0], kv[:, :, 1], bias=None if bias is None else bias[:, None, None, :]))
    begun = time.perf_counter()
    for batch in (1, 32):
        for keys, masked in ((577, False), (24, True)):
            rng = np.random.default_rng(0)
            kv = jnp.asarray(rng.normal(size=(batch, keys, 2, 12, 64)), jnp.bfloat16)
            q = jnp.asarray(rng.normal(size=(batch, 1, 12, 64)), jnp.bfloat16)
            bias = key_bias(jnp.asarray(rng.random((batch, 1, 1, keys)) > 0.2), keys) if masked else None
            reference = np.asarray(xla(q, kv, bias), np.float32)
            variants = {"xla": (xla, None)}
            for block, chunks, warps in ((128, 1, 4), (64, 1, 4), (64, 1, 2), (32, 1, 1), (128, 1, 8), (64, 4, 4),
                                         (128, 5, 4), (32, 8, 2)):
                tuning = {"block": block, "chunks": chunks, "num_warps": warps}
                variants[f"pallas {tuning}"] = (chained(functools.partial(decode_attention, **tuning)), tuning)
            fastest = (float("inf"), None)
            for label, (fn, tuning) in variants.items():
                if time.perf_counter() - begun > budget_s:
                    record({"probe": "decode attention", "batch": batch, "keys": keys, "skipped": label})
                    continue
                try:
                    out = np.asarray(fn(q, kv, bias), np.float32)
                    med, _ = median_s(lambda: jax.block_until_ready(fn(q, kv, bias)))
                    diff = float(np.max(np.abs(out - reference)))
                    record({"probe": "decode attention", "batch": batch, "keys": keys, "label": label,
                            "us_per_call": 1e6 * med / chain, "max_abs_diff_vs_xla": diff})
                    if tuning is not None and diff < 0.1 and med < fastest[0]:
                        fastest = (med, tuning)
                except Exception as err:
                    record({"probe": "decode attention", "batch": batch, "keys": keys, "label": label,
                            "error": f"{type(err).__name__}: {str(err)[:300]}"})
            if fastest[1] is not None:
                TUNED[(batch, "self" if masked else "cross")] = fastest[1]
    record({"probe": "decode attention", "tuned": {f"b{b} {which}": t for (b, which), t in TUNED.items()}})


def settle(plan, peak: float, repeats: int = 3) -> int:
    """Compile every variant first, then time them round-robin `repeats` times, so clock and
    thermal drift falls on all of them alike; report each variant's median of medians."""
    runs, reference, same = [], {}, {}
    for entry, batch, kernels, options, label, layout, cross_cache in plan:
        if left_s() < 40:
            break
        try:
            run, compile_s = compile_variant(entry, batch, kernels, options, layout, cross_cache)
            out = np.asarray(run())
        except Exception as err:  # an option this XLA rejects is a result, not the end of the study
            record({"entry": entry, "batch": batch, "label": label, "error": f"{type(err).__name__}: {str(err)[:300]}"})
            continue
        reference.setdefault((entry, batch), out)
        same[(entry, batch, label)] = bool(np.array_equal(out, reference[(entry, batch)])) if entry == "caption" else \
            float(np.max(np.abs(out.astype(np.float32) - reference[(entry, batch)].astype(np.float32))))
        runs.append((entry, batch, label, run.analytic_flops, compile_s, run))
        if (entry, batch, label) in PROFILE:   # the optimized HLO, to read the kernels by name afterwards
            with gzip.open(OUT / f"hlo-{entry}-b{batch}-{len(runs)}.txt.gz", "wt") as fp:
                fp.write(run.compiled.as_text())
    medians: dict = {(entry, batch, label): [] for entry, batch, label, *_ in runs}
    for _ in range(repeats):
        for entry, batch, label, _, _, run in runs:
            medians[(entry, batch, label)].append(median_s(run)[0])
    for entry, batch, label, flops, compile_s, run in runs:
        m = medians[(entry, batch, label)]
        record({"entry": entry, "batch": batch, "label": label, "compile_s": compile_s,
                "hlo_launches": run.profile.launches,
                "median_ms": 1e3 * float(np.median(m)), "medians_ms": [1e3 * x for x in m],
                "mfu": flops / float(np.median(m)) / peak, "same_as_first": same[(entry, batch, label)]})
    for entry, batch, label, _, _, run in runs:
        profile_if_listed(run, entry, batch, label)
    return done()


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    if jax.default_backend() != "gpu" and MODEL == "base":
        print("tools.studies.gpu_decode: no GPU here; set CAPIBARA_STUDY_MODEL=tiny for a dry run", file=sys.stderr)
        return 2
    print("device:", jax.devices()[0].device_kind, "jax", jax.__version__, flush=True)
    peak = hardware().peak_flops("bfloat16")
    for entry, batch in PEER:
        if left_s() < 300:
            break
        pixels = harness.pixels(MODEL, batch)
        run = peer.caption_fn(MODEL, pixels, "bf16", NEW_TOKENS) if entry == "caption" else \
            peer.vision_fn(MODEL, pixels, "bf16")
        med, p90 = median_s(run)
        record({"peer": "hf-eager", "entry": entry, "batch": batch, "median_ms": 1e3 * med, "p90_ms": 1e3 * p90})
    if STUDY == "pallas":
        attention_probe()
    if STUDY in ("settle", "layout", "layout2", "hoist", "attn", "pallas", "graphs", "cache"):
        return settle(PLAN, peak)
    reference: dict = {}
    for entry, batch, kernels, options, label, layout, _ in PLAN:
        if left_s() < 60:
            record({"skipped": label, "entry": entry, "batch": batch, "reason": "study budget spent"})
            continue
        try:
            run, compile_s = compile_variant(entry, batch, kernels, options, layout)
            flops = run.analytic_flops
            out = np.asarray(run())
            med, p90 = median_s(run)
        except Exception as err:  # a kernel choice a cuDNN/XLA version rejects is a result, not a crash
            record({"entry": entry, "batch": batch, "kernels": kernels, "label": label,
                    "error": f"{type(err).__name__}: {str(err)[:300]}"})
            continue
        key = (entry, batch)
        reference.setdefault(key, out)
        same = bool(np.array_equal(out, reference[key])) if entry == "caption" else \
            float(np.max(np.abs(out.astype(np.float32) - reference[key].astype(np.float32))))
        record({"entry": entry, "batch": batch, "kernels": kernels, "options": options, "label": label,
                "compile_s": compile_s, "median_ms": 1e3 * med, "p90_ms": 1e3 * p90,
                "mfu": flops / med / peak, "hlo_flops": run.flops, "analytic_flops": flops,
                "same_as_default": same})
        profile_if_listed(run, entry, batch, label)
    return done()


if __name__ == "__main__":
    sys.exit(main())
