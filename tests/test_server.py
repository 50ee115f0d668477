"""The live server across two local processes (a 2-host slice), driven by the clients serving
teams already use: tritonclient (KServe v2 over HTTP and gRPC) and plain HTTP for TF Serving's
REST. Every answer is held against the bundle's own single-device program run in this test
process; bad requests interleave with good ones; a drain under load answers everything and
exits 0; a host killed under load is named in every answer and ends the slice."""

from __future__ import annotations

import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tests.live_slice import LiveSlice, Reference, build_server_bundle

pytestmark = pytest.mark.slow
tritonclient_http = pytest.importorskip("tritonclient.http")
tritonclient_grpc = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

DTYPES = {np.dtype(np.float32): "FP32", np.dtype(np.int32): "INT32"}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return build_server_bundle(tmp_path_factory.mktemp("server"))


@pytest.fixture(scope="module")
def live(bundle, tmp_path_factory):
    server = LiveSlice(bundle, tmp_path_factory.mktemp("server-logs"), extra=("--max-body-mb", "1"))
    try:
        yield server.start()
    finally:
        server.kill()


@pytest.fixture(scope="module")
def reference(bundle) -> Reference:
    return Reference(bundle)


def _requests(rows: int, seed: int) -> dict[str, dict[str, np.ndarray]]:
    """Inputs of every served model; caption prompts of 1..3 tokens, right-padded with a mask."""
    rng = np.random.default_rng(seed)
    pixels = rng.standard_normal((rows, 3, 32, 32)).astype(np.float32)
    lengths = rng.integers(1, 4, rows)
    prompt_mask = (np.arange(3)[None, :] < lengths[:, None]).astype(np.int32)
    prompt_ids = np.where(prompt_mask == 1, rng.integers(5, 90, (rows, 3)), 0).astype(np.int32)
    prompt_ids[:, 0] = 2                                    # the tiny config's BOS
    ids = rng.integers(5, 90, (rows, 32)).astype(np.int32)
    mask = (np.arange(32)[None, :] < rng.integers(4, 33, rows)[:, None]).astype(np.int32)
    return {"caption": {"pixel_values": pixels, "prompt_ids": prompt_ids, "prompt_mask": prompt_mask},
            "encode_image": {"pixel_values": pixels},
            "score": {"pixel_values": pixels, "input_ids": ids * mask, "attention_mask": mask}}


def _http_infer(url: str, model: str, inputs: dict[str, np.ndarray], binary: bool = True) -> dict[str, np.ndarray]:
    client = tritonclient_http.InferenceServerClient(url, connection_timeout=60, network_timeout=60)
    given = []
    for name, value in inputs.items():
        t = tritonclient_http.InferInput(name, list(value.shape), DTYPES[value.dtype])
        t.set_data_from_numpy(value, binary_data=binary)
        given.append(t)
    result = client.infer(model, given)
    return {o["name"]: result.as_numpy(o["name"]) for o in result.get_response()["outputs"]}


def _grpc_infer(url: str, model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    client = tritonclient_grpc.InferenceServerClient(url)
    given = []
    for name, value in inputs.items():
        t = tritonclient_grpc.InferInput(name, list(value.shape), DTYPES[value.dtype])
        t.set_data_from_numpy(value)
        given.append(t)
    result = client.infer(model, given, client_timeout=60)
    return {o.name: result.as_numpy(o.name) for o in result.get_response().outputs}


def _same(got: dict[str, np.ndarray], want: dict[str, np.ndarray], what: str) -> None:
    assert set(got) == set(want), what
    for name in want:
        assert got[name].shape == want[name].shape, (what, name)
        if want[name].dtype.kind in "iu":
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"{what}: {name}")
        else:
            np.testing.assert_allclose(got[name], want[name], rtol=2e-4, atol=2e-5, err_msg=f"{what}: {name}")


def test_health_metadata_and_metrics_speak_kserve_v2(live):
    assert live.get("/v2/health/live") == (200, {"live": True})
    assert live.get("/v2/health/ready") == (200, {"ready": True})
    status, server = live.get("/v2")
    assert status == 200 and server["name"] == "capibara-export" and "binary_tensor_data" in server["extensions"]
    status, caption = live.get("/v2/models/caption")
    assert status == 200 and caption["inputs"] == [
        {"name": "pixel_values", "datatype": "FP32", "shape": [-1, 3, 32, 32]},
        {"name": "prompt_ids", "datatype": "INT32", "shape": [-1, 3]},
        {"name": "prompt_mask", "datatype": "INT32", "shape": [-1, 3]}]
    assert caption["outputs"] == [{"name": "token_ids", "datatype": "INT32", "shape": [-1, 7]}]
    assert caption["parameters"]["batch_sizes"] == [8, 16]
    assert live.get("/v2/models/caption/versions/1/ready")[0] == 200
    assert live.get("/v2/models/nope")[0] == 404
    grpc = tritonclient_grpc.InferenceServerClient(live.grpc)
    assert grpc.is_server_live() and grpc.is_server_ready() and grpc.is_model_ready("score")
    meta = grpc.get_model_metadata("score")
    assert [o.name for o in meta.outputs] == ["itc_similarity", "itm_logits", "itm_prob"]
    assert list(meta.inputs[1].shape) == [-1, 32]
    # TF Serving's model status and metadata
    status, tfs = live.get("/v1/models/encode_image")
    assert status == 200 and tfs["model_version_status"][0]["state"] == "AVAILABLE"
    status, text = live.get("/metrics")
    assert status == 200 and "capibara_ready 1.0" in text and "capibara_request_latency_seconds" in text


@pytest.mark.parametrize("model", ["caption", "encode_image", "score"])
def test_every_protocol_answers_what_the_bundle_computes(live, reference, model):
    inputs = _requests(3, seed=1)[model]
    want = reference(model, inputs)
    _same(_http_infer(live.http, model, inputs, binary=True), want, "kserve http, binary")
    _same(_http_infer(live.http, model, inputs, binary=False), want, "kserve http, json")
    _same(_grpc_infer(live.grpc, model, inputs), want, "kserve grpc")
    # TF Serving REST, as a TF Serving client sends it: rows ("instances") and columns ("inputs")
    rows = [{k: v[i].tolist() for k, v in inputs.items()} for i in range(3)]
    status, body = live.post(f"/v1/models/{model}:predict", json.dumps({"instances": rows}).encode())
    assert status == 200, body
    got = body["predictions"]
    if len(want) == 1:
        got = {next(iter(want)): np.asarray(got)}
    else:
        got = {k: np.asarray([row[k] for row in got]) for k in want}
    _same({k: v.astype(want[k].dtype) for k, v in got.items()}, want, "tf serving rows")
    status, body = live.post(f"/v1/models/{model}/versions/1:predict",
                             json.dumps({"inputs": {k: v.tolist() for k, v in inputs.items()}}).encode())
    assert status == 200, body
    outs = body["outputs"] if isinstance(body["outputs"], dict) else {next(iter(want)): body["outputs"]}
    _same({k: np.asarray(v).astype(want[k].dtype) for k, v in outs.items()}, want, "tf serving columns")


def test_concurrent_requests_share_batches_and_each_equals_itself_alone(live, reference):
    """Captions with prompts of 1..3 tokens from 24 concurrent clients: batched together, every
    answer equals the same request answered alone by the bundle's own program."""
    def metric(name: str) -> float:
        text = live.get("/metrics")[1]
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith(name) and 'model="caption"' in line)
    runs0, rows0 = metric("capibara_batch_rows_count"), metric("capibara_batch_rows_sum")
    requests = [_requests(1 + i % 2, seed=100 + i)["caption"] for i in range(24)]
    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(lambda r: _http_infer(live.http, "caption", r), requests))
    for i, (given, got) in enumerate(zip(requests, answers)):
        _same(got, reference("caption", given), f"request {i}")
    runs, rows = metric("capibara_batch_rows_count") - runs0, metric("capibara_batch_rows_sum") - rows0
    assert rows == sum(1 + i % 2 for i in range(24))
    assert runs < 24, f"{runs} batches for 24 concurrent requests: nothing was batched"


def _bad_requests(live) -> list[tuple[str, int, str]]:
    """(what, HTTP status wanted, words the error must contain) after each is sent."""
    good = _requests(1, seed=7)["encode_image"]["pixel_values"]

    def v2(model: str, tensors: list[dict], extra: dict | None = None) -> tuple[int, dict]:
        return live.post(f"/v2/models/{model}/infer", json.dumps({"inputs": tensors, **(extra or {})}).encode())

    def tensor(name="pixel_values", shape=(1, 3, 32, 32), datatype="FP32", data=None):
        return {"name": name, "shape": list(shape), "datatype": datatype,
                "data": good.reshape(-1).tolist() if data is None else data}
    cases = [
        ("unknown model", v2("nope", [tensor()]), 404, "unknown model 'nope'"),
        ("wrong input name", v2("encode_image", [tensor(name="pixels")]), 400, "no input 'pixels'"),
        ("wrong row shape", v2("encode_image", [tensor(shape=(3, 32, 32, 1))]), 400, "takes [-1, 3, 32, 32]"),
        ("wrong dtype", v2("encode_image", [tensor(datatype="INT32", data=[0] * good.size)]), 400, "is INT32"),
        ("too many rows", v2("encode_image", [tensor(shape=(17, 3, 32, 32), data=[0.0] * (17 * good.size))]), 400,
         "1..16 rows"),
        ("data of the wrong size", v2("encode_image", [tensor(data=[0.0] * 5)]), 400, "5 values"),
        ("malformed JSON", live.post("/v2/models/encode_image/infer", b"{\"inputs\": [}"), 400, "not JSON"),
        ("body over --max-body-mb", live.post("/v2/models/encode_image/infer", b" " * (2 << 20)), 413,
         "--max-body-mb"),
        ("a missing input", v2("score", [tensor()]), 400, "needs input 'input_ids'"),
        ("tf serving: unknown field", live.post("/v1/models/encode_image:predict", b"{\"rows\": []}"), 400,
         "instances"),
        ("tf serving: wrong version", live.post("/v1/models/encode_image/versions/7:predict", b"{}"), 404, "version"),
    ]
    return [(what, status, body, want_status, words) for what, (status, body), want_status, words in cases]


def test_bad_requests_get_one_clear_line_while_good_ones_pass(live, reference):
    good = _requests(2, seed=9)["encode_image"]
    want = reference("encode_image", good)
    with ThreadPoolExecutor(4) as pool:
        goods = [pool.submit(_http_infer, live.http, "encode_image", good) for _ in range(8)]
        results = _bad_requests(live)
        for f in goods:
            _same(f.result(timeout=60), want, "a good request beside bad ones")
    for what, status, body, want_status, words in results:
        assert status == want_status, (what, status, body)
        assert isinstance(body, dict) and words in body["error"] and "\n" not in body["error"], (what, body)
    # gRPC: the same refusals as status codes, the server still serving after them
    with pytest.raises(InferenceServerException, match="unknown model"):
        _grpc_infer(live.grpc, "nope", good)
    with pytest.raises(InferenceServerException, match="takes \\[-1, 3, 32, 32\\]"):
        _grpc_infer(live.grpc, "encode_image", {"pixel_values": np.zeros((1, 3, 32, 31), np.float32)})
    with pytest.raises(InferenceServerException, match="1..16 rows"):
        _grpc_infer(live.grpc, "encode_image", {"pixel_values": np.zeros((20, 3, 32, 32), np.float32)})
    # bytes that are no protobuf message, through grpcio's own channel
    import grpc

    with grpc.insecure_channel(live.grpc) as channel:
        raw = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as err:
            raw(b"\xff\xff\xff not a protobuf", timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
        assert "not an inference.ModelInferRequest protobuf message" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            channel.unary_unary("/inference.GRPCInferenceService/RepositoryIndex")(b"", timeout=10)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    _same(_grpc_infer(live.grpc, "encode_image", good), want, "grpc after refusals")
    assert live.get("/v2/health/ready")[0] == 200


def _load(live, stop: threading.Event, outcomes: list, model: str = "encode_image") -> None:
    """One client sending requests until `stop` or until the server stops answering."""
    inputs = _requests(1, seed=threading.get_ident() % 1000)[model]
    while not stop.is_set():
        try:
            _http_infer(live.http, model, inputs)
            outcomes.append(("ok", ""))
        except InferenceServerException as err:
            outcomes.append(("error", str(err)))
        except Exception as err:   # the listener closed: this client is done
            outcomes.append(("closed", f"{type(err).__name__}: {err}"))
            return


def _under_load(live, clients: int, then, settle_s: float = 2.0) -> list:
    stop, outcomes = threading.Event(), []
    threads = [threading.Thread(target=_load, args=(live, stop, outcomes), daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    time.sleep(settle_s)
    then()
    return stop, threads, outcomes


def test_sigterm_under_load_answers_every_request_and_every_process_exits_0(live):
    """Last on this module's server: SIGTERM to every process, as Kubernetes sends it."""
    stop, threads, outcomes = _under_load(live, 16, lambda: [live.signal(p, signal.SIGTERM) for p in (1, 0)])
    codes = live.wait(within_s=60)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert codes == [0, 0], live.output()
    served = [o for o in outcomes if o[0] == "ok"]
    refused = [o for o in outcomes if o[0] == "error"]
    assert len(served) > 16, (len(served), outcomes[-5:])
    assert all("shutting down" in why or "503" in why for _, why in refused), refused[:3]
    assert not any(t.is_alive() for t in threads)
    assert "drained after" in live.output()


# ------------------------------------------------------------------ a bundle of a Hugging Face checkpoint
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The parity fixture's tiny BLIP captioner as a Hugging Face folder (weights, tokenizer,
    image processor): transformers' own `generate` outputs for it are in the fixture."""
    from tests.test_semiotic import _checkpoint

    return _checkpoint(tmp_path_factory.mktemp("hf") / "caption", "caption")


@pytest.fixture(scope="module")
def hf_live(checkpoint, tmp_path_factory):
    from tests.hf_reference import NEW_TOKENS

    bundle = build_server_bundle(tmp_path_factory.mktemp("hf-server"), checkpoint=checkpoint,
                                 entries="encode_image,caption", max_new_tokens=NEW_TOKENS, prompt_len=6)
    # the key-value lockstep here (the other server uses the default collective one): every test
    # of this server, the fault included, runs through it
    server = LiveSlice(bundle, tmp_path_factory.mktemp("hf-server-logs"), heartbeat_timeout_s=5,
                       extra=("--max-queue-delay-ms", "300", "--lockstep", "kv"))
    try:
        yield server.start()
    finally:
        server.kill()


def test_prompts_of_different_lengths_batched_together_equal_each_alone_and_transformers_generate(hf_live):
    """The fixture's three prompts (6, 5 and 3 tokens, right-padded, with their mask) sent as
    three concurrent requests share one batch; each answer equals the same request sent alone
    and BlipForConditionalGeneration.generate(input_ids, attention_mask) (transformers 5)."""
    from tests.test_parity import _fixture

    case = _fixture()
    x, theirs = case["inputs"], case["caption"]["outputs"]["generate_padded"]
    rows = [{"pixel_values": x["pixels"][i:i + 1], "prompt_ids": x["ids"][i:i + 1, :6].astype(np.int32),
             "prompt_mask": x["mask"][i:i + 1, :6].astype(np.int32)} for i in range(3)]
    assert sorted(int(r["prompt_mask"].sum()) for r in rows) == [3, 5, 6]
    before = _caption_batches(hf_live)
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(lambda r: _http_infer(hf_live.http, "caption", r)["token_ids"], rows))
    shared = _caption_batches(hf_live) - before
    alone = [_grpc_infer(hf_live.grpc, "caption", r)["token_ids"] for r in rows]
    for i in range(3):
        want = np.pad(theirs[i:i + 1], ((0, 0), (0, together[i].shape[1] - theirs.shape[1])))
        np.testing.assert_array_equal(together[i], want, err_msg=f"row {i} batched vs transformers")
        np.testing.assert_array_equal(alone[i], together[i], err_msg=f"row {i} alone vs batched")
    assert shared < 3, f"the three requests ran in {shared} batches: they never shared one"


def _caption_batches(live) -> float:
    text = live.get("/metrics")[1]
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("capibara_batch_rows_count") and 'model="caption"' in line)


def _jpeg(seed: int, size=(48, 40)) -> bytes:
    import io

    from PIL import Image

    pixels = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG")
    return out.getvalue()


def test_caption_text_from_jpeg_bytes_gives_the_text_analyze_gives(hf_live, checkpoint):
    from capibara_export.matrix.programs import ProgramOptions
    from capibara_export.semiotic import MnemosyneSemioModule
    from tests.hf_reference import NEW_TOKENS

    images, prompts = [_jpeg(1), _jpeg(2), _jpeg(3)], [b"", b"a picture of", b""]
    # what `analyze --checkpoint` runs, decoding as many new tokens as the bundle's caption program
    module = MnemosyneSemioModule.from_checkpoints([checkpoint], options=ProgramOptions(max_new_tokens=NEW_TOKENS))
    want = [module.process_image(img, prompt=p.decode() or None) for img, p in zip(images, prompts)]
    client = tritonclient_http.InferenceServerClient(hf_live.http, network_timeout=60)
    image = tritonclient_http.InferInput("image", [3], "BYTES")
    image.set_data_from_numpy(np.array(images, dtype=object))
    prompt = tritonclient_http.InferInput("prompt", [3], "BYTES")
    prompt.set_data_from_numpy(np.array(prompts, dtype=object), binary_data=False)
    got = client.infer("caption_text", [image, prompt]).as_numpy("text")
    assert [t.decode() for t in got] == want
    # gRPC without the optional prompt; TF Serving with {"b64": ...}
    g = tritonclient_grpc.InferInput("image", [1], "BYTES")
    g.set_data_from_numpy(np.array(images[:1], dtype=object))
    assert tritonclient_grpc.InferenceServerClient(hf_live.grpc).infer("caption_text", [g]).as_numpy("text")[0] \
        .decode() == want[0]
    import base64

    status, body = hf_live.post("/v1/models/caption_text:predict", json.dumps(
        {"instances": [{"b64": base64.b64encode(images[2]).decode()}]}).encode())
    assert status == 200 and body["predictions"][0]["text"] == want[2], body


def test_undecodable_oversized_and_overlong_inputs_are_refused_in_one_line(hf_live):
    from capibara_export.semiotic.images import limits

    def send(images, prompts=None):
        tensors = [{"name": "image", "shape": [len(images)], "datatype": "BYTES", "data": images}]
        if prompts is not None:
            tensors.append({"name": "prompt", "shape": [len(prompts)], "datatype": "BYTES", "data": prompts})
        return hf_live.post("/v2/models/caption_text/infer", json.dumps({"inputs": tensors}).encode())
    status, body = send(["not an image"])
    assert status == 400 and "image of row 0" in body["error"] and "not an image" in body["error"], body
    # a PNG whose header claims more pixels than analyze's limit: refused before decoding
    import io
    import struct
    import zlib

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, "PNG")
    png = bytearray(out.getvalue())
    side = int(limits.max_pixels ** 0.5) + 10
    png[16:24] = struct.pack(">II", side, side)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    client = tritonclient_http.InferenceServerClient(hf_live.http, network_timeout=60)
    image = tritonclient_http.InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([bytes(png)], dtype=object))
    with pytest.raises(InferenceServerException, match="pixels"):
        client.infer("caption_text", [image])
    status, body = send([], None)
    assert status == 400 and "0 rows" in body["error"], body
    image.set_data_from_numpy(np.array([_jpeg(4)], dtype=object))
    prompt = tritonclient_http.InferInput("prompt", [1], "BYTES")
    prompt.set_data_from_numpy(np.array([" ".join(["word"] * 40).encode()], dtype=object))
    with pytest.raises(InferenceServerException, match="takes at most 6 \\(build --prompt-len\\)"):
        client.infer("caption_text", [image, prompt])
    assert client.infer("caption_text", [image]).as_numpy("text").shape == (1,)


def test_a_host_killed_under_load_is_named_in_every_answer_and_ends_the_slice(hf_live):
    """Last on this module's second server: SIGKILL process 1 while 8 clients send requests."""
    server, readiness = hf_live, []
    stop, threads, outcomes = _under_load(server, 8, lambda: server.procs[1].kill())
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and server.procs[0].poll() is None:
        readiness.append(server.get("/v2/health/ready", timeout=2)[0])
        time.sleep(0.2)
    codes = server.wait(within_s=max(1.0, deadline - time.monotonic()))
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert codes[0] == 1 and codes[1] == -signal.SIGKILL, (codes, server.output())
    assert 503 in readiness, readiness
    # the batch in flight learns it from the collective that broke; the rest name the lost process
    errors = [why for kind, why in outcomes if kind == "error"]
    assert errors and all(why.startswith("[503]") for why in errors), errors[:3]
    assert all("process(es) 1 of 2 stopped" in why or "a step failed on the slice" in why for why in errors), errors[:3]
    assert not any(t.is_alive() for t in threads)
    assert "process(es) 1 of 2 stopped" in server.output()


_OWN_FRONT_END = """
import sys, threading
import numpy as np
from capibara_export.export.multihost import HostRuntime
from capibara_export.server import ServerOptions, SliceServer

coordinator, pid = sys.argv[1], int(sys.argv[2])
runtime = HostRuntime(coordinator, 2, pid, cpu_devices=4, join_timeout_s=120, heartbeat_timeout_s=30)
from capibara_export.export.trust import TrustPolicy
server = SliceServer(sys.argv[3], runtime, TrustPolicy(allow_unsigned_executables=True),
                     ServerOptions(http_port=None, grpc_port=None), say=lambda _: None)
if pid == 0:
    def front_end():
        import time
        while server.front is None or not server.front.ready:
            time.sleep(0.1)
        pixels = np.load(sys.argv[4])["pixel_values"]
        out = server.infer("encode_image", {"pixel_values": pixels})
        np.save(sys.argv[5], out["image_embeds"])
        server.drain()
    threading.Thread(target=front_end, daemon=True).start()
sys.exit(server.run())
"""


def test_a_teams_own_front_end_drives_the_slice_through_the_python_api(bundle, reference, tmp_path):
    """Both ports off: process 0's own thread calls SliceServer.infer, then drain(); both exit 0."""
    import os
    import subprocess
    import sys

    from capibara_export.export.launch import free_port

    pixels = _requests(5, seed=3)["encode_image"]
    np.savez(tmp_path / "in.npz", **pixels)
    script = tmp_path / "front_end.py"
    script.write_text(_OWN_FRONT_END)
    coordinator = f"127.0.0.1:{free_port()}"
    procs = [subprocess.Popen([sys.executable, str(script), coordinator, str(pid), str(bundle), str(tmp_path / "in.npz"),
                               str(tmp_path / "out.npy")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}) for pid in (0, 1)]
    try:
        outs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
    want = reference("encode_image", pixels)["image_embeds"]
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), want, rtol=2e-4, atol=2e-5)
