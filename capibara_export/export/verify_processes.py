"""`verify --processes N`: the bundle's sharded programs across N local processes, laid out as
the manifest's hosts, against the single-process reference.

The reference is computed here (Verifier.reference: the model's own program on this machine);
the N processes are the `serve` command itself (launch.py), each simulating its host's devices
on CPU with gloo collectives, so what is checked is exactly what a serving team runs: the
multi-process join, the per-host parameter restore, the per-host input slices, the gather.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import jax
import numpy as np

from ..bundle_error import BundleError
from . import manifest as mf
from .arrays import as_declared, read_npz, write_npz
from .launch import failure, launch
from .loading import inspect_artifact
from .trust import TrustPolicy
from .verify import Row, Verifier, _compare

TIMEOUT_S = 600
_SHARE = re.compile(r"parameters restored on this host: sharded (\d+) of (\d+) bytes, replicated (\d+) bytes")
# one such line per process and entry (sharded_server.ShardedServer.open's note)
_LAP = re.compile(r"([^,]+?) (\d+\.\d+) s(?:,|$)")


def _trust_args(policy: TrustPolicy) -> list[str]:
    return ((["--trust-key", str(policy.trust_key)] if policy.trust_key else [])
            + (["--allow-unsigned-executables"] if policy.allow_unsigned_executables else []))


def devices_per_process(manifest: dict, processes: int) -> int:
    """The simulated devices each of `processes` local processes needs; refuses a count that is
    not the manifest's hosts (call it before any work: bad input is refused first)."""
    mesh = manifest["mesh"]
    hosts = mesh.get("hosts") or {}
    want, per = int(hosts.get("processes", 1)), int(hosts.get("devices_per_process", mesh["devices"]))
    if processes != want:
        raise BundleError(f"--processes {processes}: this bundle's mesh spans {want} process(es) x {per} device(s) "
                          f"(manifest mesh.hosts); use --processes {want}")
    return per


def across_processes(v: Verifier, processes: int, timeout_s: float = TIMEOUT_S) -> list[Row]:
    """Rows for every sharded program run across `processes` local processes; `v` is the
    Verifier of the single-process run (its bundle, trust policy and reference cache)."""
    per = devices_per_process(v.manifest, processes)
    policy = v.opened.policy
    label = f"{processes} processes x {per} cpu devices"
    rows, jobs = [], []
    for a in (a for a in v.manifest["artifacts"] if a["kind"] == "jax.export-sharded"):
        problem = mf.check_hash(v.bundle, a) or inspect_artifact(v.opened, a)
        if problem:
            rows.append(Row(a["path"], f"across {label}", None, None, "FAIL", problem))
        elif "cpu" not in a.get("platforms", []):
            rows.append(Row(a["path"], f"across {label}", None, None, "not runnable here",
                            f"lowered for {', '.join(a.get('platforms', []))} only (an export made before sharded "
                            "programs were lowered for cpu too): re-export to check it across processes"))
        else:
            jobs.append(a)
    if not jobs:
        return rows
    with tempfile.TemporaryDirectory(prefix="capibara-verify-") as tmp:
        tmp = Path(tmp)
        serve_args = [str(v.bundle)]
        for i, a in enumerate(jobs):
            inputs, _ = v.reference(a["entry"], a["precision"], a["params"], a["batch"])
            names = [t["name"] for t in a["inputs"]]
            write_npz(tmp / f"{i}-in.npz", dict(zip(names, map(np.asarray, jax.tree.leaves(inputs)))))
            serve_args += ["--entry", a["entry"], "--precision", a["precision"], "--inputs", tmp / f"{i}-in.npz",
                           "--out", tmp / f"{i}-out.npz"]
        ended = launch(serve_args + _trust_args(policy) + ["--no-executables", "--timings"], processes, per,
                       tmp / "logs", timeout_s=timeout_s)
        crashed = any(e.returncode not in (0, 2) for e in ended)   # 2: some entries refused, the rest ran
        problem = failure(ended)
        logs = [e.log.read_text(errors="replace") for e in ended]
        for i, a in enumerate(jobs):
            out = tmp / f"{i}-out.npz"
            refused = _refusal(logs[0], out)
            if refused or not out.is_file() or crashed:
                rows.append(Row(a["path"], f"across {label}", None, None, "FAIL",
                                refused or problem or "process 0 wrote no outputs"))
                continue
            inputs, reference = v.reference(a["entry"], a["precision"], a["params"], a["batch"])
            stored = read_npz(out)
            names = [t["name"] for t in a["outputs"]]
            got = {t["name"]: as_declared(stored[t["name"]], t["dtype"]) for t in a["outputs"] if t["name"] in stored}
            compared = _compare(a["path"], got, dict(zip(names, jax.tree.leaves(reference))),
                                a["precision"], v._ties_for(a, a["batch"]))
            note = "; ".join(filter(None, [_share_note(logs, _what(a)), _timings_note(logs, a)]))
            rows += [Row(r.artifact, f"{r.output} across {label}", r.max_abs_error, r.tolerance, r.result,
                         "; ".join(filter(None, [r.note, note]))) for r in compared]
    return rows


def _refusal(log: str, out: Path) -> str | None:
    """Process 0's one line for an entry it refused (cli_serve: `ENTRY (PRECISION) -> OUT: error: ...`)."""
    marker = f" -> {out}: error: "
    for line in log.splitlines():
        if marker in line:
            return line.split(marker, 1)[1].strip()
    return None


def _timings_note(logs: list[str], a: dict) -> str:
    """The slowest process's restore, first call and program seconds for this entry, and its
    open, join and exit (serve --timings)."""
    what = _what(a)
    per_process = []
    for log in logs:
        line = next((ln for ln in log.splitlines() if ": timings: " in ln), None)
        if line:
            per_process.append(dict((name.strip(), float(sec)) for name, sec in _LAP.findall(line.split(": timings: ", 1)[1])))
    if not per_process:
        return ""
    keys = [("open", "open"), ("join", "join"), (f"{what} restore", "restore"), (f"{what} first call", "first call"),
            (f"{what} program", "program"), ("exit", "exit")]
    parts = [f"{label} {max(p.get(k, 0.0) for p in per_process):.2f}" for k, label in keys
             if any(k in p for p in per_process)]
    return "slowest process, s: " + ", ".join(parts)


def _what(a: dict) -> str:
    return f"{a['entry']} ({a['precision']})"   # how serve names an entry in its lines


def _host_shares(logs: list[str], what: str) -> list[tuple[int, int, int]]:
    """Per process: (sharded bytes here, sharded bytes in all, replicated bytes) for the entry
    `what`, as each serve process reported it."""
    found = []
    for log in logs:
        line = next((ln for ln in log.splitlines() if f": {what}: parameters restored" in ln), "")
        m = _SHARE.search(line)
        if m:
            found.append(tuple(map(int, m.groups())))
    return found


def _share_note(logs: list[str], what: str) -> str:
    mine = _host_shares(logs, what)
    if not mine:
        return ""
    here, total, replicated = max(mine)
    if not total:
        return f"each process restored all {replicated} parameter bytes (the plan replicates them)"
    return (f"each process restored at most {here} of {total} sharded parameter bytes (1/{total / here:.1f}) "
            f"and {replicated} replicated bytes")
