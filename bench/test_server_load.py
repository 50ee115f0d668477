"""The live server under load: tritonclient (KServe v2 over HTTP, binary tensors) against a 2-host
slice of local processes (tests/live_slice.py), one `score` row per request.

At each concurrency C, C - 1 clients send requests back to back while pytest-benchmark times
the C-th client's requests: the benchmark's median and p99 are a request's latency under that
load. Beside it, in extra_info: throughput (requests/s over the window, every client), the
mean real rows per batch and the padded rows (from the server's /metrics), and the ceiling:
requests of the largest compiled batch (16 rows) sent one after another in the same run,
and 16 rows over the server's own mean step time at that size is what the slice does with
every batch full and nothing else in the way. `ceiling_ratio` = throughput / that. On simulated CPU hosts the absolute figures say nothing about a TPU; the
ratios (batching's gain over concurrency 1, the fraction of the ceiling) are the result.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from bench.harness import percentiles
from tests.live_slice import LiveSlice, build_server_bundle

tritonclient_http = pytest.importorskip("tritonclient.http")

MODEL = "score"
CONCURRENCY = [1, 8, 32, 64]
ROUNDS = 30


def _inputs(rows: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = (np.arange(32)[None, :] < rng.integers(4, 33, rows)[:, None]).astype(np.int32)
    return {"pixel_values": rng.standard_normal((rows, 3, 32, 32)).astype(np.float32),
            "input_ids": (rng.integers(5, 90, (rows, 32)) * mask).astype(np.int32), "attention_mask": mask}


class Client:
    def __init__(self, url: str, inputs: dict[str, np.ndarray]):
        self.client = tritonclient_http.InferenceServerClient(url, connection_timeout=60, network_timeout=60)
        self.given = []
        for name, value in inputs.items():
            t = tritonclient_http.InferInput(name, list(value.shape), "FP32" if value.dtype == np.float32 else "INT32")
            t.set_data_from_numpy(value, binary_data=True)
            self.given.append(t)

    def __call__(self) -> None:
        result = self.client.infer(MODEL, self.given)
        assert result.as_numpy("itm_prob").shape[0] == self.given[0].shape()[0]


def _metric(live: LiveSlice, name: str) -> float:
    text = live.get("/metrics")[1]
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name + "{") and f'model="{MODEL}"' in line)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    server = LiveSlice(build_server_bundle(tmp_path_factory.mktemp("load")), tmp_path_factory.mktemp("load-logs"),
                       extra=("--no-grpc", "--max-queue", "512"))
    try:
        yield server.start()
    finally:
        server.kill()


@pytest.fixture(scope="module")
def ceiling(live) -> dict:
    """What the slice does with every batch full: 16-row requests one after another; the
    ceiling is 16 rows over the server's own mean step time (broadcast, program, gather) at
    that size, so no client or HTTP time is in it. `serial` is the same requests' rows/s seen by
    the client (nothing overlaps its HTTP and the step there)."""
    full = Client(live.http, _inputs(16, seed=0))
    full()
    steps0, seconds0 = _metric(live, "capibara_step_seconds_count"), _metric(live, "capibara_step_seconds_sum")
    times = []
    for _ in range(8):
        t0 = time.perf_counter()
        full()
        times.append(time.perf_counter() - t0)
    step = (_metric(live, "capibara_step_seconds_sum") - seconds0) / (_metric(live, "capibara_step_seconds_count")
                                                                      - steps0)
    return {"rows_per_s": 16 / step, "step_s": step, "serial_rows_per_s": 16 / float(np.median(times))}


@pytest.mark.parametrize("concurrency", CONCURRENCY)
def test_server_load(benchmark, live, ceiling, concurrency):
    benchmark.group = "server load"
    stop, done, errors = threading.Event(), [0], []

    def background(seed: int) -> None:
        client = Client(live.http, _inputs(1, seed))
        while not stop.is_set():
            try:
                client()
                done[0] += 1
            except Exception as err:
                errors.append(str(err))
                return
    threads = [threading.Thread(target=background, args=(s,), daemon=True) for s in range(1, concurrency)]
    timed = Client(live.http, _inputs(1, seed=1000))
    timed()
    batches0, rows0, padded0 = (_metric(live, "capibara_batch_rows_count"), _metric(live, "capibara_batch_rows_sum"),
                                _metric(live, "capibara_padded_rows_total"))
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
    batches = _metric(live, "capibara_batch_rows_count") - batches0
    rows = _metric(live, "capibara_batch_rows_sum") - rows0
    requests = done[0] + benchmark.stats.stats.rounds if getattr(benchmark, "stats", None) else done[0] + 1
    throughput = rows / window
    benchmark.extra_info.update(
        unit={"entry": MODEL, "plan": "dp", "precision": "fp32", "batch": concurrency, "target": "v4:2x2x2 (2 cpu "
              "hosts)", "model": "tiny"}, concurrency=concurrency, requests=int(requests), window_s=window,
        throughput_rows_per_s=throughput, mean_batch_rows=rows / batches if batches else None,
        padded_rows=_metric(live, "capibara_padded_rows_total") - padded0, ceiling_rows_per_s=ceiling["rows_per_s"],
        full_batch_step_s=ceiling["step_s"], serial_full_batch_rows_per_s=ceiling["serial_rows_per_s"],
        ceiling_ratio=throughput / ceiling["rows_per_s"], item="requests", items_per_s=throughput)
    timed_run = bool(getattr(benchmark, "stats", None) and benchmark.stats.stats.data)
    if timed_run:
        benchmark.extra_info.update(percentiles(list(benchmark.stats.stats.data)))
    if timed_run and concurrency >= 8:   # batching itself is tested in tests/test_server.py
        assert rows / batches > 1.5, f"{rows / batches:.2f} rows per batch at concurrency {concurrency}: no batching"
