"""Export the bundle of a build folder: the ExportRequest assembled from what the build
wrote (build.json, selection.json, analysis.json) and its kept executables."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from .. import interrupts
from ..matrix.driver import kept_executables
from ..matrix.folder import build_parts, read_analysis, read_build, read_selection
from ..matrix.staging import folder_lock
from .bundle import ExportRequest, export_bundle


def export_build_folder(folder: Path, mesh, weights: tuple[dict, str], *, precisions: Sequence[str] | None = None,
                        saved_model: bool = True, checkpoint: str | None = None, entries: Sequence[str] | None = None,
                        sign_key: str | None = None, compiled: dict | None = None, kept: dict | None = None,
                        progress: Callable[[str], None] = lambda _: None) -> Path:
    """Write `folder`/bundle (folder staged or final). `precisions` default to the build's
    (then no executable is written for a selection refused on this hardware; named, they are);
    executables come from the build's cache, or for an uncached build from `compiled` (this
    process's build) and `kept` (serialized by its workers). Holds the
    build folder's lock, so a build cannot replace the folder under the export."""
    folder = Path(folder)
    with folder_lock(folder, flag="build folder"):
        build = read_build(folder)
        config, _, options, plans = build_parts(build, folder)
        req = ExportRequest(
            build_folder=folder, config=config, params=weights[0], weights=weights[1],
            precisions=tuple(precisions or build["request"]["precisions"]), export_refused=bool(precisions),
            selection=read_selection(folder), analysis=read_analysis(folder),
            plans=plans, target=build["target"], mesh=mesh, mesh_info=build["mesh"], options=options,
            saved_model=saved_model, processor_from=Path(checkpoint) if checkpoint else None,
            entries=tuple(entries) if entries else None, sign_key=Path(sign_key) if sign_key else None,
            executables=kept_executables(folder, compiled, kept))

        def step(what: str) -> None:  # between export steps: where a remembered Ctrl-C stops the export
            interrupts.check()
            progress(what)
        return export_bundle(req, progress=step)
