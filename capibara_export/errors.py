"""The errors that mean "bad input" or "the machine cannot take the output": reported as one
line and exit code 2, no traceback.

Looked up among the modules already imported, never imported here: an exception's class
lives in the module that raised it, so that module is loaded whenever its error is being
reported, and a bad option is refused before torch, transformers or TensorFlow load (the
eager imports cost ~7 s per refusal).
"""

from __future__ import annotations

import errno
import sys

_USER_ERRORS = (
    ("model.config", "ConfigError"), ("model.hf", "CheckpointError"), ("model.processor", "ProcessorError"),
    ("sharding.plans", "PlanError"), ("sharding.precision", "PrecisionError"),
    ("capibara_export.programs", "ProgramError"), ("capibara_export.targets", "TargetError"),
    ("capibara_export.export.manifest", "BundleError"), ("capibara_export.build_folder", "BuildFolderError"), ("capibara_export.bench_report", "BenchReportError"),
    ("capibara_export.semiotic.module", "SemioticError"), ("capibara_export.semiotic.codes", "CodesError"),
)


def user_errors() -> tuple[type[BaseException], ...]:
    found: list[type[BaseException]] = [FileNotFoundError]
    for module, name in _USER_ERRORS:
        loaded = sys.modules.get(module)
        if loaded is not None:
            found.append(getattr(loaded, name))
    return tuple(found)


def is_user_error(err: BaseException) -> bool:
    return isinstance(err, user_errors())


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
