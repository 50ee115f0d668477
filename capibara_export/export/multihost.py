"""Joining JAX's multi-controller runtime as one host of a bundle's slice, and the mesh by position.

A bundle for a TPU slice is served by one process per host (the manifest's `mesh.hosts`:
processes, devices per process, which process owns each mesh position). Every process runs
the same command with its own `process_id`; process 0 hosts JAX's coordination service.

Timeouts are JAX's own (`jax.distributed.initialize`), set from `HostRuntime`:
- `initialization_timeout` = `connect_timeout_s`: how long registration may wait for all
  processes to arrive;
- `heartbeat_timeout_seconds` = `heartbeat_timeout_s`: a process that sends no heartbeat for
  this long is declared dead by the coordination service, and every other process aborts
  (SIGABRT, exit 134) with JAX's message naming the unhealthy task; a lost process 0 (the
  service itself) is noticed at the next poll. Measured here: 13 s after a peer died with
  10 s, 3 s after process 0 died. Nothing waits for ever: no hang.
- `shutdown_timeout_seconds` = `heartbeat_timeout_s`: the barrier at exit.
Before JAX is asked to connect, the coordinator is probed over TCP (bounded by the same
connect timeout), so an unreachable address is one clear line and exit 2, not JAX's abort.

For tests and smoke tests, `cpu_devices` makes each process simulate its host's share of the
slice as that many CPU devices with gloo collectives (DESIGN.md, multi-host facts).
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

from .manifest import BundleError


@dataclass(frozen=True)
class HostRuntime:
    """Where this process stands in the slice: what `jax.distributed.initialize` is given."""
    coordinator: str | None = None          # HOST:PORT of process 0; None: one process, no coordination
    num_processes: int = 1
    process_id: int = 0
    cpu_devices: int | None = None          # simulate this host's devices on CPU (tests, smoke tests)
    connect_timeout_s: int = 60
    heartbeat_timeout_s: int = 30

    def describe(self) -> str:
        where = f" via {self.coordinator}" if self.coordinator else ""
        return f"process {self.process_id} of {self.num_processes}{where}"


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BundleError(f"--coordinator {text!r}: expected HOST:PORT of process 0, e.g. 10.0.0.2:8476")
    return host.strip("[]"), int(port)


def check_against_manifest(runtime: HostRuntime, manifest: dict) -> None:
    """Refuse, before anything connects, a process count or id that cannot be this slice's."""
    hosts = manifest["mesh"].get("hosts") or {}
    want = int(hosts.get("processes", 1))
    if runtime.num_processes < 1 or not 0 <= runtime.process_id < runtime.num_processes:
        raise BundleError(f"--process-id {runtime.process_id} is not one of 0..{runtime.num_processes - 1}: "
                          "give each host its own id below --num-processes")
    if runtime.num_processes != want:
        per = hosts.get("devices_per_process", manifest["mesh"]["devices"])
        raise BundleError(f"this bundle's mesh spans {want} process(es) x {per} device(s) (manifest mesh.hosts); "
                          f"--num-processes {runtime.num_processes} does not match: start one process per host, "
                          f"--num-processes {want}")
    if want > 1 and not runtime.coordinator:
        raise BundleError(f"this bundle's mesh spans {want} processes: give every process --coordinator HOST:PORT "
                          "(process 0's address), --num-processes and its own --process-id")


def _probe(runtime: HostRuntime) -> None:
    """Process 0 must be able to listen on the port; the others must reach it in time."""
    host, port = parse_address(runtime.coordinator)
    if runtime.process_id == 0:
        try:
            with socket.create_server(("", port)):
                return
        except OSError as err:
            raise BundleError(f"process 0 cannot host the coordinator on port {port} ({err.strerror}): "
                              "choose a free port for --coordinator") from None
    deadline = time.monotonic() + runtime.connect_timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=2):
                return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise BundleError(f"the coordinator {runtime.coordinator} did not answer within "
                                  f"{runtime.connect_timeout_s} s ({err.strerror or err}): start process 0 "
                                  "there first, or fix --coordinator") from None
            time.sleep(0.5)


def join(runtime: HostRuntime) -> None:
    """Configure JAX for this host and join the slice (before any JAX computation)."""
    import jax

    if runtime.cpu_devices:
        jax.config.update("jax_num_cpu_devices", int(runtime.cpu_devices))
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if runtime.num_processes == 1 and not runtime.coordinator:
        return
    _probe(runtime)
    jax.distributed.initialize(coordinator_address=runtime.coordinator, num_processes=runtime.num_processes,
                               process_id=runtime.process_id, initialization_timeout=runtime.connect_timeout_s,
                               heartbeat_timeout_seconds=runtime.heartbeat_timeout_s,
                               shutdown_timeout_seconds=runtime.heartbeat_timeout_s)


def mesh_by_position(manifest: dict):
    """The bundle's mesh on this runtime's devices, matched by mesh position, never by raw id.

    Position (i, j) belongs to process `process_grid[i][j]`; among that process's positions,
    the one whose recorded device id ranks k-th gets the process's k-th local device by id.
    On the target runtime this is the compiled device order (ids rank alike within a host);
    across simulated CPU processes, whose ids start at 0, 2048, ..., it is the same layout."""
    import jax
    import numpy as np

    m = manifest["mesh"]
    hosts = m.get("hosts") or {}
    ids = np.array(m["device_ids"])
    grid = np.array(hosts.get("process_grid", np.zeros_like(ids)))
    by_process: dict[int, list] = {}
    for d in sorted(jax.devices(), key=lambda d: d.id):  # the runtime's platform (simulated: cpu)
        by_process.setdefault(d.process_index, []).append(d)
    out = np.empty(ids.shape, dtype=object)
    for p in sorted(set(grid.flat)):
        mine = sorted(ids[grid == p])
        have = by_process.get(int(p), [])
        if len(have) < len(mine):
            raise BundleError(f"process {p} has {len(have)} device(s); the bundle places {len(mine)} mesh positions "
                              "on it: run it on the slice it was built for")
        rank = {int(i): k for k, i in enumerate(mine)}
        for pos in zip(*np.nonzero(grid == p)):
            out[pos] = have[rank[int(ids[pos])]]
    return jax.sharding.Mesh(out, tuple(m["axis_names"]))
