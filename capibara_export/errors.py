"""The error types that mean "bad input": reported as one line and exit code 2, no traceback."""

from model.config import ConfigError
from model.hf import CheckpointError
from model.processor import ProcessorError
from sharding.plans import PlanError
from sharding.precision import PrecisionError

from .bench_report import BenchReportError
from .export.manifest import BundleError
from .programs import ProgramError
from .semiotic.codes import CodesError
from .semiotic.module import SemioticError
from .targets import TargetError

USER_ERRORS = (ConfigError, CheckpointError, ProcessorError, PlanError, PrecisionError, ProgramError, TargetError,
               FileNotFoundError, BundleError, BenchReportError, SemioticError, CodesError)
