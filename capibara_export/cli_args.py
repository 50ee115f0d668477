"""Argument types and option groups every command's parser shares (`cli.py` and the
`cli_*` modules each import them from here), checked where they are parsed so a bad value
is one line before JAX loads."""

from __future__ import annotations

import argparse
from pathlib import Path


def csv_of(kind=str):
    """A comma-separated list of `kind`, refused when empty."""
    def parse(text: str):
        items = [x.strip() for x in text.split(",") if x.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"{text!r} is an empty list: give at least one value, or leave the "
                                             "option out for its default")
        try:
            return tuple(kind(x) for x in items)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {kind.__name__}") from None
    return parse


def path_arg(text: str) -> str:
    """A path option that must name something: an empty string would read as "not given"."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; name the file")
    return text


def jobs_arg(text: str) -> int | None:
    """--jobs: a positive count, or `auto` (None: workers/auto_jobs decides)."""
    return None if text == "auto" else count()(text)


def count(minimum: int = 1, maximum: int = 2 ** 31 - 1):
    """An integer option checked where it is parsed (`analyze --batch 0` used to loop forever)."""
    def parse(text: str) -> int:
        if not text.strip().isascii() or not text.strip().lstrip("-").isdigit() or len(text) > 20:
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a whole number")
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below the minimum of {minimum}")
        if value > maximum:
            raise argparse.ArgumentTypeError(f"{value} is above the maximum of {maximum}")
        return value
    return parse


def add_trust_args(p: argparse.ArgumentParser, executables: bool) -> None:
    """--trust-key, and with `executables` --allow-unsigned-executables."""
    p.add_argument("--trust-key", metavar="PUB", type=path_arg,
                   help="ed25519 public key (PEM) that must have signed the manifest; checked before any artifact "
                        "is read")
    if executables:
        p.add_argument("--allow-unsigned-executables", action="store_true",
                       help="load serialized executables (compiled code) from a bundle whose signature was not "
                            "checked; only for bundles from a source you trust")


def trust_policy(args):
    """The TrustPolicy that --trust-key and --allow-unsigned-executables ask for."""
    from .export.trust import TrustPolicy

    return TrustPolicy(trust_key=Path(args.trust_key) if getattr(args, "trust_key", None) else None,
                       allow_unsigned_executables=getattr(args, "allow_unsigned_executables", False))
