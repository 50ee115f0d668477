"""The bundle of the default TPU target (tpu-v4-64: 8 hosts x 4 megacore devices) and of a
2-slice target, served across local processes as on the slice's hosts: JAX's multi-controller
runtime (gloo CPU collectives), each process restoring only its parameter shards, refusals
in one line, and a lost host ending the others."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from capibara_export.export import manifest as mf
from tests.test_export import KINDS, _pixels, _serve, build_bundle, in_process, verify

pytestmark = pytest.mark.slow

FSDP_ACROSS_SLICES = """
[fsdp-dcn]
description = "fsdp over every device of every slice: parameters sharded across the two hosts."
params = { embed = ["dcn", "data", "model"] }
activations = { batch = ["dcn", "data", "model"] }
"""


@pytest.fixture(scope="module")
def tpu_bundle(tmp_path_factory) -> Path:
    # fsdp: parameters sharded over all 32 devices, so each of the 8 hosts must restore only its share;
    # 4 new tokens: each decode step all-gathers the weights over gloo, ~2.7 s a step across 8 local processes
    # no SavedModel: the CPU bundle (test_export.py) and the base bundle check that artifact kind;
    # the portable exports of the semiotic entries too (the CPU bundle has all nine)
    return build_bundle(tmp_path_factory.mktemp("tpu"), "--precisions", "fp32", "--plans", "fsdp",
                        "--max-new-tokens", "4", "--no-saved-model", "--export-entries", "encode_image,caption,score")



def test_tpu_bundle_verifies_what_runs_here_and_never_passes_what_cannot(tpu_bundle):
    manifest = mf.read(tpu_bundle)
    assert {a["kind"] for a in manifest["artifacts"]} == KINDS - {"saved_model"}
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
    wrong_n = in_process("verify", tpu_bundle, "--processes", 4)   # refused before verify does any work
    assert wrong_n.returncode == 2 and wrong_n.stdout == "", wrong_n.stdout[-500:]
    assert "--processes 4: this bundle's mesh spans 8 process(es) x 4 device(s)" in wrong_n.stderr, wrong_n.stderr
    for want, proc in running.items():
        _, err = proc.communicate(timeout=120)
        code = 1 if "did not answer" in want else 2   # a slice that never came together: exit 1, as a lost host
        assert proc.returncode == code and want in err, (want, err[-800:])
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
    # every survivor: exit 1 and one line naming process 3, within the bound (not JAX's abort)
    assert all(e.returncode == 1 for e in others), [(e.process_id, e.returncode) for e in others]
    assert all("process(es) 3 of 8 stopped: no heartbeat for 5 s" in e.last_line() for e in others), \
        [e.last_line() for e in others]
    assert max(e.seconds for e in others) - (killed["at"] - begun) < 5 + 10, [e.seconds for e in others]
    line = failure(ended)
    assert line.startswith("process 3 was killed by signal 9") and "7 other(s) ended too" in line, line
    assert not (tmp_path / "out.npz").exists()


def test_a_process_that_never_joins_is_named_by_every_other(tpu_bundle, tmp_path):
    """Seven of eight processes start; each ends with exit 1 and one line naming process 7."""
    import time

    from capibara_export.export.launch import failure, launch

    def kill_seven(procs):
        os.killpg(procs[7].pid, 9)   # before it imports anything: it never reaches the join

    begun = time.monotonic()
    ended = launch([tpu_bundle, "--entry", "encode_image", "--inputs", _pixels(tmp_path / "in.npz"),
                    "--out", tmp_path / "out.npz"], 8, 4, tmp_path / "logs", timeout_s=300, grace_s=60,
                   join_timeout_s=20, started=kill_seven)
    others = [e for e in ended if e.process_id != 7]
    assert all(e.returncode == 1 for e in others), [(e.process_id, e.returncode) for e in others]
    assert all("process(es) 7 of 8 did not join within 20 s" in e.last_line() for e in others), \
        [e.last_line() for e in others]
    assert time.monotonic() - begun < 20 + 60
    assert "did not join" in failure(ended)



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



def test_inspect_says_what_for_whom_and_until_when(tpu_bundle):
    result = in_process("inspect", tpu_bundle)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "serving teams" in out and "params/float32" in out
    assert "load in a jaxlib released 2026-05-27 .. 2026-12-17" in out and "inside the window" in out
    assert "pixel_values" in out and "token_ids" in out and "signature not checked" in out


@pytest.fixture(scope="module")
def two_slice_bundle(tmp_path_factory) -> Path:
    """2 x tpu-v4-8 (one host of 4 chips each, joined by DCN): 2 processes, a (dcn, data, model)
    mesh, parameters sharded over both hosts."""
    out = tmp_path_factory.mktemp("slices")
    plan = out.parent / f"{out.name}-fsdp-dcn.toml"
    plan.write_text(FSDP_ACROSS_SLICES)
    return build_bundle(out, "--target", "tpu-v4-8", "--slices", "2", "--mesh", "2x2", "--batch", "8",
                        "--precisions", "fp32", "--plans", "fsdp-dcn", "--plan-file", plan, "--max-new-tokens", "4",
                        "--no-saved-model", "--export-entries", "encode_image,caption")


def test_two_processes_of_two_slices_serve_the_bundle_each_restoring_half(two_slice_bundle):
    """The 2-process variant of the multi-host test, on two slices: the sharded programs across
    2 local processes x 4 devices equal the single-process reference."""
    manifest = mf.read(two_slice_bundle)
    assert manifest["mesh"]["axis_names"] == ["dcn", "data", "model"]
    hosts = manifest["mesh"]["hosts"]
    assert (hosts["slices"], hosts["processes"], hosts["devices_per_process"]) == (2, 2, 4)
    sharded = [a for a in manifest["artifacts"] if a["kind"] == "jax.export-sharded"]
    assert sharded and all(a["analysis"]["collective_bytes_per_device"]["dcn"] > 0 for a in sharded)
    code, rows, err = verify(two_slice_bundle, "--allow-unsigned-executables", "--processes", "2")
    assert code == 0, err
    across = [r for r in rows if r["output"].endswith("across 2 processes x 4 cpu devices")]
    assert {r["artifact"] for r in across} == {a["path"] for a in sharded}
    assert all(r["result"] == "pass" for r in across), across
    assert any(r["note"].startswith("token ids identical") for r in across if "caption" in r["artifact"])
    for r in across:
        share = re.search(r"each process restored at most (\d+) of (\d+) sharded parameter bytes", r["note"])
        assert share and int(share[2]) > 0 and int(share[1]) * 2 == int(share[2]), r["note"]
