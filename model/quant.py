"""Weight-only int8 as the model's layers read it (defined in modelapi.quant, shared with the precisions)."""

from modelapi.quant import QArray, materialize, quantize

__all__ = ["QArray", "materialize", "quantize"]
