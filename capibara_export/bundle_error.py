"""BundleError: a bundle (or one artifact of it) that is incomplete, altered, unsafe, or made
for another toolchain or machine.

On the floor beneath `matrix/` and `export/` because both raise it: the matrix writes and
checks executables in the bundle's format (matrix/executable_format.py), the export reads
whole bundles.
"""

from __future__ import annotations

from modelapi.errors import UserError


class BundleError(UserError):
    """A bundle that is incomplete, altered, unsafe, or made for another toolchain or machine."""
