"""What every protocol shares on process 0: the served models by name, the checks a request
must pass before it may queue, the state behind `live` and `ready`, and the metrics.

The protocol modules (kserve_http.py, kserve_grpc.py, tf_serving_rest.py) only turn their wire
format into named NumPy arrays and back; `Frontend.infer` does the rest, so a request gets the
same answer, the same refusal and the same metrics whichever protocol brought it.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Future

import numpy as np

from .batcher import BadRequest, Batcher, DeadlineExceeded, NotFound, Request, ServingError, Unavailable
from .metrics import Metrics
from .models import ModelSpec


class Frontend:
    def __init__(self, models: list[ModelSpec], batcher: Batcher, metrics: Metrics, timeout_s: float,
                 max_body_bytes: int, version: str = "", views: tuple = ()):
        self.models = {m.name: m for m in models} | {v.spec.name: v.spec for v in views}
        self.views = {v.spec.name: v for v in views}     # fronts for another model (text_caption.py)
        self.batcher, self.metrics = batcher, metrics
        self.timeout_s, self.max_body_bytes, self.version = timeout_s, max_body_bytes, version
        self.warmed = False
        self.lost: str | None = None           # a lost host: not ready, every answer an error
        self.draining = False

    # -- state --------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.warmed and not self.lost and not self.draining

    @property
    def live(self) -> bool:
        return self.lost is None

    def set_ready(self) -> None:
        self.warmed = True
        self.metrics.ready.set(1)

    def drain(self) -> None:
        self.draining = True
        self.metrics.ready.set(0)
        self.batcher.close("the server is shutting down (SIGTERM): send the request to another replica")

    def host_lost(self, why: str) -> int:
        """Readiness false and every queued request answered with the reason; how many."""
        self.lost = why
        self.metrics.ready.set(0)
        return self.batcher.fail_all(Unavailable(why))

    # -- requests -----------------------------------------------------------------------------
    def model(self, name: str, version: str | None = None) -> ModelSpec:
        """The model by name; `version` as a protocol gives it (None or "" for the only one, 1)."""
        if name not in self.models:
            raise NotFound(f"unknown model {name!r}: this server has {', '.join(self.models)}")
        if version not in (None, "", "1"):
            raise NotFound(f"model {name!r} has version 1 only, not {version!r}")
        return self.models[name]

    def check(self, model: ModelSpec, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
        """Every input by name, of the model's row shape and dtype, the same number of rows, at
        most the largest compiled batch; one line naming the first problem otherwise."""
        want = {t.name: t for t in model.inputs}
        unknown = sorted(set(inputs) - set(want))
        if unknown:
            raise BadRequest(f"{model.name} has no input {unknown[0]!r}; its inputs are {', '.join(want)}")
        missing = [n for n in want if n not in inputs and n not in model.optional_inputs]
        if missing:
            raise BadRequest(f"{model.name} needs input {missing[0]!r} "
                             f"{[-1, *want[missing[0]].row_shape]} {want[missing[0]].datatype}")
        out, rows = {}, set()
        for name, spec in want.items():
            if name not in inputs:
                continue
            value = inputs[name]
            if value.dtype != spec.np_dtype:
                raise BadRequest(f"input {name!r} is {_datatype(value.dtype)}; {model.name} takes {spec.datatype}")
            if value.dtype == object and not all(isinstance(v, bytes) for v in value.reshape(-1)):
                raise BadRequest(f"input {name!r}: BYTES elements must be bytes")
            if value.ndim != 1 + len(spec.row_shape) or tuple(value.shape[1:]) != spec.row_shape:
                raise BadRequest(f"input {name!r} has shape {list(value.shape)}; {model.name} takes "
                                 f"{[-1, *spec.row_shape]} (rows first)")
            rows.add(int(value.shape[0]))
            out[name] = np.ascontiguousarray(value)
        if len(rows) != 1:
            raise BadRequest(f"the inputs have different row counts ({', '.join(map(str, sorted(rows)))}): give every "
                             "input the same number of rows")
        (n,) = rows
        if not 1 <= n <= model.max_batch:
            raise BadRequest(f"{n} rows: {model.name} takes 1..{model.max_batch} rows per request (its largest "
                             f"compiled batch); split the request")
        return out, n

    def submit(self, name: str, inputs: dict[str, np.ndarray], protocol: str = "python",
               timeout_s: float | None = None) -> tuple[ModelSpec, Future]:
        """Check the request and queue it: its model and the future of its rows of the batch's
        outputs. Thread-safe; a refusal raises a ServingError at once. `timeout_s` may only
        shorten the server's timeout."""
        label = name if name in self.models else "(unknown)"
        self.metrics.requests.labels(label, protocol).inc()
        try:
            model = self.model(name)
            checked, rows = self.check(model, inputs)
            if self.lost:
                raise Unavailable(self.lost)
            if not self.warmed:
                raise Unavailable("the server is still loading and warming its programs: wait until "
                                  "/v2/health/ready answers 200")
            timeout = self._timeout(timeout_s)
            view = self.views.get(model.name)
            runs = self.models[view.spec.view_of] if view else model
            request = Request(runs, view.prepare(checked, rows) if view else checked, rows,
                              time.monotonic() + timeout)
            future = self.batcher.submit(request)
        except ServingError as err:
            self.metrics.errors.labels(label, err.kind).inc()
            raise
        self.metrics.queue_depth.set(self.batcher.depth())
        if view:
            future = _then(future, view.finish)
        future.add_done_callback(lambda f: self._answered(model.name, request, f))
        return model, future

    def _timeout(self, timeout_s: float | None) -> float:
        """The request's bound: the server's, shortened (never lengthened) by the client's."""
        if timeout_s is not None and not 0 < timeout_s:
            raise BadRequest(f"timeout {timeout_s}: give a positive number of seconds")
        return min(self.timeout_s, timeout_s) if timeout_s else self.timeout_s

    def _answered(self, name: str, request: Request, future: Future) -> None:
        if future.cancelled():
            return
        err = future.exception()
        if err is None:
            self.metrics.latency.labels(name).observe(time.monotonic() - request.enqueued)
        else:
            self.metrics.errors.labels(name, getattr(err, "kind", "internal")).inc()

    async def infer(self, name: str, inputs: dict[str, np.ndarray], protocol: str,
                    timeout_s: float | None = None) -> tuple[ModelSpec, dict[str, np.ndarray]]:
        """Queue the request and await its rows of the batch's outputs (or its error). The
        wait is bounded by the request's deadline even while its batch runs."""
        if name in self.views:   # decoding and resizing images: off the event loop
            loop = asyncio.get_running_loop()
            model, future = await loop.run_in_executor(None, self.submit, name, inputs, protocol, timeout_s)
        else:
            model, future = self.submit(name, inputs, protocol, timeout_s)
        bound = self._timeout(timeout_s)
        try:
            return model, await asyncio.wait_for(asyncio.wrap_future(future), bound + 0.5)
        except asyncio.TimeoutError:
            self.metrics.errors.labels(name, "deadline_exceeded").inc()
            raise DeadlineExceeded(f"no answer within {bound:.3f} s (the request's deadline)") from None

    def batch_ran(self, batch, seconds: float, told_s: float = 0.0) -> None:
        """The engine's callback after each batch (on the step loop's thread)."""
        self.metrics.batch_ran(batch, seconds, told_s)
        start = time.monotonic() - seconds
        for r in batch.requests:
            self.metrics.queue_wait.labels(batch.model.name).observe(max(0.0, start - r.enqueued))
        self.metrics.queue_depth.set(self.batcher.depth())


def _then(future: Future, fn) -> Future:
    """A future of `fn(result)` (or the same error)."""
    out = Future()

    def done(f: Future) -> None:
        if f.cancelled():
            out.cancel()
        elif f.exception() is not None:
            out.set_exception(f.exception())
        else:
            try:
                out.set_result(fn(f.result()))
            except Exception as err:   # a decoding failure: the request's error, never the step loop's
                out.set_exception(err)
    future.add_done_callback(done)
    out.add_done_callback(lambda o: future.cancel() if o.cancelled() else None)
    return out


def _datatype(dtype: np.dtype) -> str:
    from .models import DATATYPES

    return DATATYPES.get(str(dtype), str(dtype).upper())
