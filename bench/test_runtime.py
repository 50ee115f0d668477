"""Runtime: the entry programs on the local device, and the Hugging Face peer beside them.

CPU: tiny and small at batch 1, on one CPU device when this file runs alone (`make bench`
does; bench/conftest.py says why). GPU (bench/gpu.sh): base at batch 1 and 32. Compilation is
outside the timed region, every round ends in block_until_ready (torch: synchronize), and
the warm-up round is not counted. The peer benchmarks run first so each of ours can carry
its ratio to the peer in extra_info.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from bench import harness, peer
from bench.harness import NEW_TOKENS, attach, on_gpu, predicted, runnable

MODELS = ["base"] if on_gpu() else ["tiny", "small"]
# CAPIBARA_BENCH_BATCHES="1" (or "32") runs one batch size per process: bench/gpu.sh
# writes one JSON per batch so a late failure cannot lose the earlier numbers.
BATCHES = [int(b) for b in os.environ.get("CAPIBARA_BENCH_BATCHES", "1,32" if on_gpu() else "1").split(",")]
PRECISIONS = ["fp32", "bf16"]
ROUNDS = 20 if on_gpu() else 5
PEER_ENTRIES = ("caption", "encode_image")
needs_torch = pytest.mark.skipif(not peer.available(), reason="torch not installed: the peer needs it")


def _items(entry: str, batch: int) -> tuple[float, str]:
    return (batch * NEW_TOKENS, "tokens") if entry in ("caption",) else (batch, "images" if entry != "decode_step"
                                                                           else "tokens")


def _pixels(model: str, batch: int) -> np.ndarray:
    """The pixels our encode_image benchmark feeds (same seed), without compiling anything."""
    return harness.pixels(model, batch)


def _params(model: str):
    return peer.our_params(model) if peer.available() else None


@needs_torch
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("entry", PEER_ENTRIES)
@pytest.mark.parametrize("model", MODELS)
def test_peer(benchmark, peer_times, model, entry, precision, batch):
    benchmark.group = f"peer {model}"
    pixels = _pixels(model, batch)
    run = peer.caption_fn(model, pixels, precision, NEW_TOKENS) if entry == "caption" else \
        peer.vision_fn(model, pixels, precision)
    out = benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1)
    expected = (batch, 1 + NEW_TOKENS) if entry == "caption" else (batch, harness.get_preset(model).vision.tokens,
                                                                     harness.get_preset(model).vision.width)
    assert tuple(out.shape) == expected
    cfg = harness.get_preset(model)
    flops = cfg.flops_caption(batch, NEW_TOKENS) if entry == "caption" else cfg.flops_encode_image(batch)
    items, name = _items(entry, batch)
    attach(benchmark, entry=entry, plan="hf-eager", precision=precision, batch=batch, target="local", model=model,
           flops=flops, analytic_flops=flops, memory_peak=0, predicted_s=0.0, items=items, item_name=name,
           compute_dtype="bfloat16" if precision == "bf16" else "float32")
    if benchmark.extra_info.get("timed"):
        peer_times[(model, entry, precision, batch)] = benchmark.extra_info["p50_s"]


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("entry", ["encode_image", "caption", "score", "decode_step"])
@pytest.mark.parametrize("model", MODELS)
def test_runtime(benchmark, peer_times, model, entry, precision, batch):
    benchmark.group = f"runtime {model}"
    towers = ("caption",) if entry in PEER_ENTRIES + ("decode_step",) else None
    run = runnable(model, entry, precision, batch, towers=towers, params=_params(model) if towers else None)
    out = benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1)
    if entry == "caption":
        assert out.shape == (batch, 1 + NEW_TOKENS)
        if model == "tiny" and precision == "fp32" and peer.available():
            _assert_matches_peer(model, np.asarray(run.args[1]), np.asarray(out))
    items, name = _items(entry, batch)
    policy_dtype = "bfloat16" if precision == "bf16" else "float32"
    attach(benchmark, entry=entry, plan="single-device", precision=precision, batch=batch, target="local",
           model=model, flops=run.flops, analytic_flops=run.analytic_flops, memory_peak=run.memory_peak,
           predicted_s=predicted(run), items=items, item_name=name, compute_dtype=policy_dtype,
           peer_s=peer_times.get((model, entry, precision, batch)))
    # 1 when run alone (bench/conftest.py): more simulated CPU devices slow a one-device program
    benchmark.extra_info["devices_in_process"] = len(jax.devices())


def _assert_matches_peer(model: str, pixels: np.ndarray, ours: np.ndarray) -> None:
    """Same weights, same inputs: fp32 greedy ids equal Hugging Face's (which stops at [SEP])."""
    import torch

    hf, device = peer.hf_model(model)
    with torch.no_grad():
        theirs = hf.float().generate(pixel_values=torch.from_numpy(pixels).to(device), max_new_tokens=NEW_TOKENS,
                                     do_sample=False, num_beams=1).cpu().numpy()
    np.testing.assert_array_equal(ours[:, :theirs.shape[1]], theirs)
