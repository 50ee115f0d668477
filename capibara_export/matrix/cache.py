"""Result cache: a re-run with nothing changed recompiles nothing.

Keyed by everything that determines a compiled program: the unit (target, mesh, entry,
plan name, precision, batch, program options), the model config, the plan's rules, the
source code that builds programs (records.code_version) and the toolchain versions.
Each entry is a record plus its HLO texts (optimized and pre-partition) and, for a unit
that compiled, its serialized executable (JAX's payload and the JSON tree description),
so an export writes the build's executables instead of compiling them again. Every file
is written atomically (temporary file then rename) and the record last, so an
interrupted build leaves only whole entries and the next run resumes.

This is the build's only compilation cache. JAX's persistent cache is not used: for
deviceless TPU targets jax 0.10.2 writes entries it cannot read back without a TPU client
("PjRtCompiler must be constructed with a Client"), and an XLA:CPU executable loaded from
it re-serializes without its code ("Function wrapped_add not found"), which would poison
the executables kept here.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import re
from pathlib import Path

from .records import CompileRecord, code_version, toolchain


def cache_key(record_unit: dict, model_config: dict, plan: dict, mesh: dict, model_module: str | None = None) -> str:
    return key_of({"unit": record_unit, "model": model_config, "plan": {k: plan[k] for k in ("params", "activations")},
                   "devices": mesh, "code": code_version(model_module), "toolchain": toolchain()})


def _atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename: readers see the whole file or
    none. A failed write (a full disk) removes its temporary file before raising."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


_TMP = re.compile(r"\..+\.(\d+)\.tmp")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class ResultCache:
    def __init__(self, root: Path, enabled: bool = True):
        self.root = Path(root) / "results"
        self.enabled = enabled

    TEXTS = ("hlo", "pre")  # optimized per-device HLO, pre-partition global HLO
    # serialized executable: the payload (gzip -1, ~4x smaller) and its JSON trees with the
    # payload's sha256 (not *.json: a record is the only .json of an entry)
    EXECUTABLE = ("xla.gz", "xla-trees")

    def sweep(self) -> int:
        """Remove the temporary files of processes that died while writing (killed, or the
        machine went down); a live writer's are left alone. Returns how many were removed."""
        removed = 0
        if not self.enabled or not self.root.is_dir():
            return removed
        for path in self.root.glob("*/.*.tmp"):
            match = _TMP.fullmatch(path.name)
            if match and not _pid_alive(int(match[1])):
                with contextlib.suppress(OSError):
                    path.unlink()
                    removed += 1
        return removed

    def _path(self, key: str, suffix: str) -> Path:
        return self.root / key[:2] / f"{key}.{suffix}"

    def get(self, key: str) -> tuple[CompileRecord, dict[str, str]] | None:
        if not self.enabled:
            return None
        rec_path = self._path(key, "json")
        if not rec_path.is_file():
            return None
        texts = {}
        try:
            record = CompileRecord.from_dict(json.loads(rec_path.read_text()))
            for name in self.TEXTS:
                path = self._path(key, f"{name}.gz")
                if path.is_file():
                    texts[name] = gzip.decompress(path.read_bytes()).decode()
        except Exception:  # noqa: BLE001 - any unreadable entry (bad gzip, zlib.error, JSON, types) is a miss
            self.discard(key)
            return None
        if record.status == "ok" and set(texts) != set(self.TEXTS):
            self.discard(key)
            return None
        return record, texts

    def discard(self, key: str) -> None:
        """Remove an entry that failed to read, so the rebuilt one replaces it cleanly."""
        for suffix in ("json", *(f"{name}.gz" for name in self.TEXTS), *self.EXECUTABLE):
            with contextlib.suppress(OSError):
                self._path(key, suffix).unlink()

    def put(self, key: str, record: CompileRecord, texts: dict[str, str],
            executable: tuple[bytes, str] | None = None) -> None:
        """Texts and executable first, the record last: a record on disk means its entry is whole."""
        if not self.enabled:
            return
        rec_path = self._path(key, "json")
        rec_path.parent.mkdir(parents=True, exist_ok=True)
        for name, text in texts.items():
            _atomic_write(self._path(key, f"{name}.gz"), gzip.compress(text.encode(), compresslevel=6))
        if executable is not None:
            payload, trees = executable
            _atomic_write(self._path(key, self.EXECUTABLE[0]), gzip.compress(payload, compresslevel=1))
            sidecar = {"sha256": hashlib.sha256(payload).hexdigest(), "trees": trees}
            _atomic_write(self._path(key, self.EXECUTABLE[1]), json.dumps(sidecar).encode())
        _atomic_write(rec_path, json.dumps(record.to_dict(), sort_keys=True).encode())

    def executable(self, key: str) -> tuple[bytes, str] | None:
        """The unit's serialized executable (payload, trees JSON), or None when the entry has
        none (a unit that did not compile, one cached before executables were kept, or one
        whose payload no longer matches the hash written beside it: that is discarded)."""
        if not self.enabled:
            return None
        payload_path, sidecar_path = (self._path(key, suffix) for suffix in self.EXECUTABLE)
        if not (payload_path.is_file() and sidecar_path.is_file() and self._path(key, "json").is_file()):
            return None
        try:
            payload = gzip.decompress(payload_path.read_bytes())
            sidecar = json.loads(sidecar_path.read_bytes())
            if hashlib.sha256(payload).hexdigest() == sidecar["sha256"] and isinstance(sidecar["trees"], str):
                return payload, sidecar["trees"]
        except Exception:  # noqa: BLE001 - unreadable (bad gzip, zlib.error, JSON, types): a miss
            pass
        for path in (payload_path, sidecar_path):
            with contextlib.suppress(OSError):
                path.unlink()
        return None


class DerivedCache:
    """What is computed from cached records: a unit's analysis, the report. Keyed by a hash of
    its inputs and of the source code that computes it (`source_hash`), so a warm build
    recomputes nothing and any change recomputes what it touches. An unreadable entry is a
    miss; writes are atomic."""

    def __init__(self, root: Path, kind: str):
        self.root = Path(root) / kind

    def get(self, key: str, suffix: str) -> bytes | None:
        path = self.root / key[:2] / f"{key}.{suffix}"
        try:
            return path.read_bytes()
        except OSError:
            return None

    def get_json(self, key: str) -> dict | None:
        data = self.get(key, "json")
        try:
            value = json.loads(data) if data is not None else None
        except ValueError:
            value = None
        return value if isinstance(value, dict) else None

    def put(self, key: str, suffix: str, data: bytes) -> None:
        path = self.root / key[:2] / f"{key}.{suffix}"
        with contextlib.suppress(OSError):  # a cache that cannot be written is only slower, never an error
            path.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(path, data)


def source_hash(*relative: str) -> str:
    """Hash of the named source files (relative to the repository root)."""
    root = Path(__file__).resolve().parents[2]
    digest = hashlib.sha256()
    for name in relative:
        digest.update(name.encode())
        digest.update((root / name).read_bytes())
    return digest.hexdigest()[:16]


def key_of(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


@contextlib.contextmanager
def jax_cache_disabled():
    """Compile without JAX's persistent cache, whoever switched it on. An XLA:CPU executable
    loaded from that cache re-serializes without its code ("Function wrapped_add not found"
    when loaded again), so executables that are exported are always compiled fresh."""
    import jax

    previous = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", previous)
