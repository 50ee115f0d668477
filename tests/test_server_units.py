"""The live server's parts without a slice: the batcher's semantics (TF Serving's allowed batch
sizes, Triton's queue delay, a bounded queue, deadlines), the lockstep header, the model
catalogue from a manifest, the request checks, and the slice read from a LeaderWorkerSet's
variables. The server across processes: test_server.py."""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np
import pytest

from capibara_export.export.manifest import BundleError
from capibara_export.server.batcher import BadRequest, Batcher, DeadlineExceeded, QueueFull, Request, Unavailable
from capibara_export.server.frontend import Frontend
from capibara_export.server.lockstep import KEEPALIVE, RUN, Step
from capibara_export.server.metrics import Metrics
from capibara_export.server.models import ModelSpec, TensorSpec, catalogue
from capibara_export.server.run import ServerOptions

SCORE = ModelSpec("score", "score", "fp32", (TensorSpec("x", "float32", (2,)), TensorSpec("ids", "int32", (3,))),
                  (TensorSpec("y", "float32", ()),), (4, 8), ())
OTHER = ModelSpec("other", "other", "fp32", (TensorSpec("x", "float32", (2,)),), (TensorSpec("y", "float32", ()),),
                  (2,), ())


def _request(model=SCORE, rows=1, value=0.0, deadline_s=10.0) -> Request:
    inputs = {t.name: np.full((rows, *t.row_shape), value, t.np_dtype) for t in model.inputs}
    return Request(model, inputs, rows, time.monotonic() + deadline_s)


def test_a_batch_pads_to_the_smallest_compiled_size_with_the_first_row_and_answers_each_request_its_rows():
    batcher = Batcher(max_queue=16, max_delay_s=0.0)
    a, b = _request(rows=2, value=1.0), _request(rows=3, value=2.0)
    batcher.submit(a), batcher.submit(b)
    batch = batcher.next_batch(1.0)
    assert (batch.rows, batch.size, batch.requests) == (5, 8, [a, b])
    x = batch.inputs()["x"]
    assert x.shape == (8, 2) and x[:2].tolist() == [[1, 1]] * 2 and x[2:5].tolist() == [[2, 2]] * 3
    assert x[5:].tolist() == [[1, 1]] * 3                       # padding repeats row 0, never zeros
    batch.answer({"y": np.arange(8, dtype=np.float32)})
    assert a.future.result().keys() == {"y"}
    assert a.future.result()["y"].tolist() == [0, 1] and b.future.result()["y"].tolist() == [2, 3, 4]


def test_a_batch_waits_at_most_the_queue_delay_and_never_mixes_models_or_exceeds_the_largest_batch():
    batcher = Batcher(max_queue=64, max_delay_s=0.15)
    batcher.submit(_request(rows=3))
    started = time.monotonic()
    threading.Timer(0.05, lambda: batcher.submit(_request(rows=3))).start()
    batch = batcher.next_batch(1.0)
    waited = time.monotonic() - started
    assert batch.rows == 6 and batch.size == 8 and 0.12 <= waited < 0.5, (batch.rows, waited)
    for _ in range(3):
        batcher.submit(_request(rows=3))
    batcher.submit(_request(OTHER, rows=1))
    started = time.monotonic()
    first = batcher.next_batch(1.0)          # full at 6 of 8 rows + 3 would pass 8: two requests, no wait
    assert (first.model, first.rows) == (SCORE, 6) and time.monotonic() - started < 0.14
    assert (batcher.next_batch(1.0).model, batcher.next_batch(1.0).model) == (SCORE, OTHER)
    assert batcher.next_batch(0.05) is None  # idle: a keep-alive is due


def test_a_full_queue_refuses_at_once_and_expired_requests_are_answered_not_run():
    batcher = Batcher(max_queue=2, max_delay_s=0.0)
    batcher.submit(_request(deadline_s=0.01)), batcher.submit(_request())
    with pytest.raises(QueueFull, match="queue is full \\(2 requests, --max-queue\\)") as full:
        batcher.submit(_request())
    from capibara_export.server.kserve_grpc import CODES
    from capibara_export.server.kserve_http import STATUS

    assert (STATUS[full.value.kind], CODES[full.value.kind].name) == (503, "RESOURCE_EXHAUSTED")
    time.sleep(0.03)
    expired = batcher._queue[0]
    batch = batcher.next_batch(1.0)
    assert batch.rows == 1 and expired not in batch.requests
    with pytest.raises(DeadlineExceeded, match="past its deadline"):
        expired.future.result(timeout=1)


def test_draining_takes_the_queue_then_refuses_and_a_lost_host_answers_everything():
    batcher = Batcher(max_queue=8, max_delay_s=5.0)
    waiting = _request()
    batcher.submit(waiting)
    batcher.close("shutting down")
    with pytest.raises(Unavailable, match="shutting down"):
        batcher.submit(_request())
    started = time.monotonic()
    assert batcher.next_batch(1.0).requests == [waiting] and time.monotonic() - started < 1   # no queue delay
    assert batcher.next_batch(1.0) is None and batcher.closed
    lost = Batcher(max_queue=8, max_delay_s=0.0)
    queued = [_request(), _request()]
    for r in queued:
        lost.submit(r)
    assert lost.fail_all(Unavailable("process 1 stopped")) == 2
    assert all(isinstance(r.future.exception(), Unavailable) for r in queued)


def test_the_lockstep_header_round_trips_and_refuses_corruption():
    step = Step(RUN, 2, 16, 11, 7)
    assert Step.from_header(step.header()) == step
    assert Step.from_header(Step(KEEPALIVE, seq=3).header()).kind == KEEPALIVE
    bad = step.header()
    bad[3] += 1
    with pytest.raises(RuntimeError, match="corrupted"):
        Step.from_header(bad)


def _front(max_batch_model=SCORE) -> Frontend:
    front = Frontend([max_batch_model, OTHER], Batcher(8, 0.0), Metrics(), timeout_s=5, max_body_bytes=1 << 20)
    front.set_ready()
    return front


def test_the_checks_name_the_first_problem_of_a_request():
    front = _front()
    ok = {"x": np.zeros((2, 2), np.float32), "ids": np.zeros((2, 3), np.int32)}
    assert front.check(SCORE, ok)[1] == 2
    cases = [({"x": ok["x"]}, "needs input 'ids' [-1, 3] INT32"),
             ({**ok, "z": ok["x"]}, "has no input 'z'"),
             ({**ok, "ids": ok["ids"].astype(np.int64)}, "is INT64; score takes INT32"),
             ({**ok, "x": np.zeros((2, 3), np.float32)}, "shape [2, 3]; score takes [-1, 2]"),
             ({**ok, "ids": np.zeros((3, 3), np.int32)}, "different row counts (2, 3)"),
             ({"x": np.zeros((9, 2), np.float32), "ids": np.zeros((9, 3), np.int32)}, "1..8 rows")]
    for given, words in cases:
        with pytest.raises(BadRequest) as err:
            front.check(SCORE, given)
        assert words in str(err.value), (words, str(err.value))
    with pytest.raises(Exception, match="unknown model 'nope'"):
        front.submit("nope", ok)
    front.host_lost("process 1 of 2 stopped")
    with pytest.raises(Unavailable, match="process 1 of 2 stopped"):
        front.submit("score", ok)
    assert not front.ready and not front.live


def _manifest(*artifacts) -> dict:
    return {"artifacts": [{"kind": "jax.export-sharded", "entry": e, "precision": p, "batch": b, "path": f"{e}{b}",
                           "inputs": [{"name": "x", "shape": [b, 2], "dtype": "float32"}],
                           "outputs": [{"name": "y", "shape": [b], "dtype": "float32"}]} for e, p, b in artifacts]}


def test_the_catalogue_serves_each_entry_at_every_batch_and_refuses_an_ambiguous_precision():
    models, notes = catalogue(_manifest(("score", "fp32", 16), ("score", "fp32", 4)))
    assert [(m.name, m.batch_sizes, m.inputs[0].row_shape) for m in models] == [("score", (4, 16), (2,))]
    assert models[0].padded(5) == 16 and models[0].padded(4) == 4 and not notes
    both = _manifest(("score", "fp32", 4), ("score", "bf16", 4))
    with pytest.raises(BundleError, match="score in 2 precisions: choose one with --precision \\(bf16, fp32\\)"):
        catalogue(both)
    assert catalogue(both, "bf16")[0][0].precision == "bf16"
    decode = _manifest(("decode_step", "fp32", 4), ("score", "fp32", 4))
    decode["artifacts"][0]["inputs"].append({"name": "pos", "shape": [], "dtype": "int32"})
    models, notes = catalogue(decode)
    assert [m.name for m in models] == ["score"] and "decode_step: not served" in notes[0]


def _args(**given):
    base = {"coordinator": None, "num_processes": None, "process_id": None, "cpu_devices": None,
            "join_timeout": 60, "heartbeat_timeout": 30}
    return argparse.Namespace(**{**base, **given})


def test_the_slice_comes_from_a_leader_worker_set_where_no_flag_gives_it():
    from capibara_export.cli_serve import runtime_from

    lws = {"LWS_LEADER_ADDRESS": "blip-0.blip.default", "LWS_GROUP_SIZE": "8", "LWS_WORKER_INDEX": "3"}
    runtime = runtime_from(_args(), lws)
    assert (runtime.coordinator, runtime.num_processes, runtime.process_id) == ("blip-0.blip.default:8476", 8, 3)
    assert runtime_from(_args(), {"TPU_WORKER_ID": "5", "LWS_GROUP_SIZE": "8"}).process_id == 5
    flags = runtime_from(_args(coordinator="h:1", num_processes=2, process_id=1), lws)
    assert (flags.coordinator, flags.num_processes, flags.process_id) == ("h:1", 2, 1)   # flags win
    alone = runtime_from(_args(), {})
    assert (alone.coordinator, alone.num_processes, alone.process_id) == (None, 1, 0)
    with pytest.raises(BundleError, match="LWS_GROUP_SIZE='eight' is not a whole number"):
        runtime_from(_args(), {"LWS_GROUP_SIZE": "eight"})


@pytest.mark.parametrize("options, words", [
    (ServerOptions(http_port=70000), "--http-port 70000"),
    (ServerOptions(http_port=9000, grpc_port=9000), "both 9000"),
    (ServerOptions(max_queue=0), "--max-queue 0"),
    (ServerOptions(timeout_s=0), "--timeout 0"),
])
def test_server_options_are_refused_in_one_line(options, words):
    with pytest.raises(BundleError, match=words):
        options.check()


def test_a_port_in_use_is_refused_in_one_line_naming_the_flags():
    import socket

    from capibara_export.server.run import Protocols

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        listeners = Protocols(_front(), ServerOptions(host="127.0.0.1", http_port=port, grpc_port=None))
        with pytest.raises(BundleError, match="cannot listen on 127.0.0.1: .*pass free ports with --http-port"):
            listeners.start()
        assert not listeners._thread.is_alive()
    finally:
        taken.close()
