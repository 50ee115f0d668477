"""BLIP's logical axes (the shared vocabulary of modelapi.axes) and its towers.

Each tower is a named scope of the program (HLO metadata) and the top-level key of its
parameters, so a plan may give a tower rules of its own (sharding/plans.py).
"""

from modelapi.axes import (BATCH, CACHE_SEQ, EMBED, HEAD_DIM, HEADS, LAYERS, LOGICAL_AXES, MLP, PATCH, SEQ, VOCAB,
                           constrain, is_names, tower, tower_rules)

TOWERS = ("vision", "text_decoder", "text_encoder")

__all__ = ["BATCH", "CACHE_SEQ", "EMBED", "HEAD_DIM", "HEADS", "LAYERS", "LOGICAL_AXES", "MLP", "PATCH", "SEQ",
           "VOCAB", "TOWERS", "constrain", "is_names", "tower", "tower_rules"]
