"""The semiotic pipeline over 64 small images: sequential against pipelined, in one run.

Sequential reads, preprocesses and captions one image at a time. Pipelined decodes and
preprocesses in 2 worker threads ahead of the device and captions in batches of 8.
Both use the same module (random `tiny` weights) after its programs are compiled, and
start from an empty embedding cache, so each image is encoded in both.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

from bench.harness import attach
from capibara_export.semiotic import ImagePipeline, MnemosyneSemioModule

N_IMAGES = 64


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline-images")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(N_IMAGES):
        path = folder / f"img{i:02d}.jpg"
        Image.fromarray(rng.integers(0, 255, (256, 320, 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = MnemosyneSemioModule.random("tiny")
    pipeline = ImagePipeline(module, workers=2, batch_size=8)
    pipeline.run(paths[:9])             # compile batch sizes 8 and 1 outside the timed runs
    pipeline.run_sequential(paths[:1])
    return module, pipeline, paths


@pytest.mark.parametrize("mode", ["sequential", "pipelined"])
def test_pipeline_throughput(benchmark, setup, mode):
    module, pipeline, paths = setup
    benchmark.group = "semiotic pipeline (64 images)"

    def run():
        module._cache.clear()  # every round encodes every image
        return pipeline.run_sequential(paths) if mode == "sequential" else pipeline.run(paths)

    results, stats = benchmark.pedantic(run, rounds=3, warmup_rounds=0)
    assert stats.images == N_IMAGES and stats.errors == 0 and all(r.caption for r in results)
    attach(benchmark, entry="caption", plan=mode, precision="fp32", batch=8 if mode == "pipelined" else 1,
           target="local", model="tiny", flops=0, analytic_flops=0, memory_peak=0, predicted_s=0.0,
           items=N_IMAGES, item_name="images")
