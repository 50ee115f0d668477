"""Probe for issue 14 item 3: `small` caption and encode_image (fp32, batch 1) on this CPU with
the scanned layer loops as shipped and with them unrolled (the GPU's `unroll-layers` trace
choice, forced on), beside the Hugging Face peer in the same process. Not a pytest benchmark:
it changes a trace-time switch that the model keeps for GPUs only.

    python -m bench.cpu_unroll_probe            (from the repository root, with the dev extra)
"""

from __future__ import annotations

import os
import time

from capibara_export import environment

environment.prepare(target=None, cpu_devices=1)

import jax  # noqa: E402
import numpy as np  # noqa: E402

import model.layers as layers  # noqa: E402
from bench import harness, peer  # noqa: E402


def median_seconds(fn, rounds: int = 5) -> float:
    jax.block_until_ready(fn())  # warm-up
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    params = peer.our_params("small")
    for entry in ("caption", "encode_image"):
        pixels = harness.pixels("small", 1)
        hf = (peer.caption_fn("small", pixels, "fp32", harness.NEW_TOKENS) if entry == "caption"
              else peer.vision_fn("small", pixels, "fp32"))
        theirs = median_seconds(hf)
        variants = [("scanned", None), ("unrolled", "unroll-layers")]
        if entry == "caption":  # the decoder's layer slices taken once before the decode loop
            variants.append(("hoisted", "unroll-layers+hoist-layers"))
        for name, kernels in variants:
            # the switch model/layers.py keeps for GPUs
            layers._tracing_for_local_gpu = lambda on=kernels is not None: on
            os.environ["CAPIBARA_GPU_KERNELS"] = kernels or "xla"
            layers.HOIST_MIN_ROWS = 1
            started = time.perf_counter()
            run = harness.runnable("small", entry, "fp32", 1, towers=("caption",), params=params)
            compile_s = time.perf_counter() - started
            ours = median_seconds(lambda: run.compiled(*run.args))
            print(f"{entry:12s} {name:9s} ours {ours * 1e3:7.1f} ms   "
                  f"peer {theirs * 1e3:7.1f} ms   peer/ours {theirs / ours:4.2f}x   compile {compile_s:.1f} s",
                  flush=True)


if __name__ == "__main__":
    main()
