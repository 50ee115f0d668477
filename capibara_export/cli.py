"""Command line: `python -m capibara_export {build,plans,...}`.

Arguments are parsed before JAX is imported, so the process environment (platforms,
simulated CPU devices, libtpu's variables) is set for the chosen target first. Every
expected failure is one line on stderr naming the problem and the fix, exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import environment

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _csv(kind=str):
    def parse(text: str):
        items = [x.strip() for x in text.split(",") if x.strip()]
        try:
            return tuple(kind(x) for x in items)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {kind.__name__}") from None
    return parse


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="base", help="model preset: tiny, small, base, large (default base)")
    p.add_argument("--checkpoint", metavar="DIR", help="a local Hugging Face BLIP folder; overrides --model")


def _add_mesh_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mesh", default="4x8", help="DATAxMODEL mesh shape (default 4x8)")
    p.add_argument("--target", default="tpu-v4-32",
                   help="tpu-v4-32 (default), tpu-v4-64, tpu-v5e-32, cpu (simulated devices) or local")
    p.add_argument("--plan-file", action="append", default=[], metavar="TOML",
                   help="extra sharding plans (same form as sharding/plans.toml); repeatable")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m capibara_export",
                                  description="Compile, analyse, select and export the semiotic model for TPU slices.")
    sub = top.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="compile every (entry × plan × precision × batch) unit for a target and mesh")
    _add_mesh_args(b)
    _add_model_args(b)
    b.add_argument("--entries", type=_csv(), help="comma list (default: encode_image,caption,decode_step,score; "
                                                  "train_step on request)")
    b.add_argument("--plans", type=_csv(), help="comma list of plan names (default: every plan)")
    b.add_argument("--precisions", type=_csv(), help="comma list (default fp32,bf16-mixed,bf16; also int8-weights)")
    b.add_argument("--batch", type=_csv(int), help="comma list of batch sizes (default 32)")
    b.add_argument("--max-new-tokens", type=int, default=20, help="caption length (default 20)")
    b.add_argument("--prompt-len", type=int, default=1, help="caption prompt length in tokens (default 1: [BOS])")
    b.add_argument("--text-len", type=int, default=32, help="padded text length for score/train_step (default 32)")
    b.add_argument("--remat", default="none", choices=("none", "full", "dots-saveable"),
                   help="train_step rematerialisation policy (default none)")
    b.add_argument("--out", default="artifacts", help="output folder (default artifacts/)")
    b.add_argument("--name", help="build folder name (default MODEL-TARGET-MESH)")
    b.add_argument("--no-cache", action="store_true", help="ignore and do not write the result cache")
    b.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("plans", help="list sharding plans and whether each is valid for a model, mesh and batch")
    _add_mesh_args(p)
    _add_model_args(p)
    p.add_argument("--batch", type=int, default=32, help="batch size to check (default 32)")

    r = sub.add_parser("report", help="recompute analysis, selection and report.html for a build folder")
    r.add_argument("build_dir", help="a folder written by `build`, e.g. artifacts/base-tpu-v4-32-4x8")
    return top


def _cpu_devices(args) -> int | None:
    if getattr(args, "target", None) != "cpu":
        return None
    from .targets import parse_mesh

    rows, cols = parse_mesh(args.mesh)
    return rows * cols


def cmd_build(args) -> int:
    from rich.markdown import Markdown

    from .build import BuildRequest, run_build
    from .console import build_progress, console, out, reasons_table, records_table
    from .derive import derive
    from .programs import SERVING_ENTRIES, ProgramOptions
    from .targets import parse_mesh

    request = BuildRequest(
        target=args.target, mesh=parse_mesh(args.mesh), model=args.model, checkpoint=args.checkpoint,
        entries=args.entries or SERVING_ENTRIES, plans=args.plans or (), plan_files=tuple(args.plan_file),
        precisions=args.precisions or ("fp32", "bf16-mixed", "bf16"), batches=args.batch or (32,),
        options=ProgramOptions(max_new_tokens=args.max_new_tokens, prompt_len=args.prompt_len,
                               text_len=args.text_len, remat=args.remat),
        out=Path(args.out), use_cache=not args.no_cache, name=args.name)
    summary = {}

    def finish(staging, result):
        console.print("analysing, selecting plans and writing the report ...")
        summary["text"] = derive(staging)[2]

    with build_progress(args.quiet) as progress:
        result = run_build(request, progress=progress, finish=finish)
    counts = result.counts()
    out.print(records_table(result.records, f"Build {result.folder} ({result.hardware.name}, "
                                            f"mesh {args.mesh})"))
    why = reasons_table(result.records)
    if why is not None:
        out.print(why)
    out.print(Markdown(summary["text"]))
    console.print(f"{len(result.records)} units in {result.seconds:.1f}s: "
                  + ", ".join(f"{counts.get(s, 0)} {s}" for s in ("ok", "invalid", "does-not-fit", "compile-error"))
                  + f"; {counts['cached']} from cache. Report: {result.folder / 'report.html'}")
    return 0


def cmd_report(args) -> int:
    from rich.markdown import Markdown

    from .console import out
    from .derive import derive

    folder = Path(args.build_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: build folder not found; pass the folder `build` printed")
    _, _, summary = derive(folder)
    out.print(Markdown(summary))
    out.print(f"Report: {folder / 'report.html'}")
    return 0


def cmd_plans(args) -> int:
    from rich.table import Table

    from model.state import abstract_params, logical_names
    from sharding.plans import load_plans
    from sharding.validity import check

    from .build import BuildRequest, model_config
    from .console import out
    from .targets import parse_mesh

    rows, cols = parse_mesh(args.mesh)
    cfg = model_config(BuildRequest(model=args.model, checkpoint=args.checkpoint))
    sizes = {**cfg.axis_sizes(), "batch": {args.batch}}
    table = Table(title=f"Plans for {cfg.name} on a {rows}x{cols} mesh at batch {args.batch}", title_justify="left")
    for col in ("plan", "valid", "description / reason"):
        table.add_column(col, overflow="fold")
    for plan in load_plans(args.plan_file).values():
        validity = check(plan, logical_names(cfg), abstract_params(cfg), sizes, {"data": rows, "model": cols})
        table.add_row(plan.name, "[green]yes[/]" if validity.ok else "[yellow]no[/]",
                      plan.description if validity.ok else validity.reason)
    out.print(table)
    return 0


COMMANDS = {"build": cmd_build, "plans": cmd_plans, "report": cmd_report}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from .targets import TargetError  # no JAX import yet

    try:
        environment.prepare(getattr(args, "target", None), _cpu_devices(args))
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("capibara-export: interrupted; finished units are cached, run the same command again to resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except TargetError as err:
        print(f"capibara-export: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as err:
        from .errors import USER_ERRORS

        if isinstance(err, USER_ERRORS):
            print(f"capibara-export: error: {err}", file=sys.stderr)
            return EXIT_USAGE
        raise
