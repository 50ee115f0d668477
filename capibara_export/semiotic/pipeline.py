"""The asynchronous pipeline for many images: decoding and preprocessing in a worker pool,
overlapped with device execution, batched to the engine's compiled batch sizes.

Workers (threads: PIL decoding and resizing release the GIL) read and preprocess images
ahead of the device, at most `batch_size × prefetch` images in flight; the main thread
runs each batch's programs as soon as its images are ready. A corrupt file or a
non-image becomes a per-image error; the rest of the batch completes.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from .. import interrupts
from .images import ImageError, ImageInput, LoadedImage, load_image
from .interaction import SemioticInteraction
from .module import MnemosyneSemioModule


@dataclass
class ImageResult:
    index: int
    source: str
    caption: str | None = None
    interpretation: dict | None = None
    relation: dict | None = None
    culture: dict | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class RunStats:
    images: int
    errors: int
    seconds: float
    mode: str
    extra: dict = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


class ImagePipeline:
    """Many images through one module: reading and preprocessing run on `workers` threads, up to
    `prefetch` batches ahead, while the device captions `batch_size` images at a time."""
    def __init__(self, module: MnemosyneSemioModule, workers: int = 2, batch_size: int = 8, prefetch: int = 2):
        self.module, self.workers, self.batch_size, self.prefetch = module, workers, batch_size, prefetch

    def _prepare(self, item: ImageInput) -> tuple[LoadedImage, np.ndarray]:
        loaded = load_image(item)
        return loaded, self.module.captioner.preprocessor.images([loaded.image])[0]

    def run(self, items: Iterable[ImageInput], k: int = 0, text: str | None = None, culture: bool = False,
            progress: Callable[[ImageResult], None] | None = None) -> tuple[list[ImageResult], RunStats]:
        """Every item's result in order (a caption, and with `k` readings, with `text` its relation,
        with `culture` its cultural codes) and the run's timings; an unreadable image is a result with
        its error, not an exception. `progress` is called with each result as it is ready."""
        items = list(items)
        started = time.perf_counter()
        results: list[ImageResult] = []
        window = self.batch_size * self.prefetch
        with ThreadPoolExecutor(self.workers) as pool:
            pending: deque[tuple[int, ImageInput, Future]] = deque()
            queued = 0
            while queued < len(items) or pending:
                while queued < len(items) and len(pending) < window:
                    pending.append((queued, items[queued], pool.submit(self._prepare, items[queued])))
                    queued += 1
                batch = [pending.popleft() for _ in range(min(self.batch_size, len(pending)))]
                for result in self._process(batch, k, text, culture):
                    results.append(result)
                    interrupts.check()  # between images: a Ctrl-C swallowed by a GC callback still stops
                    if progress:
                        progress(result)
        return results, self._stats(results, started, "pipelined")

    def _process(self, batch, k, text, culture) -> list[ImageResult]:
        ready, out = [], {}
        for index, item, future in batch:
            source = str(item) if not hasattr(item, "size") else "<PIL image>"
            try:
                ready.append((index, *future.result()))
            except ImageError as err:
                out[index] = ImageResult(index, source, error=str(err))
        if ready:
            loaded = [r[1] for r in ready]
            captions = self.module.caption_many(loaded, pixels=np.stack([r[2] for r in ready]))
            for (index, image, _), caption in zip(ready, captions):
                res = ImageResult(index, image.source, caption=caption)
                if k:
                    res.interpretation = self.module.interpret(image, k)
                if text is not None:
                    res.relation = SemioticInteraction(self.module).relate(image, text, max(k, 1))
                if culture:
                    res.culture = self.module.analyze_culture(image)
                out[index] = res
        return [out[i] for i, _, _ in batch]

    def run_sequential(self, items: Iterable[ImageInput]) -> tuple[list[ImageResult], RunStats]:
        """The baseline: one image at a time, read, preprocessed and captioned in turn."""
        started = time.perf_counter()
        results = []
        for index, item in enumerate(items):
            try:
                loaded = load_image(item)
                results.append(ImageResult(index, loaded.source, caption=self.module.caption_many([loaded])[0]))
            except ImageError as err:
                results.append(ImageResult(index, str(item), error=str(err)))
        return results, self._stats(results, started, "sequential")

    def _stats(self, results: list[ImageResult], started: float, mode: str) -> RunStats:
        return RunStats(images=sum(r.error is None for r in results), errors=sum(r.error is not None for r in results),
                        seconds=time.perf_counter() - started, mode=mode)
