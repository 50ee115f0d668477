"""Result cache: a re-run with nothing changed recompiles nothing.

Keyed by everything that determines a compiled program: the unit (target, mesh, entry,
plan name, precision, batch, program options), the model config, the plan's rules, the
source code that builds programs (records.code_version) and the toolchain versions.
Each entry is a record plus its optimized HLO, written atomically (temporary file then
rename), so an interrupted build leaves only whole entries and the next run resumes.

JAX's own persistent compilation cache is switched on for cpu/local targets; for
deviceless TPU targets jax 0.10.2 writes entries it cannot read back without a TPU
client ("PjRtCompiler must be constructed with a Client"), so there this cache is the
only one.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from pathlib import Path

from .records import CompileRecord, code_version, toolchain


def cache_key(record_unit: dict, model_config: dict, plan: dict, mesh: dict) -> str:
    payload = {"unit": record_unit, "model": model_config, "plan": {k: plan[k] for k in ("params", "activations")},
               "devices": mesh, "code": code_version(), "toolchain": toolchain()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class ResultCache:
    def __init__(self, root: Path, enabled: bool = True):
        self.root = Path(root) / "results"
        self.enabled = enabled

    def _paths(self, key: str) -> tuple[Path, Path]:
        folder = self.root / key[:2]
        return folder / f"{key}.json", folder / f"{key}.hlo.gz"

    def get(self, key: str) -> tuple[CompileRecord, str | None] | None:
        if not self.enabled:
            return None
        rec_path, hlo_path = self._paths(key)
        if not rec_path.is_file():
            return None
        try:
            record = CompileRecord.from_dict(json.loads(rec_path.read_text()))
            hlo = gzip.decompress(hlo_path.read_bytes()).decode() if hlo_path.is_file() else None
        except (ValueError, OSError, EOFError):
            return None  # an unreadable entry is a miss; it is rewritten after compiling
        if record.status == "ok" and hlo is None:
            return None
        return record, hlo

    def put(self, key: str, record: CompileRecord, hlo_text: str | None) -> None:
        if not self.enabled:
            return
        rec_path, hlo_path = self._paths(key)
        rec_path.parent.mkdir(parents=True, exist_ok=True)
        if hlo_text is not None:
            _atomic_write(hlo_path, gzip.compress(hlo_text.encode(), compresslevel=6))
        _atomic_write(rec_path, json.dumps(record.to_dict(), sort_keys=True).encode())


def enable_jax_cache(root: Path) -> None:
    import jax

    path = Path(root) / "jax"
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
