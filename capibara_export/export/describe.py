"""`inspect`: what a bundle holds, what each program takes and returns, what it needs to
run (devices, hosts, toolchain), whether this machine's JAX may load it, who signed it, and
whether every artifact passes its hash and static checks (loading.py; nothing is run)."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from .loading import OpenedBundle, compatibility_problem, jaxlib_here


def _tensors(items: list[dict]) -> str:
    def one(t):
        shape = "×".join(str(d) for d in t["shape"]) or "scalar"
        spec = f" {t['sharding']}" if "sharding" in t else ""
        return f"{t['name']} {t['dtype']}[{shape}]{spec}"
    return "\n".join(one(t) for t in items)


def describe_bundle(opened: OpenedBundle, problems: dict[str, str] | None = None) -> list:
    """Lines and tables for the console; `problems` (path -> reason) marks refused artifacts."""
    problems = problems or {}
    m = opened.manifest
    mesh, tools, compat = m["mesh"], m["toolchain"], m["compatibility"]
    loads = compat["loads_in"]
    problem = compatibility_problem(m)
    signed = (f"[green]signed[/], signature checked with {opened.trust.signed_by}" if opened.trust.signed_by
              else "signature [yellow]not checked[/] (pass --trust-key PUB.pem); executables need it or "
                   "--allow-unsigned-executables")
    lines: list = [
        f"[bold]{escape(m['model']['name'])}[/] bundle for {escape(m['for'])}",
        f"made {m['created']} for {m['target']['name']} ({mesh['device_kind']}, mesh "
        f"{'x'.join(str(v) for v in mesh['shape'].values())} = {mesh['devices']} devices, axes "
        f"{', '.join(mesh['axis_names'])}); weights: {escape(m['model']['weights'])}",
        f"trust: {signed}",
        "toolchain: " + ", ".join(f"{k} {v}" for k, v in tools.items()),
        f"jax.export artifacts: serialized by jaxlib {compat['serialized_by']['jaxlib']} (released "
        f"{compat['serialized_by']['released']}); load in a jaxlib released {loads['jaxlib_released_from']} .. "
        f"{loads['jaxlib_released_until']} (known: {', '.join(loads['known_releases'])}); "
        + (f"[red]not here[/]: {escape(problem)}" if problem else f"[green]this machine's jaxlib {jaxlib_here()} "
                                                                   "is inside the window[/]"),
        f"needs: Python {compat['requirements']['python']}; {', '.join(compat['requirements']['packages'])}; "
        f"executables only with jax {tools['jax']}, jaxlib {tools['jaxlib']}, libtpu {tools['libtpu']} on "
        f"{mesh['devices']} {mesh['device_kind']} devices in the order of mesh.device_ids",
    ]
    table = Table(title="Programs", title_justify="left", show_lines=True)
    for col in ("path", "kind", "entry / signature", "precision", "plan", "batch", "inputs", "outputs", "platforms"):
        table.add_column(col, overflow="fold")
    for a in m["artifacts"]:
        if a["kind"] in ("jax.export", "jax.export-sharded", "executable"):
            table.add_row(a["path"], a["kind"], a["entry"], a["precision"], a.get("plan", ""), str(a["batch"]),
                          escape(_tensors(a["inputs"])), escape(_tensors(a["outputs"])), ", ".join(a["platforms"]))
        elif a["kind"] == "saved_model":
            for sig in a["signatures"]:
                name = sig["name"] + (f" (= {sig['entry']})" if sig["name"] != sig["entry"] else "")
                table.add_row(a["path"], a["kind"], name, a["precision"], "", str(a["batch"]),
                              escape(_tensors(sig["inputs"])), escape(_tensors(sig["outputs"])),
                              ", ".join(a["platforms"]))
    lines.append(table)
    files = Table(title="Files", title_justify="left")
    for col in ("path", "kind", "MiB", "sha256", "checks"):
        files.add_column(col, overflow="fold")
    for a in m["artifacts"]:
        status = f"[red]refused[/]: {escape(problems[a['path']])}" if a["path"] in problems else "[green]ok[/]"
        files.add_row(a["path"], a["kind"], f"{a['size'] / 2 ** 20:.1f}", a["sha256"][:12], status)
    lines.append(files)
    for s in m["selection"]:
        lines.append(f"selected {s['entry']} b{s['batch']} {s['precision']}: {escape(s['reason'])}")
    return lines
