"""`python -m capibara_export serve`: one host's process of a bundle's slice.

The same command on every host, each with its own --process-id; process 0 writes the
outputs. Parsed before JAX starts: `--cpu-devices` must configure JAX before any backend.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli_args import add_trust_args, trust_policy


def add_parser(sub) -> None:
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
    s.add_argument("--precision", action="append",
                   help="when the bundle has an entry in several precisions: once for every --entry, or once per "
                        "--entry in the same order")
    add_runtime_args(s)
    s.add_argument("--timings", action="store_true",
                   help="print where this process's time went: open, join, and per entry restore, first call "
                        "(compile and run), program (a second call), then the exit barrier")
    s.add_argument("--no-executables", action="store_true",
                   help="always run the sharded jax.export program, even where the serialized executable could load")
    add_trust_args(s, executables=True)


def add_launch_parser(sub) -> None:
    s = sub.add_parser("launch", help="start N local processes of a multi-host command (serve, server) as the "
                                      "slice's hosts on this machine, on simulated CPU devices")
    s.add_argument("processes", type=int, help="how many processes: the bundle's hosts (manifest mesh.hosts)")
    s.add_argument("--cpu-devices", type=int, metavar="K",
                   help="simulated devices per process (default: the bundle's devices per host)")
    s.add_argument("--logs", type=Path, help="folder for each process's log (default: a new temporary folder)")
    s.add_argument("--timeout", type=float, metavar="S", help="kill every process after S seconds (default: none)")
    s.add_argument("--heartbeat-timeout", type=_seconds, default=30, metavar="S",
                   help="passed to every process (default 30)")
    s.add_argument("--join-timeout", type=_seconds, default=60, metavar="S", help="passed to every process (default 60)")
    s.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND ...",
                   help="-- serve BUNDLE ... (or server BUNDLE ...): the command every host runs, without the "
                        "runtime flags, which launch adds")


def cmd_launch(args) -> int:
    import tempfile

    from .export.launch import LAUNCHABLE, exit_code, failure, launch
    from .export.manifest import BundleError, parse, read_bytes

    command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not command or command[0] not in LAUNCHABLE:
        raise BundleError(f"launch runs one of {', '.join(LAUNCHABLE)}: python -m capibara_export launch N -- serve "
                          "BUNDLE --entry E --inputs IN.npz --out OUT.npz" + (f" (not {command[0]!r}; verify "
                          "--processes N starts its own)" if command else ""))
    ours = sorted({a.split("=")[0] for a in command} & {"--coordinator", "--num-processes", "--process-id",
                                                         "--cpu-devices", "--heartbeat-timeout", "--join-timeout"})
    if ours:
        raise BundleError(f"{ours[0]} is set by launch for every process: leave it out of the command "
                          "(give --cpu-devices, --heartbeat-timeout or --join-timeout to launch itself)")
    if args.processes < 1:
        raise BundleError(f"launch {args.processes}: give a process count of 1 or more")
    per = args.cpu_devices
    if per is None:
        if len(command) < 2:
            raise BundleError(f"launch ... {command[0]}: name the bundle")
        manifest = parse(Path(command[1]), read_bytes(Path(command[1])))
        hosts = manifest["mesh"].get("hosts") or {}
        per = int(hosts.get("devices_per_process", manifest["mesh"]["devices"]))
    logs = args.logs or Path(tempfile.mkdtemp(prefix="capibara-launch-"))
    print(f"capibara-export launch: {args.processes} x `{command[0]}` on {per} cpu device(s) each; logs in {logs}",
          file=sys.stderr, flush=True)
    ended = launch(command[1:], args.processes, per, logs, timeout_s=args.timeout or float("inf"),
                   heartbeat_timeout_s=args.heartbeat_timeout, join_timeout_s=args.join_timeout,
                   command=command[0], echo=True)
    problem = failure(ended)
    if problem:
        print(f"capibara-export: error: {problem}", file=sys.stderr)
    return exit_code(ended)


def add_runtime_args(s) -> None:
    """Where this process stands in the slice, and the bounds on joining and on a lost peer:
    the same for `serve` and `server`."""
    s.add_argument("--coordinator", metavar="HOST:PORT",
                   help="process 0's address (every process passes the same; default: $LWS_LEADER_ADDRESS:8476 where "
                        "a Kubernetes LeaderWorkerSet sets it)")
    s.add_argument("--num-processes", type=int,
                   help="processes in the slice: one per host (default: $LWS_GROUP_SIZE, else 1)")
    s.add_argument("--process-id", type=int,
                   help="this host's process, 0..N-1 (default: $LWS_WORKER_INDEX or $TPU_WORKER_ID, else 0)")
    s.add_argument("--cpu-devices", type=int, metavar="K",
                   help="simulate this host's devices as K CPU devices with gloo collectives (tests, smoke tests)")
    s.add_argument("--join-timeout", "--connect-timeout", dest="join_timeout", type=_seconds, default=60,
                   metavar="S", help="seconds to wait for the coordinator and for every process to join; past it "
                                     "every process that came exits 1 naming the ones that did not (default 60)")
    s.add_argument("--heartbeat-timeout", type=_seconds, default=30, metavar="S",
                   help="seconds without a heartbeat after which a process counts as lost: every other process "
                        "exits 1 naming it (default 30)")


def _seconds(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of seconds") from None
    if not 1 <= value <= 86400:
        raise argparse.ArgumentTypeError(f"{value} s is outside 1..86400")
    return value


# what a Kubernetes LeaderWorkerSet sets on every pod of a group (multi-host TPU serving), and
# JAX's default coordinator port on Cloud TPU
LWS_COORDINATOR_PORT = 8476


def runtime_from(args, environ=None):
    """The slice from the flags; where a flag is not given, from a LeaderWorkerSet's variables
    (so one pod spec serves every host), else one process."""
    import os

    from .bundle_error import BundleError
    from .export.multihost import HostRuntime

    env = os.environ if environ is None else environ

    def number(name: str) -> int | None:
        text = env.get(name)
        if text is None:
            return None
        if not text.strip().isdigit():
            raise BundleError(f"${name}={text!r} is not a whole number: fix the pod spec, or pass the flag")
        return int(text)
    coordinator = args.coordinator
    if coordinator is None and env.get("LWS_LEADER_ADDRESS"):
        coordinator = f"{env['LWS_LEADER_ADDRESS']}:{LWS_COORDINATOR_PORT}"
    count = args.num_processes if args.num_processes is not None else number("LWS_GROUP_SIZE")
    pid = args.process_id
    if pid is None:
        pid = number("LWS_WORKER_INDEX")
        pid = number("TPU_WORKER_ID") if pid is None else pid
    return HostRuntime(coordinator, 1 if count is None else count, 0 if pid is None else pid, args.cpu_devices,
                       args.join_timeout, args.heartbeat_timeout)


def prepare(args) -> None:
    """Process environment before JAX starts: simulated CPU devices, or the runtime's own platform
    (never libtpu's single-host defaults, which would hide the other hosts of a real slice)."""
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.cpu_devices:
        os.environ["JAX_PLATFORMS"] = "cpu"


def _precisions(args) -> list[str | None]:
    given = args.precision or []
    if len(given) in (0, 1):
        return [given[0] if given else None] * len(args.entry)
    if len(given) != len(args.entry):
        from .bundle_error import BundleError

        raise BundleError(f"{len(args.entry)} --entry and {len(given)} --precision: give one --precision for all "
                          "entries, or one per --entry in the same order")
    return given


def cmd_serve(args) -> int:
    policy = trust_policy(args)
    """Each entry stands on its own: an entry refused for its inputs or its artifacts (the same
    refusal on every process, since every process reads the same files) is reported and the
    next entry still runs; the exit code is 2 if any was refused."""
    from .export.arrays import read_npz, write_npz
    from .bundle_error import BundleError
    from .export.multihost import check_against_manifest, join, leave
    from .export.loading import open_bundle

    if not len(args.entry) == len(args.inputs) == len(args.out):
        raise BundleError(f"{len(args.entry)} --entry, {len(args.inputs)} --inputs and {len(args.out)} --out: "
                          "give one --inputs and one --out per --entry")
    precisions = _precisions(args)
    runtime = runtime_from(args)
    clock = Stopwatch()
    opened = open_bundle(Path(args.bundle), policy)   # once: signature, schema, paths
    manifest = opened.manifest
    check_against_manifest(runtime, manifest)
    from .export.sharded_server import ShardedServer, sharded_artifact

    if len(args.entry) == 1:   # one entry: every refusal is the command's, before joining, in one line
        sharded_artifact(manifest, args.entry[0], precisions[0])
    inputs = [read_npz(p) for p in args.inputs]
    clock.lap("open")
    watchdog = join(runtime, opened.digest)
    clock.lap("join")
    import jax

    def say(text: str) -> None:
        print(f"capibara-export serve: {runtime.describe()}: {text}", file=sys.stderr, flush=True)

    say(f"joined, {jax.local_device_count()} local {jax.default_backend()} device(s) of {jax.device_count()}")
    refused = []
    for entry, precision, given, out in zip(args.entry, precisions, inputs, args.out):
        what = f"{entry}" + (f" ({precision})" if precision else "")
        try:
            server = ShardedServer.open(opened, entry, precision, use_executable=not args.no_executables)
            clock.lap(f"{what} restore")
            for note in server.notes:
                say(f"{what}: {note}")
            outputs = server(given)
            clock.lap(f"{what} first call")
            if args.timings:
                server(given)
                clock.lap(f"{what} program")
        except BundleError as err:
            if len(args.entry) == 1:
                raise
            refused.append(what)
            say(f"{what} -> {out}: error: {' '.join(str(err).split())}")
            continue
        if jax.process_index() == 0:
            write_npz(out, outputs)
        say(f"{what}: ran {server.program_path} ({server.program_kind})"
            + (f", outputs in {out}" if jax.process_index() == 0 else ""))
    leave(runtime, watchdog)
    clock.lap("exit")
    if args.timings:
        say("timings: " + clock.describe())
    if refused:
        raise BundleError(f"{len(refused)} of {len(args.entry)} entries refused ({', '.join(refused)}); "
                          "the others ran: see each entry's line above")
    return 0


class Stopwatch:
    """Named laps in order, for `serve --timings`."""

    def __init__(self):
        import time

        self._clock = time.perf_counter
        self._last = self._clock()
        self.laps: list[tuple[str, float]] = []

    def lap(self, name: str) -> None:
        now = self._clock()
        self.laps.append((name, now - self._last))
        self._last = now

    def describe(self) -> str:
        return ", ".join(f"{name} {seconds:.2f} s" for name, seconds in self.laps)
