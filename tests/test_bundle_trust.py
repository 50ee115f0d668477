"""A bundle is input from elsewhere: crafted bundles whose manifest hashes match are refused
by every command before anything in them runs; signatures vouch for a bundle; the static
readers (pickle scan, tree files, SavedModel ops) refuse what the project never writes."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from capibara_export.export import manifest as mf
from capibara_export.matrix import executable_format, pickle_scan
from capibara_export.export.trust import keygen
from tests.test_export import in_process as main_in_process

pytestmark = pytest.mark.slow
ENV = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}


class Plant:
    """A pickle that, if ever unpickled, creates a file: the side effect that must never happen."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def run_cli(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "capibara_export", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def in_process(*args) -> tuple[int, str]:
    result = main_in_process(*args)   # JAX started first: the command keeps this process's devices
    return result.returncode, result.stderr


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple[Path, Path]:
    return keygen(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def signed_bundle(tmp_path_factory, keys) -> Path:
    """A signed tiny CPU bundle: encode_image only (portable export, SavedModel, sharded
    export and executable), so every artifact kind is present and quick to check."""
    out = tmp_path_factory.mktemp("signed")
    # a 2x2 mesh: trust does not depend on the mesh, and 4 simulated devices compile in a fraction of 32's time
    result = run_cli("build", "--model", "tiny", "--quiet", "--target", "cpu", "--mesh", "2x2",
                     "--entries", "encode_image", "--plans", "dp", "--precisions", "fp32", "--export", "--random-weights",
                     "--export-entries", "encode_image", "--sign-key", keys[0], "--out", out, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    (out / "build-output.txt").write_text(result.stdout + result.stderr)
    return out / "tiny-cpu-2x2" / "bundle"


def test_first_contact_names_the_final_folders(signed_bundle):
    """The printed verify command, report, summary and analysis name the folders that exist
    after the build, never its temporary staging folder."""
    build = signed_bundle.parent
    printed = (build.parent / "build-output.txt").read_text()
    command = next(line for line in printed.splitlines() if "verify it with:" in line)
    public = Path(command.split("--trust-key ")[1].strip())
    assert f"verify {signed_bundle} --trust-key" in command and signed_bundle.is_dir() and public.is_file()
    assert json.loads((build / "analysis.json").read_text())["build"]["folder"] == build.name
    for name in ("report.html", "summary.md", "analysis.json"):
        assert ".tmp-" not in (build / name).read_text(), name
    assert "<title>capibara-export tiny-cpu-2x2</title>" in (build / "report.html").read_text()


def rehash(bundle: Path, manifest: dict) -> None:
    """What an attacker does after planting: make every hash match again (no signature)."""
    for a in manifest["artifacts"]:
        path = bundle / a["path"]
        if path.resolve().is_relative_to(bundle.resolve()) and path.exists() and not path.is_symlink():
            try:
                a["sha256"], a["size"] = mf.artifact_hash(path), mf.artifact_size(path)
            except mf.BundleError:  # a folder holding a link: our hash refuses it, so leave it
                pass
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    (bundle / "manifest.json.sig").unlink(missing_ok=True)


def crafted_saved_model(folder: Path, marker: Path) -> None:
    """A SavedModel whose signature writes a file when called (what verify would call)."""
    import tensorflow as tf

    class Writer(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 3, 32, 32], tf.float32, name="pixel_values")])
        def encode_image(self, pixel_values):
            tf.io.write_file(str(marker), "planted")
            return {"image_embeds": tf.reduce_sum(pixel_values, axis=1)}

    shutil.rmtree(folder)
    module = Writer()
    tf.saved_model.save(module, str(folder), signatures={"encode_image": module.encode_image,
                                                         "serving_default": module.encode_image})


def test_hash_matching_bundles_with_planted_code_are_refused_and_nothing_runs(signed_bundle, tmp_path):
    bundle = Path(shutil.copytree(signed_bundle, tmp_path / "bundle"))
    manifest = json.loads((bundle / "manifest.json").read_text())
    exe = next(a for a in manifest["artifacts"] if a["kind"] == "executable")
    markers = {k: tmp_path / f"planted-{k}" for k in ("trees", "payload", "saved_model")}
    (bundle / exe["trees"]).write_bytes(pickle.dumps(Plant(markers["trees"])))
    (bundle / exe["path"]).write_bytes(pickle.dumps(Plant(markers["payload"])))
    saved = next(a for a in manifest["artifacts"] if a["kind"] == "saved_model")
    crafted_saved_model(bundle / saved["path"], markers["saved_model"])
    rehash(bundle, manifest)

    started = time.perf_counter()
    result = main_in_process("verify", bundle, "--json", "--allow-unsigned-executables")
    assert time.perf_counter() - started < 120
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("capibara-export: verify failed: ")
    failed = {r["artifact"]: r["note"] for r in rows if r["result"] == "FAIL"}
    assert "not a JSON tree description" in failed[exe["trees"]]
    assert "names io.open, which a JAX executable never holds" in failed[exe["path"]]
    assert "op WriteFile" in failed[saved["path"]] and "refusing to load this SavedModel" in failed[saved["path"]]
    # the untouched artifacts still verify
    assert any(r["result"] == "pass" and r["artifact"].startswith("stablehlo/") for r in rows)
    # inspect and analyze never load those artifacts, and still refuse the bundle whole
    for command in (["inspect", bundle], ["analyze", tmp_path / "none.png", "--bundle", bundle]):
        started = time.perf_counter()
        result = main_in_process(*command)
        assert time.perf_counter() - started < 60, command
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and "Traceback" not in result.stderr, (command, result.stderr[-2000:])
        assert lines[-1].startswith("capibara-export: error: ") and "refusing this bundle" in lines[-1], lines[-1]
    assert not [m for m in markers.values() if m.exists()]  # no planted side effect happened


@pytest.mark.parametrize("craft", ["dotdot", "absolute", "dev-zero", "symlink-out", "symlink-inside-folder"])
def test_paths_out_of_the_bundle_are_refused_by_every_command_before_reading(signed_bundle, tmp_path, craft):
    bundle = Path(shutil.copytree(signed_bundle, tmp_path / "bundle"))
    outside = tmp_path / "outside.bin"
    outside.write_bytes(pickle.dumps(Plant(tmp_path / "planted")))
    manifest = json.loads((bundle / "manifest.json").read_text())
    exe = next(a for a in manifest["artifacts"] if a["kind"] == "executable")
    if craft == "dotdot":
        exe["trees"] = "../outside.bin"
    elif craft == "absolute":
        exe["path"] = str(outside)
    elif craft == "dev-zero":
        exe["path"] = "/dev/zero"
    elif craft == "symlink-out":
        (bundle / exe["trees"]).unlink()
        (bundle / exe["trees"]).symlink_to("/dev/zero")
    else:
        params = next(a for a in manifest["artifacts"] if a["kind"] == "params")
        (bundle / params["path"] / "escape").symlink_to(outside)
    rehash(bundle, manifest)
    for command in (["verify", bundle, "--allow-unsigned-executables"], ["inspect", bundle],
                    ["analyze", tmp_path / "none.png", "--bundle", bundle]):
        started = time.perf_counter()
        code, err = in_process(*command)
        assert time.perf_counter() - started < 30, command
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("capibara-export: error: "), (command, err)
        assert "refusing" in lines[0] or "link or special file" in lines[0], lines[0]
    assert not (tmp_path / "planted").exists()


def test_signed_bundle_verifies_with_its_key_and_is_refused_with_another_or_after_any_change(
        signed_bundle, keys, tmp_path):
    result = main_in_process("verify", signed_bundle, "--json", "--trust-key", keys[1])
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert result.returncode == 0, result.stderr[-2000:]
    executables_run = [r for r in rows if r["artifact"].startswith("executables/")]
    assert executables_run and all(r["result"] == "pass" for r in executables_run)  # signed: executables load

    other = keygen(tmp_path / "other")[1]
    code, err = in_process("inspect", signed_bundle, "--trust-key", other)
    assert code == 2 and "manifest signature does not verify" in err and len(err.strip().splitlines()) == 1

    altered = Path(shutil.copytree(signed_bundle, tmp_path / "altered"))
    data = bytearray((altered / "manifest.json").read_bytes())
    data[data.index(b'"tiny"')+1] ^= 0x01  # one byte of the model name
    (altered / "manifest.json").write_bytes(bytes(data))
    code, err = in_process("verify", altered, "--trust-key", keys[1])
    assert code == 2 and "manifest signature does not verify" in err

    unsigned = Path(shutil.copytree(signed_bundle, tmp_path / "unsigned"))
    (unsigned / "manifest.json.sig").unlink()
    code, err = in_process("verify", unsigned, "--trust-key", keys[1])
    assert code == 2 and "not signed" in err


@pytest.mark.parametrize("document", ["README.md", "ARTIFACTS.md", "manifest.schema.json"])
def test_the_signature_covers_every_document_and_a_trusted_open_refuses_unlisted_files(
        signed_bundle, keys, tmp_path, document):
    """The README holds the recipes a serving team runs: one flipped byte in it (or in any
    document) is refused with or without a key; a file the manifest does not list, at the root
    or beside the artifacts, is refused when the signature is checked."""
    manifest = mf.read(signed_bundle)
    assert {d["path"] for d in manifest["documents"]} == set(mf.DOCUMENTS)
    flipped = Path(shutil.copytree(signed_bundle, tmp_path / "flipped"))
    data = bytearray((flipped / document).read_bytes())
    data[len(data) // 2] ^= 0x01
    (flipped / document).write_bytes(bytes(data))
    for trust in (["--trust-key", keys[1]], []):
        code, err = in_process("inspect", flipped, *trust)
        assert code == 2 and f"{document}: sha256 does not match the manifest's" in err, err[-500:]
    for extra in ("run-me.sh", "stablehlo/extra.jaxexport"):
        planted = Path(shutil.copytree(signed_bundle, tmp_path / f"planted-{extra.replace('/', '-')}"))
        (planted / extra).write_text("echo hello")
        code, err = in_process("inspect", planted, "--trust-key", keys[1])
        assert code == 2 and f"holds {extra}, which the signed manifest does not list" in err, err[-500:]
        assert len(err.strip().splitlines()) == 1


def test_unsigned_bundles_never_load_executables_without_the_opt_in(signed_bundle, tmp_path):
    result = main_in_process("verify", signed_bundle, "--json")  # no --trust-key: the signature is not checked
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert result.returncode == 0, result.stderr[-2000:]
    exe_rows = [r for r in rows if r["artifact"].startswith("executables/")]
    assert exe_rows and all(r["result"] == "not loaded (unsigned)" and "--trust-key" in r["note"] for r in exe_rows)
    assert all(r["result"] == "pass" for r in rows if r not in exe_rows)


def test_manifest_matches_its_schema_and_the_jaxlib_compatibility_window(signed_bundle):
    import jsonschema

    manifest = mf.read(signed_bundle)
    shipped = json.loads((signed_bundle / "manifest.schema.json").read_text())
    jsonschema.Draft202012Validator(shipped).validate(manifest)
    assert (signed_bundle / "ARTIFACTS.md").read_text().startswith("# ")
    compat = manifest["compatibility"]
    assert compat["serialized_by"] == {"jaxlib": "0.10.2", "released": "2026-06-17"}  # JAX CHANGELOG
    assert compat["loads_in"]["jaxlib_released_from"] == "2026-05-27"   # 3 weeks older
    assert compat["loads_in"]["jaxlib_released_until"] == "2026-12-17"  # 6 months newer
    assert compat["loads_in"]["known_releases"] == ["0.10.2", "0.11.0", "0.11.1"]
    for a in manifest["artifacts"]:
        for t in a.get("inputs", []) + a.get("outputs", []):
            assert all(isinstance(d, int) or d == "b" for d in t["shape"])
            if "sharding" in t:
                assert isinstance(t["sharding"], list)
    broken = dict(manifest, artifacts=[{k: v for k, v in a.items() if k != "outputs"} for a in manifest["artifacts"]])
    with pytest.raises(mf.BundleError, match="manifest.schema.json at artifacts/"):
        mf.parse(signed_bundle, json.dumps(broken).encode())


def test_saved_model_has_serving_default_and_warmup_at_every_batch(signed_bundle):
    import tensorflow as tf

    from capibara_export.export.warmup import read_fields

    saved = next(a for a in mf.read(signed_bundle)["artifacts"] if a["kind"] == "saved_model")
    shown = subprocess.run([str(Path(sys.executable).parent / "saved_model_cli"), "show", "--dir",
                            str(signed_bundle / saved["path"]), "--all"], capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "signature_def['serving_default']" in shown.stdout and "signature_def['encode_image']" in shown.stdout
    assert saved["warmup"]["batch_sizes"] == [1, 32]
    seen = set()
    path = signed_bundle / saved["path"] / saved["warmup"]["path"]
    for record in tf.data.TFRecordDataset(str(path)):
        (field, predict_log), = read_fields(record.numpy())  # PredictionLog.predict_log = 6
        assert field == 6
        request = dict(read_fields(predict_log))[1]            # PredictLog.request = 1
        fields = read_fields(request)
        spec = dict(read_fields(dict(fields)[1]))              # PredictRequest.model_spec = 1
        for number, entry in fields:
            if number == 2:                                    # PredictRequest.inputs = 2
                tensor = tf.make_ndarray(tf.make_tensor_proto(0).FromString(dict(read_fields(entry))[2]))
                seen.add((spec[3].decode(), tensor.shape[0]))
    # every signature at every batch size; the serving_default alias (the same function) at batch 1
    assert seen == {("encode_image", 1), ("encode_image", 32), ("serving_default", 1)}


def test_pickle_scan_lists_globals_without_running_them(signed_bundle, tmp_path):
    marker = tmp_path / "planted"
    for protocol in range(0, pickle.HIGHEST_PROTOCOL + 1):
        data = pickle.dumps(Plant(marker), protocol=protocol)
        assert pickle_scan.globals_named(data) == {("io", "open")}, protocol
        with pytest.raises(pickle_scan.PickleRefused, match="io.open"):
            pickle_scan.check(data, executable_format.EXECUTABLE_GLOBALS)
    # a global whose name is computed while unpickling cannot be vouched for
    computed = (b"\x80\x04" b"\x8c\x08builtins\x94" b"\x8c\x03str\x94\x93\x94" b"\x8c\x02os\x94\x85\x94R\x94"
                b"\x8c\x06system\x94\x93\x94.")
    with pytest.raises(pickle_scan.PickleRefused, match="computed"):
        pickle_scan.globals_named(computed)
    assert not marker.exists()
    payload = next((signed_bundle / "executables").glob("*.xla")).read_bytes()
    assert pickle_scan.globals_named(payload) <= executable_format.EXECUTABLE_GLOBALS


def test_tree_descriptions_round_trip_and_refuse_anything_else(tmp_path):
    import jax

    tree = jax.tree_util.tree_structure(((1, {"b": 2, "a": [3, None]}), {}))
    desc = executable_format.tree_to_json(tree)
    assert executable_format.tree_from_json(json.loads(json.dumps(desc))) == tree
    for bad in ({"leaf": True, "x": 1}, {"call": ["os.system"]}, ["leaf"], {"dict": [[1, {"leaf": True}]]}):
        with pytest.raises(mf.BundleError):
            executable_format.tree_from_json(bad)
