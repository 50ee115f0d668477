"""The errors that mean "bad input" or "the machine cannot take the output": reported as one
line and exit code 2, no traceback.

Every package's bad-input error subclasses `modelapi.errors.UserError`. The base is looked up
among the modules already imported, never imported here: a UserError can only have been
raised once modelapi/errors.py is loaded, and a bad option is refused before JAX, torch,
transformers or TensorFlow load (the eager imports cost ~7 s per refusal).
"""

from __future__ import annotations

import errno
import sys


def is_user_error(err: BaseException) -> bool:
    """A UserError (modelapi/errors.py: every package's bad-input error) or a missing file."""
    base = sys.modules.get("modelapi.errors")   # not loaded yet: nothing can have raised a UserError
    return isinstance(err, FileNotFoundError) or (base is not None and isinstance(err, base.UserError))


# OS errors that mean "the disk or folder cannot take the output", with the fix; staged
# writes (staging.py) guarantee that nothing half-written is left behind.
_DISK_ERRORS = {errno.ENOSPC: "free some space or choose another --out; nothing half-written was left",
                errno.EDQUOT: "your disk quota is full: free some space or choose another --out",
                errno.EROFS: "that file system is read-only: choose another --out"}


def one_line_report(err: BaseException) -> str | None:
    """The one line to print for a user or disk error, whatever foreign text (a key, a path)
    it quotes; None for anything else (a bug: its traceback is the useful report)."""
    if is_user_error(err):
        return " ".join(str(err).split())
    if isinstance(err, OSError) and err.errno in _DISK_ERRORS:
        return f"{err.filename or 'writing the output'}: {err.strerror}; {_DISK_ERRORS[err.errno]}"
    return None
