"""Command line: `python -m capibara_export {build,plans,...}`.

Arguments are parsed before JAX is imported, so the process environment (platforms,
simulated CPU devices, libtpu's variables) is set for the chosen target first. Every
expected failure is one line on stderr naming the problem and the fix, exit code 2.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from . import cli_analyze, cli_bench_report, cli_serve, cli_server, environment
from .cli_args import add_trust_args, count, csv_of, jobs_arg, path_arg, trust_policy
from .environment import DEFAULT_TARGET

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model preset: BLIP's tiny, small, base, large (default base), GPT-2's, or a "
                                   "--model-module's (default: its first)")
    p.add_argument("--checkpoint", metavar="DIR", help="a local Hugging Face checkpoint folder; overrides --model")
    p.add_argument("--model-module", metavar="PKG.MODULE:ATTR",
                   help="a model of your own: ATTR of an importable module, a modelapi.family.ModelFamily "
                        "(docs/models.md); --model then names one of its presets (default: its first)")


def model_preset(args) -> str:
    """--model, else BLIP's base, or a --model-module's first preset."""
    if args.model:
        return args.model
    if args.model_module:
        from . import families
        return next(iter(families.load_module(args.model_module).presets))
    return "base"


def _add_mesh_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mesh", default="4x8", help="DATAxMODEL mesh shape (default 4x8)")
    p.add_argument("--target", default=DEFAULT_TARGET,
                   help="a named slice as Cloud TPU names it: tpu-v4-8 .. tpu-v4-4096 (v4-N: N/2 chips, one megacore "
                        "device each, as a default runtime exposes them; tpu-v4-64, 32 chips, is the default), "
                        "tpu-v5e-4 .. tpu-v5e-256; cpu (simulated devices); local; or any v4/v5e topology libtpu "
                        "knows: v4:4x4x4/megacore (64 chips), v4:2x2x4 (32 TensorCores as devices), v5e:16x16, ...")
    p.add_argument("--topology", metavar="NAME",
                   help="a libtpu topology instead of --target, e.g. v4:4x4x8 (with --chip-config megacore for one "
                        "device per chip) or v5e:16x16")
    p.add_argument("--chip-config", choices=("default", "megacore"), default="default",
                   help="with --topology: megacore (one device per v4 chip, what a default runtime exposes) or "
                        "default (one device per TensorCore)")
    p.add_argument("--slices", type=count(), default=1,
                   help="S identical TPU slices joined by the data-centre network: the mesh gets a `dcn` axis of "
                        "size S in front of DATAxMODEL (one slice's mesh); plans that do not name dcn put the batch "
                        "on it (default 1)")
    p.add_argument("--plan-file", action="append", default=[], metavar="TOML",
                   help="extra sharding plans (same form as sharding/plans.toml); repeatable")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m capibara_export",
                                  description="Compile, analyse, select and export the semiotic model for TPU slices.")
    sub = top.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="compile every (entry × plan × precision × batch) unit for a target and mesh")
    _add_mesh_args(b)
    _add_model_args(b)
    b.add_argument("--entries", type=csv_of(), help="comma list (default: encode_image,caption,decode_step,score; "
                                                  "train_step on request)")
    b.add_argument("--plans", type=csv_of(), help="comma list of plan names (default: every plan)")
    b.add_argument("--precisions", type=csv_of(), help="comma list (default fp32,bf16-mixed,bf16; also int8-weights)")
    b.add_argument("--batch", type=csv_of(count()), help="comma list of batch sizes (default 32)")
    b.add_argument("--max-new-tokens", type=count(), default=20, help="caption length (default 20)")
    b.add_argument("--prompt-len", type=count(), default=1, help="caption prompt length in tokens (default 1: [BOS])")
    b.add_argument("--text-len", type=count(), default=32, help="padded text length for score/train_step (default 32)")
    b.add_argument("--remat", default="none", choices=("none", "full", "dots-saveable"),
                   help="train_step rematerialisation policy (default none)")
    b.add_argument("--out", default="artifacts", help="output folder (default artifacts/)")
    b.add_argument("--name", help="build folder name (default MODEL-TARGET-MESH)")
    b.add_argument("--no-cache", action="store_true", help="ignore and do not write the result cache")
    b.add_argument("--kernel-layout", default="auto", choices=("auto", "in-out", "out-in"),
                   help="how the text towers' dense kernels are stored (default auto: out-in on a GPU, where "
                        "batch-1 decoding is 1.5x faster, in-out on a TPU or CPU; docs/performance.md)")
    b.add_argument("--layer-storage", default="auto", choices=("auto", "stacked", "per-layer"),
                   help="how the text towers' layers are stored (default auto: per-layer on a CPU, where XLA "
                        "would copy each stacked layer's weights before every dot, stacked on a TPU or GPU; "
                        "docs/performance.md)")
    b.add_argument("--derive-rounds", type=count(0), default=1,
                   help="rounds of plans proposed by the hotspots (each tower on the plan its figures favour), "
                        "compiled as extra units of this build (default 1; 0: only the given plans)")
    b.add_argument("--derive-budget", type=count(0), default=4,
                   help="at most this many derived units over all rounds (default 4)")
    b.add_argument("--jobs", type=jobs_arg, default=None, metavar="N|auto",
                   help="worker processes that compile units (default auto: the core count for TPU targets when "
                        "at least 4 units per worker are to be compiled, else 1: compile in this process)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_export_args(b, standalone=False)

    p = sub.add_parser("plans", help="list sharding plans and whether each is valid for a model, mesh and batch")
    _add_mesh_args(p)
    _add_model_args(p)
    p.add_argument("--batch", type=count(), default=32, help="batch size to check (default 32)")

    r = sub.add_parser("report", help="recompute analysis, selection and report.html for a build folder")
    r.add_argument("build_dir", help="a folder written by `build`, e.g. artifacts/base-tpu-v4-64-4x8")

    e = sub.add_parser("export", help="write the serving bundle of an existing build folder")
    e.add_argument("build_dir", help="a folder written by `build`")
    _add_export_args(e, standalone=True)

    v = sub.add_parser("verify", help="check a bundle's hashes and that every runnable artifact reproduces the model")
    v.add_argument("bundle", help="a bundle folder, e.g. artifacts/base-tpu-v4-64-4x8/bundle")
    v.add_argument("--json", action="store_true", help="print the equivalence matrix as JSON lines")
    v.add_argument("--processes", type=count(1, 4096), metavar="N",
                   help="also run the sharded programs across N local processes laid out as the manifest's hosts "
                        "(simulated CPU devices, gloo) and compare them with the single-process reference")
    add_trust_args(v, executables=True)
    cli_serve.add_parser(sub)
    cli_server.add_parser(sub)
    cli_serve.add_launch_parser(sub)

    i = sub.add_parser("inspect", help="what a bundle holds, for whom, and until when it is valid")
    i.add_argument("bundle")
    add_trust_args(i, executables=False)

    k = sub.add_parser("keygen", help="make an ed25519 key pair for signing bundles (export --sign-key)")
    k.add_argument("folder", help="where to write signing.pem (private, mode 600) and signing.pub.pem")

    cli_analyze.add_parser(sub)

    cli_bench_report.add_parser(sub)
    return top


def _add_export_args(p: argparse.ArgumentParser, standalone: bool) -> None:
    if not standalone:
        p.add_argument("--export", action="store_true", help="also write the serving bundle (BUILD/bundle)")
    else:
        p.add_argument("--checkpoint", metavar="DIR", help="weights to export (a Hugging Face BLIP folder)")
    p.add_argument("--random-weights", action="store_true",
                   help="export random weights (outputs are meaningless; for testing the serving path)")
    p.add_argument("--seed", type=count(0, 2 ** 32 - 1), default=0,
                   help="seed for --random-weights, 0..2^32-1 (default 0)")
    p.add_argument("--export-precisions", type=csv_of(), help="precisions to export (default: the build's)")
    p.add_argument("--export-entries", type=csv_of(),
                   help="portable programs and SavedModel signatures to export (default: all the towers allow; "
                        "the semiotic module needs caption_image, readings, score_image, image_features, "
                        "text_features)")
    p.add_argument("--no-saved-model", action="store_true", help="skip the TF SavedModel (the slowest artifact)")
    p.add_argument("--sign-key", metavar="PEM", type=path_arg, help="sign the manifest with this ed25519 private key "
                                                     "(make one with `keygen`)")


def _environment(args) -> tuple[str | None, int | None]:
    """(target, simulated CPU devices) this command needs, known before JAX starts.

    verify and export read them from the bundle manifest or build.json: a CPU bundle's
    executables need its mesh, and a TPU bundle's parameters are restored onto its plan's
    shardings over as many simulated CPU devices."""
    import json

    if args.command in ("verify", "export"):
        try:
            if args.command == "verify":  # read as loading.py reads it: a regular file of bounded size
                from .export.manifest import BundleError, read_bytes

                try:
                    raw = read_bytes(Path(args.bundle))
                except BundleError:
                    return None, None  # the command itself reports it
            else:
                raw = (Path(args.build_dir) / "build.json").read_bytes()
            data = json.loads(raw)
            shape = data["mesh"]["shape"]
            target = data["target"]["name"]
            return target, math.prod(int(n) for n in shape.values())
        except (OSError, ValueError, KeyError, TypeError):
            return None, None  # the command itself reports the missing or broken file
    if getattr(args, "target", None) != "cpu":
        return getattr(args, "target", None), None
    from .matrix.targets import parse_mesh

    rows, cols = parse_mesh(args.mesh)
    return args.target, rows * cols


def cmd_build(args) -> int:
    from rich.markdown import Markdown

    from .matrix.derive import derive
    from .matrix.driver import BuildRequest, run_build
    from .matrix.driver import model_config as build_config
    from .matrix.programs import ProgramOptions
    from .matrix.targets import parse_mesh
    from .console import build_progress, console, out, reasons_table, records_table

    request = BuildRequest(
        target=args.target, mesh=parse_mesh(args.mesh), model=model_preset(args), checkpoint=args.checkpoint,
        entries=tuple(args.entries or ()), plans=args.plans or (), plan_files=tuple(args.plan_file),
        precisions=tuple(args.precisions or ()), batches=args.batch or (32,),
        options=ProgramOptions(max_new_tokens=args.max_new_tokens, prompt_len=args.prompt_len,
                               text_len=args.text_len, remat=args.remat),
        out=Path(args.out), use_cache=not args.no_cache, name=args.name, kernel_layout=args.kernel_layout,
        layer_storage=args.layer_storage, derive_rounds=args.derive_rounds, derive_budget=args.derive_budget,
        model_module=args.model_module).resolved()
    summary = {}

    weights = None
    if args.export:  # fail on missing weights before compiling anything
        from .export.bundle import float_params

        weights = float_params(build_config(request), args.checkpoint, args.seed if args.random_weights else None)

    def finish(staging, result):
        console.print("analysing, selecting plans and writing the report ...")
        _, selection, summary["text"] = derive(staging, name=result.folder.name)
        summary["selection"] = selection["selections"]
        if weights is not None:
            summary["bundle"] = write_bundle(staging, result.mesh, weights, args, console, final_folder=result.folder,
                                             compiled=result.compiled, kept=result.kept)

    with build_progress(args.quiet) as progress:
        result = run_build(request, progress=progress, finish=finish, jobs=args.jobs)
    counts = result.counts()
    slices = dict(result.mesh.shape).get("dcn", 1)
    where = f"mesh {args.mesh}" + (f" in each of {slices} slices" if slices > 1 else "")
    out.print(records_table(result.records, f"Build {result.folder} ({result.hardware.name}, {where})"))
    why = reasons_table(result.records)
    if why is not None:
        out.print(why)
    out.print(Markdown(summary["text"]))
    console.print(f"{len(result.records)} units in {result.seconds:.1f}s: "
                  + ", ".join(f"{counts.get(s, 0)} {s}" for s in ("ok", "invalid", "does-not-fit", "compile-error"))
                  + f"; {counts['cached']} from cache. Report: {result.folder / 'report.html'}")
    if "bundle" in summary:
        print_bundle_next_steps(summary["bundle"], args.sign_key, console)
    if not any(s.get("plan") for s in summary["selection"]):
        print(f"capibara-export: error: the build selected no plan for any entry (every unit was invalid, did not "
              f"fit or was refused: {result.folder / 'report.html'} says why); choose other --plans, --precisions, "
              "--batch or --mesh", file=sys.stderr)
        return 1
    return 0


def write_bundle(folder: Path, mesh, weights: tuple[dict, str], args, console, final_folder: Path | None = None,
                 compiled: dict | None = None, kept: dict | None = None) -> Path:
    """The bundle of a build folder (export/from_build.py) with the export options of `args`;
    returns where it will be once the folder is in place (`final_folder`, default `folder`)."""
    from .export.from_build import export_build_folder

    export_build_folder(folder, mesh, weights, precisions=args.export_precisions, saved_model=not args.no_saved_model,
                        checkpoint=args.checkpoint, entries=args.export_entries, sign_key=args.sign_key,
                        compiled=compiled, kept=kept, progress=lambda what: console.print(f"exporting {what} ..."))
    return Path(final_folder or folder) / "bundle"


def print_bundle_next_steps(bundle: Path, sign_key: str | None, console) -> None:
    """Where the bundle is and the verify command for it, on one unwrapped line to copy."""
    if sign_key:
        key = Path(sign_key)
        public = key.with_name("signing.pub.pem") if key.name == "signing.pem" else "PUB.pem"
        trust = f" --trust-key {public}"
    else:
        trust = " --allow-unsigned-executables"
    console.print(f"bundle: {bundle}")
    console.print(f"verify it with: python -m capibara_export verify {bundle}{trust}", soft_wrap=True)


def cmd_export(args) -> int:
    from .matrix.folder import build_parts, read_build
    from .matrix.targets import get_target, make_mesh
    from .console import console
    from .export.bundle import float_params

    folder = Path(args.build_dir)
    if not (folder / "build.json").is_file() or not (folder / "selection.json").is_file():
        raise FileNotFoundError(f"{folder}: not a build folder with a selection; run `build` first")
    build = read_build(folder)
    cfg = build_parts(build, folder)[0]
    weights = float_params(cfg, args.checkpoint, args.seed if args.random_weights else None)
    shape = build["mesh"]["shape"]
    mesh = make_mesh(get_target(build["request"]["target"]), (shape["data"], shape["model"]))
    print_bundle_next_steps(write_bundle(folder, mesh, weights, args, console), args.sign_key, console)
    return 0


def cmd_verify(args) -> int:
    import json as _json

    from rich.table import Table

    from .console import out
    from .export.verify import Verifier
    from .export.verify_processes import across_processes, devices_per_process

    verifier = Verifier(Path(args.bundle), trust_policy(args))
    if args.processes:
        devices_per_process(verifier.manifest, args.processes)   # a wrong N is refused before any work
    rows = verifier.run()
    if args.processes:
        rows += across_processes(verifier, args.processes)
    if args.json:
        for r in rows:
            print(_json.dumps(r.__dict__))
    else:
        table = Table(title=f"Equivalence matrix: {args.bundle}", title_justify="left")
        for col in ("artifact", "output", "max abs error", "tolerance", "result", "note"):
            table.add_column(col, overflow="fold")
        style = {"pass": "green", "FAIL": "red", "error": "red", "not runnable here": "yellow",
                 "not loaded (unsigned)": "yellow"}
        for r in rows:
            table.add_row(r.artifact, r.output, "" if r.max_abs_error is None else f"{r.max_abs_error:.3g}",
                          "" if r.tolerance is None else f"{r.tolerance:.3g}", f"[{style[r.result]}]{r.result}[/]",
                          r.note)
        out.print(table)
    failed = [r for r in rows if r.failed]
    counts = {k: sum(r.result == k for r in rows)
              for k in ("pass", "FAIL", "error", "not runnable here", "not loaded (unsigned)")}
    print(", ".join(f"{v} {k}" for k, v in counts.items()), file=sys.stderr)
    if failed:
        print(f"capibara-export: verify failed: {failed[0].artifact}: {failed[0].note or failed[0].result}",
              file=sys.stderr)
        return 1
    return 0


def cmd_inspect(args) -> int:
    from .console import out
    from .export.describe import describe_bundle
    from .export.loading import open_bundle, refusal

    opened = open_bundle(Path(args.bundle), trust_policy(args))
    problems = opened.problems()
    for line in describe_bundle(opened, problems):
        out.print(line)
    if problems:
        print(f"capibara-export: error: {refusal(Path(args.bundle), problems)}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def cmd_keygen(args) -> int:
    from .console import console
    from .export.trust import fingerprint, keygen, read_key

    private, public = keygen(Path(args.folder))
    console.print(f"private key: {private} (keep it secret; sign with: export BUILD --sign-key {private} ...)")
    console.print(f"public key:  {public} ({fingerprint(read_key(public, private=False))}; give it to serving "
                  f"teams: verify BUNDLE --trust-key {public})")
    return 0


def cmd_report(args) -> int:
    from rich.markdown import Markdown

    from .matrix.derive import derive
    from .console import out

    folder = Path(args.build_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: build folder not found; pass the folder `build` printed")
    _, _, summary = derive(folder)
    out.print(Markdown(summary))
    out.print(f"Report: {folder / 'report.html'}")
    return 0


def cmd_plans(args) -> int:
    from rich.table import Table

    from sharding.plans import load_plans
    from sharding.validity import check

    from .matrix.driver import BuildRequest, model_config
    from .matrix.targets import DCN_AXIS, get_target, parse_mesh
    from .console import out

    rows, cols = parse_mesh(args.mesh)
    slices = get_target(args.target).slices
    mesh_shape = {**({DCN_AXIS: slices} if slices > 1 else {}), "data": rows, "model": cols}
    request = BuildRequest(model=model_preset(args), checkpoint=args.checkpoint, model_module=args.model_module)
    family, cfg = request.family(), model_config(request)
    sizes = {**family.axis_sizes(cfg), "batch": {args.batch}}
    where = f"{slices} slices of a {rows}x{cols} mesh" if slices > 1 else f"a {rows}x{cols} mesh"
    table = Table(title=f"Plans for {cfg.name} on {where} at batch {args.batch}", title_justify="left")
    for col in ("plan", "valid", "description / reason"):
        table.add_column(col, overflow="fold")
    for plan in load_plans(args.plan_file).values():
        plan = plan.for_mesh(tuple(mesh_shape))
        validity = check(plan, family.logical_names(cfg), family.abstract_params(cfg), sizes, mesh_shape,
                         family.name, family.scopes, family.logical_axes)
        table.add_row(plan.name, "[green]yes[/]" if validity.ok else "[yellow]no[/]",
                      plan.description if validity.ok else validity.reason)
    out.print(table)
    return 0


COMMANDS = {"build": cmd_build, "plans": cmd_plans, "report": cmd_report, "export": cmd_export,
            "verify": cmd_verify, "serve": cli_serve.cmd_serve, "server": cli_server.cmd_server, "inspect": cmd_inspect, "keygen": cmd_keygen,
            "bench-report": cli_bench_report.cmd_bench_report, "analyze": cli_analyze.cmd_analyze,
            "launch": cli_serve.cmd_launch}


def _resolve_target(args) -> str | None:
    """--topology/--chip-config and --slices folded into the one target name every later step
    and the build folder resolve alike (`2xv4:4x4x8/megacore`); the problem, if the options
    contradict each other. String work only: JAX is not imported yet, and get_target checks
    the name (one line) when the command resolves it."""
    if getattr(args, "topology", None):
        if args.target != DEFAULT_TARGET:
            return f"--topology {args.topology} and --target {args.target} both name the target; give one"
        args.target = args.topology + ("/megacore" if args.chip_config == "megacore" else "")
    elif getattr(args, "chip_config", "default") != "default":
        return "--chip-config goes with --topology (a named slice such as tpu-v4-64 is already megacore)"
    if getattr(args, "slices", 1) > 1:
        args.target = f"{args.slices}x{args.target}"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from . import errors, interrupts  # no JAX import yet

    interrupts.reset()
    problem = _resolve_target(args)
    if problem:
        print(f"capibara-export: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with interrupts.watched():
            if args.command in ("serve", "server", "launch"):
                cli_serve.prepare(args)
            else:
                environment.prepare(*_environment(args))
            code = COMMANDS[args.command](args)
        if interrupts.requested():  # a Ctrl-C that Python swallowed (in a GC callback) while the work finished
            interrupts.reset()  # acted on: later work in this process (the Python API, tests) starts clean
            print("capibara-export: interrupted after the work had finished; its output is complete", file=sys.stderr)
            return EXIT_INTERRUPTED
        return code
    except KeyboardInterrupt:
        interrupts.reset()
        why = {"build": "finished units are cached, run the same command again to resume",
               "export": "no bundle was written; the previous one, if any, is unchanged"}
        print("capibara-export: interrupted" + (f"; {why[args.command]}" if args.command in why else ""),
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        message = errors.one_line_report(err)
        if message is None:
            raise
        print(f"capibara-export: error: {message}", file=sys.stderr)
        return getattr(err, "exit_code", EXIT_USAGE)
