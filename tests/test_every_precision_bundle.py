"""The tiny default-target bundle (tpu-v4-64: 8 hosts x 4 devices) with every sharded entry in
every precision: `verify --processes 8` passes on it, and the bundle README's slice recipes run
as written. Its own file, beside tests/test_tpu_bundle.py, so the test scheduler (`--dist
loadfile`) can run the two on different workers."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from capibara_export.export import manifest as mf
from tests.test_export import build_bundle, verify

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def every_precision_bundle(tmp_path_factory) -> Path:
    """The tiny default-target bundle with every sharded entry in every precision (dp, the
    plan every precision selects; 4 new tokens; readings among the portable programs, whose
    bf16 beams tie-break differently from the reference)."""
    return build_bundle(tmp_path_factory.mktemp("every"), "--entries", "encode_image,caption,decode_step,score",
                        "--precisions", "fp32,bf16-mixed,bf16", "--export-precisions", "fp32,bf16-mixed,bf16",
                        "--max-new-tokens", "4", "--no-saved-model", "--export-entries", "readings")


def test_every_entry_in_every_precision_verifies_across_eight_processes(every_precision_bundle):
    manifest = mf.read(every_precision_bundle)
    sharded = {(a["entry"], a["precision"]) for a in manifest["artifacts"] if a["kind"] == "jax.export-sharded"}
    assert sharded == {(e, p) for e in ("encode_image", "caption", "decode_step", "score")
                       for p in ("fp32", "bf16-mixed", "bf16")}, sharded
    code, rows, err = verify(every_precision_bundle, "--processes", "8")
    assert code == 0, err[-2000:]
    across = [r for r in rows if "across 8 processes" in r["output"]]
    assert {r["artifact"] for r in across} == {a["path"] for a in manifest["artifacts"]
                                               if a["kind"] == "jax.export-sharded"}
    assert all(r["result"] == "pass" for r in rows if r["result"] not in ("not runnable here", "not loaded (unsigned)"))
    # decode_step's bf16 cache crossed the process boundary as bfloat16
    assert [r for r in across if "decode_step-dp-bf16-b32" in r["artifact"] and "cross_kv" in r["output"]]
    # every row carries the slowest process's timings
    assert all(re.search(r"slowest process, s: open [\d.]+, join [\d.]+, restore [\d.]+, first call [\d.]+, "
                         r"program [\d.]+, exit [\d.]+", r["note"]) for r in across), across[0]["note"]


def test_the_bundle_readme_slice_recipes_run_as_written(every_precision_bundle, tmp_path):
    """The README's bash blocks: the inputs, the local launch as written, and the per-host command
    with its two placeholders filled in (and simulated devices), every process exiting 0."""
    import subprocess
    import sys

    import numpy as np

    readme = (every_precision_bundle / "README.md").read_text()
    section = readme.split("### On the slice", 1)[1].split("\n### ", 1)[0]
    blocks = [b.split("```", 1)[0].strip() for b in section.split("```bash\n")[1:]]
    make_inputs, per_host, local, verify_cmd = blocks
    assert verify_cmd == "python -m capibara_export verify . --processes 8"
    work = tmp_path / "build"
    import shutil
    shutil.copytree(every_precision_bundle.parent, work)
    bundle = work / "bundle"

    def sh(cmd: str, **kw):
        return subprocess.run(["bash", "-c", cmd.replace("python -m", f"{sys.executable} -m", 1)
                               .replace("python -c", f"{sys.executable} -c", 1)], cwd=bundle, capture_output=True,
                              text=True, timeout=600, **kw)
    made = sh(make_inputs)
    assert made.returncode == 0 and (work / "in.npz").is_file(), made.stderr[-1000:]
    ran = sh(local)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "[0] capibara-export serve: process 0 of 8" in ran.stdout and (work / "out.npz").is_file()
    first = dict(np.load(work / "out.npz"))
    (work / "out.npz").unlink()
    from capibara_export.export.launch import free_port

    port = free_port()
    cmd = per_host.replace("HOST0:8476", f"127.0.0.1:{port}").replace("\\\n", " ").split("#")[0]
    procs = [subprocess.Popen(["bash", "-c", cmd.replace("$I", str(i)).replace("python -m", f"{sys.executable} -m", 1)
                               + " --cpu-devices 4 --heartbeat-timeout 30"], cwd=bundle, stdout=subprocess.DEVNULL,
                              stderr=open(tmp_path / f"host-{i}.log", "w"), start_new_session=True)
             for i in range(8)]
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
    assert codes == [0] * 8, [(tmp_path / f"host-{i}.log").read_text()[-500:] for i, c in enumerate(codes) if c]
    again = dict(np.load(work / "out.npz"))
    assert first.keys() == again.keys() and all(np.array_equal(first[k], again[k]) for k in first)
