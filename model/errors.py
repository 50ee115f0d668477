"""The model's view of the project's one bad-input error (it lives in modelapi, the floor below)."""

from modelapi.errors import UserError

__all__ = ["UserError"]
