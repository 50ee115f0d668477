"""Start a bundle's N processes on this machine, as the slice's hosts: `python -m capibara_export
launch N -- serve BUNDLE ...` for a serving team's smoke test, and `launch()` for verify and tests.

Each process is `python -m capibara_export COMMAND ... --coordinator 127.0.0.1:PORT
--num-processes N --process-id I --cpu-devices K` on a free port, in its own process group.
Its output goes to its own log file and, with `echo`, to this process's stdout with an
`[I] ` prefix. Every wait is bounded: when a process ends with an error, the others get
`grace_s` to end by themselves (each names the lost process within its heartbeat bound,
multihost.py) and are then killed; at `timeout_s` everything still running is killed.
SIGINT and SIGTERM sent to the launcher are passed on to every process. Only the processes
started here are ever signalled.

Written by hand: JAX ships no local launcher (its cluster detection reads SLURM, MPI or
Cloud TPU metadata), and torchrun / mpirun would add a runtime the project does not need.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..bundle_error import BundleError

# the subcommands that run as one process per host and take the runtime flags
LAUNCHABLE = ("serve", "server")


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


def launch(args: list, processes: int, cpu_devices: int, logs: Path, timeout_s: float = 600,
           grace_s: float = 60, heartbeat_timeout_s: int = 30, started=None, command: str = "serve",
           echo: bool = False, join_timeout_s: int | None = None) -> list[Ended]:
    """Run `command args...` in `processes` local processes; every one's end, in id order.
    `started(popen_list)` is called once all are running (a test may kill one of them)."""
    logs = Path(logs)
    logs.mkdir(parents=True, exist_ok=True)
    port = free_port()
    common = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes), "--cpu-devices",
              str(cpu_devices), "--heartbeat-timeout", str(heartbeat_timeout_s)]
    if join_timeout_s is not None:
        common += ["--join-timeout", str(join_timeout_s)]
    root = str(Path(__file__).resolve().parents[2])   # the children run the very code this process runs
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}
    procs, pumps, begun = [], [], time.monotonic()
    forwarded = _forward_signals(procs)
    try:
        for i in range(processes):
            argv = [sys.executable, "-m", "capibara_export", command, *map(str, args), *common, "--process-id", str(i)]
            if echo:
                p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, env=env)
                pumps.append(threading.Thread(target=_pump, args=(p.stdout, logs / f"process-{i}.log", f"[{i}] "),
                                              daemon=True))
                pumps[-1].start()
            else:
                with open(logs / f"process-{i}.log", "wb") as log:
                    p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, env=env)
            procs.append(p)
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
        for p in procs:
            if p.poll() is None:
                _kill_group(p)
        for t in pumps:
            t.join(timeout=10)
        _restore_signals(forwarded)
    return [ended.get(i) or Ended(i, None, time.monotonic() - begun, logs / f"process-{i}.log")
            for i in range(processes)]


def _pump(stream, log: Path, prefix: str) -> None:
    """One process's output, line by line, to its log and prefixed to this process's stdout."""
    with open(log, "wb") as f:
        for raw in iter(stream.readline, b""):
            f.write(raw)
            f.flush()
            sys.stdout.write(prefix + raw.decode(errors="replace"))
            sys.stdout.flush()
    stream.close()


def _forward_signals(procs: list) -> dict:
    """SIGINT and SIGTERM to the launcher go to every child's process group (only from the main
    thread, where Python can install handlers)."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signum)
                except ProcessLookupError:
                    pass
    return {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}


def _restore_signals(previous: dict) -> None:
    for s, handler in previous.items():
        signal.signal(s, handler)


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


def exit_code(ended: list[Ended]) -> int:
    """The first failure's exit code (1 for a process killed or timed out), 0 if all passed."""
    bad = sorted((e for e in ended if e.returncode != 0), key=lambda e: e.seconds)
    if not bad:
        return 0
    code = bad[0].returncode
    return code if code is not None and code > 0 else 1
