"""The live server under load: tritonclient (KServe v2 over HTTP and gRPC) against a 2-host
slice of local processes (tests/live_slice.py), one `score` row per request, for each way
process 0 tells the others a step (`--lockstep collective` and `kv`), side by side.

At each concurrency C, C - 1 clients send requests back to back while pytest-benchmark times
the C-th client's requests: the benchmark's median and p99 are a request's latency under that
load. Beside it, in extra_info: throughput (rows/s over the window, every client), the mean
real rows per batch and the padded rows (from the server's /metrics), process 0's mean time to
tell every process a step, and the ceiling: the same processes running the largest compiled
batch (16) back to back with no server in between, measured by the server at start-up
(`--measure-ceiling 40`) in the same run.
`ceiling_ratio` = throughput / ceiling. `test_every_request_is_answered_once_and_correctly`
sends 5,000 requests (500 with --benchmark-disable) from 32 clients and checks each answer
against the bundle's own program. On simulated CPU hosts the absolute figures say nothing
about a TPU; the ratios are the result.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from bench.harness import percentiles
from tests.live_slice import LiveSlice, Reference, build_server_bundle

tritonclient_http = pytest.importorskip("tritonclient.http")
tritonclient_grpc = pytest.importorskip("tritonclient.grpc")

MODEL = "score"
ROUNDS = 30


def _inputs(rows: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = (np.arange(32)[None, :] < rng.integers(4, 33, rows)[:, None]).astype(np.int32)
    return {"pixel_values": rng.standard_normal((rows, 3, 32, 32)).astype(np.float32),
            "input_ids": (rng.integers(5, 90, (rows, 32)) * mask).astype(np.int32), "attention_mask": mask}


class Client:
    """One tritonclient connection sending the same request again and again."""

    def __init__(self, live: LiveSlice, protocol: str, inputs: dict[str, np.ndarray]):
        lib = tritonclient_http if protocol == "http" else tritonclient_grpc
        self.client = lib.InferenceServerClient(live.http, connection_timeout=60, network_timeout=60) \
            if protocol == "http" else lib.InferenceServerClient(live.grpc)
        self.given = []
        for name, value in inputs.items():
            t = lib.InferInput(name, list(value.shape), "FP32" if value.dtype == np.float32 else "INT32")
            t.set_data_from_numpy(value)
            self.given.append(t)

    def __call__(self) -> dict[str, np.ndarray]:
        result = self.client.infer(MODEL, self.given)
        return {name: result.as_numpy(name) for name in ("itc_similarity", "itm_logits", "itm_prob")}


def _metric(live: LiveSlice, name: str) -> float:
    text = live.get("/metrics")[1]
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name) and (f'model="{MODEL}"' in line or "model=" not in line)
               and not line.startswith("#"))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return build_server_bundle(tmp_path_factory.mktemp("load"))


@pytest.fixture(scope="module", params=["collective", "kv"])
def live(request, bundle, tmp_path_factory):
    server = LiveSlice(bundle, tmp_path_factory.mktemp(f"load-{request.param}"),
                       extra=("--max-queue", "512", "--lockstep", request.param, "--measure-ceiling", "40"))
    try:
        server.start()
        server.ceiling = _ceiling(server)
        yield server
    finally:
        server.kill()


def _ceiling(live: LiveSlice) -> dict:
    """The server's own start-up measurement (--measure-ceiling) and the same 16-row batches sent
    one after another through HTTP (nothing overlaps a request's transfer with the step)."""
    full = Client(live, "http", _inputs(16, seed=0))
    full()
    times = []
    for _ in range(8):
        t0 = time.perf_counter()
        full()
        times.append(time.perf_counter() - t0)
    return {"rows_per_s": _metric(live, "capibara_ceiling_rows_per_second"),
            "serial_rows_per_s": 16 / float(np.median(times))}


@pytest.mark.parametrize("protocol, concurrency", [("http", 1), ("http", 8), ("http", 32), ("http", 64),
                                                   ("grpc", 8), ("grpc", 32)])
def test_server_load(benchmark, live, protocol, concurrency):
    benchmark.group = f"server load ({protocol})"
    stop, done, errors = threading.Event(), [0], []

    def background(seed: int) -> None:
        client = Client(live, protocol, _inputs(1, seed))
        while not stop.is_set():
            try:
                client()
                done[0] += 1
            except Exception as err:
                errors.append(str(err))
                return
    threads = [threading.Thread(target=background, args=(s,), daemon=True) for s in range(1, concurrency)]
    timed = Client(live, protocol, _inputs(1, seed=1000))
    timed()
    names = ("capibara_batch_rows_count", "capibara_batch_rows_sum", "capibara_padded_rows_total",
             "capibara_lockstep_seconds_sum", "capibara_lockstep_seconds_count")
    before = {n: _metric(live, n) for n in names}
    for t in threads:
        t.start()
    started = time.perf_counter()
    benchmark.pedantic(timed, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    window = time.perf_counter() - started
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors[:3]
    assert not any(t.is_alive() for t in threads)
    delta = {n: _metric(live, n) - before[n] for n in names}
    batches, rows = delta["capibara_batch_rows_count"], delta["capibara_batch_rows_sum"]
    throughput = rows / window
    ceiling = live.ceiling
    transport = [a for a in live.extra if a in ("collective", "kv")][0]
    benchmark.extra_info.update(
        unit={"entry": MODEL, "plan": f"dp, lockstep {transport}", "precision": "fp32", "batch": concurrency,
              "target": "v4:2x2x2 (2 cpu hosts)", "model": "tiny"},
        protocol=protocol, lockstep=transport, concurrency=concurrency, window_s=window,
        throughput_rows_per_s=throughput, mean_batch_rows=rows / batches if batches else None,
        padded_rows=delta["capibara_padded_rows_total"],
        lockstep_mean_s=delta["capibara_lockstep_seconds_sum"] / max(1.0, delta["capibara_lockstep_seconds_count"]),
        ceiling_rows_per_s=ceiling["rows_per_s"], serial_full_batch_rows_per_s=ceiling["serial_rows_per_s"], ceiling_ratio=throughput / ceiling["rows_per_s"],
        item="rows", items_per_s=throughput)
    timed_run = not benchmark.disabled
    if timed_run:
        benchmark.extra_info.update(percentiles(list(benchmark.stats.stats.data)))
    if timed_run and concurrency >= 8:   # batching itself is tested in tests/test_server.py
        assert rows / batches > 1.5, f"{rows / batches:.2f} rows per batch at concurrency {concurrency}: no batching"


def test_every_request_is_answered_once_and_correctly(benchmark, live, bundle):
    """5,000 requests from 32 clients (HTTP and gRPC alike), 64 distinct inputs: every request
    answered, each with its own input's outputs (an answer sliced to the wrong request, lost or
    given twice would show as a mismatch or a missing answer)."""
    benchmark.group = "server answers"
    total = 500 if benchmark.disabled else 5000
    distinct = [_inputs(1, seed=5000 + k) for k in range(64)]
    reference = Reference(bundle)
    stacked = {name: np.concatenate([d[name] for d in distinct]) for name in distinct[0]}
    want = reference(MODEL, stacked)
    assert len({round(float(p), 6) for p in want["itm_prob"]}) > 32, "the distinct inputs must answer distinctly"

    def client(c: int) -> list[tuple[int, dict]]:
        clients = {k: Client(live, "http" if c % 2 else "grpc", distinct[k]) for k in range(c % 64, 64, 32)}
        return [(k, clients[k]()) for i in range(c, total, 32) for k in [i % 64 if i % 64 in clients else
                                                                           next(iter(clients))]]

    def run() -> list:
        with ThreadPoolExecutor(32) as pool:
            return [a for part in pool.map(client, range(32)) for a in part]
    answers = benchmark.pedantic(run, rounds=1, iterations=1)
    assert len(answers) == total
    for k, got in answers:
        for name, value in got.items():
            np.testing.assert_allclose(value, want[name][k:k + 1], rtol=2e-4, atol=2e-5, err_msg=f"input {k}: {name}")
    benchmark.extra_info.update(requests=total, answered=len(answers), lockstep=[a for a in live.extra
                                                                                 if a in ("collective", "kv")][0])
