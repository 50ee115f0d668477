"""The error types that mean "bad input": reported as one line and exit code 2, no traceback.

Looked up among the modules already imported, never imported here: an exception's class
lives in the module that raised it, so that module is loaded whenever its error is being
reported, and a bad option is refused before torch, transformers or TensorFlow load (the
eager imports cost ~7 s per refusal).
"""

from __future__ import annotations

import sys

_USER_ERRORS = (
    ("model.config", "ConfigError"), ("model.hf", "CheckpointError"), ("model.processor", "ProcessorError"),
    ("sharding.plans", "PlanError"), ("sharding.precision", "PrecisionError"),
    ("capibara_export.programs", "ProgramError"), ("capibara_export.targets", "TargetError"),
    ("capibara_export.export.manifest", "BundleError"), ("capibara_export.bench_report", "BenchReportError"),
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
