"""SemioticInteraction: how a text works on an image (Barthes' anchorage and relay).

- anchorage: the image confirms the text (ITM match ≥ MATCH) and the text sits close to
  one of the image's own readings (ITC text cosine ≥ ANCHOR_SIMILARITY): it fixes that
  reading among the possible ones;
- contradiction: the image contradicts the text (ITM match < CONTRADICT);
- relay: everything between: the text is compatible with the image but adds what the
  image does not show (or confirms it without choosing one of its readings).

The thresholds live here and only here (THRESHOLDS) and are documented in docs/semiotics.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .images import ImageInput, load_image
from .module import MnemosyneSemioModule


@dataclass(frozen=True)
class Thresholds:
    """The ITM probabilities and ITC similarity at which `SemioticInteraction.relate` calls a text
    anchorage, relay or contradiction of its image."""
    match: float = 0.5               # ITM probability at or above which the image confirms the text
    contradict: float = 0.2          # ITM probability below which the image contradicts the text
    anchor_similarity: float = 0.5   # ITC cosine between the text and its nearest reading


THRESHOLDS = Thresholds()


class SemioticInteraction:
    """How a text relates to an image, in Barthes' terms: anchorage (the image confirms the text,
    which fixes one of the image's readings), relay (compatible, adding to it) or contradiction.
    Needs a module with a matching model."""
    def __init__(self, module: MnemosyneSemioModule, thresholds: Thresholds = THRESHOLDS):
        module._require_matcher()
        self.module, self.thresholds = module, thresholds

    def relate(self, image: ImageInput, text: str, k: int = 3) -> dict:
        """The verdict for `text` against `image`, with why, the ITM probability and ITC similarity,
        the reading the text anchors and all `k` readings with the image's polysemy index."""
        loaded = load_image(image)
        interpretation = self.module.interpret(loaded, k)
        readings = [r["text"] for r in interpretation["readings"]]
        scores = self.module.score(loaded, [text])
        match, similarity = scores["itm_prob"][0], scores["itc_similarity"][0]
        features = self.module._text_features(self.module.matcher, tuple([text, *readings]))
        reading_cos = features[1:] @ features[0]
        nearest = int(np.argmax(reading_cos))
        t = self.thresholds
        if match >= t.match and reading_cos[nearest] >= t.anchor_similarity:
            verdict, why = "anchorage", "the image confirms the text, which fixes one of its readings"
        elif match < t.contradict:
            verdict, why = "contradiction", "the image contradicts the text"
        else:
            verdict, why = "relay", "the text is compatible with the image and adds to it"
        self.module.stats.counts[f"relations_{verdict}"] += 1
        self.module.stats.add_coherence(text_match=match)
        return {"image": loaded.source, "text": text, "verdict": verdict, "why": why,
                "itm_prob": match, "itc_similarity": similarity,
                "anchored_reading": readings[nearest], "reading_similarity": float(reading_cos[nearest]),
                "readings": interpretation["readings"], "polysemy_index": interpretation["polysemy_index"],
                "thresholds": asdict(t)}
