"""`python -m capibara_export server`: one host's process of the live server (server/run.py).

The same command on every host of the slice; process 0 listens. Parsed before JAX starts, as
`serve` is (cli_serve.prepare).
"""

from __future__ import annotations

from pathlib import Path

from .cli_args import add_trust_args, trust_policy
from .cli_serve import add_runtime_args, runtime_from


def add_parser(sub) -> None:
    s = sub.add_parser("server", help="serve a bundle's sharded programs to live traffic across the slice: KServe v2 "
                                      "HTTP/gRPC and TF Serving REST on process 0, dynamic batching, every host in "
                                      "lockstep (one process per host)")
    s.add_argument("bundle")
    s.add_argument("--host", default="0.0.0.0", help="address process 0 listens on (default 0.0.0.0)")
    s.add_argument("--http-port", type=int, default=8000,
                   help="KServe v2 REST, TF Serving REST and /metrics (default 8000; 0: any free port)")
    s.add_argument("--grpc-port", type=int, default=8001, help="KServe v2 gRPC (default 8001; 0: any free port)")
    s.add_argument("--no-grpc", action="store_true", help="serve HTTP only")
    s.add_argument("--max-queue-delay-ms", type=float, default=5.0, metavar="MS",
                   help="how long a batch waits for more requests once one is queued (Triton's "
                        "max_queue_delay_microseconds; default 5)")
    s.add_argument("--max-queue", type=int, default=256, metavar="N",
                   help="requests waiting for a batch; beyond it a request is refused with 503 / RESOURCE_EXHAUSTED "
                        "(default 256)")
    s.add_argument("--timeout", type=float, default=60.0, metavar="S",
                   help="a request's longest time from receipt to answer; a client's own deadline may shorten it "
                        "(default 60)")
    s.add_argument("--max-body-mb", type=float, default=64.0, metavar="MB",
                   help="largest HTTP body or gRPC message (default 64)")
    s.add_argument("--max-pixels", type=int, metavar="N",
                   help="caption_text: refuse images whose header says more pixels (default 100 MP, as analyze)")
    s.add_argument("--lockstep", choices=("collective", "kv"), default="collective",
                   help="how process 0 tells every process each step: a broadcast over the slice's collectives "
                        "(default) or JAX's key-value store (docs/server.md compares them)")
    s.add_argument("--measure-ceiling", type=int, default=0, metavar="STEPS",
                   help="before ready, run each model's largest compiled batch STEPS times back to back and report "
                        "rows/s (log and /metrics): what the slice does with no server in between (default 0: off)")
    s.add_argument("--precision", help="the precision to serve, where the bundle has an entry in several")
    s.add_argument("--no-executables", action="store_true",
                   help="always run the sharded jax.export program, even where the serialized executable could load")
    add_runtime_args(s)
    add_trust_args(s, executables=True)


def cmd_server(args) -> int:
    policy = trust_policy(args)
    from .server.run import ServerOptions, SliceServer

    options = ServerOptions(host=args.host, http_port=args.http_port, grpc_port=None if args.no_grpc else args.grpc_port,
                            max_queue=args.max_queue, max_queue_delay_ms=args.max_queue_delay_ms,
                            timeout_s=args.timeout, max_body_mb=args.max_body_mb,
                            use_executable=not args.no_executables, precision=args.precision,
                            max_pixels=args.max_pixels, lockstep=args.lockstep,
                            measure_ceiling=args.measure_ceiling)
    return SliceServer(Path(args.bundle), runtime_from(args), policy, options).run()
