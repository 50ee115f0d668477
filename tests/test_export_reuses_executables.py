"""An export writes the executables its build compiled: `build --export` and a later
`export` compile no selected unit again (issue 14), and what they write still loads and
runs like a fresh compile."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from capibara_export.cli import main
from capibara_export.export import executables
from capibara_export.export import manifest as mf
from capibara_export.export import params as params_io
from capibara_export.matrix.serving import example_inputs, serving_function
from capibara_export.matrix.programs import ProgramOptions, place
from model import BlipConfig
from sharding.precision import get_policy

pytestmark = pytest.mark.slow
ARGS = ["--model", "tiny", "--target", "cpu", "--entries", "encode_image", "--plans", "dp", "--precisions", "fp32",
        "--batch", "32", "--quiet"]
EXPORT = ["--random-weights", "--no-saved-model", "--export-entries", "encode_image"]


@pytest.fixture
def compiles(monkeypatch) -> list[str]:
    """Every XLA compile in this process, by the jitted function's name."""
    seen: list[str] = []
    original = jax.stages.Lowered.compile

    def counting(self, *args, **kwargs):
        seen.append(getattr(self, "_fun_name", "?"))
        return original(self, *args, **kwargs)
    monkeypatch.setattr(jax.stages.Lowered, "compile", counting)
    return seen


def _units(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()]


def test_build_export_and_a_later_export_compile_nothing_again(tmp_path, compiles):
    assert main(["build", *ARGS, "--out", str(tmp_path), "--export", *EXPORT]) == 0
    (folder,) = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    built = [u for u in _units(folder) if u["status"] == "ok"]
    assert len(built) == 1 and len(compiles) == 1, compiles   # the build's one compile, none in the export
    manifest = mf.read(folder / "bundle")
    (exe,) = [a for a in manifest["artifacts"] if a["kind"] == "executable"]
    first = (folder / "bundle" / exe["path"]).read_bytes()

    compiles.clear()
    assert main(["export", str(folder), *EXPORT]) == 0       # the cache holds the executable
    assert compiles == []
    assert (folder / "bundle" / exe["path"]).read_bytes() == first

    # the kept executable loads and computes what the serving function computes
    cfg = BlipConfig.from_dict(manifest["model"]["config"])   # a CPU bundle: layers stored per layer
    assert cfg.text.layer_storage == "per-layer" and cfg.towers == tuple(manifest["model"]["towers"])
    serving = serving_function(cfg, "encode_image", get_policy("fp32"), 32, ProgramOptions())
    params = params_io.restore(folder / "bundle" / "params" / "float32")
    devices = executables.execution_devices(manifest)
    loaded = executables.load(folder / "bundle" / exe["path"], folder / "bundle" / exe["trees"], "cpu", devices)
    (pixels,) = example_inputs(serving, 32)
    shardings = loaded.input_shardings[0]
    ours = loaded(*place((params, pixels), shardings))
    reference = jax.jit(serving.fn)(params, pixels)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(reference), atol=1e-5)


def test_an_uncached_build_exports_from_memory(tmp_path, compiles):
    assert main(["build", *ARGS, "--out", str(tmp_path), "--no-cache", "--export", *EXPORT]) == 0
    assert len(compiles) == 1, compiles
    assert not (tmp_path / ".cache" / "results").exists() or not any((tmp_path / ".cache" / "results").rglob("*.xla*"))


def test_a_damaged_cached_executable_is_compiled_again_never_exported(tmp_path, compiles):
    assert main(["build", *ARGS, "--out", str(tmp_path)]) == 0
    (folder,) = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    (payload,) = (tmp_path / ".cache" / "results").rglob("*.xla.gz")
    data = bytearray(payload.read_bytes())
    data[len(data) // 2] ^= 0xFF
    payload.write_bytes(bytes(data))
    compiles.clear()
    assert main(["export", str(folder), *EXPORT]) == 0
    assert len(compiles) == 1                                  # the damaged one was not trusted
    assert not payload.exists()                                # and it left the cache
    manifest = mf.read(folder / "bundle")
    (exe,) = [a for a in manifest["artifacts"] if a["kind"] == "executable"]
    assert (folder / "bundle" / exe["path"]).read_bytes() != bytes(data)
