"""The one base of every "bad input" error in the project.

`UserError` means the input or the request is wrong, not the code: the CLI prints it as one
line naming the problem and the fix and exits 2, with no traceback. Every package's own
error (ConfigError here, PlanError in sharding, BundleError in the pipeline, ...) subclasses
it, so the CLI catches one type. It lives in `modelapi`, the lowest package, because every model and every other package
imports it and it imports nothing of theirs.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input: reported as one line with its fix, exit code 2."""
