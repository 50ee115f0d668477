"""The programs of every served model at every compiled batch size, on this host's share of the
slice, and the step loop that runs them in lockstep.

Process 0 leads: it takes each batch from the batcher, tells every process the step
(lockstep.py), runs the program with them, and slices the gathered outputs back to the
requests. Every other process follows: it receives each step and runs the same program on
the same padded batch. When idle, process 0 sends a keep-alive step every `keepalive_s`.
Warm-up is a series of ordinary steps, one per (model, batch size): when process 0 has run
them, every process has (each step ends in a gather across all of them), which is what
readiness means.

Any failure inside a step (a peer gone mid-collective, a program error) fails the batch's
requests and every queued one, and ends the loop with the error: the slice cannot go on
with one process out of step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..export.loading import OpenedBundle
from ..export.sharded_server import ShardedServer
from .batcher import Batch, Batcher, Unavailable
from .lockstep import KEEPALIVE, RUN, STOP, Lockstep, Step
from .models import ModelSpec


@dataclass
class Engine:
    models: list[ModelSpec]
    programs: dict[tuple[int, int], ShardedServer]     # (model index, batch size) -> program
    lockstep: Lockstep
    notes: list[str] = field(default_factory=list)
    on_step: Callable[[Batch, float, float], None] | None = None   # process 0: metrics after each batch
    steps: int = 0
    current: Batch | None = None                            # process 0: the batch now running
    told_s: float = 0.0                                     # process 0: the last step's lockstep send

    @classmethod
    def open(cls, opened: OpenedBundle, models: list[ModelSpec], lockstep: Lockstep, use_executable: bool = True,
             progress: Callable[[str], None] = lambda _: None) -> Engine:
        programs, notes, restored = {}, [], {}
        for mi, model in enumerate(models):
            for a in model.artifacts:
                key = (a["params"], a["plan"])
                program = ShardedServer.open(opened, model.entry, model.precision, use_executable=use_executable,
                                             batch=a["batch"], restored=restored.get(key))
                restored.setdefault(key, program.params)
                programs[(mi, a["batch"])] = program
                notes += [f"{model.name} batch {a['batch']}: {n}" for n in program.notes[:1]]
                progress(f"{model.name} batch {a['batch']}: {program.program_path} ({program.program_kind})")
        return cls(models, programs, lockstep, notes)

    def _shapes(self, step: Step) -> list[tuple[tuple[int, ...], np.dtype]]:
        model = self.models[step.model]
        return [((step.batch, *t.row_shape), t.np_dtype) for t in model.inputs]

    def _run(self, step: Step, arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
        model = self.models[step.model]
        self.steps += 1
        return self.programs[(step.model, step.batch)](dict(zip([t.name for t in model.inputs], arrays)))

    def warm(self, progress: Callable[[str], None] = lambda _: None) -> float:
        """Process 0: run every program once at every batch size (zeros), in lockstep; seconds."""
        started = time.perf_counter()
        for (mi, size) in sorted(self.programs):
            model = self.models[mi]
            t0 = time.perf_counter()
            arrays = {t.name: np.zeros((size, *t.row_shape), t.np_dtype) for t in model.inputs}
            self.lockstep.send(Step(RUN, mi, size, 0), arrays)
            self._run(Step(RUN, mi, size, 0), list(arrays.values()))
            self.lockstep.ran()
            progress(f"warmed {model.name} at batch {size} in {time.perf_counter() - t0:.1f} s")
        return time.perf_counter() - started

    def ceiling(self, steps: int, progress: Callable[[str], None] = lambda _: None) -> dict[str, float]:
        """Process 0: each model's largest compiled batch run `steps` times back to back in
        lockstep, with no server in between (real rows of random values); rows per second."""
        rates, rng = {}, np.random.default_rng(0)
        for mi, model in enumerate(self.models):
            size = model.max_batch
            arrays = {t.name: _random(rng, (size, *t.row_shape), t.np_dtype) for t in model.inputs}
            started = time.perf_counter()
            for _ in range(steps):
                self.lockstep.send(Step(RUN, mi, size, size), arrays)
                self._run(Step(RUN, mi, size, size), list(arrays.values()))
                self.lockstep.ran()
            seconds = time.perf_counter() - started
            rates[model.name] = steps * size / seconds
            progress(f"ceiling of {model.name}: {steps} steps of batch {size} back to back in {seconds:.2f} s = "
                     f"{rates[model.name]:.1f} rows/s")
        return rates

    def lead(self, batcher: Batcher, keepalive_s: float) -> None:
        """Process 0's loop, until the batcher is closed and drained (then a STOP step)."""
        index = {id(m): i for i, m in enumerate(self.models)}
        while True:
            batch = batcher.next_batch(keepalive_s)
            if batch is None:
                if batcher.closed and batcher.depth() == 0:
                    self.lockstep.send(Step(STOP))
                    return
                self.lockstep.send(Step(KEEPALIVE))
                continue
            started = time.perf_counter()
            self.current = batch
            try:
                inputs = batch.inputs()
                mi = index[id(batch.model)]
                told = time.perf_counter()
                self.lockstep.send(Step(RUN, mi, batch.size, batch.rows), inputs)
                self.told_s = time.perf_counter() - told
                outputs = self._run(Step(RUN, mi, batch.size, batch.rows), list(inputs.values()))
                self.lockstep.ran()
            except BaseException as err:
                why = Unavailable(f"a step failed on the slice while running this batch "
                                  f"({' '.join(str(err).split())[:300]}): retry on another replica")
                batch.fail(why)
                batcher.fail_all(why)
                raise
            batch.answer(outputs)
            self.current = None
            if self.on_step is not None:
                self.on_step(batch, time.perf_counter() - started, self.told_s)

    def follow(self) -> None:
        """Every other process's loop, until process 0's STOP step."""
        while True:
            step, arrays = self.lockstep.receive(self._shapes)
            if step.kind == STOP:
                return
            if step.kind == RUN:
                self._run(step, arrays)


def _random(rng, shape, dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, 2, shape).astype(dtype)   # valid ids and masks for every model
    return rng.standard_normal(shape).astype(dtype)
