"""Study: how long does each check of opening an untrusted bundle take (hashes, static scans,
per artifact kind; capibara_export/export/loading.py, what `verify` runs before it loads
anything)? The answer is in docs/measurements/ ("Opening an untrusted bundle").

    python -m tools.studies.bundle_checks BUNDLE

A script, not a pytest benchmark: it needs a real (base) bundle, which takes minutes to export."""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from pathlib import Path

from capibara_export import environment


def main(bundle: Path) -> None:
    environment.prepare(None, None)
    from capibara_export.export import manifest as mf
    from capibara_export.export.loading import inspect_artifact, open_bundle

    started = time.perf_counter()
    opened = open_bundle(bundle)
    opening = time.perf_counter() - started
    hashes, static, size = defaultdict(float), defaultdict(float), defaultdict(int)
    for a in opened.manifest["artifacts"]:
        t = time.perf_counter()
        problem = mf.check_hash(bundle, a)
        hashes[a["kind"]] += time.perf_counter() - t
        t = time.perf_counter()
        problem = problem or inspect_artifact(opened, a)
        static[a["kind"]] += time.perf_counter() - t
        size[a["kind"]] += a["size"]
        if problem:
            sys.exit(f"refused: {problem}")
    print(f"open (manifest read, schema, paths): {opening * 1e3:.0f} ms")
    for kind in hashes:
        print(f"{kind:20s} {size[kind] / 2 ** 20:9.1f} MiB  sha256 {hashes[kind]:6.2f} s  "
              f"static check {static[kind]:6.2f} s")
    print(f"total sha256 {sum(hashes.values()):.1f} s, static checks {sum(static.values()):.1f} s")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tools.studies.bundle_checks BUNDLE")
    main(Path(sys.argv[1]))
