"""Every process runs the same program, on the same shapes, in the same order.

In multi-controller JAX every process must issue the same computations in the same order
(DESIGN.md, "Serving facts"). Requests reach process 0 only, so process 0 decides each step
and tells the others: a fixed-size header (what to do, which model, which compiled batch,
how many real rows, a sequence number), then, for a run step, the padded batch itself. Both
go through `jax.experimental.multihost_utils.broadcast_one_to_all`: a jitted sum over one
device per process in which only process 0 contributes, so the message rides the slice's own
collectives (ICI / DCN; gloo on simulated CPU hosts), in order with the programs, and every
leaf keeps its dtype exactly (x + 0). The other processes know the batch's shapes from the
header and the model catalogue, which every process reads from the same manifest.

Steps: RUN (a batch), KEEPALIVE (sent when idle, so a lost host shows up in a collective
without traffic, beside the heartbeat watchdog), STOP (drain finished: every process leaves).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RUN, KEEPALIVE, STOP = 1, 2, 3
_HEADER = 6   # int32: kind, model index, compiled batch, real rows, sequence number, checksum


@dataclass(frozen=True)
class Step:
    kind: int
    model: int = -1          # index into the catalogue (models.catalogue order)
    batch: int = 0           # the compiled batch size it runs at
    rows: int = 0            # real rows; the rest is padding
    seq: int = 0

    def header(self) -> np.ndarray:
        fields = [self.kind, self.model, self.batch, self.rows, self.seq]
        return np.array([*fields, sum(fields) % (1 << 30)], dtype=np.int32)

    @classmethod
    def from_header(cls, h: np.ndarray) -> Step:
        fields = [int(v) for v in h[:5]]
        if int(h[5]) != sum(fields) % (1 << 30) or fields[0] not in (RUN, KEEPALIVE, STOP):
            raise RuntimeError(f"lockstep header corrupted: {h.tolist()}")
        return cls(*fields)


class Lockstep:
    """Process 0 `send`s each step; every other process `receive`s the same step, in order.

    transport "collective" (the default): broadcast_one_to_all, as the module docstring says.
    transport "kv": JAX's distributed key-value store, the step as one value of raw bytes
    (the header, then each array's bytes in catalogue order: the receiver knows every shape
    and dtype, so nothing is pickled and bfloat16 survives). Kept to measure the two side by
    side (bench/test_server_load.py; docs/server.md gives the figures and the choice)."""

    TRANSPORTS = ("collective", "kv")
    _KEY = "capibara-export/step/"

    def __init__(self, process_id: int, num_processes: int, transport: str = "collective",
                 receive_timeout_s: float = 60.0):
        if transport not in self.TRANSPORTS:
            raise ValueError(f"lockstep transport {transport!r}: one of {', '.join(self.TRANSPORTS)}")
        self.is_source = process_id == 0
        self.num_processes, self.transport = num_processes, transport
        self.receive_timeout_ms = int(receive_timeout_s * 1000)
        self.seq = 0
        self._written: list[int] = []   # kv: steps whose value is still in the store

    def _broadcast(self, tree):
        if self.num_processes == 1:
            return tree
        from jax.experimental import multihost_utils

        return multihost_utils.broadcast_one_to_all(tree, is_source=self.is_source)

    def _client(self):
        from jax._src import distributed   # the key-value store has no public handle in jax 0.10.2

        return distributed.global_state.client

    def send(self, step: Step, arrays: dict[str, np.ndarray] | None = None) -> None:
        """Process 0: the step, then (RUN) its arrays, in the catalogue's input order."""
        assert self.is_source
        self.seq += 1
        header = Step(step.kind, step.model, step.batch, step.rows, self.seq).header()
        if self.num_processes == 1:
            return
        if self.transport == "collective":
            self._broadcast(header)
            if step.kind == RUN:
                self._broadcast(list(arrays.values()))
            return
        payload = b"".join([header.tobytes(), *(np.ascontiguousarray(a).tobytes() for a in
                                                (arrays.values() if step.kind == RUN else ()))])
        self._client().key_value_set_bytes(f"{self._KEY}{self.seq}", payload)
        self._written.append(self.seq)

    def ran(self) -> None:
        """Process 0, after a RUN step's program returned: every process has read every step up
        to it (the program's collectives need them all), so their values can go."""
        if self.transport != "kv" or self.num_processes == 1:
            return
        client = self._client()
        for seq in self._written:
            client.key_value_delete(f"{self._KEY}{seq}")
        self._written.clear()

    def receive(self, shapes_of) -> tuple[Step, list[np.ndarray] | None]:
        """Another process: the next step and (RUN) its arrays. `shapes_of(step)` gives the
        (shape, dtype) of each array, in order, from the catalogue."""
        assert not self.is_source
        if self.transport == "kv":
            return self._receive_kv(shapes_of)
        step = Step.from_header(np.asarray(self._broadcast(np.zeros(_HEADER, np.int32))))
        self._check(step)
        if step.kind != RUN:
            return step, None
        zeros = [np.zeros(shape, dtype) for shape, dtype in shapes_of(step)]
        return step, [np.asarray(x) for x in self._broadcast(zeros)]

    def _check(self, step: Step) -> None:
        if step.seq != self.seq + 1:
            raise RuntimeError(f"lockstep out of order: step {step.seq} after {self.seq}")
        self.seq = step.seq

    def _receive_kv(self, shapes_of):
        payload = self._client().blocking_key_value_get_bytes(f"{self._KEY}{self.seq + 1}", self.receive_timeout_ms)
        head = _HEADER * 4
        step = Step.from_header(np.frombuffer(payload[:head], np.int32))
        self._check(step)
        if step.kind != RUN:
            return step, None
        arrays, offset = [], head
        for shape, dtype in shapes_of(step):
            size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            arrays.append(np.frombuffer(payload[offset:offset + size], dtype).reshape(shape))
            offset += size
        if offset != len(payload):
            raise RuntimeError(f"lockstep step {step.seq}: {len(payload)} bytes, the catalogue's shapes say {offset}")
        return step, arrays
