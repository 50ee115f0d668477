"""Export the bundle of a build folder: the ExportRequest assembled from what the build
wrote (build.json, selection.json, analysis.json) and its kept executables."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

from model import BlipConfig
from sharding.plans import ShardingPlan

from ..build import kept_executables
from ..programs import ProgramOptions
from .bundle import ExportRequest, export_bundle


def export_build_folder(folder: Path, mesh, weights: tuple[dict, str], *, precisions: Sequence[str] | None = None,
                        saved_model: bool = True, checkpoint: str | None = None, entries: Sequence[str] | None = None,
                        sign_key: str | None = None, compiled: dict | None = None,
                        progress: Callable[[str], None] = lambda _: None) -> Path:
    """Write `folder`/bundle (folder staged or final). `precisions` default to the build's;
    executables come from `compiled` (this process's build) or the build's cache."""
    folder = Path(folder)
    build = json.loads((folder / "build.json").read_text())
    request = build["request"]
    req = ExportRequest(
        build_folder=folder, config=BlipConfig.from_dict(build["model_config"]), params=weights[0], weights=weights[1],
        precisions=tuple(precisions or request["precisions"]),
        selection=json.loads((folder / "selection.json").read_text())["selections"],
        analysis=json.loads((folder / "analysis.json").read_text())["units"],
        plans={k: ShardingPlan.from_dict(v) for k, v in build["plans"].items()}, target=build["target"],
        mesh=mesh, mesh_info=build["mesh"], options=ProgramOptions(**request["options"]),
        saved_model=saved_model, processor_from=Path(checkpoint) if checkpoint else None,
        entries=tuple(entries) if entries else None, sign_key=Path(sign_key) if sign_key else None,
        executables=kept_executables(folder, compiled))
    return export_bundle(req, progress=progress)
