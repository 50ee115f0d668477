"""One host's process of the live server: open the bundle, join the slice, warm every program,
then process 0 serves requests and leads while every other process follows.

    python -m capibara_export server BUNDLE --coordinator HOST:PORT --num-processes N --process-id I

Order of start-up, and why:

1. Every process opens the bundle exactly as `serve` does (signature, hashes, schema, host
   layout) and builds the model catalogue from the manifest: a bad bundle or flag is refused
   in one line before anything connects.
2. Process 0 binds its HTTP and gRPC ports before joining: a port in use is a refusal at start,
   not a slice that joined for nothing. From then on `live` answers 200 and `ready` 503.
3. Every process joins (rendezvous, then JAX's distributed runtime, multihost.py).
4. Every process opens each model's program at each compiled batch size; process 0 runs each
   once (warm-up steps, which every other process follows). Then `ready` answers 200.
5. Process 0 leads (engine.py) until SIGTERM or SIGINT: it stops taking requests (`ready` 503,
   new requests 503), answers every queued one, sends STOP, and every process leaves together
   and exits 0. The other processes ignore SIGTERM (Kubernetes signals every pod of a group;
   the group ends when its leader does) and leave on process 0's STOP.

A lost process (the heartbeat watchdog, or a failed step) makes process 0 answer the batch in
flight and every queued request with 503 naming the lost process, `live` and `ready` 503, and
every surviving process exits 1 within the heartbeat bound (--heartbeat-timeout).

`SliceServer` is also the Python API for a team's own front end: leave both ports off
(`http_port=None, grpc_port=None`), call `run()` on the main thread of every process, and on
process 0 call `infer()` from any other thread.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..bundle_error import BundleError
from ..export.trust import TrustPolicy
from .batcher import Batcher, Unavailable
from .models import catalogue


@dataclass(frozen=True)
class ServerOptions:
    host: str = "0.0.0.0"                 # where process 0 listens
    http_port: int | None = 8000          # KServe v2 REST, TF Serving REST and /metrics; None: off
    grpc_port: int | None = 8001          # KServe v2 gRPC; None: off
    max_queue: int = 256                  # requests waiting; one more is refused with 503 / UNAVAILABLE
    max_queue_delay_ms: float = 5.0       # how long a batch waits for more requests once one is queued
    timeout_s: float = 60.0               # a request's longest time from receipt to answer
    max_body_mb: float = 64.0             # the largest HTTP body or gRPC message
    keepalive_s: float = 1.0              # idle process 0 sends a keep-alive step this often
    use_executable: bool = True           # the serialized executable where it loads, else the jax.export program
    precision: str | None = None          # which precision to serve where the bundle has several
    max_pixels: int | None = None         # caption_text: the largest image (header), as `analyze --max-pixels`
    lockstep: str = "collective"          # how process 0 tells the others each step (lockstep.py)
    measure_ceiling: int = 0              # steps of each model's largest batch run back to back before ready

    def check(self) -> None:
        """Refuse options that cannot work (a port out of range, one port for two protocols, ...)
        with a BundleError naming the option and the fix."""
        for name, port in (("--http-port", self.http_port), ("--grpc-port", self.grpc_port)):
            if port is not None and not 0 <= port <= 65535:
                raise BundleError(f"{name} {port}: give a port in 0..65535 (0: any free port)")
        if self.http_port and self.http_port == self.grpc_port:
            raise BundleError(f"--http-port and --grpc-port are both {self.http_port}: give two ports")
        if self.max_queue < 1:
            raise BundleError(f"--max-queue {self.max_queue}: give 1 or more")
        if not 0 <= self.max_queue_delay_ms <= 10_000:
            raise BundleError(f"--max-queue-delay-ms {self.max_queue_delay_ms}: give 0..10000")
        if not 0 < self.timeout_s <= 3600:
            raise BundleError(f"--timeout {self.timeout_s}: give 0 < seconds <= 3600")
        if not 0 <= self.measure_ceiling <= 10_000:
            raise BundleError(f"--measure-ceiling {self.measure_ceiling}: give 0..10000 steps")
        if self.lockstep not in ("collective", "kv"):
            raise BundleError(f"--lockstep {self.lockstep}: collective or kv")
        if self.max_pixels is not None and self.max_pixels < 1:
            raise BundleError(f"--max-pixels {self.max_pixels}: give 1 or more")
        if not 0 < self.max_body_mb <= 2047:
            raise BundleError(f"--max-body-mb {self.max_body_mb}: give 0 < MB <= 2047 (gRPC's limit)")


class Protocols:
    """Process 0's listeners (aiohttp and grpc.aio) on an asyncio loop of their own thread, so
    the main thread is free for the step loop."""

    def __init__(self, front, options: ServerOptions):
        self.front, self.options = front, options
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="capibara-export-listeners", daemon=True)
        self._runner = self._grpc = None
        self.ports: dict[str, int] = {}

    def start(self) -> dict[str, int]:
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=30)
        except OSError as err:
            self.stop()
            raise BundleError(f"cannot listen on {self.options.host}: {err.strerror or err}: pass free ports with "
                              "--http-port and --grpc-port (0: any free port)") from None
        return self.ports

    async def _start(self) -> None:
        from aiohttp import web

        from . import kserve_grpc, kserve_http, tf_serving_rest

        limit = int(self.options.max_body_mb * 2**20)
        if self.options.http_port is not None:
            app = web.Application(client_max_size=limit)
            app.add_routes(kserve_http.routes(self.front) + tf_serving_rest.routes(self.front))
            self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await self._runner.setup()
            site = web.TCPSite(self._runner, self.options.host, self.options.http_port, reuse_address=True)
            await site.start()
            self.ports["http"] = site._server.sockets[0].getsockname()[1]   # aiohttp: no public bound-port accessor
        if self.options.grpc_port is not None:
            self._grpc, self.ports["grpc"] = await kserve_grpc.start(self.front, self.options.host,
                                                                     self.options.grpc_port, limit)

    def call(self, fn, *args) -> None:
        """Run `fn(*args)` on the listeners' loop (state the handlers read is changed there)."""
        self.loop.call_soon_threadsafe(fn, *args)

    def stop(self, grace_s: float = 5.0) -> None:
        async def _stop():
            if self._grpc is not None:
                await self._grpc.stop(grace_s)
            if self._runner is not None:
                await self._runner.cleanup()
        if self._thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(_stop(), self.loop).result(timeout=grace_s + 5)
            except Exception:
                pass   # leaving anyway: the process exits next
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)


class SliceServer:
    """One process of the live server (module docstring)."""

    def __init__(self, bundle: Path, runtime, policy: TrustPolicy = TrustPolicy(),
                 options: ServerOptions = ServerOptions(), say: Callable[[str], None] | None = None):
        from ..export.loading import open_bundle
        from ..export.multihost import check_against_manifest

        options.check()
        self.runtime, self.options = runtime, options
        self.say = say or (lambda text: print(f"capibara-export server: {runtime.describe()}: {text}",
                                              file=sys.stderr, flush=True))
        self.opened = open_bundle(Path(bundle), policy)
        check_against_manifest(runtime, self.opened.manifest)
        self.models, self.notes = catalogue(self.opened.manifest, options.precision)
        self.leader = runtime.process_id == 0
        self.front = self.protocols = self.engine = self.watchdog = None
        self.batcher = Batcher(options.max_queue, options.max_queue_delay_ms / 1000)
        self._lost: str | None = None

    # -- start-up -------------------------------------------------------------------------------
    def start(self) -> None:
        """Listen (process 0), join, open and warm every program; ready when it returns."""
        from .. import __version__
        from ..export.multihost import join
        from .engine import Engine
        from .frontend import Frontend
        from .lockstep import Lockstep
        from .metrics import Metrics
        from .text_caption import open_view

        for note in self.notes:
            self.say(note)
        if self.leader:
            if self.options.max_pixels:
                from ..semiotic.images import limits

                limits.max_pixels = self.options.max_pixels
            view, why = open_view(self.opened, self.models)
            if why:
                self.say(why)
            self.front = Frontend(self.models, self.batcher, Metrics(), self.options.timeout_s,
                                  int(self.options.max_body_mb * 2**20), __version__, views=(view,) if view else ())
            if self.options.http_port is not None or self.options.grpc_port is not None:
                self.protocols = Protocols(self.front, self.options)
                ports = self.protocols.start()
                self.say("listening (live, not ready): " + ", ".join(
                    f"{k} {self.options.host}:{v}" for k, v in ports.items()))
        started = time.perf_counter()
        self.watchdog = join(self.runtime, self.opened.digest, on_lost=self._on_lost)
        import jax

        self.say(f"joined in {time.perf_counter() - started:.1f} s, {jax.local_device_count()} local "
                 f"{jax.default_backend()} device(s) of {jax.device_count()}")
        started = time.perf_counter()
        lockstep = Lockstep(self.runtime.process_id, self.runtime.num_processes, self.options.lockstep,
                            receive_timeout_s=self.runtime.heartbeat_timeout_s + 10 * self.options.keepalive_s)
        self.engine = Engine.open(self.opened, self.models, lockstep, self.options.use_executable)
        for note in self.engine.notes[:1]:
            self.say(note)
        self.say(f"opened {len(self.engine.programs)} program(s) of {len(self.models)} model(s) in "
                 f"{time.perf_counter() - started:.1f} s: " + ", ".join(
                     f"{m.name} ({m.precision}) at batch {'/'.join(map(str, m.batch_sizes))}" for m in self.models))

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> int:
        """Start, serve until drained (process 0) or told to stop (the others), leave; 0."""
        from ..export.multihost import leave

        self.start()
        self._signals()
        try:
            if self.leader:
                seconds = self.engine.warm(self.say)
                if self.options.measure_ceiling:
                    for name, rate in self.engine.ceiling(self.options.measure_ceiling, self.say).items():
                        self.front.metrics.ceiling.labels(name).set(rate)
                self.engine.on_step = self.front.batch_ran
                self._on_listeners(self.front.set_ready)
                self.say(f"ready: warmed every program in {seconds:.1f} s")
                self.engine.lead(self.batcher, self.options.keepalive_s)
            else:
                self.engine.follow()
        except Exception as err:
            why = self._lost or f"a step failed on the slice ({' '.join(str(err).split())[:300]})"
            self._fail_everything(why)
            self._await_verdict()
            raise SliceFailed(f"{self.runtime.describe()}: {why}; restart every process of the slice") from None
        self.say(f"drained after {self.engine.steps} step(s); leaving the slice")
        if self.protocols is not None:
            self.protocols.stop()
        leave(self.runtime, self.watchdog)
        return 0

    def infer(self, model: str, inputs: dict[str, np.ndarray], timeout_s: float | None = None) -> dict[str, np.ndarray]:
        """Process 0, from any thread but the one in `run()`: one request's outputs."""
        if not self.leader or self.front is None:
            raise BundleError("infer runs on process 0, after start()")
        _, future = self.front.submit(model, inputs, "python", timeout_s)
        return future.result(timeout=(timeout_s or self.options.timeout_s) + 1)

    def drain(self) -> None:
        """Process 0: stop taking requests, answer those queued, then every process leaves."""
        if self.front is not None:
            self._on_listeners(self.front.drain)

    # -- signals and faults ---------------------------------------------------------------------
    def _on_listeners(self, fn, *args) -> None:
        if self.protocols is not None:
            self.protocols.call(fn, *args)
        else:
            fn(*args)

    def _signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return   # a team's own front end runs us elsewhere; it calls drain() itself

        def leader(signum, _frame):
            self.say(f"{signal.Signals(signum).name}: draining: refusing new requests, answering the queued ones")
            self.drain()

        def follower(signum, _frame):
            self.say(f"{signal.Signals(signum).name}: ignored; this process leaves when process 0 drains")
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, leader if self.leader else follower)

    def _on_lost(self, line: str) -> None:
        """The watchdog's callback, on its thread, before it ends this process."""
        found = self.watchdog.lost if self.watchdog is not None else None
        self._lost = f"{found or line.split(': error: ', 1)[-1]}: this slice is ending; retry on another replica"
        if self.leader:
            self._fail_everything(self._lost)
            time.sleep(1.0)   # the listeners send the answers before the watchdog ends the process

    def _await_verdict(self) -> None:
        """After a failed step: a peer gone mid-collective shows up in the collective (gloo,
        ICI) before its heartbeat goes stale. Wait, bounded by the heartbeat timeout, for the
        watchdog to name the lost process (it ends this process with that line); answering 503
        meanwhile. If none is named, the step's own error ends the process."""
        if self.watchdog is None:
            return
        self.say(f"a step failed; waiting up to {self.runtime.heartbeat_timeout_s + 3} s for the heartbeat to "
                 "name a lost process")
        deadline = time.monotonic() + self.runtime.heartbeat_timeout_s + 3
        while time.monotonic() < deadline and self.watchdog.lost is None:
            time.sleep(0.2)
        time.sleep(2.0 if self.watchdog.lost else 0)   # the watchdog's own exit comes first

    def _fail_everything(self, why: str) -> None:
        if not self.leader or self.front is None:
            return
        error = Unavailable(why)
        if self.engine is not None and self.engine.current is not None:
            self.engine.current.fail(error)
        self.front.lost = self.front.lost or why
        self.front.metrics.ready.set(0)
        count = self.batcher.fail_all(error)
        self.say(f"answered {count} queued request(s) with 503: {why}")
        if self.protocols is not None:
            time.sleep(0.5)


class SliceFailed(BundleError):
    """A process of the slice was lost or a step failed while serving: exit 1."""
    exit_code = 1
