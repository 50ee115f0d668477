"""Joining JAX's multi-controller runtime as one host of a bundle's slice, and the mesh by position.

A bundle for a TPU slice is served by one process per host (the manifest's `mesh.hosts`:
processes, devices per process, which process owns each mesh position). Every process runs
the same command with its own `process_id`; process 0 hosts JAX's coordination service.

JAX's own fault handling ends a process with a C++ abort (SIGABRT, exit 134, a stack trace,
no name for a process that never registered), so two bounded steps of the project's come
around it, each ending every survivor with one line and exit 1 that names the lost processes:

1. **Join** (`rendezvous`, before `jax.distributed.initialize`): process 0 listens on the
   coordinator's port, bound to the coordinator's own address, and every other process
   connects and says who it is and which bundle it serves (the manifest's sha256). When all
   are there, process 0 answers "go", closes the port and JAX's service takes it; when
   `join_timeout_s` passes first, every process that did arrive is told which ids never did.
   A second process with the same id, or one serving another bundle, is refused by name.
2. **Heartbeats** (`Watchdog`, after joining): each process bumps its own counter in JAX's
   key-value store every second and reads everyone else's; a counter that has not moved for
   `heartbeat_timeout_s` names its process as lost. JAX's recoverable mode
   (`jax_enable_recoverability`) keeps the coordination service from aborting the survivors
   first, so the watchdog's line is the one they print. A lost process 0 takes the service
   with it: the survivors end at once, with JAX's own abort naming the leader (measured:
   under a second), because every JAX client polls the service and aborts when it is gone.

For tests and smoke tests, `cpu_devices` makes each process simulate its host's share of the
slice as that many CPU devices with gloo collectives (DESIGN.md, multi-host facts).
"""

from __future__ import annotations

import errno
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass

from ..bundle_error import BundleError

_HELLO = "capibara-export-join 1"


@dataclass(frozen=True)
class HostRuntime:
    """Where this process stands in the slice: what `jax.distributed.initialize` is given."""
    coordinator: str | None = None          # HOST:PORT of process 0; None: one process, no coordination
    num_processes: int = 1
    process_id: int = 0
    cpu_devices: int | None = None          # simulate this host's devices on CPU (tests, smoke tests)
    join_timeout_s: int = 60
    heartbeat_timeout_s: int = 30

    def describe(self) -> str:
        """`process I of N via HOST:PORT`, for logs and errors."""
        where = f" via {self.coordinator}" if self.coordinator else ""
        return f"process {self.process_id} of {self.num_processes}{where}"

    @property
    def coordinated(self) -> bool:
        """Whether this process is one of several joined through a coordinator."""
        return self.num_processes > 1 or bool(self.coordinator)


class LostProcesses(BundleError):
    """Some process of the slice never joined, or stopped: names them. Exit 1, as for a run that
    failed, not 2 (bad input): the same command may pass once every host is up."""
    exit_code = 1


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


def _listen(host: str, port: int) -> socket.socket:
    """Process 0's listener on the coordinator's own address. Only when that name is not an
    address of this host (a load balancer's or Service's virtual IP in front of it) does it
    fall back to every interface, as JAX's service itself binds."""
    try:
        return socket.create_server((host, port))
    except OSError as err:
        if err.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT) or isinstance(err, socket.gaierror):
            try:
                return socket.create_server(("", port))
            except OSError as err2:
                err = err2
        raise BundleError(f"process 0 cannot host the coordinator on {host}:{port} ({err.strerror or err}): "
                          "choose a free port for --coordinator") from None


def _ids(ids) -> str:
    ids = sorted(ids)
    return ", ".join(map(str, ids[:16])) + (f", ... ({len(ids)} in all)" if len(ids) > 16 else "")


class Link:
    """The join's connections, kept open until the end: process 0 holds one to every other
    process, each other process one to process 0. `leave` uses them to stop the coordination
    service only after every other process has disconnected from it (see `leave`)."""

    def __init__(self, conns: dict[int, socket.socket]):
        self.conns = conns

    def tell_left(self) -> None:
        for conn in self.conns.values():
            _send(conn, "left")
        self.close()

    def wait_all_left(self, timeout_s: float) -> list[int]:
        """Process 0: block until every other process said "left" or hung up; those that did
        neither within `timeout_s`."""
        deadline, pending = time.monotonic() + timeout_s, dict(self.conns)
        for pid, conn in list(pending.items()):
            try:
                conn.settimeout(max(0.01, deadline - time.monotonic()))
                _read_line(conn)   # "left", or "" when its process is gone: either way it is off the service
                pending.pop(pid)
            except OSError:
                pass
        self.close()
        return sorted(pending)

    def close(self) -> None:
        for conn in self.conns.values():
            conn.close()
        self.conns = {}


def rendezvous(runtime: HostRuntime, token: str) -> Link:
    """Every process of the slice present, serving the bundle `token` names, or one line naming
    who is missing; bounded by `join_timeout_s` (module docstring, step 1)."""
    host, port = parse_address(runtime.coordinator)
    deadline = time.monotonic() + runtime.join_timeout_s
    if runtime.process_id == 0:
        return _host_rendezvous(runtime, _listen(host, port), token, deadline)
    return _join_rendezvous(runtime, host, port, token, deadline)


def _read_line(conn: socket.socket, limit: int = 512) -> str:
    data = b""
    while not data.endswith(b"\n") and len(data) < limit:
        chunk = conn.recv(limit - len(data))
        if not chunk:
            break
        data += chunk
    return data.decode("ascii", errors="replace").strip()


def _host_rendezvous(runtime: HostRuntime, server: socket.socket, token: str, deadline: float) -> Link:
    n = runtime.num_processes
    joined: dict[int, socket.socket] = {}
    refusal = None
    with server:
        try:
            while len(joined) < n - 1 and refusal is None:
                server.settimeout(max(0.05, deadline - time.monotonic()))
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    break
                conn.settimeout(5)
                try:
                    words = _read_line(conn).split()
                except OSError:
                    conn.close()
                    continue
                # hello: capibara-export-join 1 <id> <processes> <token>; anything else is not ours: dropped
                if len(words) != 5 or " ".join(words[:2]) != _HELLO or not words[2].isdigit():
                    conn.close()
                    continue
                pid, count, theirs = int(words[2]), words[3], words[4]
                problem = (f"process {pid} says the slice has {count} processes, process 0 says {n}"
                           if count != str(n) else
                           f"process {pid} serves another bundle (manifest sha256 {theirs[:12]}, process 0's "
                           f"{token[:12]})" if theirs != token else
                           f"process id {pid} is not one of 1..{n - 1}" if not 0 < pid < n else
                           f"two processes joined as process {pid}" if pid in joined else None)
                if problem:
                    refusal = problem
                    _send(conn, f"refused {problem}")
                    conn.close()
                    continue
                joined[pid] = conn
            if refusal is None and len(joined) == n - 1:
                for conn in joined.values():
                    _send(conn, "go")
                link, joined = Link(joined), {}
                return link
            missing = sorted(set(range(1, n)) - set(joined))
            why = refusal or (f"process(es) {_ids(missing)} of {n} did not join within {runtime.join_timeout_s} s "
                              f"(--join-timeout): start every host's process with the same --coordinator")
            for conn in joined.values():
                _send(conn, f"refused {why}")
            _refuse_waiting(server, why)
            raise LostProcesses(why)
        finally:
            for conn in joined.values():
                conn.close()


def _refuse_waiting(server: socket.socket, why: str) -> None:
    """Tell processes whose connection the kernel already queued (but the join never accepted)
    why the join ended, so they print process 0's reason instead of a closed connection."""
    server.settimeout(0.2)
    while True:
        try:
            conn, _ = server.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(0.5)
            try:
                _read_line(conn)   # its hello, read so that closing does not reset the connection
            except OSError:
                pass
            _send(conn, f"refused {why}")


def _send(conn: socket.socket, text: str) -> None:
    try:
        conn.sendall((" ".join(text.split()) + "\n").encode("ascii", errors="replace"))
    except OSError:
        pass   # that process is gone; it learns nothing more from us


def _join_rendezvous(runtime: HostRuntime, host: str, port: int, token: str, deadline: float) -> Link:
    hello = f"{_HELLO} {runtime.process_id} {runtime.num_processes} {token}"
    while True:
        try:
            conn = socket.create_connection((host, port), timeout=2)
            break
        except OSError as err:
            if time.monotonic() >= deadline:
                raise LostProcesses(f"the coordinator {runtime.coordinator} did not answer within "
                                    f"{runtime.join_timeout_s} s ({err.strerror or err}): start process 0 there "
                                    "first, or fix --coordinator") from None
            time.sleep(0.5)
    try:
        conn.sendall((hello + "\n").encode("ascii"))
        conn.settimeout(max(1.0, deadline - time.monotonic()) + 10)   # process 0 answers by its own deadline
        answer = _read_line(conn)
    except OSError as err:
        answer = f"(no answer: {err})"
    if answer == "go":
        return Link({0: conn})
    conn.close()
    if answer.startswith("refused "):
        raise LostProcesses(answer[len("refused "):])
    raise LostProcesses(f"process 0 at {runtime.coordinator} ended the join without an answer "
                        f"{answer or '(connection closed)'}: see process 0's output")


class Watchdog:
    """Heartbeats through JAX's key-value store; a process whose counter stops is named and every
    survivor ends with one line and exit 1 (module docstring, step 2). `lost` is what it found,
    for a server's readiness; `on_lost(line)` runs before the exit (a server answers its queue)."""

    interval_s = 1.0
    _LOST = "capibara-export/lost"   # process 0's finding, so every survivor prints the same line

    def __init__(self, runtime: HostRuntime, link: Link | None = None, on_lost=None):
        from jax._src import distributed   # the key-value store has no public handle in jax 0.10.2

        self.runtime, self.link, self.on_lost = runtime, link, on_lost
        self._client = distributed.global_state.client
        self._stop = threading.Event()
        self._leaving = threading.Event()
        self.lost: str | None = None
        self._thread = threading.Thread(target=self._run, name="capibara-export-heartbeat", daemon=True)
        self._thread.start()

    def _key(self, pid: int) -> str:
        return f"capibara-export/heartbeat/{pid}"

    def _run(self) -> None:
        me, n, bound = self.runtime.process_id, self.runtime.num_processes, self.runtime.heartbeat_timeout_s
        seen = {p: (None, time.monotonic()) for p in range(n) if p != me}
        beat = 0
        while not self._stop.wait(self.interval_s):
            beat += 1
            try:
                self._client.key_value_set(self._key(me), str(beat), allow_overwrite=True)
                values = {p: self._try_get(self._key(p)) for p in seen}
                told = self._try_get(self._LOST) if me != 0 else None
            except Exception as err:   # the service is gone with process 0 (JAX usually aborts first)
                if self._leaving.is_set():
                    return
                self._fail(f"process 0 (the coordinator, {self.runtime.coordinator}) is unreachable "
                           f"({' '.join(str(err).split())[:160]})")
                return
            if told and not self._leaving.is_set():
                self._fail(told)
                return
            now = time.monotonic()
            for p, value in values.items():
                last, since = seen[p]
                if value != last:
                    seen[p] = (value, now)
            stale = sorted(p for p, (_, since) in seen.items() if now - since > bound)
            if stale and not self._leaving.is_set():
                self._fail(f"process(es) {_ids(stale)} of {n} stopped: no heartbeat for {bound} s "
                           "(--heartbeat-timeout)")
                return

    def _try_get(self, key: str):
        try:
            return self._client.key_value_try_get(key)
        except Exception as err:
            if "NOT_FOUND" in str(err) or "not found" in str(err).lower():
                return None   # not published yet: it has the bound to start
            raise

    def _fail(self, why: str) -> None:
        self.lost = why
        line = f"capibara-export: error: {self.runtime.describe()}: {why}; ending this process: restart every " \
               "process of the slice"
        if self.on_lost is not None:
            try:
                self.on_lost(line)
            except Exception:
                pass
        print(line, file=sys.stderr, flush=True)
        if self.runtime.process_id == 0:
            # the service ends with this process, and with it (JAX's abort) every survivor that has
            # not yet printed its own line: tell them, and wait a few beats until they have gone
            try:
                self._client.key_value_set(self._LOST, why, allow_overwrite=True)
            except Exception:
                pass
            if self.link is not None:
                self.link.wait_all_left(3 * self.interval_s + 2)
        os._exit(1)   # from a thread, while the main thread may be inside a collective that never returns

    def leaving(self) -> None:
        """The shutdown barrier is next: peers that finish first are not lost."""
        self._leaving.set()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def join(runtime: HostRuntime, token: str = "", on_lost=None) -> Watchdog | None:
    """Configure JAX for this host and join the slice (before any JAX computation); the
    heartbeat watchdog of a slice of several processes. `on_lost(line)` runs when the
    watchdog finds a process lost, before this process exits (a server answers its queue)."""
    import jax

    if runtime.cpu_devices:
        jax.config.update("jax_num_cpu_devices", int(runtime.cpu_devices))
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if not runtime.coordinated:
        return None
    link = rendezvous(runtime, token)
    jax.config.update("jax_enable_recoverability", True)   # survivors live to name the lost (docstring)
    jax.distributed.initialize(coordinator_address=runtime.coordinator, num_processes=runtime.num_processes,
                               process_id=runtime.process_id, initialization_timeout=runtime.join_timeout_s,
                               heartbeat_timeout_seconds=runtime.heartbeat_timeout_s,
                               shutdown_timeout_seconds=runtime.heartbeat_timeout_s)
    return Watchdog(runtime, link, on_lost)


def leave(runtime: HostRuntime, watchdog: Watchdog | None) -> None:
    """Every process leaves the slice together, bounded by the heartbeat timeout.

    In recoverable mode JAX's `shutdown` has no barrier of its own: process 0 would stop the
    coordination service while a slower peer is still disconnecting from it, and that peer
    aborts ("Failed to disconnect from coordination service", SIGABRT; measured: 6 or 7 of 8
    processes on every run where they finish a few hundred ms apart). So every process first
    meets the others at a barrier in JAX's store; each other process disconnects and then says
    so on the join's connection; process 0 stops the service only after all have (the service
    has no call that reports this: its `GetAliveTasks` is itself a barrier)."""
    if watchdog is None:
        return
    import jax

    watchdog.leaving()
    bound = runtime.heartbeat_timeout_s
    try:
        watchdog._client.wait_at_barrier("capibara-export/leave", bound * 1000)
    except Exception as err:
        raise LostProcesses(f"not every process of {runtime.num_processes} reached the end within {bound} s "
                            f"(--heartbeat-timeout): {' '.join(str(err).split())[:200]}") from None
    if runtime.process_id != 0:
        jax.distributed.shutdown()
        if watchdog.link is not None:
            watchdog.link.tell_left()
    else:
        if watchdog.link is not None:
            watchdog.link.wait_all_left(bound)
        jax.distributed.shutdown()
    watchdog.stop()


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
