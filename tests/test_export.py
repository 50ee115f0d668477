"""Serving bundles: all four artifact kinds, `verify` proving each reproduces the model,
refusal of altered or foreign bundles, and the README's own snippet."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from capibara_export.export import manifest as mf

pytestmark = pytest.mark.slow
KINDS = {"params", "jax.export", "jax.export-sharded", "saved_model", "executable", "executable-trees", "processor"}


def cli(*args, cwd=None, env=None) -> subprocess.CompletedProcess:
    merged = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
    return subprocess.run([sys.executable, "-m", "capibara_export", *map(str, args)], capture_output=True, text=True,
                          timeout=900, cwd=cwd, env=merged)


def build_bundle(out: Path, *extra) -> Path:
    """A tiny bundle: the portable exports cover every entry; executables and sharded
    exports are made for the selected encode_image and caption units."""
    result = cli("build", "--model", "tiny", "--quiet", "--entries", "encode_image,caption", "--export",
                 "--random-weights", "--out", out, *(extra if "--plans" in extra else ("--plans", "dp", *extra)))
    assert result.returncode == 0, result.stderr[-3000:]
    (folder,) = [p for p in out.iterdir() if not p.name.startswith(".")]
    return folder / "bundle"


def verify(bundle: Path, *extra) -> tuple[int, list[dict], str]:
    result = cli("verify", bundle, "--json", *extra)
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return result.returncode, rows, result.stderr


@pytest.fixture(scope="module")
def cpu_bundle(tmp_path_factory) -> Path:
    # the GPU serving layout (text kernels out-in, model/layout.py) end to end: params, every
    # export kind and the README recipes must agree on it; the TPU bundle keeps in-out
    return build_bundle(tmp_path_factory.mktemp("cpu"), "--target", "cpu", "--precisions", "fp32,bf16",
                        "--kernel-layout", "out-in")


@pytest.fixture(scope="module")
def cpu_verified(cpu_bundle):
    return verify(cpu_bundle, "--allow-unsigned-executables")


@pytest.fixture(scope="module")
def tpu_bundle(tmp_path_factory) -> Path:
    # fsdp: parameters sharded over all 32 devices, so each of the 8 hosts must restore only its share;
    # 4 new tokens: each decode step all-gathers the weights over gloo, ~2.7 s a step across 8 local processes
    return build_bundle(tmp_path_factory.mktemp("tpu"), "--precisions", "fp32", "--plans", "fsdp",
                        "--max-new-tokens", "4")


def test_cpu_bundle_holds_every_kind_and_verifies(cpu_bundle, cpu_verified):
    manifest = mf.read(cpu_bundle)
    assert {a["kind"] for a in manifest["artifacts"]} == KINDS
    assert manifest["model"]["config"]["text"]["kernel_layout"] == "out-in"
    params = next(a for a in manifest["artifacts"] if a["kind"] == "params")
    shapes = {x["name"]: x["shape"] for x in params["arrays"]}
    cfg = manifest["model"]["config"]
    fc1 = next(v for k, v in shapes.items() if k.startswith("text_decoder") and "fc1" in k and k.endswith("kernel"))
    assert fc1 == [cfg["text"]["depth"], cfg["text"]["mlp"], cfg["text"]["width"]], "fc1 stored outputs first"
    code, rows, err = cpu_verified
    assert code == 0, err
    assert rows and all(r["result"] == "pass" for r in rows)  # a CPU bundle runs entirely here
    kinds_checked = {r["artifact"].split("/")[0] for r in rows}
    assert {"params", "stablehlo", "saved_model", "executables"} <= kinds_checked
    fp32 = [r for r in rows if "fp32" in r["artifact"] and r["max_abs_error"] is not None and r["tolerance"]]
    assert fp32 and all(r["max_abs_error"] <= 1e-5 * max(1.0, r["tolerance"] / 1e-5) for r in fp32)
    captions = [r for r in rows if "caption" in r["artifact"] and r["output"] == "out"]
    assert captions and all(r["note"] == "token ids identical" for r in captions if "fp32" in r["artifact"])
    # bf16 may take the other branch only at a near-tie of the reference logits, and says so
    assert all(r["note"] == "token ids identical" or r["note"].startswith("ids identical up to near-ties")
               for r in captions)


def test_tpu_bundle_verifies_what_runs_here_and_never_passes_what_cannot(tpu_bundle):
    manifest = mf.read(tpu_bundle)
    assert {a["kind"] for a in manifest["artifacts"]} == KINDS
    # the default target: 32 v4 chips in megacore mode, 8 hosts x 4
    assert manifest["mesh"]["device_kind"] == "TPU v4" and manifest["target"]["topology"] == "v4:2x4x4"
    assert (manifest["mesh"]["hosts"]["processes"], manifest["mesh"]["hosts"]["devices_per_process"]) == (8, 4)
    code, rows, err = verify(tpu_bundle, "--allow-unsigned-executables", "--processes", "8")
    assert code == 0, err
    single = [r for r in rows if "across" not in r["output"]]
    tpu_only = [r for r in single if r["artifact"].startswith("executables/") or ".tpu-cpu.jaxexport" in r["artifact"]]
    assert tpu_only and all(r["result"] == "not runnable here" for r in tpu_only)
    executables = [r for r in tpu_only if r["artifact"].startswith("executables/") and "trees" not in r["artifact"]]
    assert executables and all(r["note"].startswith("compiled for 8 process(es) x 4 TPU v4 device(s)")
                               for r in executables), executables[0]["note"]
    sharded_restore = [r for r in rows if r["output"].startswith("restore sharded")]
    assert sharded_restore and all(r["result"] == "pass" for r in sharded_restore)
    # the same sharded programs across 8 local processes x 4 simulated devices, as the slice's hosts
    sharded = {a["path"] for a in manifest["artifacts"] if a["kind"] == "jax.export-sharded"}
    across = [r for r in rows if r["output"].endswith("across 8 processes x 4 cpu devices")]
    assert {r["artifact"] for r in across} == sharded and all(r["result"] == "pass" for r in across), across
    assert any(r["note"].startswith("token ids identical") for r in across if "caption" in r["artifact"])
    assert all(r["max_abs_error"] <= r["tolerance"] <= 1e-4 for r in across if "encode_image" in r["artifact"])
    # each host restored only its devices' shards: 4 of 32 devices, so 1/8 of every sharded array
    for r in across:
        share = re.search(r"each process restored at most (\d+) of (\d+) sharded parameter bytes", r["note"])
        assert share and int(share[2]) > 0 and int(share[1]) * 8 == int(share[2]), r["note"]


def _serve(bundle: Path, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "capibara_export", "serve", bundle, *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _pixels(path: Path, batch: int = 32, size: int = 32) -> Path:
    import numpy as np

    np.savez(path, pixel_values=np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32))
    return path


def test_serve_refuses_a_runtime_that_cannot_be_the_slice_in_one_line(tpu_bundle, tmp_path):
    """Wrong process count, an id out of range, an unreachable coordinator, a bad inputs file:
    each one line and exit 2, before anything runs (run side by side: bounded waits)."""
    from capibara_export.export.launch import free_port

    good = _pixels(tmp_path / "in.npz")
    (tmp_path / "bad.npz").write_text("not a zip")
    io = ["--entry", "encode_image", "--out", tmp_path / "out.npz"]
    cases = {
        "--num-processes 4 does not match: start one process per host, --num-processes 8":
            [*io, "--inputs", good, "--num-processes", 4, "--coordinator", "127.0.0.1:1"],
        "--process-id 8 is not one of 0..7":
            [*io, "--inputs", good, "--num-processes", 8, "--process-id", 8, "--coordinator", "127.0.0.1:1"],
        "did not answer within 2 s":
            [*io, "--inputs", good, "--num-processes", 8, "--process-id", 3, "--cpu-devices", 4,
             "--coordinator", f"127.0.0.1:{free_port()}", "--connect-timeout", 2],
        "the bundle has no sharded program for decode_step; it has: caption (fp32), encode_image (fp32)":
            [*io[:1], "decode_step", *io[2:], "--inputs", good, "--num-processes", 8, "--coordinator", "127.0.0.1:1"],
        "not an .npz of arrays":
            [*io, "--inputs", tmp_path / "bad.npz", "--num-processes", 8, "--process-id", 1,
             "--coordinator", "127.0.0.1:1"],
    }
    running = {want: _serve(tpu_bundle, *args) for want, args in cases.items()}
    wrong_n = cli("verify", tpu_bundle, "--processes", 4)   # refused before verify does any work
    assert wrong_n.returncode == 2 and wrong_n.stdout == "", wrong_n.stdout[-500:]
    assert "--processes 4: this bundle's mesh spans 8 process(es) x 4 device(s)" in wrong_n.stderr, wrong_n.stderr
    for want, proc in running.items():
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2 and want in err, (want, err[-800:])
        assert len(err.strip().splitlines()) == 1 and err.startswith("capibara-export: error: "), err[-800:]
    assert not (tmp_path / "out.npz").exists()


def test_a_lost_host_ends_every_other_process_within_the_heartbeat(tpu_bundle, tmp_path):
    """Process 3 of 8 is killed once it has joined: the other seven must not hang, nor pass; JAX's
    coordination service (5 s heartbeat here) ends them, and the launcher names process 3."""
    import signal
    import time

    from capibara_export.export.launch import failure, launch

    killed = {}

    def kill_three(procs):
        log, deadline = tmp_path / "logs" / "process-3.log", time.monotonic() + 180
        while "joined" not in log.read_text(errors="replace"):
            assert time.monotonic() < deadline and procs[3].poll() is None, log.read_text()[-2000:]
            time.sleep(0.2)
        os.killpg(procs[3].pid, signal.SIGKILL)
        killed["at"] = time.monotonic()

    begun = time.monotonic()
    ended = launch([tpu_bundle, "--entry", "encode_image", "--inputs", _pixels(tmp_path / "in.npz"),
                    "--out", tmp_path / "out.npz"], 8, 4, tmp_path / "logs", timeout_s=300, grace_s=60,
                   heartbeat_timeout_s=5, started=kill_three)
    assert ended[3].returncode == -signal.SIGKILL
    others = [e for e in ended if e.process_id != 3]
    assert all(e.returncode not in (0, None) for e in others), [(e.process_id, e.returncode) for e in others]
    assert max(e.seconds for e in others) - (killed["at"] - begun) < 5 + 40, [e.seconds for e in others]
    line = failure(ended)
    assert line.startswith("process 3 was killed by signal 9") and "7 other(s) ended too" in line, line
    assert "unhealthy" in line or "Terminating process" in line, line
    assert not (tmp_path / "out.npz").exists()


def test_serve_runs_the_executable_on_the_mesh_by_position_and_matches_the_export(cpu_bundle, tmp_path):
    """One process (a CPU bundle): the serialized executable where trust allows, else the sharded
    export; identical outputs, written by process 0."""
    import numpy as np

    pixels = _pixels(tmp_path / "in.npz")
    outs = {}
    for flag in ("--allow-unsigned-executables", "--no-executables"):
        out = tmp_path / f"out{flag}.npz"
        proc = _serve(cpu_bundle, "--entry", "encode_image", "--precision", "fp32", "--inputs", pixels, "--out", out,
                      "--cpu-devices", 32, flag)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        kind = "executable" if flag.startswith("--allow") else "jax.export-sharded"
        assert f"({kind})" in err, err[-2000:]
        with np.load(out) as data:
            outs[flag] = data["image_embeds"]
    a, b = outs.values()
    assert a.shape[0] == 32 and np.array_equal(a, b)


def test_manifest_documents_every_artifact(tpu_bundle):
    manifest = mf.read(tpu_bundle)
    for key in ("toolchain", "target", "mesh", "model", "compatibility", "selection", "plans", "artifacts"):
        assert key in manifest
    assert manifest["toolchain"]["jax"] == "0.10.2" and manifest["mesh"]["axis_names"] == ["data", "model"]
    loads = manifest["compatibility"]["loads_in"]
    assert loads["jaxlib_released_from"] < manifest["compatibility"]["serialized_by"]["released"] < \
        loads["jaxlib_released_until"]
    for a in manifest["artifacts"]:
        assert len(a["sha256"]) == 64 and a["size"] > 0
        assert "load" not in a  # no pointers into project code: the README has plain-library recipes
        if a["kind"] in ("jax.export", "jax.export-sharded", "executable"):
            assert a["inputs"] and a["outputs"] and a["entry"] and a["precision"]
            assert all(set(t) >= {"name", "shape", "dtype"} for t in a["inputs"] + a["outputs"])
    portable = next(a for a in manifest["artifacts"] if a["kind"] == "jax.export" and a["entry"] == "caption")
    assert portable["inputs"][0]["shape"][0] == "b" and set(portable["platforms"]) == {"tpu", "cpu", "cuda"}
    assert [t["name"] for t in portable["outputs"]] == ["token_ids"]
    score = next(a for a in manifest["artifacts"] if a["kind"] == "jax.export" and a["entry"] == "score")
    assert [t["name"] for t in score["outputs"]] == ["itc_similarity", "itm_logits", "itm_prob"]  # JAX's order
    sharded = next(a for a in manifest["artifacts"] if a["kind"] == "jax.export-sharded")
    assert sharded["mesh_axes"] == ["data", "model"] and isinstance(sharded["batch"], int)
    assert sharded["inputs"][0]["name"] in ("pixel_values", "input_ids")
    assert sharded["inputs"][0]["sharding"][0] == ["data", "model"]  # fsdp: the batch over all 32 devices
    assert all(isinstance(d, int) for t in sharded["outputs"] for d in t["shape"])
    assert sharded["analysis"]["predicted_latency_s"] > 0


def _flip_one_byte(path: Path) -> Path:
    target = path if path.is_file() else max((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    return target


def test_altered_artifacts_and_a_foreign_jax_version_fail_verify_naming_them(cpu_bundle, tmp_path):
    """One tampered copy, one verify run: a flipped byte in one artifact of each kind, and a
    manifest claiming the executables were made by jax 0.9.0."""
    copy = Path(shutil.copytree(cpu_bundle, tmp_path / "bundle"))
    manifest = json.loads((copy / "manifest.json").read_text())
    flipped = []
    for kind in ("params", "jax.export", "saved_model", "executable"):
        artifact = [a for a in manifest["artifacts"] if a["kind"] == kind][-1]  # keep earlier ones intact
        _flip_one_byte(copy / artifact["path"])
        flipped.append(artifact["path"])
    manifest["toolchain"]["jax"] = "0.9.0"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    code, rows, err = verify(copy, "--allow-unsigned-executables")
    assert code == 1
    for path in flipped:
        assert any(r["result"] == "FAIL" and r["artifact"] == path and "sha256" in r["note"] for r in rows), path
    assert "verify failed: " in err
    refused = [r for r in rows if r["artifact"].startswith("executables/") and r["artifact"] not in flipped
               and r["result"] == "FAIL" and "sha256" not in r["note"] and "depends on" not in r["note"]]
    assert refused and all("built with jax 0.9.0, but this machine has jax 0.10.2" in r["note"] for r in refused)


def test_bundle_readme_recipes_run_as_written_without_the_project(cpu_bundle):
    """Every code block of the bundle README, in a fresh process from the bundle folder, with
    plain JAX / orbax / TensorFlow / transformers: none of them may import capibara-export."""
    readme = (cpu_bundle / "README.md").read_text()
    blocks = readme.split("```python\n")[1:]
    assert len(blocks) == 5  # jax.export, SavedModel, processor, sharded export, executable
    env = {k: v for k, v in os.environ.items() if k not in ("TPU_LIBRARY_PATH", "XLA_FLAGS", "PYTHONPATH")}
    env["JAX_PLATFORMS"] = "cpu"  # libtpu is installed here; a CPU host says so
    guard = ("\nimport sys\nassert not [m for m in sys.modules if m.split('.')[0] in "
             "('capibara_export', 'model', 'sharding')], 'the recipe imported the project'\n")
    outputs = []
    for block in blocks:
        code = block.split("```", 1)[0]
        result = subprocess.run([sys.executable, "-c", code + guard], cwd=cpu_bundle, capture_output=True,
                                text=True, timeout=600, env=env)
        assert result.returncode == 0, (code, result.stderr[-2000:])
        outputs.append(result.stdout)
    assert "['token_ids'] (2, 21)" in outputs[0]
    assert "serving_default" in outputs[1] and "'token_ids': TensorShape([2, 21])" in outputs[1]
    assert "(1, 3, 32, 32)" in outputs[2]
    assert outputs[3].startswith("caption (32, 21)") or outputs[3].startswith("encode_image (32,")
    assert outputs[4].startswith("caption (32, 21)") or outputs[4].startswith("encode_image (32,")


def test_inspect_says_what_for_whom_and_until_when(tpu_bundle):
    result = cli("inspect", tpu_bundle)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "serving teams" in out and "params/float32" in out
    assert "load in a jaxlib released 2026-05-27 .. 2026-12-17" in out and "inside the window" in out
    assert "pixel_values" in out and "token_ids" in out and "signature not checked" in out


def test_export_without_weights_is_refused_before_compiling(tmp_path):
    result = cli("build", "--model", "tiny", "--quiet", "--export", "--out", tmp_path)
    assert result.returncode == 2
    assert "export needs weights: pass --checkpoint DIR, or --random-weights" in result.stderr
    assert not any(tmp_path.glob("tiny-*"))


def test_export_with_a_misspelt_entry_is_refused_and_the_old_bundle_stays(cpu_bundle, tmp_path):
    build = Path(shutil.copytree(cpu_bundle.parent, tmp_path / "build"))
    before = {p.relative_to(build): p.read_bytes() for p in (build / "bundle").rglob("*") if p.is_file()}
    result = cli("export", build, "--random-weights", "--export-entries", "captoin")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "--export-entries captoin: not an entry of this model" in result.stderr.strip().splitlines()[-1]
    after = {p.relative_to(build): p.read_bytes() for p in (build / "bundle").rglob("*") if p.is_file()}
    assert after == before
