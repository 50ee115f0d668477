"""Signed bundles: who vouches for a bundle, checked before any artifact is read.

The manifest lists every artifact's sha256, so a signature over the manifest's bytes
vouches for the whole bundle. Ed25519 (RFC 8032) through `cryptography`; keys are the
standard PEM files `openssl genpkey -algorithm ed25519` also writes (PKCS#8 private,
SubjectPublicKeyInfo public). The signature sits beside the manifest in
`manifest.json.sig` (JSON: algorithm, key fingerprint, base64 signature).

Policy (docs/artifacts.md): without `--trust-key` a bundle is untrusted. Everything that
is data (parameters, StableHLO, SavedModels after their op check, the tokenizer) may be
read; serialized executables, which are compiled code, load only from a bundle whose
signature a trusted key checked, or with `--allow-unsigned-executables`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..bundle_error import BundleError

SIGNATURE_FILE = "manifest.json.sig"
ALGORITHM = "ed25519"


@dataclass(frozen=True)
class TrustPolicy:
    """What a bundle must prove before it is used: a signature by `trust_key`, and whether
    serialized executables (compiled code) may load without one."""
    trust_key: Path | None = None            # public key that must have signed the manifest
    allow_unsigned_executables: bool = False  # load executables without a checked signature


@dataclass(frozen=True)
class Trust:
    """What opening a bundle established: the fingerprint of the key that signed it, or None."""
    signed_by: str | None  # fingerprint of the trusted key that checked the signature; None: unsigned/unchecked

    def executables_refused(self, policy: TrustPolicy) -> str | None:
        """Why executables may not load from this bundle, or None."""
        if self.signed_by or policy.allow_unsigned_executables:
            return None
        return ("serialized executables are compiled code and this bundle's signature was not checked: pass "
                "--trust-key PUB.pem for a signed bundle, or --allow-unsigned-executables if you trust its source")


def _crypto():
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    return serialization, ed25519, InvalidSignature


def fingerprint(public_key) -> str:
    serialization, _, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


def read_key(path: Path, private: bool):
    serialization, ed25519, _ = _crypto()
    path = Path(path)
    kind = "private" if private else "public"
    if not path.is_file():
        raise BundleError(f"{path}: {kind} key file not found; make a pair with `python -m capibara_export keygen DIR`")
    data = path.read_bytes()[:64 * 1024]
    try:
        key = (serialization.load_pem_private_key(data, password=None) if private
               else serialization.load_pem_public_key(data))
    except (ValueError, TypeError) as err:
        raise BundleError(f"{path}: not a PEM {kind} key without a passphrase ({str(err)[:80]}); make one with "
                          "`python -m capibara_export keygen DIR` or `openssl genpkey -algorithm ed25519`") from None
    wanted = ed25519.Ed25519PrivateKey if private else ed25519.Ed25519PublicKey
    if not isinstance(key, wanted):
        raise BundleError(f"{path}: a {type(key).__name__}, not an Ed25519 {kind} key")
    return key


def keygen(folder: Path) -> tuple[Path, Path]:
    """A new key pair: signing.pem (mode 600) and signing.pub.pem. Refuses to overwrite."""
    serialization, ed25519, _ = _crypto()
    folder = Path(folder)
    if os.path.lexists(folder) and (folder.is_symlink() or not folder.is_dir()):
        raise BundleError(f"{folder}: exists and is not a folder; keygen writes signing.pem and signing.pub.pem into "
                          "a folder: choose a new or existing folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BundleError(f"{folder}: cannot make that folder ({err.strerror}); choose another") from None
    private, public = folder / "signing.pem", folder / "signing.pub.pem"
    for p in (private, public):
        if os.path.lexists(p):
            raise BundleError(f"{p}: already exists; keygen never overwrites a key (choose another folder)")
    key = ed25519.Ed25519PrivateKey.generate()
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def sign(manifest_bytes: bytes, private_key_path: Path) -> bytes:
    """The signature file's bytes for a manifest."""
    key = read_key(private_key_path, private=True)
    return json.dumps({"algorithm": ALGORITHM, "key": fingerprint(key.public_key()),
                       "signature": base64.b64encode(key.sign(manifest_bytes)).decode()}).encode()


def establish(bundle: Path, manifest_bytes: bytes, policy: TrustPolicy) -> Trust:
    """Check the signature of these manifest bytes when the policy names a trusted key."""
    if policy.trust_key is None:
        return Trust(signed_by=None)
    _, _, invalid = _crypto()
    key = read_key(policy.trust_key, private=False)
    sig_path = Path(bundle) / SIGNATURE_FILE
    if sig_path.is_symlink() or not sig_path.is_file():
        raise BundleError(f"{bundle}: not signed (no {SIGNATURE_FILE}), but --trust-key asks for a signature: "
                          "ask its author for a signed export (`export --sign-key`)")
    try:
        sig = json.loads(sig_path.read_bytes()[:64 * 1024])
        assert sig["algorithm"] == ALGORITHM
        signature = base64.b64decode(sig["signature"], validate=True)
    except Exception:
        raise BundleError(f"{sig_path}: not an {ALGORITHM} signature file") from None
    try:
        key.verify(signature, manifest_bytes)
    except invalid:
        signer = sig.get("key", "?")
        raise BundleError(f"{bundle}: manifest signature does not verify with {policy.trust_key} "
                          f"({fingerprint(key)}; the bundle says {signer}): the manifest was altered or signed "
                          "by another key; do not use this bundle") from None
    return Trust(signed_by=fingerprint(key))
