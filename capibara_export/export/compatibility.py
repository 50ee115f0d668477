"""How long, and for which JAX releases, a bundle's jax.export artifacts stay loadable.

JAX's promise is about builds, not dates of export (docs/export/export.md, "Compatibility
guarantees", jax-ml/jax): an artifact serialized by a jaxlib can be deserialized and run
by a JAX built **up to 6 months newer** (backward compatibility) and **up to 3 weeks
older** (forward compatibility). "What matters is when the exporting and consuming
components were built, not the time when the exporting and the compilation happen."
So the window is computed from the release date of the jaxlib that serialized the
artifact, which this table records (from jax-ml/jax's CHANGELOG.md and its GitHub
releases; jax and jaxlib have been released together, with one version, since 0.4.32).

Newer JAX also needs Python >= 3.12 (jax 0.11 dropped 3.11) and the `flatbuffers` package
to deserialize; `requirements()` says so for inspect and the bundle README.
"""

from __future__ import annotations

import datetime as dt

from ..bundle_error import BundleError

# jaxlib version -> release date (CHANGELOG.md headings "JAX 0.x.y (Month D, YYYY)";
# 0.11.1 from its GitHub release page).
RELEASES = {
    "0.8.0": "2025-10-15", "0.8.1": "2025-11-18", "0.8.2": "2025-12-18",
    "0.9.0": "2026-01-20", "0.9.1": "2026-03-02", "0.9.2": "2026-03-18",
    "0.10.0": "2026-04-16", "0.10.1": "2026-05-20", "0.10.2": "2026-06-17",
    "0.11.0": "2026-07-16", "0.11.1": "2026-08-17",
}
BACKWARD_DAYS = 183   # "up to 6 months newer"
FORWARD_DAYS = 21     # "up to 3 weeks older"
SOURCE = "https://docs.jax.dev/en/latest/export/export.html#compatibility-guarantees"
REQUIREMENTS = {"python": ">=3.11 for jax 0.10.x; >=3.12 for jax 0.11 and newer",
                "packages": ["jax", "jaxlib", "flatbuffers (jax.export deserialization)"]}


def _key(version: str) -> tuple[int, ...]:
    return tuple(int("".join(ch for ch in part if ch.isdigit()) or 0) for part in version.split("."))


def released(version: str) -> dt.date | None:
    """The release date of a jaxlib version; None when the table does not know it."""
    date = RELEASES.get(version) or RELEASES.get(".".join(version.split(".")[:3]))
    return dt.date.fromisoformat(date) if date else None


def window(jaxlib: str) -> dict:
    """The manifest's `compatibility` block for artifacts serialized by `jaxlib`."""
    made = released(jaxlib)
    if made is None:
        raise BundleError(f"jaxlib {jaxlib}: release date unknown to capibara-export; add it to "
                          "capibara_export/export/compatibility.py RELEASES before exporting")
    oldest = made - dt.timedelta(days=FORWARD_DAYS)
    newest = made + dt.timedelta(days=BACKWARD_DAYS)
    known = sorted(RELEASES, key=_key)
    return {
        "serialized_by": {"jaxlib": jaxlib, "released": made.isoformat()},
        "loads_in": {"jaxlib_released_from": oldest.isoformat(), "jaxlib_released_until": newest.isoformat(),
                     "known_releases": [v for v in known if oldest <= released(v) <= newest]},
        "rule": "jax.export artifacts load in a JAX/jaxlib released up to 3 weeks before and up to 6 months "
                "after the jaxlib that serialized them",
        "source": SOURCE,
        "requirements": REQUIREMENTS,
    }


def check(compat: dict, here: str) -> str | None:
    """None when a jaxlib `here` is inside the window, else the problem and the fix.

    A version newer than every release in the table has no date here; it is accepted,
    because JAX itself (>= 0.11.1) refuses artifacts older than its backward window."""
    loads = compat["loads_in"]
    start, end = dt.date.fromisoformat(loads["jaxlib_released_from"]), dt.date.fromisoformat(
        loads["jaxlib_released_until"])
    made = compat["serialized_by"]["jaxlib"]
    date = released(here)
    if date is None:
        if _key(here) < _key(made):
            return (f"jaxlib {here} is older than {made}, which serialized the artifacts, and its release date is "
                    f"unknown: install a jaxlib released {start} .. {end}")
        return None
    if date < start:
        return (f"jaxlib {here} (released {date}) is more than 3 weeks older than jaxlib {made}, which serialized "
                f"these artifacts: install a jaxlib released {start} .. {end}")
    if date > end:
        return (f"jaxlib {here} (released {date}) is more than 6 months newer than jaxlib {made}, which serialized "
                f"these artifacts: re-export the bundle, or install a jaxlib released {start} .. {end}")
    return None
