"""Serving bundles: all four artifact kinds, `verify` proving each reproduces the model,
refusal of altered or foreign bundles, and the README's own snippet."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from capibara_export.export import manifest as mf
from capibara_export.export.warmup import read_fields

pytestmark = pytest.mark.slow
KINDS = {"params", "jax.export", "jax.export-sharded", "saved_model", "executable", "executable-trees", "processor"}


def cli(*args, cwd=None, env=None) -> subprocess.CompletedProcess:
    merged = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
    return subprocess.run([sys.executable, "-m", "capibara_export", *map(str, args)], capture_output=True, text=True,
                          timeout=900, cwd=cwd, env=merged)


def build_bundle(out: Path, *extra) -> Path:
    """A tiny bundle: the portable exports cover every entry; executables and sharded
    exports are made for the selected encode_image and caption units."""
    result = cli("build", "--model", "tiny", "--quiet", "--entries", "encode_image,caption", "--plans", "dp",
                 "--export", "--random-weights", "--out", out, *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    (folder,) = [p for p in out.iterdir() if not p.name.startswith(".")]
    return folder / "bundle"


def verify(bundle: Path) -> tuple[int, list[dict], str]:
    result = cli("verify", bundle, "--json")
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return result.returncode, rows, result.stderr


@pytest.fixture(scope="module")
def cpu_bundle(tmp_path_factory) -> Path:
    return build_bundle(tmp_path_factory.mktemp("cpu"), "--target", "cpu", "--precisions", "fp32,bf16")


@pytest.fixture(scope="module")
def cpu_verified(cpu_bundle):
    return verify(cpu_bundle)


@pytest.fixture(scope="module")
def tpu_bundle(tmp_path_factory) -> Path:
    return build_bundle(tmp_path_factory.mktemp("tpu"), "--precisions", "fp32")


def test_cpu_bundle_holds_every_kind_and_verifies(cpu_bundle, cpu_verified):
    manifest = mf.read(cpu_bundle)
    assert {a["kind"] for a in manifest["artifacts"]} == KINDS
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
    assert manifest["mesh"]["device_kind"] == "TPU v4" and manifest["target"]["topology"] == "v4:2x2x4"
    code, rows, err = verify(tpu_bundle)
    assert code == 0, err
    tpu_only = [r for r in rows if r["artifact"].startswith("executables/") or ".tpu.jaxexport" in r["artifact"]]
    assert tpu_only and all(r["result"] == "not runnable here" for r in tpu_only)
    sharded_restore = [r for r in rows if r["output"].startswith("restore sharded")]
    assert sharded_restore and all(r["result"] == "pass" for r in sharded_restore)


def test_manifest_documents_every_artifact(tpu_bundle):
    manifest = mf.read(tpu_bundle)
    for key in ("toolchain", "target", "mesh", "model", "compatibility", "selection", "plans", "artifacts"):
        assert key in manifest
    assert manifest["toolchain"]["jax"] == "0.10.2" and manifest["mesh"]["axis_names"] == ["data", "model"]
    assert manifest["compatibility"]["valid_until"] > manifest["compatibility"]["created"]
    for a in manifest["artifacts"]:
        assert len(a["sha256"]) == 64 and a["size"] > 0
        if a["kind"] in ("jax.export", "jax.export-sharded", "executable"):
            assert a["inputs"] and a["entry"] and a["precision"] and "load" in a
    portable = next(a for a in manifest["artifacts"] if a["kind"] == "jax.export" and a["entry"] == "caption")
    assert portable["inputs"][0]["shape"][0] == "b" and set(portable["platforms"]) == {"tpu", "cpu", "cuda"}
    sharded = next(a for a in manifest["artifacts"] if a["kind"] == "jax.export-sharded")
    assert sharded["mesh_axes"] == ["data", "model"]
    assert sharded["inputs"][0]["name"] in ("pixel_values", "input_ids")
    assert "('data', 'model')" in sharded["inputs"][0]["sharding"]  # dp: the batch over all 32 devices
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
    code, rows, err = verify(copy)
    assert code == 1
    for path in flipped:
        assert any(r["result"] == "FAIL" and r["artifact"] == path and "sha256" in r["note"] for r in rows), path
    assert "verify failed: " in err
    refused = [r for r in rows if r["artifact"].startswith("executables/") and r["artifact"] not in flipped
               and r["result"] == "FAIL" and "sha256" not in r["note"] and "depends on" not in r["note"]]
    assert refused and all("built with jax 0.9.0, but this machine has jax 0.10.2" in r["note"] for r in refused)


def test_readme_snippet_runs_as_written(tpu_bundle):
    readme = (tpu_bundle / "README.md").read_text()
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    env = {k: v for k, v in os.environ.items() if k != "TPU_LIBRARY_PATH"}
    result = subprocess.run([sys.executable, "-c", code + "\nprint('ids', ids.shape, out['token_ids'].shape)"],
                            cwd=tpu_bundle, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ids (2, 21) (2, 21)" in result.stdout


def test_saved_model_warmup_requests_name_its_signatures(tpu_bundle):
    import tensorflow as tf

    for folder in (tpu_bundle / "saved_model").iterdir():
        records = list(tf.data.TFRecordDataset(str(folder / "assets.extra" / "tf_serving_warmup_requests")))
        signatures = []
        for record in records:
            (field, predict_log), = read_fields(record.numpy())
            assert field == 6
            request = dict(read_fields(dict(read_fields(predict_log))[1]))
            spec = dict(read_fields(request[1]))
            signatures.append(spec[3].decode())
            inputs = [f for n, f in read_fields(dict(read_fields(predict_log))[1]) if n == 2]
            for entry in inputs:
                tensor = tf.make_ndarray(tf.make_tensor_proto(0).FromString(dict(read_fields(entry))[2]))
                assert tensor.shape[0] == 1
        assert sorted(signatures) == ["caption", "encode_image", "score"]


def test_inspect_says_what_for_whom_and_until_when(tpu_bundle):
    result = cli("inspect", tpu_bundle)
    assert result.returncode == 0, result.stderr
    assert "serving teams" in result.stdout and "valid until" in result.stdout and "params/float32" in result.stdout


def test_export_without_weights_is_refused_before_compiling(tmp_path):
    result = cli("build", "--model", "tiny", "--quiet", "--export", "--out", tmp_path)
    assert result.returncode == 2
    assert "export needs weights: pass --checkpoint DIR, or --random-weights" in result.stderr
    assert not any(tmp_path.glob("tiny-*"))


def test_base_saved_model_holds_each_weight_once_and_the_bundle_verifies(tmp_path):
    result = cli("build", "--model", "base", "--quiet", "--entries", "encode_image,caption", "--plans", "dp",
                 "--precisions", "bf16", "--export", "--random-weights", "--out", tmp_path,
                 "--export-entries", "encode_image,caption")
    assert result.returncode == 0, result.stderr[-3000:]
    bundle = tmp_path / "base-tpu-v4-32-4x8" / "bundle"
    from model import get_preset

    param_bytes = 2 * get_preset("base").param_count()
    saved = next(a for a in mf.read(bundle)["artifacts"] if a["kind"] == "saved_model")
    assert saved["size"] == pytest.approx(param_bytes, rel=0.05)
    code, rows, err = verify(bundle)
    assert code == 0, err
    assert not [r for r in rows if r["result"] in ("FAIL", "error")]
    assert np.sum([r["result"] == "pass" for r in rows]) >= 7  # params, 2 entries × (stablehlo, saved_model, ...)
    exported = {a.get("entry") for a in mf.read(bundle)["artifacts"] if a["kind"] == "jax.export"}
    assert exported == {"encode_image", "caption"}  # --export-entries
