"""Cumulative metrics of a semiotic module: counts, latency percentiles, throughput, cache
hit rates and coherence accumulated across calls."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np


@dataclass
class HitCounter:
    hits: int = 0
    misses: int = 0

    def to_dict(self) -> dict:
        total = self.hits + self.misses
        return {"hits": self.hits, "misses": self.misses, "hit_rate": self.hits / total if total else 0.0}


@dataclass
class Metrics:
    started: float = field(default_factory=time.perf_counter)
    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    coherence: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    embedding_cache: HitCounter = field(default_factory=HitCounter)
    text_cache: HitCounter = field(default_factory=HitCounter)

    @contextlib.contextmanager
    def timed(self, operation: str, items: int = 1):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.latencies[operation].append(time.perf_counter() - start)
            self.counts[operation] += items

    def add_coherence(self, **values: float) -> None:
        for k, v in values.items():
            if v is not None:
                self.coherence[k].append(float(v))

    def to_dict(self, programs: dict | None = None) -> dict:
        wall = time.perf_counter() - self.started
        latency = {op: {"count": len(xs), **{f"p{q}_s": float(np.percentile(xs, q)) for q in (50, 90, 99)}}
                   for op, xs in self.latencies.items() if xs}
        images = self.counts.get("images", 0)
        return {
            "counts": dict(self.counts),
            "latency": latency,
            "throughput": {"images_per_s": images / wall if wall > 0 else 0.0, "wall_s": wall},
            "cache": {"embeddings": self.embedding_cache.to_dict(), "text_features": self.text_cache.to_dict(),
                      **({"programs": programs} if programs else {})},
            "coherence": {k: {"mean": float(np.mean(v)), "std": float(np.std(v)), "n": len(v)}
                          for k, v in self.coherence.items() if v},
        }
