"""`python -m capibara_export serve`: one host's process of a bundle's slice.

The same command on every host, each with its own --process-id; process 0 writes the
outputs. Parsed before JAX starts: `--cpu-devices` must configure JAX before any backend.
"""

from __future__ import annotations

import sys
from pathlib import Path


def add_parser(sub, add_trust_args) -> None:
    s = sub.add_parser("serve", help="run a bundle's selected sharded programs on this host's share of the slice "
                                     "(one process per host)")
    s.add_argument("bundle")
    s.add_argument("--entry", action="append", required=True,
                   help="entry to run (repeat, with one --inputs and --out each, to run several in one start-up)")
    s.add_argument("--inputs", action="append", required=True, type=Path,
                   help=".npz of the entry's inputs by name (the manifest's inputs; the whole batch, every host "
                        "passes the same file and places only its own slice)")
    s.add_argument("--out", action="append", required=True, type=Path,
                   help=".npz of the outputs (written by process 0)")
    s.add_argument("--precision", help="when the bundle has the entry in several precisions")
    s.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address (every process passes the same)")
    s.add_argument("--num-processes", type=int, default=1, help="processes in the slice: one per host")
    s.add_argument("--process-id", type=int, default=0, help="this host's process, 0..N-1")
    s.add_argument("--cpu-devices", type=int, metavar="K",
                   help="simulate this host's devices as K CPU devices with gloo collectives (tests, smoke tests)")
    s.add_argument("--connect-timeout", type=int, default=60, metavar="S",
                   help="seconds to wait for the coordinator and for every process to join (default 60)")
    s.add_argument("--heartbeat-timeout", type=int, default=30, metavar="S",
                   help="seconds without a heartbeat after which a process counts as lost and every other "
                        "process aborts (default 30)")
    s.add_argument("--no-executables", action="store_true",
                   help="always run the sharded jax.export program, even where the serialized executable could load")
    add_trust_args(s, executables=True)


def prepare(args) -> None:
    """Process environment before JAX starts: simulated CPU devices, or the runtime's own platform
    (never libtpu's single-host defaults, which would hide the other hosts of a real slice)."""
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.cpu_devices:
        os.environ["JAX_PLATFORMS"] = "cpu"


def cmd_serve(args, policy) -> int:
    from .export.loading import open_bundle
    from .export.manifest import BundleError
    from .export.multihost import HostRuntime, check_against_manifest, join

    if not len(args.entry) == len(args.inputs) == len(args.out):
        raise BundleError(f"{len(args.entry)} --entry, {len(args.inputs)} --inputs and {len(args.out)} --out: "
                          "give one --inputs and one --out per --entry")
    runtime = HostRuntime(args.coordinator, args.num_processes, args.process_id, args.cpu_devices,
                          args.connect_timeout, args.heartbeat_timeout)
    opened = open_bundle(Path(args.bundle), policy)   # once: signature, schema, paths
    manifest = opened.manifest
    check_against_manifest(runtime, manifest)
    from .export.sharded_server import ShardedServer, read_inputs, sharded_artifact

    for entry in args.entry:                              # before joining: refused alone, in one line
        sharded_artifact(manifest, entry, args.precision)
    inputs = [read_inputs(p) for p in args.inputs]
    join(runtime)
    import jax

    def say(text: str) -> None:
        print(f"capibara-export serve: {runtime.describe()}: {text}", file=sys.stderr, flush=True)

    say(f"joined, {jax.local_device_count()} local {jax.default_backend()} device(s) of {jax.device_count()}")
    for entry, given, out in zip(args.entry, inputs, args.out):
        server = ShardedServer.open(opened, entry, args.precision, use_executable=not args.no_executables)
        for note in server.notes:
            say(note)
        outputs = server(given)
        if jax.process_index() == 0:
            _write_npz(out, outputs)
        say(f"{entry}: ran {server.program_path} ({server.program_kind})"
            + (f", outputs in {out}" if jax.process_index() == 0 else ""))
    return 0


def _write_npz(path: Path, arrays: dict) -> None:
    """Whole or not at all: a temporary file beside it, renamed."""
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    tmp.replace(path)
