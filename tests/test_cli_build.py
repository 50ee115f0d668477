"""`python -m capibara_export build` end to end, in a subprocess like a user runs it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TINY = ["--model", "tiny", "--quiet"]


def run(*args, env=None, timeout=600) -> subprocess.CompletedProcess:
    """The CLI in a fresh process; `env` entries set to None are removed from its environment."""
    merged = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
    return subprocess.run([sys.executable, "-m", "capibara_export", *args], capture_output=True, text=True,
                          timeout=timeout, env=merged)


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()]


def test_build_writes_records_and_a_rerun_compiles_nothing(tmp_path):
    args = ["build", "--mesh", "4x8", *TINY, "--entries", "encode_image,caption", "--plans", "replicated,fsdp",
            "--precisions", "fp32,bf16", "--out", str(tmp_path)]
    first = run(*args)
    assert first.returncode == 0, first.stderr
    folder = tmp_path / "tiny-tpu-v4-64-4x8"   # the default target
    recs = records(folder)
    assert len(recs) == 8 and {r["status"] for r in recs} == {"ok"}
    r = recs[0]
    assert r["schema"] == "capibara-export/compile-record" and r["schema_version"] == 1
    assert r["unit"]["target"] == "tpu-v4-64" and r["mesh"]["device_kind"] == "TPU v4"
    hosts = r["mesh"]["hosts"]   # 32 chips, megacore, 8 hosts x 4, as a default runtime exposes them
    assert (hosts["processes"], hosts["devices_per_process"], hosts["default_runtime_loads"]) == (8, 4, True)
    assert r["memory"]["peak"] > 0 and r["cost"]["flops"] > 0 and len(r["hlo_sha256"]) == 64
    assert r["toolchain"]["jax"] == "0.10.2" and r["toolchain"]["libtpu"] == "0.0.42.1"
    assert (folder / r["hlo_file"]).is_file() and (folder / "build.json").is_file()
    assert "encode_image" in first.stdout and "8 ok" in first.stderr

    started = time.perf_counter()
    second = run(*args)
    assert second.returncode == 0, second.stderr
    assert "8 from cache" in " ".join(second.stderr.split())
    assert all(r["cached"] for r in records(folder))
    assert [r["hlo_sha256"] for r in records(folder)] == [r["hlo_sha256"] for r in recs]
    assert time.perf_counter() - started < 30


@pytest.mark.parametrize("target, mesh", [("tpu-v4-64", "4x8"), ("tpu-v5e-32", "4x8"), ("v4-2x2x4", "8x4"),
                                          ("tpu-v4-32", "2x8")])
def test_other_targets_and_meshes_build(tmp_path, target, mesh):
    result = run("build", "--target", target, "--mesh", mesh, *TINY, "--entries", "encode_image", "--plans",
                 "fsdp", "--precisions", "bf16", "--out", str(tmp_path), "--no-cache")
    assert result.returncode == 0, result.stderr
    (rec,) = records(tmp_path / f"tiny-{target}-{mesh}")
    assert rec["status"] == "ok" and rec["unit"]["target"] == target
    assert rec["mesh"]["shape"] == dict(zip(("data", "model"), map(int, mesh.split("x"))))


def test_topology_chip_config_and_slices_options_build(tmp_path):
    """Any libtpu topology by its flags, and S slices of a preset (a `dcn` mesh axis)."""
    common = [*TINY, "--entries", "encode_image", "--plans", "dp", "--precisions", "fp32", "--out", str(tmp_path),
              "--no-cache"]
    result = run("build", "--topology", "v4:4x4x8", "--chip-config", "megacore", "--mesh", "16x8", "--batch", "128",
                 *common)
    assert result.returncode == 0, result.stderr
    (rec,) = records(tmp_path / "tiny-v4-4x4x8-megacore-16x8")
    assert rec["status"] == "ok" and rec["mesh"]["shape"] == {"data": 16, "model": 8}
    hosts = rec["mesh"]["hosts"]
    assert (hosts["processes"], hosts["devices_per_process"], hosts["slices"]) == (32, 4, 1)
    result = run("build", "--target", "tpu-v4-16", "--slices", "2", "--mesh", "2x4", "--batch", "16", *common)
    assert result.returncode == 0, result.stderr
    (rec,) = records(tmp_path / "tiny-2xtpu-v4-16-2x4")
    assert rec["status"] == "ok" and rec["unit"]["target"] == "2xtpu-v4-16"
    assert rec["mesh"]["axis_names"] == ["dcn", "data", "model"] and rec["mesh"]["hosts"]["processes"] == 4
    assert "2 slices" in result.stdout


def _bad_plan(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[mine]\nparams = { hidden = 'model' }\n")
    return ["--plan-file", str(path)]


@pytest.mark.parametrize("args, env, message", [
    (["--mesh", "4x9"], {}, "--mesh 4x9 needs 36 devices but tpu-v4-64 has 32 devices"),
    (["--mesh", "abc"], {}, "--mesh 'abc' is not of the form DATAxMODEL"),
    (["--plans", "nope"], {}, "unknown plan 'nope'; available: replicated"),
    ("bad-plan-file", {}, "plan 'mine': unknown logical axis 'hidden' in params"),
    (["--precisions", "fp16"], {}, "unknown precision 'fp16'"),
    (["--entries", "train"], {}, "unknown entry 'train'"),
    (["--checkpoint", "/nonexistent/blip"], {}, "/nonexistent/blip: checkpoint folder does not exist"),
    ([], "no-libtpu", "target tpu-v4-64 needs libtpu"),
    (["--name", "."], {}, "--name '.': must be one folder name"),
    (["--name", "../sibling"], {}, "--name '../sibling': must be one folder name"),
    (["--name", "/tmp"], {}, "--name '/tmp': must be one folder name"),
    (["--out", "/etc/passwd"], {}, "is a file, not a folder; choose a folder"),
    (["--target", "cpu", "--mesh", "64x64"], {}, "4096 simulated CPU devices: the `cpu` target simulates at most 512"),
    (["--target", "cpu", "--mesh", "2x2", "--slices", "2"], {}, "--slices 2: only TPU targets have slices"),
    (["--slices", "2", "--mesh", "8x8"], {}, "--mesh 8x8 is one slice's mesh and needs 64 devices, but each slice"),
    (["--topology", "v9:2x2"], {}, "unknown target 'v9:2x2'"),
    (["--topology", "v4:2x2x2", "--target", "tpu-v5e-32"], {}, "both name the target; give one"),
    (["--chip-config", "megacore"], {}, "--chip-config goes with --topology"),
])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, args, env, message):
    args = _bad_plan(tmp_path) if args == "bad-plan-file" else args
    if env == "no-libtpu":  # shadow the libtpu package with one that fails to import, as if not installed
        shadow = tmp_path / "shadow" / "libtpu"
        shadow.mkdir(parents=True)
        (shadow / "__init__.py").write_text("raise ImportError('simulated: libtpu is not installed')\n")
        # importing jax in this test process exported TPU_LIBRARY_PATH; a fresh machine has none
        env = {"PYTHONPATH": f"{shadow.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               "TPU_LIBRARY_PATH": None}
    result = run("build", *TINY, "--out", str(tmp_path / "out"), *args, env=env)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("capibara-export: error: ") and message in lines[-1], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists(), "a refused build left a folder (or its lock file) behind"


def test_a_unit_over_the_memory_budget_is_a_record_not_a_crash(tmp_path):
    result = run("build", "--model", "base", "--quiet", "--entries", "encode_image", "--plans", "replicated",
                 "--precisions", "fp32", "--batch", "1024", "--out", str(tmp_path), "--no-cache",
                 "--target", "v4:2x2x4")   # 32 TensorCores of 16 GiB each
    # the folder and its record are written; the build selected nothing, so it exits 1 saying so
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("capibara-export: error: the build selected no plan")
    (rec,) = records(tmp_path / "base-v4-2x2x4-4x8")
    assert rec["status"] == "does-not-fit"
    assert rec["reason"].startswith("needs ") and " GiB of " in rec["reason"] and rec["needed_bytes"] > 16 * 2 ** 30


def test_ctrl_c_leaves_no_half_written_folder_and_the_next_run_resumes(tmp_path):
    # 6 units: the signal lands after the third, mid-build; no derived round after them
    args = [sys.executable, "-m", "capibara_export", "build", *TINY, "--entries", "encode_image,score",
            "--plans", "replicated,dp,fsdp", "--precisions", "fp32", "--derive-rounds", "0", "--out", str(tmp_path)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = tmp_path / ".cache" / "results"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(results.glob("*/*.json"))) < 3:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "interrupted; finished units are cached" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cache"]
    cached = len(list(results.glob("*/*.json")))
    assert not list(results.glob("*/*.tmp"))
    resumed = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{cached} from cache" in " ".join(resumed.stderr.split())


def test_a_folder_the_tool_did_not_write_is_never_replaced(tmp_path):
    """--out/--name pointing at someone's folder: refused before compiling, contents intact;
    a folder the tool wrote (it holds the marker) is replaced as before."""
    mine = tmp_path / "out" / "precious"
    mine.mkdir(parents=True)
    (mine / "thesis.txt").write_text("do not delete")
    result = run("build", *TINY, "--out", str(tmp_path / "out"), "--name", "precious")
    assert result.returncode == 2 and "this capibara-export did not write it here" in result.stderr, result.stderr
    assert (mine / "thesis.txt").read_text() == "do not delete" and len(list(mine.iterdir())) == 1
    assert "Traceback" not in result.stderr

    small = [*TINY, "--entries", "encode_image", "--plans", "dp", "--precisions", "fp32", "--out", str(tmp_path / "out")]
    ours = run("build", *small, "--name", "run")
    assert ours.returncode == 0, ours.stderr[-2000:]
    assert (tmp_path / "out" / "run" / ".capibara-export").is_file()
    again = run("build", *small, "--name", "run", "--no-cache")
    assert again.returncode == 0, again.stderr[-2000:]
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith((".tmp-", ".old-"))]


def test_a_corrupted_cache_entry_is_a_miss_that_heals(tmp_path):
    """One flipped byte in a cached HLO file (or a truncated record): the unit compiles again
    and its entry is rewritten; never an error, never a poisoned cache."""
    args = ["build", *TINY, "--entries", "encode_image,caption", "--plans", "dp", "--precisions", "fp32",
            "--out", str(tmp_path)]
    assert run(*args).returncode == 0
    results = tmp_path / ".cache" / "results"
    hlo = sorted(results.glob("*/*.hlo.gz"))[0]
    data = bytearray(hlo.read_bytes())
    data[len(data) // 2] ^= 0xFF
    hlo.write_bytes(bytes(data))
    record = sorted(p for p in results.glob("*/*.json") if not hlo.name.startswith(p.stem))[0]
    record.write_text(record.read_text()[:40])
    healed = run(*args)
    assert healed.returncode == 0, healed.stderr[-2000:]
    assert "0 from cache" in " ".join(healed.stderr.split())  # both entries were misses
    again = run(*args)
    assert again.returncode == 0 and "2 from cache" in " ".join(again.stderr.split())


@pytest.mark.parametrize("args", [["analyze", "x.png", "--random-weights", "--batch", "0"],
                                  ["analyze", "x.png", "--random-weights", "--workers", "0"],
                                  ["plans", "--batch", "0"], ["build", "--batch", "8,0"],
                                  ["build", "--max-new-tokens", "0"], ["build", "--text-len", "x"]])
def test_numeric_options_are_checked_where_they_are_parsed(args):
    result = run(*args, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "is below the minimum" in result.stderr or "is not a whole number" in result.stderr
