"""Terminal output with rich: a progress bar naming the unit being compiled, and tables."""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .matrix.records import CompileRecord, Unit

# Piped output (logs, CI) would otherwise be cut to 80 columns, truncating unit names.
console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)
out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)

STATUS_STYLE = {"ok": "green", "invalid": "yellow", "does-not-fit": "magenta", "compile-error": "red"}


@contextlib.contextmanager
def build_progress(quiet: bool = False) -> Iterator:
    """A progress callback for build.run_build (a no-op when quiet or not a terminal)."""
    if quiet:
        yield None
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[unit]}"))
    with Progress(*columns, console=console, transient=False, disable=not sys.stderr.isatty()) as bar:
        task = bar.add_task("compiling", total=None, unit="")
        done = {"cached": 0}

        def update(i: int, n: int, unit: Unit, record: CompileRecord | None) -> None:
            if record is None:
                bar.update(task, total=n, completed=i, unit=unit.id)
                return
            done["cached"] += record.cached
            bar.update(task, completed=i, unit=f"{unit.id}: {record.status}{' (cached)' if record.cached else ''}")
            if not sys.stderr.isatty():  # logs and CI: one line per unit instead of a live bar
                console.print(f"[{i}/{n}] {unit.id}: {record.status}"
                              + (f" in {record.compile_s:.1f}s" if record.compile_s else "")
                              + (" (cached)" if record.cached else ""))
        yield update


def gib(n: float | None) -> str:
    return "" if n is None else f"{n / 1024 ** 3:.2f}"


def records_table(records: list[CompileRecord], title: str, extra: dict[str, dict[str, str]] | None = None) -> Table:
    """One row per unit; `extra` adds columns {column: {unit_id: text}} (analysis figures)."""
    table = Table(title=title, title_justify="left")
    for col in ("entry", "plan", "precision", "batch", "status", "compile s", "peak GiB/dev"):
        table.add_column(col, justify="right" if col in ("batch", "compile s", "peak GiB/dev") else "left")
    for col in (extra or {}):
        table.add_column(col, justify="right")
    for r in records:
        u = r.unit
        status = f"[{STATUS_STYLE[r.status]}]{r.status}[/]" + (" ·" if r.cached else "")
        row = [u.entry, u.plan, u.precision, str(u.batch), status,
               "" if r.compile_s is None else f"{r.compile_s:.1f}",
               gib(r.memory["peak"]) if r.memory else ""]
        row += [cols.get(u.id, "") for cols in (extra or {}).values()]
        table.add_row(*row)
    return table


def reasons_table(records: list[CompileRecord]) -> Table | None:
    """Why units were not built, one line per distinct (plan, reason)."""
    seen: dict[tuple[str, str], list[str]] = {}
    for r in records:
        if r.status != "ok":
            seen.setdefault((r.unit.plan, r.reason), []).append(f"{r.unit.entry}/{r.unit.precision}/b{r.unit.batch}")
    if not seen:
        return None
    table = Table(title="Units not built, and why", title_justify="left")
    table.add_column("plan")
    table.add_column("units")
    table.add_column("reason", overflow="fold")
    for (plan, reason), which in seen.items():
        table.add_row(plan, str(len(which)), reason)
    return table
