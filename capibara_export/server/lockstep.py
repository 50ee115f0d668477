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
    """Process 0 `send`s each step; every other process `receive`s the same step, in order."""

    def __init__(self, process_id: int, num_processes: int):
        self.is_source = process_id == 0
        self.num_processes = num_processes
        self.seq = 0

    def _broadcast(self, tree):
        if self.num_processes == 1:
            return tree
        from jax.experimental import multihost_utils

        return multihost_utils.broadcast_one_to_all(tree, is_source=self.is_source)

    def send(self, step: Step, arrays: dict[str, np.ndarray] | None = None) -> None:
        """Process 0: the step, then (RUN) its arrays, in the catalogue's input order."""
        assert self.is_source
        self.seq += 1
        self._broadcast(Step(step.kind, step.model, step.batch, step.rows, self.seq).header())
        if step.kind == RUN:
            self._broadcast(list(arrays.values()))

    def receive(self, shapes_of) -> tuple[Step, list[np.ndarray] | None]:
        """Another process: the next step and (RUN) its arrays. `shapes_of(step)` gives the
        (shape, dtype) of each array, in order, from the catalogue."""
        assert not self.is_source
        step = Step.from_header(np.asarray(self._broadcast(np.zeros(_HEADER, np.int32))))
        if step.seq != self.seq + 1:
            raise RuntimeError(f"lockstep out of order: step {step.seq} after {self.seq}")
        self.seq = step.seq
        if step.kind != RUN:
            return step, None
        zeros = [np.zeros(shape, dtype) for shape, dtype in shapes_of(step)]
        return step, [np.asarray(x) for x in self._broadcast(zeros)]
