"""Write a bundle for serving teams: parameters, portable and sharded StableHLO, TF
SavedModels, serialized executables of the selected units, a manifest and a README.

The bundle is assembled in a temporary folder and renamed into place at the end, so an
interrupted export leaves no half-written bundle.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp

from sharding.plans import ShardingPlan
from sharding.precision import get_policy
from sharding.storage import stored_params, stored_specs

from .. import compiler_options, families
from ..bundle_error import BundleError
from ..matrix import executable_format
from ..matrix.cache import jax_cache_disabled
from ..matrix.driver import ExecutableSource, config_hash
from ..matrix.programs import ProgramError, ProgramOptions
from ..matrix.records import toolchain
from ..matrix.serving import (describe, flat_shardings, flatten, input_names, output_names, partition_spec_json,
                              serving_function, sharded_jit)
from ..matrix.staging import staged_folder
from . import compatibility, saved_model, schema, stablehlo, trust
from . import manifest as mf
from . import params as params_io
from .loading import PROCESSOR_FILES
from .readme import render_readme


@dataclass
class ExportRequest:
    build_folder: Path
    config: object                    # the build's model config (its family: families.for_config)
    params: dict                      # float parameters (nested), e.g. from a checkpoint
    weights: str                      # where they came from, said in the manifest
    precisions: tuple[str, ...]
    selection: list[dict]             # selection.json's selections
    analysis: dict                    # analysis.json's units
    plans: dict[str, ShardingPlan]
    target: dict                      # build.json's target
    mesh: object                      # the jax Mesh of the build
    mesh_info: dict
    options: ProgramOptions = field(default_factory=ProgramOptions)
    saved_model: bool = True
    processor_from: Path | None = None   # a checkpoint folder holding the tokenizer; None: synthetic
    entries: tuple[str, ...] | None = None  # portable exports to write (default: every entry the family exports)
    sign_key: Path | None = None           # ed25519 private key (PEM) that signs the manifest
    # write the compiled programs (executables, sharded exports) of selections refused on this
    # hardware (analysis/selection.py): only when the precisions were named (--export-precisions)
    export_refused: bool = False
    # the build's serialized executables by unit id (build.kept_executables); a unit it lacks is compiled
    executables: ExecutableSource = lambda unit_id: None


def selected_units(req: ExportRequest) -> tuple[list[dict], list[dict]]:
    """(selections whose compiled programs the bundle gets, selections left out because the
    selection refused their precision on this hardware and the precisions were not named)."""
    wanted = [s for s in req.selection if s["plan"] and s["precision"] in req.precisions]
    left_out = lambda s: bool(s.get("refused")) and not req.export_refused  # noqa: E731
    return [s for s in wanted if not left_out(s)], [s for s in wanted if left_out(s)]


def storage_form(precision: str) -> str:
    policy = get_policy(precision)
    return "int8-weights" if policy.int8_weights else policy.param_dtype


def _entries(cfg) -> list[str]:
    """Portable exports: the entries the config's family exports (BLIP: the serving entries and
    the semiotic module's, for the towers present)."""
    return list(families.for_config(cfg).exported_entries(cfg))


def _artifact(bundle: Path, path: Path, kind: str, **info) -> dict:
    rel = path.relative_to(bundle).as_posix()
    return {"path": rel, "kind": kind, "sha256": mf.artifact_hash(path), "size": mf.artifact_size(path), **info}


def export_bundle(req: ExportRequest, progress: Callable[[str], None] = lambda _: None) -> Path:
    started = time.perf_counter()
    cfg = req.config
    family = families.for_config(cfg)
    unknown = sorted(set(req.entries or ()) - set(_entries(cfg)))
    if unknown:
        raise ProgramError(f"--export-entries {','.join(unknown)}: not an entry of this model; "
                           f"choose from {','.join(_entries(cfg))}")
    if req.sign_key is not None:
        trust.read_key(req.sign_key, private=True)  # a bad key fails here, before minutes of exporting
    batches = sorted({1, *(s["batch"] for s in req.selection if s["plan"])})
    with staged_folder(Path(req.build_folder) / "bundle") as bundle:
        artifacts: list[dict] = []
        stored: dict[str, dict] = {}
        for precision in req.precisions:
            form = storage_form(precision)
            if form in stored:
                continue
            progress(f"parameters ({form})")
            flat = flatten(stored_params(family, req.params, cfg, get_policy(precision)))
            stored[form] = flat
            folder = bundle / "params" / form
            params_io.save(folder, flat)
            artifacts.append(_artifact(bundle, folder, "params", storage=form, precisions=[
                p for p in req.precisions if storage_form(p) == form],
                arrays=[{"name": k, "shape": list(v.shape), "dtype": str(v.dtype)} for k, v in sorted(flat.items())],
                shardings={s["plan"]: {k: partition_spec_json(v) for k, v in flatten(
                    _param_specs(req, precision, s["plan"])).items()}
                    for s in req.selection if s["plan"] and s["precision"] == precision}))

        for precision in req.precisions:
            policy = get_policy(precision)
            for entry in [e for e in _entries(cfg) if req.entries is None or e in req.entries]:
                progress(f"jax.export {entry} {precision}")
                serving = serving_function(cfg, entry, policy, 1, req.options)
                exported = stablehlo.export_portable(serving)
                path = bundle / "stablehlo" / f"{entry}-{precision}.jaxexport"
                path.parent.mkdir(parents=True, exist_ok=True)
                stablehlo.save(exported, path)
                artifacts.append(_artifact(
                    bundle, path, "jax.export", entry=entry, precision=precision,
                    params=f"params/{storage_form(precision)}", platforms=list(exported.platforms), batch="b",
                    inputs=describe(input_names(serving.signature, serving.inputs),
                                    exported.in_avals[len(serving.flat_params):]),
                    outputs=_outputs(serving.signature, exported)))
            if req.saved_model:
                servings = {e: serving_function(cfg, e, policy, 1, req.options)
                            for e in saved_model.signature_entries(family, _entries(cfg))
                            if req.entries is None or e in req.entries}
                if servings:
                    progress(f"SavedModel {precision}")
                    # TF Serving's layout: a model's base path holds numbered versions
                    folder = bundle / "saved_model" / precision / saved_model.VERSION
                    signatures = saved_model.save(folder, servings, stored[storage_form(precision)],
                                                  model_name=f"{cfg.name}-{precision}", batch_sizes=batches)
                    artifacts.append(_artifact(bundle, folder, "saved_model", precision=precision,
                                               signatures=signatures, default_signature=saved_model.DEFAULT,
                                               platforms=list(stablehlo.PLATFORMS), batch="b",
                                               warmup={"path": saved_model.WARMUP, "batch_sizes": batches}))

        chosen, refused = selected_units(req)
        for sel in refused:
            progress(f"no compiled program for {sel['entry']} {sel['precision']} batch {sel['batch']}: "
                     f"{sel['refused'].split(':')[0]} (selection.json says why)")
        for sel in chosen:
            artifacts += _selected_unit(req, bundle, sel, progress)

        if family.write_assets is not None:
            progress("tokenizer and image processor")
            folder = bundle / "processor"
            source = family.write_assets(folder, cfg, req.processor_from, PROCESSOR_FILES)
            artifacts.append(_artifact(bundle, folder, "processor", source=source))
        schema.write_documents(bundle)

        manifest = {
            "schema": mf.SCHEMA, "schema_version": mf.SCHEMA_VERSION,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "for": family.description,
            "toolchain": toolchain(),
            "target": req.target,
            "mesh": {**req.mesh_info, "devices": int(req.mesh.devices.size)},
            "model": {"name": cfg.name, "config": family.config_to_dict(cfg), "hash": config_hash(cfg),
                      **family.manifest_fields(cfg), "weights": req.weights, "options": asdict(req.options),
                      **_family_fields(family)},
            "compatibility": compatibility.window(toolchain()["jaxlib"]),
            "selection": req.selection,
            "plans": {name: plan.to_dict() for name, plan in req.plans.items()},
            "artifacts": artifacts,
            "export_seconds": round(time.perf_counter() - started, 1),
        }
        (bundle / "README.md").write_text(render_readme(manifest))   # from the manifest, before it lists them
        manifest["documents"] = [{"path": p.name, "sha256": mf.sha256(p)} for p in sorted(bundle.iterdir())
                                 if p.is_file() and p.name in mf.DOCUMENTS]
        problem = schema.validate(manifest)
        if problem:
            raise BundleError(f"internal: the manifest being written does not match its schema: {problem}")
        data = mf.write(bundle / "manifest.json", manifest)
        if req.sign_key is not None:
            (bundle / trust.SIGNATURE_FILE).write_bytes(trust.sign(data, req.sign_key))
    return Path(req.build_folder) / "bundle"


def _outputs(entry, exported, shardings=None) -> list[dict]:
    example = jax.tree_util.tree_unflatten(exported.out_tree, list(exported.out_avals))
    return describe(output_names(entry, example), exported.out_avals, shardings)


def _param_specs(req: ExportRequest, precision: str, plan_name: str) -> dict:
    return stored_specs(families.for_config(req.config), req.plans[plan_name], req.config, get_policy(precision))


def _selected_unit(req: ExportRequest, bundle: Path, sel: dict, progress: Callable[[str], None]) -> list[dict]:
    """The sharded jax.export and the serialized executable of one selected unit."""
    entry, precision, plan, batch = sel["entry"], sel["precision"], req.plans[sel["plan"]], sel["batch"]
    try:
        serving = serving_function(req.config, entry, get_policy(precision), batch, req.options)
    except ProgramError:
        return []
    unit_id = sel["unit_id"]
    platform = req.mesh_info["platform"]
    common = dict(entry=entry, precision=precision, plan=plan.name, batch=batch, unit=unit_id,
                  params=f"params/{storage_form(precision)}", analysis=_analysis_summary(req.analysis.get(unit_id, {})),
                  mesh_axes=list(req.mesh.axis_names))
    exported = stablehlo.export_sharded(serving, plan, req.mesh, platform)
    path = bundle / "stablehlo" / f"{unit_id}.{'-'.join(exported.platforms)}.jaxexport"
    path.parent.mkdir(parents=True, exist_ok=True)
    stablehlo.save(exported, path)
    _, input_shardings, output_shardings = flat_shardings(serving, plan, req.mesh)
    inputs = describe(input_names(serving.signature, serving.inputs), jax.tree.leaves(serving.inputs),
                      jax.tree.leaves(input_shardings))
    outputs = _outputs(serving.signature, exported, jax.tree.leaves(output_shardings))
    out = [_artifact(bundle, path, "jax.export-sharded", **common, platforms=list(exported.platforms),
                     inputs=inputs, outputs=outputs)]
    kept = req.executables(unit_id)
    if kept is None:  # not in this build's cache (e.g. --no-cache and a separate export): compile it
        progress(f"compiling {unit_id} (the build kept no executable for it)")
        _, lower, abstract = sharded_jit(serving, plan, req.mesh)
        with jax_cache_disabled():
            options = compiler_options.for_devices(req.mesh.devices.flat)
            kept = executable_format.serialize(lower(*abstract).compile(compiler_options=options), unit_id)
    folder = bundle / "executables"
    folder.mkdir(exist_ok=True)
    exe, trees = executable_format.write(*kept, folder, unit_id)
    trees_art = _artifact(bundle, trees, "executable-trees", unit=unit_id)
    tools = toolchain()
    out.append(_artifact(bundle, exe, "executable", trees=trees_art["path"], **common, platforms=[platform],
                         inputs=inputs, outputs=outputs,
                         requires={"jax": tools["jax"], "jaxlib": tools["jaxlib"], "libtpu": tools["libtpu"],
                                   "devices": int(req.mesh.devices.size),
                                   "device_order": "mesh.device_ids, row-major"}))
    out.append(trees_art)
    return out


def _analysis_summary(unit: dict) -> dict:
    if unit.get("status") != "ok":
        return {}
    r, m = unit["roofline"], unit["memory"]
    networks = unit.get("collectives", {}).get("bytes_by_network", {})
    return {"source": "model+compiled", "predicted_latency_s": r["latency_s"], "binding": r["binding"],
            "mfu": r["mfu"], "peak_bytes_per_device": m["peak"], "fits": m["fits"],
            "collective_bytes_per_device": {"ici": float(networks.get("ici", 0.0)),
                                            "dcn": float(networks.get("dcn", 0.0))}}


def _family_fields(family) -> dict:
    """The manifest's record of a family other than BLIP (bundles of BLIP name none, as before)."""
    if family is families.DEFAULT:
        return {}
    module = families.module_of(family)
    return {"family": family.name, **({"module": module} if module else {})}


def float_params(cfg, checkpoint: str | None, random_seed: int | None) -> tuple[dict, str]:
    """The weights to export: a checkpoint's, or random ones when explicitly asked for."""
    family = families.for_config(cfg)
    canon = family.canonical(cfg)
    if checkpoint:
        if family.load_checkpoint is None:
            raise ProgramError(f"--checkpoint: model {family.name} loads no checkpoints; use --random-weights")
        loaded_cfg, params = family.load_checkpoint(checkpoint)   # canonical layout, as every checkpoint
        unnamed = lambda c: {k: v for k, v in family.config_to_dict(c).items() if k != "name"}  # noqa: E731
        if unnamed(loaded_cfg) != unnamed(canon):
            raise ProgramError(f"{checkpoint}: checkpoint layout differs from the build's model config")
        return jax.tree.map(jnp.asarray, params), f"checkpoint {Path(checkpoint).resolve()}"
    if random_seed is None:
        raise ProgramError("export needs weights: pass --checkpoint DIR, or --random-weights for a bundle whose "
                           "outputs are meaningless (for testing the serving path)")
    if family.init_params is None:
        raise ProgramError(f"--random-weights: model {family.name} makes no random parameters; pass --checkpoint")
    return family.init_params(canon, random_seed), f"random (seed {random_seed}): outputs are meaningless"
