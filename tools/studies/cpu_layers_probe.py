"""Study (issue 14 item 3): which parameter layout and compile options serve fastest on one CPU
device? The answer (per-layer storage with the head-major cross cache) is the CPU serving
layout in model/layout.py; the figures are in docs/measurements/.

`small` caption, decode_step and encode_image (fp32, batch 1) on
this CPU in three layouts, beside the Hugging Face peer in the same process: layers stacked
and scanned with the patch-major cross cache (as TPU and GPU programs run them), layers
per-layer, and per-layer with the head-major cross cache (the CPU serving layout,
model/layout.py), each compiled with the options one CPU device gets
(capibara_export/compiler_options.py); and the serving layout once more with XLA's default
options. The variants are timed in turns, round after round, so a drift of the host's speed
hits all of them alike. Not a pytest benchmark: it compares layouts and compile options,
which the bench suite does not (it runs what serving runs only).

    python -m tools.studies.cpu_layers_probe [ROUNDS]     (from the repository root, with the dev extra)
"""

from __future__ import annotations

import sys
import time

from capibara_export import environment

environment.prepare(target=None, cpu_devices=1)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench import harness, peer  # noqa: E402

VARIANTS = {   # name: (layer storage, cross cache, XLA compile options: None for this package's, {} XLA's defaults)
    "stacked": ("stacked", "patch-major", None),
    "per-layer": ("per-layer", "patch-major", None),
    "serving": ("per-layer", "head-major", None),
    "xla-default": ("per-layer", "head-major", {}),
}


def timed_in_turns(fns: dict, rounds: int) -> dict[str, list[float]]:
    for fn in fns.values():
        jax.block_until_ready(fn())   # warm-up
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return times


def main(rounds: int = 15) -> None:
    params = peer.our_params("small")
    for entry in ("caption", "decode_step", "encode_image"):
        fns, compile_s = {}, {}
        for name, (storage, cross_cache, options) in VARIANTS.items():
            started = time.perf_counter()
            run = harness.runnable("small", entry, "fp32", 1, towers=("caption",), params=params, storage=storage,
                                   cross_cache=cross_cache, compiler_options=options)
            compile_s[name] = time.perf_counter() - started
            fns[name] = lambda run=run: run.compiled(*run.args)
        if entry != "decode_step":   # the peer has no single-step program to compare with
            pixels = harness.pixels("small", 1)
            fns["peer"] = (peer.caption_fn("small", pixels, "fp32", harness.NEW_TOKENS) if entry == "caption"
                           else peer.vision_fn("small", pixels, "fp32"))
        if entry == "caption":
            same = all(np.array_equal(np.asarray(fns["stacked"]()), np.asarray(fns[name]())) for name in VARIANTS)
            print(f"caption tokens identical across layouts and options: {same}")
        times = timed_in_turns(fns, rounds)
        base = np.median(times["stacked"])
        for name, ts in times.items():
            extra = f"   compile {compile_s[name]:5.1f} s" if name in compile_s else ""
            peer_vs = (f"   peer/ours {np.median(times['peer']) / np.median(ts):4.2f}x"
                       if "peer" in times and name != "peer" else "")
            print(f"{entry:12s} {name:10s} median {np.median(ts) * 1e3:7.1f} ms   min {np.min(ts) * 1e3:7.1f} ms   "
                  f"stacked/this {base / np.median(ts):4.2f}x{peer_vs}{extra}", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 15)
