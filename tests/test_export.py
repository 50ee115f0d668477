"""Serving bundles: all four artifact kinds, `verify` proving each reproduces the model,
refusal of altered or foreign bundles, and the README's own snippet (the CPU bundle; the
TPU and multi-slice bundles and serving across processes: test_tpu_bundle.py)."""

from __future__ import annotations

import contextlib
import io
import json
import os
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
                 "--random-weights", "--derive-rounds", "0", "--out", out,   # exactly the plans asked for
                 *(extra if "--plans" in extra else ("--plans", "dp", *extra)))
    assert result.returncode == 0, result.stderr[-3000:]
    (folder,) = [p for p in out.iterdir() if not p.name.startswith(".")]
    return folder / "bundle"


def in_process(*args) -> subprocess.CompletedProcess:
    """A command run by the CLI's own main() in this test process, its output captured: what
    `verify` checks is the same, without a new interpreter importing JAX, TensorFlow, torch and
    transformers again (about 10 s of CPU per call on this suite's 2 cores). JAX is started
    first, so a command never lowers this process's 32 simulated devices to its bundle's count
    (a command takes the first devices it needs). Builds stay subprocesses: a CPU-target build
    needs exactly its mesh's devices, and a TPU target sets process-wide libtpu variables."""
    import jax

    from capibara_export import cli as cli_module

    jax.devices()
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_module.main([str(a) for a in args])
    return subprocess.CompletedProcess(["capibara-export", *map(str, args)], code, out.getvalue(), err.getvalue())


def verify(bundle: Path, *extra) -> tuple[int, list[dict], str]:
    result = in_process("verify", bundle, "--json", *extra)
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return result.returncode, rows, result.stderr


@pytest.fixture(scope="module")
def cpu_bundle(tmp_path_factory) -> Path:
    # the GPU's kernel layout (text kernels out-in, model/layout.py) with the CPU's per-layer
    # storage and head-major cross cache, end to end: params, every export kind and the README
    # recipes must agree on them; the TPU bundle keeps in-out, stacked
    # 4 simulated devices (2x2): the CPU mesh path as a TPU bundle's, at a fraction of 32 devices' compile time
    # bf16 is built (the selection's refusal is checked) but not exported: bf16 on a CPU is a
    # refused precision wherever bf16 dots are slower, and the base bundle verifies the bf16
    # portable exports; fp32 named for the export, so the bundle is the same on every machine
    return build_bundle(tmp_path_factory.mktemp("cpu"), "--target", "cpu", "--mesh", "2x2", "--precisions",
                        "fp32,bf16", "--kernel-layout", "out-in", "--export-precisions", "fp32")


@pytest.fixture(scope="module")
def cpu_verified(cpu_bundle):
    return verify(cpu_bundle, "--allow-unsigned-executables")


def test_cpu_bundle_holds_every_kind_and_verifies(cpu_bundle, cpu_verified):
    manifest = mf.read(cpu_bundle)
    assert {a["kind"] for a in manifest["artifacts"]} == KINDS
    cfg = manifest["model"]["config"]
    assert (cfg["text"]["kernel_layout"], cfg["text"]["layer_storage"], cfg["vision"]["layer_storage"],
            cfg["text"]["cross_cache"]) == ("out-in", "per-layer", "per-layer", "head-major")
    params = next(a for a in manifest["artifacts"] if a["kind"] == "params")
    shapes = {x["name"]: x["shape"] for x in params["arrays"]}
    fc1 = {k: v for k, v in shapes.items() if k.startswith("text_decoder/blocks/") and k.endswith("fc1/kernel")}
    assert sorted(fc1) == [f"text_decoder/blocks/{i}/mlp/fc1/kernel" for i in range(cfg["text"]["depth"])]
    assert all(v == [cfg["text"]["mlp"], cfg["text"]["width"]] for v in fc1.values()), "per layer, outputs first"
    # the selection refuses bf16 exactly where this host's measured bf16 matmuls are slower than f32
    hardware = json.loads((cpu_bundle.parent / "analysis.json").read_text())["build"]["hardware"]
    slower = hardware["achieved_bf16_flops"] < hardware["achieved_fp32_flops"]
    assert {sel["precision"] for sel in manifest["selection"]} == {"fp32", "bf16"}
    for sel in manifest["selection"]:
        assert ("refused" in sel) == (slower and sel["precision"] == "bf16"), sel
    assert {a.get("precision") for a in manifest["artifacts"]} == {None, "fp32"}, "--export-precisions fp32"
    code, rows, err = cpu_verified
    assert code == 0, err
    assert rows and all(r["result"] == "pass" for r in rows)  # a CPU bundle runs entirely here
    kinds_checked = {r["artifact"].split("/")[0] for r in rows}
    assert {"params", "stablehlo", "saved_model", "executables"} <= kinds_checked
    fp32 = [r for r in rows if "fp32" in r["artifact"] and r["max_abs_error"] is not None and r["tolerance"]]
    assert fp32 and all(r["max_abs_error"] <= 1e-5 * max(1.0, r["tolerance"] / 1e-5) for r in fp32)
    captions = [r for r in rows if "caption" in r["artifact"] and r["output"] == "out"]
    assert captions and all(r["note"] == "token ids identical" for r in captions)


def _serve(bundle: Path, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "capibara_export", "serve", bundle, *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _pixels(path: Path, batch: int = 32, size: int = 32) -> Path:
    import numpy as np

    np.savez(path, pixel_values=np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32))
    return path


def test_serve_runs_the_executable_on_the_mesh_by_position_and_matches_the_export(cpu_bundle, tmp_path):
    """One process (a CPU bundle): the serialized executable where trust allows, else the sharded
    export; the same outputs, written by process 0. Equal to float32 rounding, not bit for bit:
    the executable (compiled by the build) computes the GELU in its erf form, the portable export
    in its erfc form (model.layers.gelu)."""
    import numpy as np

    pixels = _pixels(tmp_path / "in.npz")
    outs = {}
    for flag in ("--allow-unsigned-executables", "--no-executables"):
        out = tmp_path / f"out{flag}.npz"
        proc = _serve(cpu_bundle, "--entry", "encode_image", "--precision", "fp32", "--inputs", pixels, "--out", out,
                      "--cpu-devices", 4, flag)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        kind = "executable" if flag.startswith("--allow") else "jax.export-sharded"
        assert f"({kind})" in err, err[-2000:]
        with np.load(out) as data:
            outs[flag] = data["image_embeds"]
    a, b = outs.values()
    assert a.shape[0] == 32 and not np.array_equal(a, np.zeros_like(a))
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def _flip_one_byte(path: Path) -> Path:
    target = path if path.is_file() else max((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    return target


def test_altered_artifacts_and_a_foreign_jax_version_fail_verify_naming_them(cpu_bundle, tmp_path):
    """A tampered copy (a flipped byte in one artifact of each kind) fails verify naming each;
    an intact copy whose manifest claims the executables were made by jax 0.9.0 fails on every
    executable, naming the versions (two copies: the bundle's one params artifact feeds every
    executable, so with it flipped they would only report the dependency)."""
    copy = Path(shutil.copytree(cpu_bundle, tmp_path / "bundle"))
    manifest = json.loads((copy / "manifest.json").read_text())
    flipped = []
    for kind in ("params", "jax.export", "saved_model", "executable"):
        artifact = [a for a in manifest["artifacts"] if a["kind"] == kind][-1]  # keep earlier ones intact
        _flip_one_byte(copy / artifact["path"])
        flipped.append(artifact["path"])
    code, rows, err = verify(copy, "--allow-unsigned-executables")
    assert code == 1
    for path in flipped:
        assert any(r["result"] == "FAIL" and r["artifact"] == path and "sha256" in r["note"] for r in rows), path
    assert "verify failed: " in err

    foreign = Path(shutil.copytree(cpu_bundle, tmp_path / "foreign"))
    manifest["toolchain"]["jax"] = "0.9.0"
    # the executables, the parameters they run on and one portable export (which must still
    # pass: StableHLO is not tied to the jax that wrote it); cpu_verified ran every other artifact
    manifest["artifacts"] = [a for a in manifest["artifacts"]
                             if a["kind"] in ("params", "executable", "executable-trees")
                             or a["path"] == "stablehlo/encode_image-fp32.jaxexport"]
    (foreign / "manifest.json").write_text(json.dumps(manifest))
    code, rows, err = verify(foreign, "--allow-unsigned-executables")
    assert code == 1 and "verify failed: " in err
    executables = [r for r in rows if r["artifact"].startswith("executables/")]
    assert executables and all(r["result"] == "FAIL" for r in executables)
    refused = [r for r in executables if "built with jax" in r["note"]]
    assert refused and all("built with jax 0.9.0, but this machine has jax 0.10.2" in r["note"] for r in refused)
    assert not [r for r in rows if not r["artifact"].startswith("executables/") and r["result"] == "FAIL"]
    assert [r["result"] for r in rows if r["artifact"] == "stablehlo/encode_image-fp32.jaxexport"] == ["pass"]


def test_bundle_readme_recipes_run_as_written_without_the_project(cpu_bundle):
    """Every code block of the bundle README, in a fresh process from the bundle folder, with
    plain JAX / orbax / TensorFlow / transformers: none of them may import capibara-export."""
    readme = (cpu_bundle / "README.md").read_text()
    blocks = readme.split("```python\n")[1:]
    assert len(blocks) == 6  # jax.export, decode_step, SavedModel, processor, sharded export, executable
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
    # the nested cache rebuilt from the manifest's names (out-in, per-layer, head-major here)
    assert "decode_step loop == caption: True (2, 21)" in outputs[1], outputs[1]
    assert "serving_default" in outputs[2] and "'token_ids': TensorShape([2, 21])" in outputs[2]
    assert "(1, 3, 32, 32)" in outputs[3]
    assert outputs[4].startswith("caption (32, 21)") or outputs[4].startswith("encode_image (32,")
    assert outputs[5].startswith("caption (32, 21)") or outputs[5].startswith("encode_image (32,")


def test_each_saved_model_sits_in_the_layout_tf_serving_loads(cpu_bundle):
    """TF Serving's model server (not on PyPI, so not run here) loads `<base>/<version>/` with
    a positive integer version and reads warmup from `<version>/assets.extra/`: the bundle's
    SavedModels are there, the README's docker line mounts that base path, and the version
    folder loads with every signature the manifest names."""
    import tensorflow as tf

    manifest = mf.read(cpu_bundle)
    readme = (cpu_bundle / "README.md").read_text()
    for art in (a for a in manifest["artifacts"] if a["kind"] == "saved_model"):
        base, version = art["path"].rsplit("/", 1)
        assert base == f"saved_model/{art['precision']}" and version.isdigit() and int(version) > 0
        assert [p.name for p in (cpu_bundle / base).iterdir()] == [version]   # nothing TF Serving would misread
        folder = cpu_bundle / art["path"]
        assert (folder / "saved_model.pb").is_file()
        assert (folder / art["warmup"]["path"]).is_file() and art["warmup"]["path"] == \
            "assets.extra/tf_serving_warmup_requests"
        loaded = tf.saved_model.load(str(folder))
        assert sorted(loaded.signatures) == sorted(s["name"] for s in art["signatures"])
    first = next(a for a in manifest["artifacts"] if a["kind"] == "saved_model")
    name = manifest["model"]["name"]
    assert f'-v "$PWD/saved_model/{first["precision"]}:/models/{name}" -e MODEL_NAME={name} tensorflow/serving' \
        in readme
    assert "single-device" in readme


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


def test_a_near_tie_is_judged_on_the_logits_the_prefix_predicts():
    """Row 1 diverges at token 2: accepted when the reference's logits at position 1 (what the
    prefix ids[:2] predicts) hold the two tokens within tolerance, refused when they do not,
    whatever the logits at other positions say; a divergence in the prompt is refused."""
    import numpy as np

    from capibara_export.export.verify import TOLERANCE
    from model.tie_checks import near_ties

    want = np.array([[7, 3, 4, 5], [7, 3, 4, 5]])
    got = np.array([[7, 3, 4, 5], [7, 3, 9, 5]])
    logits = np.zeros((1, 4, 12), np.float32)          # the diverging rows only: row 1
    logits[0, 2, 4], logits[0, 2, 9] = 10.0, -10.0     # position 2: far apart, but not the prefix's
    check = near_ties(None, None, np.zeros((2, 3, 4, 4), np.float32), TOLERANCE["bf16"],
                      next_token_logits=lambda *_: logits)
    accepted, note = check(got, want)
    assert accepted and note == "ids identical up to near-ties: row 1 at token 2 (margin 0)", note
    logits[0, 1, 4] = 5.0                              # position 1 now tells 4 from 9 clearly
    accepted, note = check(got, want)
    assert not accepted and note.startswith("row 1 diverges at token 2 with logit margin 5"), note
    accepted, note = check(np.array([[8, 3, 4, 5], [7, 3, 4, 5]]), want)
    assert not accepted and note == "row 0 differs in its prompt", note
