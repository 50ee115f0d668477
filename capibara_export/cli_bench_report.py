"""`python -m capibara_export bench-report`: pytest-benchmark JSON as tables (bench_report.py
reads and checks it), the plans' predicted-against-measured rankings, regressions against an
earlier run."""

from __future__ import annotations

import sys
from pathlib import Path


def add_parser(sub) -> None:
    br = sub.add_parser("bench-report", help="tabulate `pytest bench/ --benchmark-json` output; compare runs")
    br.add_argument("json", nargs="+", help="pytest-benchmark JSON, e.g. out.json (several: one table)")
    br.add_argument("--compare", metavar="OLD", help="an earlier JSON: list regressions, exit 1 if any")
    br.add_argument("--threshold", type=float, default=0.10,
                    help="relative median increase that counts as a regression (default 0.10)")


def cmd_bench_report(args) -> int:
    from rich.table import Table

    from .bench_report import HEADERS, compare, load, prediction_check, rows
    from .console import out

    benches = [b for path in args.json for b in load(Path(path))]
    table = Table(title=f"Benchmarks in {', '.join(args.json)}", title_justify="left")
    for h in HEADERS:
        table.add_column(h, overflow="fold")
    for row in rows(benches):
        table.add_row(*row)
    out.print(table)
    for check in prediction_check(benches):
        error, whole = check["median_rel_error"], check["whole_program_median_rel_error"]
        before = "" if whole is None else \
            f"; whole-program roofline: rank correlation {check['whole_program_rho']:.2f}, median error {whole:.0%}"
        noise = "" if check["rho_interval"] is None else \
            ", {:.2f} to {:.2f} under the timing noise".format(*check["rho_interval"])
        if check["measurement_rho"] is not None:
            noise += f", {check['measurement_rho']:.2f} for the measurement against a repeat of itself"
        if check["alone_rho"] is not None:
            before += f"; each plan timed alone: rank correlation {check['alone_rho']:.2f}"
        how = "in turns" if check["measured_in"] == "turns" else "each alone"
        t = Table(title=f"Predicted vs measured ({how}): {check['group']} {check['entry']} (Spearman rank correlation "
                        f"{check['rho']:.2f}{noise}; median |predicted - measured| / measured "
                        f"{'n/a' if error is None else f'{error:.0%}'}, {check['overestimates']} of "
                        f"{len(check['plans'])} over{before})", title_justify="left")
        for h in ("plan", "predicted ms", "measured ms", "bound"):
            t.add_column(h)
        for plan, pred, meas, bound in check["plans"]:
            t.add_row(plan, f"{pred * 1e3:.3g}", f"{meas * 1e3:.3g}", bound)
        out.print(t)
    if args.compare:
        regressions = compare(benches, load(Path(args.compare)), args.threshold)
        for name, before, after in regressions:
            out.print(f"[red]regression[/] {name}: {before * 1e3:.3g} ms -> {after * 1e3:.3g} ms "
                      f"(+{(after / before - 1):.0%})")
        if regressions:
            print(f"capibara-export: {len(regressions)} benchmark(s) slower than {args.compare} by more than "
                  f"{args.threshold:.0%}", file=sys.stderr)
            return 1
        out.print(f"no regressions beyond {args.threshold:.0%} against {args.compare}")
    return 0
