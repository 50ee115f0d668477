"""Numerical parity with Hugging Face transformers (PyTorch, CPU, fp32) on tiny random models.

Each test runs twice: against tests/fixtures/parity_tiny.npz (no torch needed) and live
against transformers (torch from the dev extra), which also proves the fixture is current.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import BlipConfig, get_preset, greedy_caption
from model.generate import caption_prompt
from model.hf import params_from_hf_tensors
from model.random_params import init_params
from model.state import bind

FIXTURE = Path(__file__).parent / "fixtures" / "parity_tiny.npz"
LOGITS_ATOL = 1e-4


@lru_cache(maxsize=None)
def _fixture():
    data = np.load(FIXTURE)
    cfg = BlipConfig.from_dict(json.loads(str(data["config"])))
    inputs = {k.split(".", 1)[1]: data[k] for k in data.files if k.startswith("inputs.")}
    case = {"config": cfg, "inputs": inputs}
    for tower in ("caption", "retrieval"):
        case[tower] = {
            "tensors": {k.split(".", 2)[2]: data[k] for k in data.files if k.startswith(f"{tower}.tensor.")},
            "outputs": {k.split(".", 2)[2]: data[k] for k in data.files if k.startswith(f"{tower}.out.")},
        }
    return case


@lru_cache(maxsize=None)
def _live():
    torch = pytest.importorskip("torch")  # noqa: F841 - the dev extra installs it
    from tests import hf_reference as ref

    cfg = _fixture()["config"]
    x = ref.inputs(cfg)
    case = {"config": cfg, "inputs": x}
    for tower, outputs in (("caption", ref.caption_outputs), ("retrieval", ref.retrieval_outputs)):
        m = ref.random_hf_model(cfg, tower)
        case[tower] = {"tensors": ref.hf_tensors(m), "outputs": outputs(m, x)}
    return case


@pytest.fixture(scope="module", params=["fixture", pytest.param("live", marks=pytest.mark.torch)])
def case(request):
    return _fixture() if request.param == "fixture" else _live()


def _model(case, tower):
    cfg = case["config"].with_towers(tower)
    return bind(cfg, jax.tree.map(jnp.asarray, params_from_hf_tensors(cfg, case[tower]["tensors"])))


def _pad_to(ids: np.ndarray, length: int, pad: int) -> np.ndarray:
    return np.pad(ids, ((0, 0), (0, length - ids.shape[1])), constant_values=pad)


def test_live_reference_reproduces_the_fixture():
    pytest.importorskip("torch")
    fixed, live = _fixture(), _live()
    for tower in ("caption", "retrieval"):
        for key, value in fixed[tower]["outputs"].items():
            # float outputs: 1e-5, since oneDNN's fp32 kernels differ by ~1e-6 between CPU generations
            np.testing.assert_allclose(live[tower]["outputs"][key], value, atol=1e-5, err_msg=f"{tower}.{key}")


def test_vision_last_hidden_state(case):
    model = _model(case, "caption")
    ours = model.encode_image(jnp.asarray(case["inputs"]["pixels"]))
    np.testing.assert_allclose(np.asarray(ours), case["caption"]["outputs"]["vision"], atol=1e-4)


def test_decoder_logits_with_padding_mask(case):
    model = _model(case, "caption")
    x = case["inputs"]
    assert x["mask"].min() == 0, "the inputs must contain padding for this test to mean anything"
    image = model.encode_image(jnp.asarray(x["pixels"]))
    ours = model.decoder_logits(jnp.asarray(x["ids"]), jnp.asarray(x["mask"]), image)
    np.testing.assert_allclose(np.asarray(ours), case["caption"]["outputs"]["logits"], atol=LOGITS_ATOL)


def test_incremental_decoding_equals_full_recompute(case):
    model = _model(case, "caption")
    x = case["inputs"]
    ids = jnp.asarray(x["ids"][:1])           # the unpadded row
    image = model.encode_image(jnp.asarray(x["pixels"][:1]))
    full = model.decoder_logits(ids, jnp.ones_like(ids), image)[0]
    prefill_len = 3
    logits, cache = model.prefill(ids[:, :prefill_len], image, cache_len=ids.shape[1])
    steps = [logits[0]]
    for pos in range(prefill_len, ids.shape[1]):
        logits, cache = jax.jit(model.decode_step)(ids[:, pos:pos + 1], pos, cache)
        steps.append(logits[0])
    np.testing.assert_allclose(np.stack(steps), np.asarray(full[prefill_len - 1:]), atol=1e-5)


@pytest.mark.parametrize("with_prompt", [False, True])
def test_greedy_caption_ids_equal_hf_generate(case, with_prompt):
    from tests.hf_reference import NEW_TOKENS

    cfg = case["config"]
    model = _model(case, "caption")
    x = case["inputs"]
    batch = x["pixels"].shape[0]
    prompt = caption_prompt(cfg.text, list(x["prompt"]) if with_prompt else None)
    run = jax.jit(lambda px, pr: greedy_caption(model, px, pr, NEW_TOKENS))
    ours = np.asarray(run(jnp.asarray(x["pixels"]), jnp.asarray(np.tile(prompt, (batch, 1)))))
    theirs = case["caption"]["outputs"]["generate_prompt" if with_prompt else "generate"]
    np.testing.assert_array_equal(ours, _pad_to(theirs, ours.shape[1], cfg.text.pad_token_id))
    if not with_prompt:  # the fixture's [SEP] bias makes some rows stop: the done mask is exercised
        assert (ours[:, 1:] == cfg.text.sep_token_id).any(axis=1).any()


def test_right_padded_prompts_in_one_batch_equal_hf_generate_with_attention_mask(case):
    """Prompts of lengths 6, 5 and 3 in one right-padded batch with a prompt mask give the
    tokens of BlipForConditionalGeneration.generate(input_ids, attention_mask=...)."""
    from tests.hf_reference import NEW_TOKENS, padded_prompts

    cfg = case["config"]
    model = _model(case, "caption")
    x = case["inputs"]
    ids, mask = padded_prompts(x)
    assert sorted(set(mask.sum(axis=1))) == [3, 5, 6]
    run = jax.jit(lambda px, pr, m: greedy_caption(model, px, pr, NEW_TOKENS, m))
    ours = np.asarray(run(jnp.asarray(x["pixels"]), jnp.asarray(ids), jnp.asarray(mask)))
    theirs = case["caption"]["outputs"]["generate_padded"]
    np.testing.assert_array_equal(ours, _pad_to(theirs, ours.shape[1], cfg.text.pad_token_id))
    # a full mask is the plain path: the same ids as no mask at all
    full = np.ones_like(mask)
    plain = jax.jit(lambda px, pr: greedy_caption(model, px, pr, NEW_TOKENS))
    np.testing.assert_array_equal(np.asarray(run(jnp.asarray(x["pixels"]), jnp.asarray(ids), jnp.asarray(full))),
                                  np.asarray(plain(jnp.asarray(x["pixels"]), jnp.asarray(ids))))


def test_itm_logits(case):
    model = _model(case, "retrieval")
    x = case["inputs"]
    image = model.encode_image(jnp.asarray(x["pixels"]))
    ours = model.itm_logits(image, jnp.asarray(x["ids"]), jnp.asarray(x["mask"]))
    np.testing.assert_allclose(np.asarray(ours), case["retrieval"]["outputs"]["itm"], atol=LOGITS_ATOL)


def test_itc_similarity(case):
    model = _model(case, "retrieval")
    x = case["inputs"]
    image = model.encode_image(jnp.asarray(x["pixels"]))
    img, txt = model.itc_features(image, jnp.asarray(x["ids"]), jnp.asarray(x["mask"]))
    np.testing.assert_allclose(np.asarray(img @ txt.T), case["retrieval"]["outputs"]["itc"], atol=LOGITS_ATOL)
    scores = model.score(image, jnp.asarray(x["ids"]), jnp.asarray(x["mask"]))
    np.testing.assert_allclose(np.asarray(scores["itc_similarity"]),
                               np.diag(case["retrieval"]["outputs"]["itc"]), atol=LOGITS_ATOL)


def test_gpu_trace_choices_keep_parity(monkeypatch):
    """The GPU-only choices that need no GPU to trace (unrolled loops, flattened dots,
    one-pass layer-norm statistics) still match transformers: traced here on the CPU as if
    for a GPU. cuDNN attention needs a GPU; tools/studies/gpu_decode.py checks it there."""
    from model import layers
    from tests.hf_reference import NEW_TOKENS, padded_prompts

    monkeypatch.setattr(layers, "_tracing_for_local_gpu", lambda: True)
    monkeypatch.setenv("CAPIBARA_GPU_KERNELS", "unroll-layers+unroll-decode+flat-dots+fast-ln")
    assert layers.gpu_kernels() == {"unroll-layers", "unroll-decode", "flat-dots", "fast-ln"}
    case = _fixture()
    model, x = _model(case, "caption"), case["inputs"]
    pixels = jnp.asarray(x["pixels"])
    traced = jax.jit(model.encode_image).lower(pixels).as_text()
    monkeypatch.setenv("CAPIBARA_GPU_KERNELS", "xla")
    assert jax.jit(model.encode_image).lower(pixels).as_text() != traced, "the choices never reached the trace"
    monkeypatch.setenv("CAPIBARA_GPU_KERNELS", "unroll-layers+unroll-decode+flat-dots+fast-ln")
    vision = jax.jit(model.encode_image)(pixels)
    np.testing.assert_allclose(np.asarray(vision), case["caption"]["outputs"]["vision"], atol=1e-4)
    logits = jax.jit(model.decoder_logits)(jnp.asarray(x["ids"]), jnp.asarray(x["mask"]), vision)
    np.testing.assert_allclose(np.asarray(logits), case["caption"]["outputs"]["logits"], atol=LOGITS_ATOL)
    ids, mask = padded_prompts(x)
    ours = jax.jit(lambda px, pr, m: greedy_caption(model, px, pr, NEW_TOKENS, m))(
        jnp.asarray(x["pixels"]), jnp.asarray(ids), jnp.asarray(mask))
    theirs = case["caption"]["outputs"]["generate_padded"]
    expected = _pad_to(theirs, ours.shape[1], case["config"].text.pad_token_id)
    np.testing.assert_array_equal(np.asarray(ours), expected)

    # hoist-layers: the decoder's layer slices taken once before the (rolled) decode loop
    args = (jnp.asarray(x["pixels"]), jnp.asarray(ids), jnp.asarray(mask))

    def caption():  # a new function each time: jit caches traces by function, not by environment
        return jax.jit(lambda px, pr, m: greedy_caption(model, px, pr, NEW_TOKENS, m))

    monkeypatch.setenv("CAPIBARA_GPU_KERNELS", "unroll-layers+flat-dots+fast-ln+hoist-layers")
    hoisted = caption().lower(*args).as_text()
    np.testing.assert_array_equal(np.asarray(caption()(*args)), expected)
    # a symbolic batch (the bundles' jax.export artifacts) keeps the slices in the loop, and exports
    (batch,) = jax.export.symbolic_shape("b")
    jax.export.export(caption())(*(jax.ShapeDtypeStruct((batch, *a.shape[1:]), a.dtype) for a in args))
    monkeypatch.setenv("CAPIBARA_GPU_KERNELS", "unroll-layers+flat-dots+fast-ln")
    assert caption().lower(*args).as_text() != hoisted, "hoist-layers never reached the trace"


def test_pallas_decode_attention_keeps_parity(monkeypatch):
    """`pallas-decode` (the GPU default): every decode step's self- and cross-attention is the
    Pallas kernel of model/decode_attention.py, traced here as if for a GPU and run in
    interpret mode. Greedy captions from right-padded prompts (masked self-attention) equal
    transformers', and the decode step's logits match the plain path's."""
    from model import layers, text
    from model.decode_attention import decode_attention
    from tests.hf_reference import NEW_TOKENS, padded_prompts

    monkeypatch.setattr(layers, "_tracing_for_local_gpu", lambda: True)
    case = _fixture()
    model, x = _model(case, "caption"), case["inputs"]
    ids, mask = padded_prompts(x)
    args = (jnp.asarray(x["pixels"]), jnp.asarray(ids), jnp.asarray(mask))

    def caption():  # a new function each time: jit caches traces by function, not by environment
        return jax.jit(lambda px, pr, m: greedy_caption(model, px, pr, NEW_TOKENS, m))

    # pallas-cache: the self-attention kernel reads the stacked cache in place plus the token's
    # own key and value; with hoist-layers the layers run straight-line (static layer indices:
    # traced here, the kernel's numbers for a static index are tests/test_decode_attention.py's)
    for kernels in ("unroll-layers+pallas-decode", "unroll-layers+pallas-decode+pallas-cache",
                    "unroll-layers+pallas-decode+pallas-cache+hoist-layers"):
        monkeypatch.setenv("CAPIBARA_GPU_KERNELS", kernels)
        calls = []
        monkeypatch.setattr(text, "decode_attention", lambda *a, **kw: calls.append(kw.get("layer") is not None)
                            or decode_attention(*a, **kw))
        jax.make_jaxpr(caption())(*args)
        # traced: self + cross in the layer scan's body, or in each of the 2 straight-line layers
        assert len(calls) == (4 if "hoist" in kernels else 2), kernels
        assert sum(calls) == (len(calls) // 2 if "pallas-cache" in kernels else 0), "in place: the self-attention"
        if "hoist" not in kernels:
            ours = caption()(*args)
            expected = _pad_to(case["caption"]["outputs"]["generate_padded"], ours.shape[1],
                               case["config"].text.pad_token_id)
            np.testing.assert_array_equal(np.asarray(ours), expected, err_msg=kernels)

    # one step after a right-padded prompt: the padding masked, the cache read whole
    image, prompt = jax.jit(model.encode_image)(args[0]), args[1]
    p = prompt.shape[1]
    key_mask = jnp.concatenate([args[2], jnp.ones((prompt.shape[0], 12 - p), args[2].dtype)], axis=1)
    _, cache = jax.jit(lambda c: model.decode_step(prompt, 0, c, key_mask))(model.init_cache(image, 12))

    def step(kernels):
        monkeypatch.setenv("CAPIBARA_GPU_KERNELS", kernels)
        return np.asarray(jax.jit(lambda t, c, m: model.decode_step(t, p, c, m)[0])(prompt[:, :1], cache, key_mask))

    plain = step("unroll-layers")
    np.testing.assert_allclose(step("unroll-layers+pallas-decode"), plain, atol=LOGITS_ATOL)
    np.testing.assert_allclose(step("unroll-layers+pallas-decode+pallas-cache"), plain, atol=LOGITS_ATOL)


def test_fused_cross_attention_over_a_kv_major_cache_keeps_parity(monkeypatch):
    """`cudnn-cross` hands the decoder's cross-attention (one query row against every image
    token) to the fused kernel, reading keys and values from a kv-major cache. Traced here on
    the CPU as if for a GPU, with XLA's implementation in cuDNN's place (the same call, the
    same arguments): bf16 captions equal those of the plain path."""
    from model import layers
    from model.generate import caption_from_image

    monkeypatch.setattr(layers, "_tracing_for_local_gpu", lambda: True)
    monkeypatch.setattr(layers, "FUSED_ATTENTION", "xla")
    cfg = get_preset("tiny").with_towers("caption").with_cross_cache("kv-major")
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), init_params(cfg, 5))
    model = bind(cfg, params, jnp.bfloat16)
    pixels = jax.random.normal(jax.random.key(1), (2, 3, cfg.vision.image_size, cfg.vision.image_size))
    prompt = jnp.array([[cfg.text.bos_token_id, 7, 3]] * 2, jnp.int32)
    mask = jnp.array([[1, 1, 1], [1, 1, 0]], jnp.int32)
    image = jax.jit(model.encode_image)(pixels)

    def run(kernels):
        monkeypatch.setenv("CAPIBARA_GPU_KERNELS", kernels)
        fn = jax.jit(lambda im, pr, m: caption_from_image(model, im, pr, 8, m))   # new function: a new trace
        return np.asarray(fn(image, prompt, mask))

    plain = run("xla")
    monkeypatch.setattr(layers, "FUSED_ATTENTION", "cudnn-on-a-gpu")   # the fused call is the one traced
    with pytest.raises(ValueError, match="cudnn-on-a-gpu"):
        run("cudnn-cross")
    monkeypatch.setattr(layers, "FUSED_ATTENTION", "xla")
    np.testing.assert_array_equal(run("cudnn-cross"), plain)


def test_gpu_kernel_choice_typo_is_one_clear_error(monkeypatch):
    from model import layers

    monkeypatch.setattr(layers, "_tracing_for_local_gpu", lambda: True)
    monkeypatch.setenv("CAPIBARA_GPU_KERNELS", "cudnn+unrol-layers")
    with pytest.raises(ValueError, match="unknown choice unrol-layers; use a preset .*fused.*xla"):
        layers.gpu_kernels()
    monkeypatch.setenv("CAPIBARA_GPU_KERNELS", "xla")
    assert layers.gpu_kernels() == frozenset()
    monkeypatch.setattr(layers, "_tracing_for_local_gpu", lambda: False)
    monkeypatch.setenv("CAPIBARA_GPU_KERNELS", "fused")
    assert layers.gpu_kernels() == frozenset(), "no GPU choice may reach a program traced for a CPU or a TPU"
