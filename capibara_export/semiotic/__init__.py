"""The Mnemosyne semiotic module: captions, readings, cultural codes and text–image relations."""

from .interaction import THRESHOLDS, SemioticInteraction, Thresholds
from .module import MnemosyneSemioModule, SemioticError, polysemy_index
from .pipeline import ImagePipeline
from .profiling import profile_usage

__all__ = ["MnemosyneSemioModule", "SemioticInteraction", "Thresholds", "THRESHOLDS", "ImagePipeline",
           "SemioticError", "polysemy_index", "profile_usage"]
