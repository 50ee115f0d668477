"""Engines: one model's semiotic programs on the local device, batched to compiled sizes.

Both kinds call the same serving functions (capibara_export.matrix.serving): a
`CheckpointEngine` jit-compiles them over parameters in memory (JAX's persistent cache
keeps the compiled programs across runs); a `BundleEngine` calls a bundle's jax.export
artifacts with its orbax parameters. Requests are padded up to the next compiled batch
size (repeating the last row), so a handful of programs serve any number of images;
`program_stats` counts first calls per (program, batch) (compiles) against reuses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np

from sharding.precision import get_policy
from sharding.storage import stored_params

from .. import compiler_options, families
from ..export import manifest as mf
from ..export import params as params_io
from ..export import stablehlo
from ..export.loading import open_bundle
from ..export.trust import TrustPolicy
from ..matrix.programs import ProgramOptions
from ..matrix.serving import flatten, serving_function

BATCH_SIZES = (1, 4, 8)


@dataclass
class ProgramStats:
    compiles: int = 0
    reuses: int = 0

    def to_dict(self) -> dict:
        total = self.compiles + self.reuses
        return {"compiles": self.compiles, "reuses": self.reuses, "reuse_rate": self.reuses / total if total else 0.0}


@dataclass
class Engine:
    name: str
    config: object                 # BLIP's config (model/config.py), read through its family
    preprocessor: object           # BLIP's Preprocessor (the family's open_processor)
    options: ProgramOptions
    precision: str = "fp32"
    batch_sizes: tuple[int, ...] = BATCH_SIZES
    stats: ProgramStats = field(default_factory=ProgramStats)

    def __post_init__(self):
        self._seen: set[tuple[str, int]] = set()

    def has(self, tower: str) -> bool:
        return self.config.has(tower)

    # ------------------------------------------------------------ batching
    def bucket(self, n: int) -> int:
        return next((b for b in self.batch_sizes if b >= n), self.batch_sizes[-1])

    def run(self, entry: str, *inputs):
        """Run `entry` over inputs whose first axis is the batch (any size)."""
        n = len(inputs[0])
        size = self.bucket(n)
        outs = []
        for start in range(0, n, size):
            chunk = [x[start:start + size] for x in inputs]
            rows = len(chunk[0])
            padded = [np.concatenate([c, np.repeat(c[-1:], size - rows, axis=0)]) if rows < size else c
                      for c in chunk]
            key = (entry, size)
            if key in self._seen:
                self.stats.reuses += 1
            else:
                self._seen.add(key)
                self.stats.compiles += 1
            out = self._call(entry, size, padded)
            outs.append(jax.tree.map(lambda x: np.asarray(x)[:rows], out))
        return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)

    def _call(self, entry: str, batch: int, inputs: list):
        raise NotImplementedError

    # ------------------------------------------------------------ programs
    def encode(self, pixels: np.ndarray) -> np.ndarray:
        return self.run("encode_image", pixels)

    def prompt(self, n: int, text: str | None = None) -> np.ndarray:
        return np.tile(self.preprocessor.prompt(text)[None], (n, 1))

    def caption(self, embeds: np.ndarray, prompt: str | None = None) -> np.ndarray:
        return self.run("caption_image", embeds, self.prompt(len(embeds), prompt))

    def readings(self, embeds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.run("readings", embeds, self.prompt(len(embeds)))

    def tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        return self.preprocessor.texts(texts, self.options.text_len)

    def score(self, embeds: np.ndarray, texts: list[str]) -> dict:
        ids, mask = self.tokenize(texts)
        return self.run("score_image", embeds, ids, mask)

    def image_features(self, embeds: np.ndarray) -> np.ndarray:
        return self.run("image_features", embeds)

    def text_features(self, texts: list[str]) -> np.ndarray:
        ids, mask = self.tokenize(texts)
        return self.run("text_features", ids, mask)


class CheckpointEngine(Engine):
    """Jit-compiled serving functions over parameters held in memory: canonical `params`
    stored once in this platform's serving layout and layer storage (model/layout.py)."""

    def __init__(self, name: str, config, params: dict, preprocessor, options: ProgramOptions,
                 precision: str = "fp32", batch_sizes=BATCH_SIZES):
        family = families.for_config(config)
        config = family.for_platform(config, jax.default_backend())
        super().__init__(name, config, preprocessor, options, precision, tuple(batch_sizes))
        policy = get_policy(precision)
        self._flat = jax.device_put(flatten(stored_params(family, params, config, policy)))
        self._compiled: dict[tuple[str, int], object] = {}

    def _call(self, entry, batch, inputs):
        key = (entry, batch)
        if key not in self._compiled:
            serving = serving_function(self.config, entry, get_policy(self.precision), batch, self.options)
            self._compiled[key] = jax.jit(serving.fn, compiler_options=compiler_options.for_devices(jax.devices()[:1]))
        return self._compiled[key](self._flat, *inputs)


class BundleEngine(Engine):
    """A bundle's portable jax.export artifacts and parameters (no model code in the loop)."""

    def __init__(self, bundle: Path, precision: str | None = None, batch_sizes=BATCH_SIZES,
                 policy: TrustPolicy = TrustPolicy()):
        bundle = Path(bundle)
        opened = open_bundle(bundle, policy)
        opened.refuse_if_tampered()  # any artifact failing its checks: not the bundle its author made
        manifest = opened.manifest
        family = families.for_record(manifest["model"])
        config = family.config_from_dict(manifest["model"]["config"])
        exports = {(a["entry"], a["precision"]): a for a in manifest["artifacts"] if a["kind"] == "jax.export"}
        available = sorted({p for _, p in exports})
        if not available:
            raise mf.BundleError(f"{bundle}: no portable jax.export artifacts; re-export it")
        precision = precision or ("fp32" if "fp32" in available else available[0])
        if precision not in available:
            raise mf.BundleError(f"{bundle}: no jax.export artifacts in {precision}; it has {', '.join(available)}")
        if not any(e == "readings" for e, _ in exports):
            raise mf.BundleError(f"{bundle}: has no semiotic programs (readings, score_image, ...); "
                                 "re-export it with this version of capibara-export")
        mine = {e: a for (e, p), a in exports.items() if p == precision}
        processor = next((a for a in manifest["artifacts"] if a["kind"] == "processor"), None)
        if processor is None:
            raise mf.BundleError(f"{bundle}: no processor/ (tokenizer); re-export the bundle")
        params_rel = next(iter(mine.values()))["params"]
        # refuse_if_tampered above hashed and statically checked every artifact
        paths = {e: opened.path(a) for e, a in mine.items()}
        params_path = opened.path(opened.artifact(params_rel))
        processor_path = opened.path(processor)
        super().__init__(f"bundle:{bundle.resolve()}:{precision}", config,
                         family.open_processor(processor_path, config),
                         ProgramOptions(**manifest["model"]["options"]), precision, tuple(batch_sizes))
        self.bundle, self.manifest = bundle, manifest
        self._exports = paths
        self._flat = params_io.restore(params_path)
        self._loaded: dict[str, object] = {}

    def _call(self, entry, batch, inputs):
        if entry not in self._exports:
            raise mf.BundleError(f"{self.bundle}: no {entry} program for this model's towers")
        if entry not in self._loaded:
            self._loaded[entry] = jax.jit(stablehlo.load(self._exports[entry]).call,
                                          compiler_options=compiler_options.for_devices(jax.devices()[:1]))
        return self._loaded[entry](self._flat, *inputs)
