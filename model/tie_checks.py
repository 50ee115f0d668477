"""How `verify` accepts generated token ids that legitimately differ from the reference's.

In bf16 and int8 another compiler may round a near tie of two tokens' logits either way;
a greedy caption then diverges from the first such token on, and a beam search may keep
the other of two beams that score alike. These checks accept exactly those cases, judged
by the reference (this model in f32 over the bundle's parameters), and nothing else.
"""

from __future__ import annotations

import hashlib

import jax
import jax.numpy as jnp
import numpy as np

from modelapi.family import ProgramOptions

from .config import BlipConfig
from .state import bind


def near_ties(config: BlipConfig, params: dict, pixels: np.ndarray, tolerance: float, next_token_logits=None):
    """Greedy caption rows whose first differing token was a near tie: the reference's logits
    for the two tokens within `tolerance` (scaled by the logits' magnitude).
    `next_token_logits(pixels, ids)` (the reference's, by default) gives (rows, T, V)."""
    cache: dict[str, np.ndarray] = {}

    def reference_logits(px: np.ndarray, ids: np.ndarray) -> np.ndarray:
        # one compiled call: the decoder is causal, so position k-1 holds what ids[:, :k] predicts
        key = hashlib.sha256(px.tobytes() + ids.tobytes()).hexdigest() + str(ids.shape)
        if key not in cache:
            def logits(p, px, ids):
                return bind(config, p, jnp.float32).caption_logits(px, ids, jnp.ones_like(ids))
            cache[key] = np.asarray(jax.jit(logits)(params, px, ids))
        return cache[key]
    next_token_logits = next_token_logits or reference_logits

    def check(got: np.ndarray, want: np.ndarray) -> tuple[bool, str]:
        rows = np.nonzero((got != want).any(axis=1))[0]
        firsts = [int(np.argmax(got[row] != want[row])) for row in rows]
        if 0 in firsts:
            return False, f"row {rows[firsts.index(0)]} differs in its prompt"
        return judge_divergences(rows, firsts, next_token_logits(np.asarray(pixels)[rows], want[rows]), got, want,
                                 tolerance)
    return check


def judge_divergences(rows, firsts, logits: np.ndarray, got: np.ndarray, want: np.ndarray,
                      tolerance: float) -> tuple[bool, str]:
    """Accept rows that first differ at token k only where the reference's logits after the
    prefix want[row, :k] (logits[i, k - 1], in teacher forcing) nearly tie the two tokens."""
    notes = []
    for i, (row, k) in enumerate(zip(rows, firsts)):
        at = logits[i, k - 1]
        margin = abs(float(at[want[row, k]] - at[got[row, k]]))
        limit = tolerance * max(1.0, float(np.abs(at).max()))
        if margin > limit:
            return False, f"row {row} diverges at token {k} with logit margin {margin:.3g} > {limit:.3g}"
        notes.append(f"row {row} at token {k} (margin {margin:.2g})")
    return True, "ids identical up to near-ties: " + ", ".join(notes)


def beam_ties(config: BlipConfig, params: dict, image_embeds: np.ndarray, prompt_len: int, tolerance: float,
              beam_scores=None):
    """Readings rows whose beams differ, accepted when, rescored by the reference in f32, the
    artifact's beams score as the reference's own do, rank by rank, within `tolerance`.
    `beam_scores(image, ids)` (the reference's, by default) gives each beam's score."""
    def reference_scores(image_pd: np.ndarray, ids_kt: np.ndarray) -> np.ndarray:
        # each beam's length-normalised log-probability, as generate.beam_search scores it:
        # generated tokens up to and including [SEP]
        k = ids_kt.shape[0]

        def logits(p, image, ids):
            return bind(config, p, jnp.float32).decoder_logits(ids, jnp.ones_like(ids), image)
        out = jax.jit(logits)(params, np.repeat(image_pd[None], k, axis=0), ids_kt)
        logp = np.asarray(jax.nn.log_softmax(out.astype(jnp.float32), axis=-1))
        sep, found = config.text.sep_token_id, []
        for beam in range(k):
            total, length = 0.0, 0
            for t in range(prompt_len, ids_kt.shape[1]):
                total += float(logp[beam, t - 1, ids_kt[beam, t]])
                length += 1
                if ids_kt[beam, t] == sep:
                    break
            found.append(total / max(length, 1))
        return np.array(found)
    scores = beam_scores or reference_scores

    def check(got: np.ndarray, want: np.ndarray) -> tuple[bool, str]:
        rows = np.nonzero((got != want).reshape(got.shape[0], -1).any(axis=1))[0]
        if any((got[r, :, :prompt_len] != want[r, :, :prompt_len]).any() for r in rows):
            return False, "a row differs in its prompt"
        notes = []
        for r in rows:
            mine, theirs = scores(image_embeds[r], got[r]), scores(image_embeds[r], want[r])
            gap = float(np.max(np.abs(np.sort(mine) - np.sort(theirs))))
            limit = tolerance * max(1.0, float(np.max(np.abs(theirs))))
            if gap > limit:
                return False, (f"row {r}'s beams score {np.round(mine, 4).tolist()} under the reference, its "
                               f"own {np.round(theirs, 4).tolist()} (gap {gap:.3g} > {limit:.3g})")
            notes.append(f"row {r} (score gap {gap:.2g})")
        return True, "ids identical up to near-tie beams scoring alike under the reference: " + ", ".join(notes)
    return check


def tie_check(config: BlipConfig, options: ProgramOptions, entry: str, params: dict, inputs: tuple,
              tolerance: float):
    """The near-tie check for an entry that searches over tokens (greedy caption from pixels,
    beam-searched readings from image embeddings); None where ids must match exactly."""
    if entry == "caption":
        return near_ties(config, params, inputs[0], tolerance)
    if entry == "readings":
        return beam_ties(config, params, np.asarray(inputs[0]), options.prompt_len, tolerance)
    return None
