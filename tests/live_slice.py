"""A live server's processes on this machine, as a slice's hosts, for the server's tests and its
load benchmark: the same `python -m capibara_export server` command per process, each with its
own --process-id, on 127.0.0.1 and free ports, every wait bounded, and only these processes
ever signalled."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from capibara_export.export import manifest as mf
from capibara_export.export import params as params_io
from capibara_export.export import stablehlo
from capibara_export.export.launch import free_port


def build_server_bundle(out: Path, *, checkpoint: Path | None = None, entries: str = "encode_image,caption,score",
                        max_new_tokens: int = 4, prompt_len: int = 3, portable: str | None = None) -> Path:
    """The tiny model on a 2-host target (v4 2x2x2 megacore: 2 processes x 4 devices), its served
    entries compiled at batch 8 and 16, caption with a prompt of `prompt_len` tokens and its
    mask; random weights unless a Hugging Face `checkpoint` folder is given."""
    weights = ["--checkpoint", str(checkpoint)] if checkpoint else ["--model", "tiny", "--random-weights"]
    result = subprocess.run([sys.executable, "-m", "capibara_export", "build", *weights, "--topology", "v4:2x2x2",
                             "--chip-config", "megacore", "--mesh", "2x4", "--export", "--entries", entries,
                             "--plans", "dp", "--precisions", "fp32", "--batch", "8,16", "--derive-rounds", "0",
                             "--max-new-tokens", str(max_new_tokens), "--prompt-len", str(prompt_len),
                             "--no-saved-model", "--export-entries", portable or entries, "--out", str(out), "--quiet"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (folder,) = [p for p in out.iterdir() if not p.name.startswith(".")]
    return folder / "bundle"


@dataclass
class LiveSlice:
    bundle: Path
    logs: Path
    processes: int = 2
    extra: tuple[str, ...] = ()
    heartbeat_timeout_s: int = 30
    http_port: int = field(default_factory=free_port)
    grpc_port: int = field(default_factory=free_port)
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def http(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, ready_within_s: float = 180) -> LiveSlice:
        coordinator = f"127.0.0.1:{free_port()}"
        self.logs.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LWS_", "TPU_WORKER"))}
        for pid in range(self.processes):
            log = open(self.logs / f"process-{pid}.log", "w")
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "capibara_export", "server", str(self.bundle), "--host", "127.0.0.1",
                 "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port), "--coordinator", coordinator,
                 "--num-processes", str(self.processes), "--process-id", str(pid), "--cpu-devices", "4",
                 "--heartbeat-timeout", str(self.heartbeat_timeout_s), "--join-timeout", "120",
                 "--allow-unsigned-executables", *self.extra],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True))
        deadline = time.monotonic() + ready_within_s
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                raise AssertionError(f"a server process ended during start-up:\n{self.output()}")
            if self.get("/v2/health/ready")[0] == 200:
                return self
            time.sleep(0.5)
        raise AssertionError(f"not ready within {ready_within_s} s:\n{self.output()}")

    def get(self, path: str, timeout: float = 5) -> tuple[int, dict | str | None]:
        try:
            with urllib.request.urlopen(f"http://{self.http}{path}", timeout=timeout) as r:
                return r.status, _body(r.read(), r.headers.get("Content-Type", ""))
        except urllib.error.HTTPError as err:
            return err.code, _body(err.read(), err.headers.get("Content-Type", ""))
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return 0, None

    def post(self, path: str, body: bytes, headers: dict | None = None, timeout: float = 60) -> tuple[int, dict | str]:
        request = urllib.request.Request(f"http://{self.http}{path}", body, headers or {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as r:
                return r.status, _body(r.read(), r.headers.get("Content-Type", ""))
        except urllib.error.HTTPError as err:
            return err.code, _body(err.read(), err.headers.get("Content-Type", ""))

    def signal(self, pid: int, sig: int) -> None:
        if self.procs[pid].poll() is None:
            self.procs[pid].send_signal(sig)

    def wait(self, within_s: float) -> list[int | None]:
        """Every process's exit code, None for one still running at the bound (then killed)."""
        deadline = time.monotonic() + within_s
        codes = []
        for p in self.procs:
            try:
                codes.append(p.wait(timeout=max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                codes.append(None)
        self.kill()
        return codes

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)   # its own session: only what this slice started
                except ProcessLookupError:
                    pass
                p.wait(timeout=10)

    def output(self) -> str:
        return "\n".join(f"--- process {i}\n" + (self.logs / f"process-{i}.log").read_text(errors="replace")[-3000:]
                         for i in range(len(self.procs)))


def _body(data: bytes, content_type: str):
    if "json" in content_type:
        return json.loads(data)
    return data.decode(errors="replace")


class Reference:
    """The bundle's portable (single-device, batch-polymorphic) program of an entry, here."""

    def __init__(self, bundle: Path):
        self.manifest = mf.read(bundle)
        self.bundle, self._cache = bundle, {}

    def __call__(self, entry: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import jax

        (a,) = [a for a in self.manifest["artifacts"] if a["kind"] == "jax.export" and a["entry"] == entry]
        if entry not in self._cache:
            self._cache[entry] = (stablehlo.load(self.bundle / a["path"]), params_io.restore(self.bundle / a["params"]))
        exported, params = self._cache[entry]
        out = exported.call(params, *[inputs[t["name"]] for t in a["inputs"]])
        return dict(zip([t["name"] for t in a["outputs"]], (np.asarray(x) for x in jax.tree.leaves(out))))
