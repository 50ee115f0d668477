"""The bundle manifest (versioned schema), artifact hashing, and the structural checks that
run before anything in a bundle is read.

A bundle is input from elsewhere. Every path the manifest names must stay inside the
bundle: relative, no `..`, no symlink anywhere on the way or inside a folder artifact, and
only regular files and folders (a device or FIFO would hang a reader). Those checks run
when the manifest is parsed, so every command refuses such a bundle before it hashes or
opens anything. Signatures (trust.py) and the per-kind checks (executables, SavedModel
ops, compatibility window) come after; docs/artifacts.md has the whole policy.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections import Counter
from pathlib import Path, PurePosixPath

from ..bundle_error import BundleError
from ..matrix.records import toolchain

SCHEMA = "capibara-export/bundle-manifest"
SCHEMA_VERSION = 2
MAX_MANIFEST_BYTES = 16 * 2 ** 20
# What a serialized executable is tied to: any difference and it must be rebuilt.
EXECUTABLE_TOOLCHAIN = ("jax", "jaxlib", "libtpu")
# Manifest fields of an artifact that name a path in the bundle.
PATH_FIELDS = ("path", "trees", "params")
# The bundle's documents, listed with their sha256 in `documents` (signed with the manifest).
DOCUMENTS = ("README.md", "ARTIFACTS.md", "manifest.schema.json")
# Files a bundle holds beside its artifacts and documents: the manifest, its signature, and
# the marker of the folder the tool wrote (matrix/staging.py; its id differs per folder).
BUNDLE_FILES = ("manifest.json", "manifest.json.sig", ".capibara-export")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _walk(folder: Path) -> list[Path]:
    """Every regular file under a folder artifact, refusing links and special files."""
    files = []
    for root, dirs, names in os.walk(folder, followlinks=False):
        for name in dirs + names:
            p = Path(root) / name
            mode = os.lstat(p).st_mode
            if stat.S_ISLNK(mode) or not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise BundleError(f"{p.relative_to(folder.parent)}: a link or special file inside a bundle "
                                  "artifact; refusing this bundle (bundles hold only regular files and folders)")
            if stat.S_ISREG(mode):
                files.append(p)
    return sorted(files)


def folder_sha256(folder: Path) -> str:
    """One hash over every file of a folder artifact (SavedModel, orbax checkpoint)."""
    digest = hashlib.sha256()
    for f in _walk(Path(folder)):
        digest.update(f.relative_to(folder).as_posix().encode())
        digest.update(sha256(f).encode())
    return digest.hexdigest()


def artifact_hash(path: Path) -> str:
    return folder_sha256(path) if path.is_dir() else sha256(path)


def artifact_size(path: Path) -> int:
    return sum(p.stat().st_size for p in _walk(path)) if path.is_dir() else path.stat().st_size


def confined(bundle: Path, rel) -> Path:
    """The bundle path a manifest names, refused if it could lead anywhere else."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        raise BundleError(f"manifest path {rel!r} is not a relative POSIX path inside the bundle")
    pure = PurePosixPath(rel)
    if pure.is_absolute() or any(part in ("..", "") for part in rel.split("/")):
        raise BundleError(f"manifest path {rel!r} points outside the bundle (absolute or ..); refusing this bundle")
    if "." in rel.split("/") or len(rel) > 1024 or any(len(part) > 255 for part in rel.split("/")):
        raise BundleError(f"manifest path {rel[:80]!r}{'...' if len(rel) > 80 else ''} is not a path a bundle "
                          "writes ('.' parts, or longer than a file system allows); refusing this bundle")
    here = Path(bundle)
    for part in pure.parts:
        here = here / part
        try:
            mode = os.lstat(here).st_mode
        except FileNotFoundError:
            return Path(bundle) / rel  # reported as missing by the hash check
        except OSError as err:
            raise BundleError(f"manifest path {rel[:80]!r} cannot be looked up ({err.strerror}); "
                              "refusing this bundle") from None
        if stat.S_ISLNK(mode):
            raise BundleError(f"manifest path {rel!r} goes through a symbolic link; refusing this bundle")
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise BundleError(f"manifest path {rel!r} is not a regular file or folder; refusing this bundle")
    if stat.S_ISDIR(mode):
        _walk(here)  # refuses links and special files inside a folder artifact
    return here


def write(path: Path, manifest: dict) -> bytes:
    data = json.dumps(manifest, indent=1, sort_keys=False).encode()
    path.write_bytes(data)
    return data


def read_bytes(bundle: Path) -> bytes:
    """The manifest's bytes: a regular file, bounded in size (read once, then checked)."""
    path = Path(bundle) / "manifest.json"
    if not Path(bundle).is_dir():
        raise BundleError(f"{bundle}: bundle folder not found; pass the folder `export` printed")
    if path.is_symlink() or not path.is_file():
        raise BundleError(f"{bundle}: no manifest.json (or not a regular file); this is not a capibara-export bundle")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{path}: {path.stat().st_size} bytes; a manifest is at most {MAX_MANIFEST_BYTES}")
    return path.read_bytes()


def parse(bundle: Path, data: bytes) -> dict:
    """The manifest from its bytes: JSON, this schema version, every path confined."""
    path = Path(bundle) / "manifest.json"
    try:
        manifest = json.loads(data)
    except RecursionError:
        raise BundleError(f"{path}: nested too deeply to be a manifest; refusing this bundle") from None
    except (UnicodeDecodeError, ValueError) as err:   # JSONDecodeError, or an integer of thousands of digits
        raise BundleError(f"{path}: not valid JSON ({' '.join(str(getattr(err, 'msg', err)).split())[:120]})") \
            from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{path}: not a JSON object")
    if manifest.get("schema") != SCHEMA or manifest.get("schema_version") != SCHEMA_VERSION:
        raise BundleError(f"{path}: schema {manifest.get('schema')} v{manifest.get('schema_version')} is not "
                          f"{SCHEMA} v{SCHEMA_VERSION}; re-export the bundle with this capibara-export")
    artifacts = manifest.get("artifacts")
    for a in artifacts if isinstance(artifacts, list) else []:  # confinement first: before anything else reads
        for key in PATH_FIELDS:
            if isinstance(a, dict) and key in a:
                confined(bundle, a[key])
    from .schema import validate

    try:
        problem = validate(manifest)
    except RecursionError:
        problem = "nested too deeply to be a manifest"
    if problem:
        raise BundleError(f"{path}: {problem}")
    counts = Counter(a["path"] for a in manifest["artifacts"])
    twice, n = counts.most_common(1)[0] if counts else ("", 1)
    if n > 1:   # each would be hashed and checked again: minutes for a few KB of manifest
        raise BundleError(f"{path}: lists {twice} {n} times; a bundle lists each artifact once")
    return manifest


def read(bundle: Path) -> dict:
    """Read and check a manifest (paths confined); signatures are checked by `trust`."""
    return parse(bundle, read_bytes(bundle))


def check_hash(bundle: Path, artifact: dict) -> str | None:
    """None when the artifact's bytes are what the manifest says, else the problem."""
    path = confined(bundle, artifact["path"])
    if not path.exists():
        return f"{artifact['path']}: missing from the bundle"
    actual = artifact_hash(path)
    if actual != artifact["sha256"]:
        return f"{artifact['path']}: sha256 {actual[:12]}… does not match the manifest's {artifact['sha256'][:12]}…"
    return None


def check_documents(bundle: Path, manifest: dict) -> str | None:
    """None when every document the manifest lists has its sha256, else the first problem."""
    for doc in manifest.get("documents", []):
        path = confined(bundle, doc["path"])
        if path.name not in DOCUMENTS or "/" in doc["path"]:
            return f"{doc['path']}: listed as a document, which a bundle never has; refusing this bundle"
        if not path.is_file():
            return f"{doc['path']}: missing from the bundle"
        if sha256(path) != doc["sha256"]:
            return f"{doc['path']}: sha256 does not match the manifest's; the document was altered"
    return None


def unlisted_files(bundle: Path, manifest: dict) -> list[str]:
    """Files in the bundle that neither the manifest lists (artifacts, with the files inside
    folder artifacts, and documents) nor are the manifest, its signature or the folder marker."""
    listed = {a[k] for a in manifest["artifacts"] for k in ("path", "trees") if k in a}
    listed |= {d["path"] for d in manifest.get("documents", [])} | set(BUNDLE_FILES)
    found = []
    for root, dirs, names in os.walk(bundle, followlinks=False):
        rel_root = Path(root).relative_to(bundle).as_posix()
        prefix = "" if rel_root == "." else rel_root + "/"
        if prefix and prefix.rstrip("/") in listed:
            dirs[:] = []          # a folder artifact: its hash covers what is inside
            continue
        for name in names + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            rel = prefix + name
            if rel not in listed:
                found.append(rel)
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(root, d))]
        if len(found) > 100:
            break
    return sorted(found)


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
