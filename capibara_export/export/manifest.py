"""The bundle manifest (versioned schema), artifact hashing, and the trust checks that run
before anything in a bundle is loaded.

Bundles are trusted input: a serialized executable is a pickle plus compiled code. Loading
one is allowed only after its sha256 matches the manifest and the manifest's toolchain
and topology match this machine; a mismatch is refused with one line naming both sides.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path

from ..records import toolchain

SCHEMA = "capibara-export/bundle-manifest"
SCHEMA_VERSION = 1
# jax.export: artifacts stay loadable by JAX releases up to 6 months newer (backward
# compatibility) and by releases at most 1 month older (forward); see docs/artifacts.md.
EXPORT_BACKWARD_DAYS = 182
EXPORT_FORWARD_DAYS = 30
# What a serialized executable is tied to: any difference and it must be rebuilt.
EXECUTABLE_TOOLCHAIN = ("jax", "jaxlib", "libtpu")


class BundleError(ValueError):
    """A bundle that is incomplete, altered, or made for another toolchain or machine."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_sha256(folder: Path) -> str:
    """One hash over every file of a folder artifact (SavedModel, orbax checkpoint)."""
    digest = hashlib.sha256()
    for f in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        digest.update(f.relative_to(folder).as_posix().encode())
        digest.update(sha256(f).encode())
    return digest.hexdigest()


def artifact_hash(path: Path) -> str:
    return folder_sha256(path) if path.is_dir() else sha256(path)


def artifact_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def validity_window(created: dt.date) -> dict:
    return {"created": created.isoformat(),
            "valid_until": (created + dt.timedelta(days=EXPORT_BACKWARD_DAYS)).isoformat(),
            "oldest_jax_release": (created - dt.timedelta(days=EXPORT_FORWARD_DAYS)).isoformat(),
            "rule": "jax.export artifacts load in JAX releases from about 1 month before `created` "
                    "to 6 months after it"}


def write(path: Path, manifest: dict) -> None:
    path.write_text(json.dumps(manifest, indent=1, sort_keys=False, default=str))


def read(bundle: Path) -> dict:
    path = Path(bundle) / "manifest.json"
    if not path.is_file():
        raise BundleError(f"{bundle}: no manifest.json; this is not a capibara-export bundle")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise BundleError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if manifest.get("schema") != SCHEMA or manifest.get("schema_version") != SCHEMA_VERSION:
        raise BundleError(f"{path}: schema {manifest.get('schema')} v{manifest.get('schema_version')} is not "
                          f"{SCHEMA} v{SCHEMA_VERSION}")
    return manifest


def check_hash(bundle: Path, artifact: dict) -> str | None:
    """None when the artifact's bytes are what the manifest says, else the problem."""
    path = Path(bundle) / artifact["path"]
    if not path.exists():
        return f"{artifact['path']}: missing from the bundle"
    actual = artifact_hash(path)
    if actual != artifact["sha256"]:
        return f"{artifact['path']}: sha256 {actual[:12]}… does not match the manifest's {artifact['sha256'][:12]}…"
    return None


def check_toolchain(manifest: dict, artifact_path: str) -> None:
    """Refuse an executable made by another jax/jaxlib/libtpu, naming both versions."""
    theirs, ours = manifest["toolchain"], toolchain()
    diff = [k for k in EXECUTABLE_TOOLCHAIN if theirs.get(k) != ours.get(k)]
    if diff:
        made = ", ".join(f"{k} {theirs.get(k)}" for k in diff)
        here = ", ".join(f"{k} {ours.get(k)}" for k in diff)
        raise BundleError(f"{artifact_path}: built with {made}, but this machine has {here}; "
                          "serialized executables only load with the exact toolchain: rebuild the bundle "
                          "or use the jax.export artifacts")
