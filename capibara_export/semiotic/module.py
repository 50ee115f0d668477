"""MnemosyneSemioModule: captions, polysemic readings, cultural codes and coherence for images.

Built on BLIP's three capabilities, run by engines (compiled programs or an exported
bundle): captioning (the caption tower), image–text matching (ITM) and contrastive
similarity (ITC) (the retrieval tower).

Definitions (docs/semiotics.md):
- a *reading* is one of the k best captions by beam search (distinct token sequences);
  its *coherence* is the ITM probability that it matches the image, its *similarity* the
  ITC cosine between image and reading;
- the *polysemy index* of an image is 1 − the mean pairwise ITC cosine between its
  readings' text embeddings: 0 when every reading says the same, growing as they diverge;
- *cultural codes* are scored zero-shot: the ITC cosine between the image and each code's
  prompt, turned into a distribution per category by a softmax at temperature 0.07.

Image embeddings are cached by content hash, per engine, so interpret, relate and
analyze_culture on the same image run its vision encoder once.
"""

from __future__ import annotations

import tempfile
import warnings
from collections import OrderedDict
from itertools import combinations
from pathlib import Path

import numpy as np

from modelapi.errors import UserError

from .. import families
from ..export.trust import TrustPolicy
from ..matrix.programs import ProgramOptions
from .codes import Code, load_codes
from .engine import BundleEngine, CheckpointEngine, Engine
from .images import ImageInput, load_image

# the semiotic module is BLIP's application: captions, readings and scores of one image
BLIP = families.get("blip")
from .metrics import Metrics

ITC_TEMPERATURE = 0.07  # BLIP's contrastive temperature at initialisation


class SemioticError(UserError):
    """A request the semiotic module cannot serve (a missing tower, a bad image or text): one line, exit 2."""
    pass


class MnemosyneSemioModule:
    """The semiotic module: captions, readings (several captions by beam search), cultural codes and
    image–text scores of one captioning model and, optionally, one matching model.

    Made from checkpoints (`from_checkpoints`), a bundle (`from_bundle`) or random weights
    (`random`, for tests). Image embeddings are cached per image, so reading, scoring and
    relating one image encode it once. `metrics()` reports what it ran and how long it took."""
    def __init__(self, captioner: Engine, matcher: Engine | None, *, random_weights: bool = False,
                 cache_size: int = 4096):
        if not captioner.has("caption"):
            raise SemioticError("the first model must have the caption tower (BlipForConditionalGeneration)")
        if matcher is not None and not matcher.has("retrieval"):
            raise SemioticError("the matching model must have the retrieval tower (BlipForImageTextRetrieval)")
        self.captioner, self.matcher = captioner, matcher
        self.random_weights = random_weights
        if random_weights:
            warnings.warn("MnemosyneSemioModule runs random weights: captions, readings and scores are meaningless",
                          stacklevel=2)
        self._cache: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._cache_size = cache_size
        self._text_cache: dict[tuple[str, tuple[str, ...]], np.ndarray] = {}
        self.stats = Metrics()

    # ------------------------------------------------------------ constructors
    @classmethod
    def from_checkpoints(cls, folders: list[str | Path], precision: str = "fp32",
                         options: ProgramOptions | None = None) -> MnemosyneSemioModule:
        """Hugging Face BLIP folders: one with the caption tower, optionally one with the
        retrieval tower (each HF checkpoint holds one)."""
        options = options or ProgramOptions(text_len=32)
        engines = []
        for folder in folders:
            cfg, params = BLIP.load_checkpoint(folder)
            engines.append(CheckpointEngine(f"checkpoint:{Path(folder).resolve()}", cfg, params,
                                            BLIP.open_processor(folder, cfg), options, precision))
        return cls._from_engines(engines)

    @classmethod
    def from_bundle(cls, folder: str | Path, precision: str | None = None,
                    policy: TrustPolicy | None = None) -> MnemosyneSemioModule:
        """A bundle's portable programs; `policy` names a trusted key to require its signature."""
        engine = BundleEngine(Path(folder), precision, policy=policy or TrustPolicy())
        weights = engine.manifest["model"]["weights"]
        return cls._from_engines([engine], random_weights=weights.startswith("random"))

    @classmethod
    def random(cls, preset: str = "tiny", seed: int = 0, precision: str = "fp32",
               options: ProgramOptions | None = None) -> MnemosyneSemioModule:
        """Random weights, for testing the serving path only (it warns: outputs are meaningless)."""
        cfg = BLIP.preset(preset)
        with tempfile.TemporaryDirectory(prefix="capibara-processor-") as folder:
            # the processor reads its files on construction; nothing is left behind in /tmp
            BLIP.write_assets(Path(folder), cfg, None, ())
            preprocessor = BLIP.open_processor(Path(folder), cfg)
        engine = CheckpointEngine(f"random:{preset}:{seed}", cfg, BLIP.init_params(cfg, seed),
                                  preprocessor, options or ProgramOptions(text_len=32), precision)
        return cls(engine, engine, random_weights=True)

    @classmethod
    def _from_engines(cls, engines: list[Engine], random_weights: bool = False) -> MnemosyneSemioModule:
        captioner = next((e for e in engines if e.has("caption")), None)
        matcher = next((e for e in engines if e.has("retrieval")), None)
        if captioner is None:
            raise SemioticError("none of the given models has the caption tower; pass a "
                                "BlipForConditionalGeneration checkpoint")
        return cls(captioner, matcher, random_weights=random_weights)

    # ------------------------------------------------------------ embeddings
    def _require_matcher(self) -> Engine:
        if self.matcher is None:
            raise SemioticError("this needs image-text matching: also pass a BlipForImageTextRetrieval checkpoint")
        return self.matcher

    def embeddings(self, engine: Engine, images: list, pixels: np.ndarray | None = None) -> np.ndarray:
        """Image tokens for each image (LoadedImage), from the cache where possible;
        `pixels` may carry the images already preprocessed (the pipeline's workers do it)."""
        keys = [(engine.name, img.key) for img in images]
        missing = [i for i, k in enumerate(keys) if k not in self._cache]
        self.stats.embedding_cache.hits += len(keys) - len(missing)
        self.stats.embedding_cache.misses += len(missing)
        if missing:
            if pixels is not None:
                pixels = pixels[missing]
            else:
                with self.stats.timed("preprocess", len(missing)):
                    pixels = engine.preprocessor.images([images[i].image for i in missing])
            with self.stats.timed("encode", len(missing)):
                encoded = engine.encode(pixels)
            for i, e in zip(missing, encoded):
                self._cache[keys[i]] = e
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        for k in keys:
            self._cache.move_to_end(k)
        return np.stack([self._cache[k] for k in keys])

    def _text_features(self, engine: Engine, texts: tuple[str, ...]) -> np.ndarray:
        key = (engine.name, texts)
        if key in self._text_cache:
            self.stats.text_cache.hits += 1
        else:
            self.stats.text_cache.misses += 1
            self._text_cache[key] = engine.text_features(list(texts))
        return self._text_cache[key]

    # ------------------------------------------------------------ capabilities
    def process_image(self, image: ImageInput, prompt: str | None = None) -> str:
        """The caption of one image, as text."""
        return self.caption_many([load_image(image)], prompt)[0]

    def caption_many(self, images: list, prompt: str | None = None, pixels: np.ndarray | None = None) -> list[str]:
        """One caption per image (greedy), in order; `prompt` starts every caption, `pixels`
        (already preprocessed, one row per image) skips the preprocessing."""
        embeds = self.embeddings(self.captioner, images, pixels)
        with self.stats.timed("caption", len(images)):
            ids = self.captioner.caption(embeds, prompt)
        self.stats.counts["images"] += len(images)
        return [self.captioner.preprocessor.decode(row) for row in ids]

    def score(self, image: ImageInput, texts: list[str]) -> dict:
        """ITM match probability and ITC similarity of the image with each text."""
        matcher = self._require_matcher()
        loaded = load_image(image)
        embeds = self.embeddings(matcher, [loaded])
        with self.stats.timed("score", len(texts)):
            out = matcher.score(np.repeat(embeds, len(texts), axis=0), list(texts))
        return {"itm_prob": out["itm_prob"].astype(float).tolist(),
                "itc_similarity": out["itc_similarity"].astype(float).tolist()}

    def interpret(self, image: ImageInput, k: int = 3) -> dict:
        """k distinct readings, each with its coherence (ITM) and similarity (ITC), and the
        image's polysemy index."""
        if not 1 <= k <= self.captioner.options.beams:
            raise SemioticError(f"k={k}: the compiled readings program keeps {self.captioner.options.beams} beams; "
                                "ask for 1..that many (or build the module with ProgramOptions(beams=k))")
        loaded = load_image(image)
        embeds = self.embeddings(self.captioner, [loaded])
        with self.stats.timed("readings"):
            ids, log_probs = self.captioner.readings(embeds)
        readings = [{"text": self.captioner.preprocessor.decode(ids[0, j]), "token_ids": ids[0, j].tolist(),
                     "log_prob": float(log_probs[0, j])} for j in range(k)]
        result = {"image": loaded.source, "readings": readings, "polysemy_index": None}
        if self.matcher is not None:
            texts = [r["text"] for r in readings]
            scores = self.score(loaded, texts)
            for r, m, s in zip(readings, scores["itm_prob"], scores["itc_similarity"]):
                r["coherence"], r["similarity"] = m, s
            result["polysemy_index"] = polysemy_index(self._text_features(self.matcher, tuple(texts)))
            self.stats.add_coherence(reading_coherence=float(np.mean(scores["itm_prob"])),
                                     polysemy_index=result["polysemy_index"])
        self.stats.counts["interpretations"] += 1
        return result

    def analyze_culture(self, image: ImageInput, codes: str | Path | list[str] | None = None, top: int = 3) -> dict:
        """Zero-shot scores of the image over a catalogue of cultural and artistic codes."""
        matcher = self._require_matcher()
        catalogue: list[Code] = load_codes(codes)
        loaded = load_image(image)
        embeds = self.embeddings(matcher, [loaded])
        with self.stats.timed("culture"):
            image_feature = matcher.image_features(embeds)[0]
            text = self._text_features(matcher, tuple(c.prompt for c in catalogue))
        sims = text @ image_feature
        by_category: dict[str, list[dict]] = {}
        for category in dict.fromkeys(c.category for c in catalogue):
            idx = [i for i, c in enumerate(catalogue) if c.category == category]
            logits = sims[idx] / ITC_TEMPERATURE
            probs = np.exp(logits - logits.max())
            probs /= probs.sum()
            rows = [{"code": catalogue[i].name, "prompt": catalogue[i].prompt, "meaning": catalogue[i].meaning,
                     "similarity": float(sims[i]), "probability": float(p)} for i, p in zip(idx, probs)]
            by_category[category] = sorted(rows, key=lambda r: -r["similarity"])[:top]
        return {"image": loaded.source, "categories": by_category, "temperature": ITC_TEMPERATURE}

    def coherence(self, image: ImageInput, k: int = 3) -> dict:
        """Per-image coherence: the caption's match, the readings' mean match, the polysemy
        index. Accumulated across calls in metrics()['coherence']."""
        loaded = load_image(image)
        caption = self.caption_many([loaded])[0]
        result = self.interpret(loaded, k)
        caption_match = self.score(loaded, [caption])["itm_prob"][0] if self.matcher is not None else None
        self.stats.add_coherence(caption_coherence=caption_match)
        return {"image": loaded.source, "caption": caption, "caption_coherence": caption_match,
                "reading_coherence": (float(np.mean([r["coherence"] for r in result["readings"]]))
                                      if self.matcher is not None else None),
                "polysemy_index": result["polysemy_index"]}

    def metrics(self) -> dict:
        """Counts, timings and coherence figures of everything this module ran, per program."""
        engines = [self.captioner] + ([self.matcher] if self.matcher not in (None, self.captioner) else [])
        programs = {e.name: e.stats.to_dict() for e in engines}
        return {**self.stats.to_dict(programs), "random_weights": self.random_weights}


def polysemy_index(features: np.ndarray) -> float:
    """1 − mean pairwise cosine of L2-normalised text embeddings (0 for a single reading)."""
    pairs = list(combinations(range(len(features)), 2))
    if not pairs:
        return 0.0
    return float(1.0 - np.mean([float(features[i] @ features[j]) for i, j in pairs]))
