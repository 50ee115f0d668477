"""Models other than BLIP through the same pipeline: GPT-2 (a built-in family, with parity
against transformers) and a user's model loaded with --model-module (tests/user_model.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from model.gpt2.config import PRESETS, Gpt2Config

ROOT = Path(__file__).resolve().parent.parent


def cli(*args, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "capibara_export", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def _summary(proc: subprocess.CompletedProcess) -> str:
    return (proc.stdout + proc.stderr)[-3000:]


# ------------------------------------------------------------------ GPT-2 against transformers
@pytest.fixture(scope="module")
def gpt2_checkpoint(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = PRESETS["gpt2-tiny"]
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(**{k: v for k, v in cfg.to_hf_dict().items()
                                       if k not in ("architectures", "model_type")})).eval()
    folder = tmp_path_factory.mktemp("gpt2-tiny")
    hf.save_pretrained(folder)
    return hf, folder


@pytest.mark.torch
def test_gpt2_logits_and_greedy_tokens_match_transformers(gpt2_checkpoint):
    """Left-padded prompts: every real position's logits within 1e-4 of GPT2LMHeadModel's, and
    generate's ids equal to GPT2LMHeadModel.generate(do_sample=False) token for token."""
    import jax
    import jax.numpy as jnp
    import torch

    from model.gpt2.hf import load_checkpoint
    from model.gpt2.programs import greedy
    from model.gpt2.state import bind

    hf, folder = gpt2_checkpoint
    cfg, params = load_checkpoint(folder)
    assert isinstance(cfg, Gpt2Config) and cfg.width == 64 and cfg.depth == 2
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (3, 7))
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :1] = 0
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)   # what generate passes for left padding
    with torch.no_grad():
        want = hf(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions)).logits
    got = np.asarray(bind(cfg, params).logits(jnp.asarray(ids, jnp.int32), jnp.asarray(mask)))
    error = np.abs(want.numpy() - got)[mask.astype(bool)].max()
    assert error <= 1e-4, error

    hf.generation_config.eos_token_id = None   # no early stop: generate runs a static number of steps
    hf.generation_config.pad_token_id = 0
    with torch.no_grad():
        want_ids = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=8,
                               do_sample=False).numpy()
    got_ids = jax.jit(lambda p, i, m: greedy(bind(cfg, p), i, m, 8))(params, jnp.asarray(ids, jnp.int32),
                                                                     jnp.asarray(mask, jnp.int32))
    np.testing.assert_array_equal(np.asarray(got_ids), want_ids)


def test_a_gpt2_config_it_does_not_implement_is_refused_with_the_field_named(tmp_path):
    from model.gpt2.hf import checkpoint_config
    from model.hf import CheckpointError

    raw = {**PRESETS["gpt2-tiny"].to_hf_dict(), "activation_function": "relu"}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="activation_function='relu' is not implemented"):
        checkpoint_config(tmp_path)


@pytest.mark.slow
def test_gpt2_tiny_builds_exports_and_verifies_on_the_default_target(tmp_path):
    """The issue's command: every entry x plan x precision on tpu-v4-64, a selection, a bundle
    that verifies alone and across 8 local processes laid out as the slice's 8 hosts."""
    out = tmp_path / "out"
    built = cli("build", "--mesh", "4x8", "--model", "gpt2-tiny", "--export", "--random-weights",
                "--out", str(out), "--quiet")
    assert built.returncode == 0, _summary(built)
    folder = out / "gpt2-tiny-tpu-v4-64-4x8"
    records = [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()]
    assert {r["unit"]["entry"] for r in records} == {"prefill", "decode_step", "generate"}
    assert sum(r["status"] == "ok" for r in records) >= 54
    selection = json.loads((folder / "selection.json").read_text())["selections"]
    assert {s["entry"] for s in selection if s["plan"]} == {"prefill", "decode_step", "generate"}
    analysis = json.loads((folder / "analysis.json").read_text())["units"]
    for a in analysis.values():   # the model's own FLOP count agrees with the compiled program's
        if a["status"] == "ok":
            assert a["flops"]["global_matmul"] == pytest.approx(a["analytic"]["flops"], rel=0.10), a["unit"]
    manifest = json.loads((folder / "bundle" / "manifest.json").read_text())
    assert manifest["model"]["family"] == "gpt2" and "towers" not in manifest["model"]
    sm = next(a for a in manifest["artifacts"] if a["kind"] == "saved_model")
    assert [s["entry"] for s in sm["signatures"]] == ["generate", "generate"]
    for extra in ((), ("--processes", "8")):
        checked = cli("verify", str(folder / "bundle"), "--allow-unsigned-executables", "--json", *extra)
        assert checked.returncode == 0, _summary(checked)
        rows = [json.loads(line) for line in checked.stdout.splitlines() if line.startswith("{")]
        assert not any(r["result"] in ("FAIL", "error") for r in rows)
        assert sum(r["result"] == "pass" for r in rows) >= (27 if not extra else 42)


# ------------------------------------------------------------------ a user's model
@pytest.mark.slow
def test_a_model_from_a_test_file_is_built_exported_and_verified_with_model_module(tmp_path):
    out = tmp_path / "out"
    built = cli("build", "--mesh", "4x8", "--model-module", "tests.user_model:FAMILY", "--export",
                "--random-weights", "--out", str(out), "--quiet")
    assert built.returncode == 0, _summary(built)
    folder = out / "mlp-tiny-tpu-v4-64-4x8"
    records = {r["unit"]["plan"] + "/" + r["unit"]["precision"]: r
               for r in map(json.loads, (folder / "records.jsonl").read_text().splitlines())}
    assert {r["unit"]["entry"] for r in records.values()} == {"classify"}
    assert {r["unit"]["precision"] for r in records.values()} == {"fp32", "bf16"}   # the precisions it offers
    assert records["fsdp-tp/fp32"]["status"] == "ok"
    build = json.loads((folder / "build.json").read_text())
    assert build["model_family"] == "mlp" and build["model_module"] == "tests.user_model:FAMILY"
    manifest = json.loads((folder / "bundle" / "manifest.json").read_text())
    assert manifest["model"]["module"] == "tests.user_model:FAMILY"
    assert not any(a["kind"] == "processor" for a in manifest["artifacts"])
    checked = cli("verify", str(folder / "bundle"), "--allow-unsigned-executables", "--json")
    assert checked.returncode == 0, _summary(checked)
    rows = [json.loads(line) for line in checked.stdout.splitlines() if line.startswith("{")]
    passed = {r["artifact"] for r in rows if r["result"] == "pass"}
    assert "stablehlo/classify-fp32.jaxexport" in passed and "saved_model/bf16/1:serving_default" in passed
    assert not any(r["result"] in ("FAIL", "error") for r in rows)


def test_a_plan_naming_an_axis_only_another_model_has_is_invalid_for_blip_with_the_reason():
    import tests.user_model  # noqa: F401  (its family declares `classes`)
    from capibara_export import families
    from model import get_preset
    from sharding.plans import parse_plans
    from sharding.validity import check

    families.register(tests.user_model.FAMILY, "tests.user_model:FAMILY")
    plan = parse_plans("[by-class]\nparams = { classes = 'model' }\n", "test")["by-class"]
    blip, cfg = families.get("blip"), get_preset("tiny")
    validity = check(plan, blip.logical_names(cfg), blip.abstract_params(cfg), cfg.axis_sizes(),
                     {"data": 4, "model": 8}, "blip", blip.scopes, blip.logical_axes)
    assert not validity.ok and validity.reason.startswith("plan maps logical axis 'classes', which model blip "
                                                          "does not have")


def test_a_model_module_that_is_not_importable_is_one_clear_error(tmp_path):
    proc = cli("build", "--mesh", "4x8", "--model-module", "no_such_pkg.models:FAMILY", "--out", str(tmp_path))
    assert proc.returncode == 2
    assert "--model-module no_such_pkg.models:FAMILY: cannot import no_such_pkg.models" in proc.stderr
    assert "Traceback" not in proc.stderr and not any(tmp_path.iterdir())


def test_gpt2_generate_accepts_a_diverging_row_only_at_a_near_tie_of_the_reference():
    """verify's check for generate: the reference's own ids pass; a row whose first differing
    token the reference clearly ruled out, or whose prompt differs, fails with the reason."""
    import jax
    import jax.numpy as jnp

    from model.gpt2.family import FAMILY
    from model.gpt2.programs import greedy
    from model.gpt2.state import bind, init_params

    cfg = PRESETS["gpt2-tiny"]
    params = init_params(cfg, 0)
    prompt = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 3)).astype(np.int32)
    mask = np.ones_like(prompt)
    want = np.asarray(jax.jit(lambda p, i, m: greedy(bind(cfg, p), i, m, 4))(params, prompt, mask))
    check = FAMILY.tie_check(cfg, None, "generate", params, (prompt, mask), 2e-2)
    assert FAMILY.tie_check(cfg, None, "prefill", params, (prompt,), 2e-2) is None
    logits = np.asarray(bind(cfg, params).logits(jnp.asarray(want), jnp.ones_like(want)))
    at = logits[1, 3]                                   # what the prompt of row 1 predicts next
    worst = int(np.argmin(at))                          # a token the reference rules out
    got = want.copy()
    got[1, 4] = worst
    accepted, note = check(got, want)
    assert not accepted and note.startswith("row 1 diverges at token 4 with logit margin"), note
    prompt_changed = want.copy()
    prompt_changed[0, 1] = (want[0, 1] + 1) % cfg.vocab_size
    assert check(prompt_changed, want) == (False, "a row differs in its prompt")


def _two_host_bundle(tmp_path: Path, *model_args: str, entry: str) -> Path:
    """A bundle of `entry` for a 2-host slice (v4 2x2x2 megacore: 2 processes x 4 devices), dp, fp32, batch 8."""
    built = cli("build", *model_args, "--random-weights", "--topology", "v4:2x2x2", "--chip-config", "megacore",
                "--mesh", "2x4", "--export", "--entries", entry, "--plans", "dp", "--precisions", "fp32",
                "--batch", "8", "--derive-rounds", "0", "--max-new-tokens", "4", "--prompt-len", "3",
                "--no-saved-model", "--out", str(tmp_path / "out"), "--quiet")
    assert built.returncode == 0, _summary(built)
    (folder,) = [p for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")]
    return folder / "bundle"


def _served(bundle: Path, logs: Path, model: str, inputs: dict[str, np.ndarray], dtypes: dict[str, str]) -> dict:
    """Start the live server on both hosts, send one KServe v2 request with tritonclient, and
    return its outputs beside what the bundle's portable program computes for the same inputs."""
    import tritonclient.http as tritonclient_http

    from tests.live_slice import LiveSlice, Reference

    server = LiveSlice(bundle, logs)
    try:
        server.start()
        status, meta = server.get(f"/v2/models/{model}")
        assert status == 200 and [t["name"] for t in meta["inputs"]] == list(inputs), meta
        client = tritonclient_http.InferenceServerClient(server.http, connection_timeout=60, network_timeout=60)
        given = []
        for name, value in inputs.items():
            tensor = tritonclient_http.InferInput(name, list(value.shape), dtypes[name])
            tensor.set_data_from_numpy(value, binary_data=True)
            given.append(tensor)
        result = client.infer(model, given)
        got = {o["name"]: result.as_numpy(o["name"]) for o in result.get_response()["outputs"]}
    finally:
        server.kill()
    return got, Reference(bundle)(model, inputs)


@pytest.mark.slow
def test_gpt2_generate_is_served_live_across_two_processes(tmp_path):
    """gpt2-tiny's generate served by the live server: left-padded prompts come back as the
    bundle's portable program computes them."""
    bundle = _two_host_bundle(tmp_path, "--model", "gpt2-tiny", entry="generate")
    mask = np.array([[1, 1, 1], [0, 1, 1], [0, 0, 1]], np.int32)
    ids = (np.random.default_rng(3).integers(0, 256, (3, 3)) * mask).astype(np.int32)
    got, want = _served(bundle, tmp_path / "logs", "generate", {"prompt_ids": ids, "prompt_mask": mask},
                        {"prompt_ids": "INT32", "prompt_mask": "INT32"})
    assert got["token_ids"].shape == (3, 7)
    np.testing.assert_array_equal(got["token_ids"], want["token_ids"])


@pytest.mark.slow
def test_the_test_file_model_is_served_live_with_model_module(tmp_path):
    """The server imports the bundle's recorded --model-module and serves classify."""
    bundle = _two_host_bundle(tmp_path, "--model-module", "tests.user_model:FAMILY", entry="classify")
    features = np.random.default_rng(4).standard_normal((5, 64)).astype(np.float32)
    got, want = _served(bundle, tmp_path / "logs", "classify", {"features": features}, {"features": "FP32"})
    assert got["logits"].shape == (5, 16)
    np.testing.assert_allclose(got["logits"], want["logits"], rtol=2e-4, atol=2e-5)
