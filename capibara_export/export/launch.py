"""Start a bundle's N serving processes on this machine: for tests and a serving team's smoke test.

Each process is `python -m capibara_export serve ... --coordinator 127.0.0.1:PORT
--num-processes N --process-id I --cpu-devices K` on a free port, in its own process group,
its output in its own log file. Every wait is bounded: when a process ends with an error, the
others get `grace_s` to end by themselves (JAX's coordination service aborts them once the
lost process misses its heartbeats) and are then killed; at `timeout_s` everything still
running is killed. Only the processes started here are ever signalled.

Written by hand: JAX ships no local launcher (its cluster detection reads SLURM, MPI or
Cloud TPU metadata), and torchrun / mpirun would add a runtime the project does not need.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .manifest import BundleError


@dataclass(frozen=True)
class Ended:
    process_id: int
    returncode: int | None      # None: still running at the deadline, killed
    seconds: float
    log: Path

    def describe(self) -> str:
        if self.returncode is None:
            return f"process {self.process_id} did not finish in time (killed)"
        if self.returncode < 0:
            return f"process {self.process_id} was killed by signal {-self.returncode}"
        return f"process {self.process_id} exited with code {self.returncode}"

    def last_line(self) -> str:
        """The process's own last words: its one-line error, or JAX's abort reason."""
        lines = [ln.strip() for ln in self.log.read_text(errors="replace").splitlines()
                 if ln.strip() and not ln.startswith(("[Gloo]", "    @", "***"))]
        for ln in reversed(lines):
            if "capibara-export: error:" in ln or "unhealthy" in ln or "Terminating process" in ln:
                return ln[:400]
        return lines[-1][:400] if lines else "(no output)"


class LaunchFailed(BundleError):
    """Some process of a local launch did not finish cleanly."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(serve_args: list[str], processes: int, cpu_devices: int, logs: Path, timeout_s: float = 600,
           grace_s: float = 60, heartbeat_timeout_s: int = 30, started=None) -> list[Ended]:
    """Run the serve command in `processes` local processes; every one's end, in id order.
    `started(popen_list)` is called once all are running (a test may kill one of them)."""
    logs = Path(logs)
    logs.mkdir(parents=True, exist_ok=True)
    port = free_port()
    common = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes), "--cpu-devices",
              str(cpu_devices), "--heartbeat-timeout", str(heartbeat_timeout_s)]
    root = str(Path(__file__).resolve().parents[2])   # the children run the very code this process runs
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    procs, begun = [], time.monotonic()
    try:
        for i in range(processes):
            log = open(logs / f"process-{i}.log", "wb")
            procs.append(subprocess.Popen([sys.executable, "-m", "capibara_export", "serve", *map(str, serve_args),
                                           *common, "--process-id", str(i)], stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True, env=env))
            log.close()
        if started is not None:
            started(procs)
        ended: dict[int, Ended] = {}
        deadline = begun + timeout_s
        while len(ended) < processes and time.monotonic() < deadline:
            for i, p in enumerate(procs):
                if i not in ended and p.poll() is not None:
                    ended[i] = Ended(i, p.returncode, time.monotonic() - begun, logs / f"process-{i}.log")
                    if p.returncode != 0:
                        deadline = min(deadline, time.monotonic() + grace_s)
            time.sleep(0.1)
    finally:
        for i, p in enumerate(procs):
            if p.poll() is None:
                _kill_group(p)
    return [ended.get(i) or Ended(i, None, time.monotonic() - begun, logs / f"process-{i}.log")
            for i in range(processes)]


def _kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)   # its own session: only what this launcher started
    except ProcessLookupError:
        pass
    p.wait(timeout=30)


def failure(ended: list[Ended]) -> str | None:
    """One line naming the process that failed first and what the others did; None if all exited 0."""
    bad = [e for e in ended if e.returncode != 0]
    if not bad:
        return None
    first = min(bad, key=lambda e: e.seconds)
    others = [e for e in bad if e is not first]
    line = f"{first.describe()} after {first.seconds:.0f} s: {first.last_line()}"
    if others:
        line += (f"; then {len(others)} other(s) ended too ({', '.join(str(e.process_id) for e in others[:8])}"
                 f"{', ...' if len(others) > 8 else ''}): {others[0].last_line()}")
    return line + f" (logs: {first.log.parent})"
