"""`python -m capibara_export analyze`: captions, readings, cultural codes and text relations
for image files, through the semiotic module (a bundle, Hugging Face checkpoints or random
weights)."""

from __future__ import annotations

import json
import sys
import warnings

from .cli_args import count, trust_policy


def add_parser(sub) -> None:
    a = sub.add_parser("analyze", help="captions, readings, cultural codes and text relations for image files")
    a.add_argument("images", nargs="+", help="image files")
    a.add_argument("--checkpoint", action="append", default=[], metavar="DIR",
                   help="a Hugging Face BLIP folder; give a captioning and a retrieval folder for every capability")
    a.add_argument("--bundle", metavar="DIR", help="an exported bundle (with its processor/)")
    a.add_argument("--trust-key", metavar="PUB", help="with --bundle: require the bundle's signature by this key")
    a.add_argument("--random-weights", action="store_true", help="random weights: outputs are meaningless")
    a.add_argument("--model", default="tiny", help="preset for --random-weights (default tiny)")
    a.add_argument("--k", type=count(0), default=3, help="readings per image (0: captions only; default 3)")
    a.add_argument("--text", help="relate this text to each image (anchorage, relay or contradiction)")
    a.add_argument("--culture", action="store_true", help="zero-shot cultural and artistic codes")
    a.add_argument("--codes", metavar="TOML", help="your own codes catalogue (default: the shipped one)")
    a.add_argument("--precision", default=None, help="fp32 (default) or bf16")
    a.add_argument("--batch", type=count(), default=8, help="images per device batch (default 8)")
    a.add_argument("--max-pixels", type=count(), default=100_000_000,
                   help="refuse images larger than this many pixels before decoding (default 100000000)")
    a.add_argument("--workers", type=count(), default=2, help="decoding/preprocessing threads (default 2)")
    a.add_argument("--json", action="store_true", help="one JSON line per image, then one with the metrics")
    a.add_argument("--profile", metavar="DIR", help="write a jax.profiler trace here")


def cmd_analyze(args) -> int:
    policy = trust_policy(args)
    from rich.progress import Progress
    from rich.table import Table

    from .console import console, out
    from .semiotic import ImagePipeline, MnemosyneSemioModule, SemioticError, images, profile_usage
    from .semiotic.profiling import trace

    images.limits.max_pixels = args.max_pixels
    sources = [bool(args.checkpoint), bool(args.bundle), args.random_weights]
    if sum(sources) != 1:
        raise SemioticError("give exactly one of --checkpoint DIR (repeatable), --bundle DIR or --random-weights")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if args.bundle:
            module = MnemosyneSemioModule.from_bundle(args.bundle, args.precision, policy=policy)
        elif args.checkpoint:
            module = MnemosyneSemioModule.from_checkpoints(args.checkpoint, args.precision or "fp32")
        else:
            module = MnemosyneSemioModule.random(args.model, precision=args.precision or "fp32")
    for w in caught:
        console.print(f"[yellow]warning:[/] {w.message}")
    pipeline = ImagePipeline(module, workers=args.workers, batch_size=args.batch)
    with trace(args.profile), Progress(console=console, disable=args.json or not sys.stderr.isatty()) as bar:
        task = bar.add_task("analysing", total=len(args.images))
        results, stats = pipeline.run(args.images, k=args.k, text=args.text, culture=args.culture or bool(args.codes),
                                      progress=lambda r: bar.advance(task))
    metrics = {**module.metrics(), "pipeline": {"images_per_s": stats.images_per_s, "seconds": stats.seconds,
                                                "errors": stats.errors}, "usage": profile_usage()}
    if args.json:
        for r in results:
            print(json.dumps(r.to_dict(), default=float))
        print(json.dumps({"metrics": metrics}, default=float))
    else:
        table = Table(title="Images", title_justify="left")
        for col in ("image", "caption / error", "polysemy", "relation"):
            table.add_column(col, overflow="fold")
        for r in results:
            relation = f"{r.relation['verdict']} (match {r.relation['itm_prob']:.2f})" if r.relation else ""
            poly = r.interpretation.get("polysemy_index") if r.interpretation else None
            table.add_row(r.source, r.caption or f"[red]{r.error}[/]", "" if poly is None else f"{poly:.3f}", relation)
        out.print(table)
        out.print(f"{stats.images} images in {stats.seconds:.2f}s ({stats.images_per_s:.1f} images/s), "
                  f"{stats.errors} error(s); embedding cache hit rate "
                  f"{metrics['cache']['embeddings']['hit_rate']:.0%}")
    return 0 if stats.images else 1
