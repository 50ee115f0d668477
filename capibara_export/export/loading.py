"""Opening a bundle from elsewhere: the one path verify, inspect, analyze and serving take.

Order, each step before the next reads anything:

1. the manifest's bytes (a regular file, bounded);
2. its signature, when a trusted key is given (trust.py);
3. its JSON, schema and paths (manifest.py: every path confined to the bundle);

then per artifact, before it is loaded:

4. its sha256 against the manifest;
5. a check that reads it without running it: executable payloads' pickle globals and
   tree files (matrix/executable_format.py), SavedModel ops (saved_model_check.py),
   jax.export custom calls, effects and the compatibility window for this machine's jaxlib;
6. for executables only: a checked signature or `--allow-unsigned-executables`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from ..bundle_error import BundleError
from ..matrix import executable_format
from . import compatibility, saved_model_check, trust
from . import manifest as mf
from .trust import Trust, TrustPolicy

# Custom calls the project's jax.export artifacts contain (shape checks of the symbolic
# batch, sharding annotations); a host callback or foreign kernel is refused.
EXPORT_CUSTOM_CALLS = frozenset({"shape_assertion", "Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape",
                                 "annotate_device_placement"})
# The tokenizer and image processor files a bundle's processor/ may hold (all JSON or text;
# never a pickle or code that `trust_remote_code` could run).
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
                   "preprocessor_config.json", "processor_config.json")
_CUSTOM_CALL = re.compile(r'custom_call @([\w.$-]+)|call_target_name = "([^"]+)"')


@dataclass(frozen=True)
class OpenedBundle:
    """A bundle whose manifest was read, its signature checked (when a key was given) and its
    schema and paths validated; artifacts are checked one by one before each is loaded."""
    folder: Path
    manifest: dict
    trust: Trust
    policy: TrustPolicy
    digest: str = ""            # sha256 of the manifest's bytes: which bundle this is, for the hosts' join

    def path(self, artifact: dict, key: str = "path") -> Path:
        """The artifact's file, confined to the bundle (a path out of it is refused)."""
        return mf.confined(self.folder, artifact[key])

    def artifact(self, rel: str) -> dict:
        """The manifest's entry for the artifact at `rel`."""
        for a in self.manifest["artifacts"]:
            if a["path"] == rel:
                return a
        raise BundleError(f"{self.folder}: the manifest refers to {rel}, which it does not list")

    def executables_refused(self) -> str | None:
        """Why serialized executables may not load from this bundle under its trust policy, or None."""
        return self.trust.executables_refused(self.policy)

    def problems(self) -> dict[str, str]:
        """Every artifact that fails its hash or static check, with the reason (runs nothing).
        A bundle with any is not one its author made: inspect and analyze refuse it whole."""
        found = {}
        for a in self.manifest["artifacts"]:
            problem = mf.check_hash(self.folder, a) or inspect_artifact(self, a)
            if problem:
                found[a["path"]] = problem
        return found

    def refuse_if_tampered(self) -> None:
        """Raise BundleError naming the first failed artifact when any fails its hash or static check."""
        problems = self.problems()
        if problems:
            raise BundleError(refusal(self.folder, problems))


def refusal(folder: Path, problems: dict[str, str]) -> str:
    """One line for a bundle with failed artifacts: the first reason and how many more."""
    why = next(iter(problems.values()))
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"{folder}: refusing this bundle: {why}{more}"


def open_bundle(folder: Path, policy: TrustPolicy = TrustPolicy()) -> OpenedBundle:
    """Open `folder` as a bundle under `policy`: the manifest's bytes, its signature, its schema
    and paths, before anything else is read. Raises BundleError with the reason and the fix."""
    folder = Path(folder)
    data = mf.read_bytes(folder)
    checked = trust.establish(folder, data, policy)
    manifest = mf.parse(folder, data)
    if checked.signed_by:   # the signature vouches for every file, and for nothing else
        if "documents" not in manifest:
            raise BundleError(f"{folder}: signed by an export that did not cover README.md and the other documents; "
                              "ask its author to export and sign it again")
        extra = mf.unlisted_files(folder, manifest)
        if extra:
            raise BundleError(f"{folder}: holds {extra[0]}" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                              + ", which the signed manifest does not list; refusing this bundle: remove it, or "
                                "ask the author for the bundle as signed")
    problem = mf.check_documents(folder, manifest)
    if problem:
        raise BundleError(f"{folder}: refusing this bundle: {problem}")
    return OpenedBundle(folder, manifest, checked, policy, hashlib.sha256(data).hexdigest())


def jaxlib_here() -> str:
    from importlib import metadata

    return metadata.version("jaxlib")


def compatibility_problem(manifest: dict) -> str | None:
    problem = compatibility.check(manifest["compatibility"], jaxlib_here())
    return f"jax.export artifacts cannot load here: {problem}" if problem else None


def inspect_artifact(opened: OpenedBundle, a: dict) -> str | None:
    """Read an artifact (hash already checked) without running it; the problem, or None."""
    path = opened.path(a)
    kind = a["kind"]
    try:
        if kind == "executable":
            executable_format.check_payload(path.read_bytes(), a["path"])
            trees = opened.artifact(a["trees"])
            return mf.check_hash(opened.folder, trees) or inspect_artifact(opened, trees)
        if kind == "executable-trees":
            executable_format.read_trees(path)
        elif kind == "saved_model":
            saved_model_check.check(path)
        elif kind == "processor":
            extra = sorted(p.name for p in path.iterdir() if p.name not in PROCESSOR_FILES)
            if extra:
                return f"{a['path']}: holds {extra[0]}, which is not a tokenizer or processor file; refusing it"
        elif kind in ("jax.export", "jax.export-sharded"):
            return compatibility_problem(opened.manifest) or _check_export(path, a["path"])
    except BundleError as err:
        return str(err) if a["path"] in str(err) else f"{a['path']}: {err}"
    return None


def _check_export(path: Path, rel: str) -> str | None:
    from jax import export

    try:
        exported = export.deserialize(bytearray(path.read_bytes()))
    except Exception as err:  # flatbuffer or MLIR errors of any type
        return f"{rel}: not a jax.export artifact this jax can read ({type(err).__name__}: {str(err)[:120]})"
    if exported.ordered_effects or exported.unordered_effects:
        return f"{rel}: has side effects ({exported.ordered_effects + exported.unordered_effects}); refusing it"
    calls = {a or b for a, b in _CUSTOM_CALL.findall(exported.mlir_module())}
    foreign = sorted(calls - EXPORT_CUSTOM_CALLS)
    if foreign:
        return f"{rel}: calls custom target {foreign[0]}, which the project's exports never use; refusing it"
    return None
