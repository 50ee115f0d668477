"""Dynamic batching on process 0: requests queue, a batch takes up to the largest compiled
batch of one model, waits at most the queue delay, and is padded to the smallest compiled
batch that holds it.

The semantics are TF Serving's and Triton's (DESIGN.md, "Serving facts"): the compiled batch
sizes play `allowed_batch_sizes`, `max_queue_delay` is Triton's `max_queue_delay_microseconds`,
a full queue refuses at once (HTTP 503 / gRPC RESOURCE_EXHAUSTED), and a request past its deadline is
answered with an error instead of being run. Padding repeats the batch's first row (as saxml
does), so padded rows compute on real values; they are counted, never returned.

Written by hand: neither TF Serving's nor Triton's batcher is a Python library, and the batch
must be handed to a lockstep step that every process runs (engine.py), not to a local call.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from .models import ModelSpec


class ServingError(Exception):
    """An answer that is an error: `kind` is its metrics label and picks the protocol's status."""
    kind = "internal"


class BadRequest(ServingError):
    kind = "invalid_argument"          # HTTP 400, gRPC INVALID_ARGUMENT


class NotFound(ServingError):
    kind = "not_found"                 # HTTP 404, gRPC NOT_FOUND


class Unavailable(ServingError):
    kind = "unavailable"               # HTTP 503, gRPC UNAVAILABLE: draining, a host lost, warming


class QueueFull(Unavailable):
    kind = "resource_exhausted"        # HTTP 503, gRPC RESOURCE_EXHAUSTED: --max-queue requests waiting


class DeadlineExceeded(ServingError):
    kind = "deadline_exceeded"         # HTTP 504, gRPC DEADLINE_EXCEEDED


@dataclass(eq=False)   # identity: a request is removed from the queue as itself
class Request:
    model: ModelSpec
    inputs: dict[str, np.ndarray]      # checked against the model: every input, `rows` rows each
    rows: int
    deadline: float                    # time.monotonic()
    enqueued: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)


@dataclass
class Batch:
    model: ModelSpec
    requests: list[Request]
    rows: int
    size: int                          # the compiled batch it runs at: rows + padding

    def inputs(self) -> dict[str, np.ndarray]:
        """Every input at the compiled batch size: the requests' rows in order, then the first
        row repeated."""
        out = {}
        for spec in self.model.inputs:
            parts = [r.inputs[spec.name] for r in self.requests]
            if self.size > self.rows:
                parts.append(np.repeat(parts[0][:1], self.size - self.rows, axis=0))
            out[spec.name] = np.concatenate(parts, axis=0)
        return out

    def answer(self, outputs: dict[str, np.ndarray]) -> None:
        """Slice the batch's outputs back to each request (padding dropped)."""
        start = 0
        for r in self.requests:
            part = {name: value[start:start + r.rows] for name, value in outputs.items()}
            start += r.rows
            if not r.future.done():
                r.future.set_result(part)

    def fail(self, error: ServingError) -> None:
        for r in self.requests:
            if not r.future.done():
                r.future.set_exception(error)


class Batcher:
    """The bounded queue of requests and the batches taken from it (thread-safe)."""

    def __init__(self, max_queue: int, max_delay_s: float):
        self.max_queue, self.max_delay_s = max_queue, max_delay_s
        self._queue: deque[Request] = deque()
        self._cond = threading.Condition()
        self._closed: str | None = None    # why new requests are refused (draining, a host lost)

    def depth(self) -> int:
        with self._cond:
            return len(self._queue)

    def submit(self, request: Request) -> Future:
        with self._cond:
            if self._closed:
                raise Unavailable(self._closed)
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests, --max-queue): retry later")
            self._queue.append(request)
            self._cond.notify_all()
        return request.future

    def close(self, why: str) -> None:
        """Refuse new requests from now on; those queued are still taken (draining)."""
        with self._cond:
            self._closed = self._closed or why
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed is not None

    def fail_all(self, error: ServingError) -> int:
        """Refuse new requests and answer every queued one with `error`; how many."""
        with self._cond:
            self._closed = self._closed or str(error)
            pending = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for r in pending:
            if not r.future.done():
                r.future.set_exception(error)
        return len(pending)

    def next_batch(self, idle_s: float) -> Batch | None:
        """The next batch to run; None when nothing came within `idle_s` (a keep-alive step is
        due) or when the queue is closed and empty (the caller checks `closed`)."""
        with self._cond:
            until = time.monotonic() + idle_s
            while True:
                self._drop_expired()
                if self._queue:
                    break
                if self._closed or not self._cond.wait(max(0.0, until - time.monotonic())):
                    if not self._queue:
                        return None
            model = self._queue[0].model
            start = self._queue[0].enqueued
            while self._rows_of(model) < model.max_batch and not self._closed:
                left = start + self.max_delay_s - time.monotonic()
                if left <= 0 or not self._cond.wait(left):
                    break
            self._drop_expired()
            taken, rows = [], 0
            for r in list(self._queue):
                if r.model is model and rows + r.rows <= model.max_batch:
                    taken.append(r)
                    rows += r.rows
            for r in taken:
                self._queue.remove(r)
        if not taken:
            return self.next_batch(idle_s)
        return Batch(model, taken, rows, model.padded(rows))

    def _rows_of(self, model: ModelSpec) -> int:
        return sum(r.rows for r in self._queue if r.model is model)

    def _drop_expired(self) -> None:
        now = time.monotonic()
        expired = [r for r in self._queue if r.deadline <= now or r.future.done()]   # done: its caller gave up
        for r in expired:
            self._queue.remove(r)
            if not r.future.done():
                r.future.set_exception(DeadlineExceeded(
                    f"the request waited {now - r.enqueued:.3f} s in the queue, past its deadline"))
