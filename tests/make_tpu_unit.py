"""Write tests/fixtures/tiny_tpu_caption_dp_bf16_b32.hlo.gz: one stored TPU unit.

The optimized HLO of the tiny model's caption entry, plan dp, bf16, batch 32, compiled for
the default target (tpu-v4-64, mesh 4x8) deviceless through libtpu. tests/test_libtpu_estimate.py
reads the compiler's per-kernel estimates from it without compiling anything. Regenerate it
after a toolchain change with `python -m tests.make_tpu_unit` (about 10 s).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

FIXTURE = Path(__file__).parent / "fixtures" / "tiny_tpu_caption_dp_bf16_b32.hlo.gz"


def build() -> None:
    from capibara_export.cli import main

    with tempfile.TemporaryDirectory() as tmp:
        code = main(["build", "--mesh", "4x8", "--model", "tiny", "--entries", "caption", "--plans", "dp",
                     "--precisions", "bf16", "--batch", "32", "--out", tmp, "--quiet", "--no-cache"])
        if code:
            raise SystemExit(code)
        (found,) = Path(tmp).glob("*/hlo/caption-dp-bf16-b32.hlo.gz")
        shutil.copyfile(found, FIXTURE)


if __name__ == "__main__":
    build()
    print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size / 1e3:.0f} kB)")
