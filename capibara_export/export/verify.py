"""`verify`: prove a bundle is what its manifest says and computes what the model computes.

0. The bundle is opened as input from elsewhere (loading.py): signature when a trusted key
   is given, schema, paths confined; each artifact is read without running it (pickle
   globals, SavedModel ops, custom calls, compatibility window) before anything loads it.
1. Every artifact's sha256 against the manifest.
2. Every artifact that can run here is reloaded and called on fixed inputs, and each
   output is compared with the JAX reference: the model's own program, jitted on this
   machine with the bundle's parameters. Tolerance by precision on the largest absolute
   error, scaled by the reference's magnitude when that exceeds 1. Token ids must match
   exactly; only in bf16/int8 may a row diverge, and only where the reference's logits for
   the two tokens were a near tie (within the tolerance), which the note reports.
3. Artifacts that cannot run here (executables for a TPU, a sharded export for devices
   this machine lacks) are listed as "not runnable here", and executables of a bundle
   whose signature was not checked as "not loaded (unsigned)": never as passed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding

from sharding.plans import ShardingPlan
from sharding.precision import get_policy
from sharding.storage import stored_specs, stored_template

from .. import families, interrupts
from ..bundle_error import BundleError
from ..matrix.folder import ordered_shape
from ..matrix.programs import ProgramOptions, place
from ..matrix.serving import example_inputs, flatten, serving_function, unflatten
from . import executables, saved_model, stablehlo
from . import manifest as mf
from . import params as params_io
from .loading import inspect_artifact, open_bundle
from .trust import TrustPolicy

TOLERANCE = {"fp32": 1e-5, "bf16-mixed": 2e-2, "bf16": 2e-2, "int8-weights": 2e-2}
VERIFY_BATCH = 2
HOST_BUDGET = 4 * 2 ** 30  # bytes of host memory the sharded-restore check may take


@dataclass
class Row:
    artifact: str
    output: str
    max_abs_error: float | None
    tolerance: float | None
    result: str          # pass | FAIL | not runnable here | not loaded (unsigned) | error
    note: str = ""

    @property
    def failed(self) -> bool:
        return self.result in ("FAIL", "error")


def _compare(artifact: str, got, want, precision: str, ties=None) -> list[Row]:
    """Rows per output; `ties(got_ids, want_ids)` may accept caption rows that diverge at a
    near-tie of the reference's logits (returns (accepted, note))."""
    rows = []
    flat_got = jax.tree_util.tree_flatten_with_path(got)[0]
    flat_want = dict(jax.tree_util.tree_flatten_with_path(want)[0])
    for path, g in flat_got:
        w = np.asarray(flat_want.get(path, np.nan))
        g = np.asarray(g)
        name = jax.tree_util.keystr(path) or "out"
        if g.shape != w.shape:
            rows.append(Row(artifact, name, None, None, "FAIL", f"shape {g.shape} != reference {w.shape}"))
        elif np.issubdtype(w.dtype, np.integer):
            mismatches = int(np.sum(g != w))
            if mismatches == 0:
                rows.append(Row(artifact, name, 0.0, 0.0, "pass", "token ids identical"))
            else:
                accepted, note = ties(g, w) if ties is not None and precision != "fp32" else (False, "")
                rows.append(Row(artifact, name, float(mismatches), 0.0, "pass" if accepted else "FAIL",
                                note or f"{mismatches} ids differ"))
        else:
            err = float(np.max(np.abs(g.astype(np.float64) - w.astype(np.float64)))) if g.size else 0.0
            tol = TOLERANCE[precision] * max(1.0, float(np.max(np.abs(w.astype(np.float64)))) if w.size else 1.0)
            rows.append(Row(artifact, name, err, tol, "pass" if err <= tol else "FAIL"))
    return rows


UNSIGNED = "not loaded (unsigned)"


class Verifier:
    def __init__(self, bundle: Path, policy: TrustPolicy = TrustPolicy()):
        self.bundle = Path(bundle)
        self.opened = open_bundle(self.bundle, policy)
        self.manifest = self.opened.manifest
        self.family = families.for_record(self.manifest["model"])
        self.config = self.family.config_from_dict(self.manifest["model"]["config"])
        self.options = ProgramOptions(**self.manifest["model"]["options"])
        self._params: dict[str, dict] = {}
        self._reference: dict[tuple, object] = {}
        self._tie_checks: dict[tuple, object] = {}   # by (entry, precision, params, batch): they cache logits

    def params(self, rel: str) -> dict:
        if rel not in self._params:
            self._params[rel] = params_io.restore(mf.confined(self.bundle, rel))
        return self._params[rel]

    def reference(self, entry: str, precision: str, params_rel: str, batch: int):
        key = (entry, precision, batch)
        if key not in self._reference:
            serving = serving_function(self.config, entry, get_policy(precision), batch, self.options)
            inputs = example_inputs(serving, batch)
            out = jax.jit(serving.fn)(self.params(params_rel), *inputs)
            self._reference[key] = (inputs, jax.tree.map(np.asarray, out))
        return self._reference[key]

    # -------------------------------------------------------------- per kind
    def check_params(self, a: dict) -> list[Row]:
        flat = self.params(a["path"])
        expected = {i["name"]: (tuple(i["shape"]), i["dtype"]) for i in a["arrays"]}
        got = {k: (tuple(v.shape), str(v.dtype)) for k, v in flat.items()}
        if got != expected:
            return [Row(a["path"], "restore", None, None, "FAIL", "restored tree differs from the manifest")]
        rows = [Row(a["path"], "restore", None, None, "pass", f"{len(flat)} arrays as listed")]
        for plan_name, specs in a.get("shardings", {}).items():
            rows.append(self._restore_sharded(a, plan_name))
        return rows

    def _restore_sharded(self, a: dict, plan_name: str) -> Row:
        """Restore onto the selected plan's PartitionSpecs, on a CPU mesh of the bundle's shape.

        Simulated devices share this host's memory, so a plan that replicates the weights
        would need devices × their size; above HOST_BUDGET of RAM, a subset is restored
        (the largest arrays the plan shards, plus one it replicates) and the note says so."""
        shape = ordered_shape(self.manifest["mesh"])
        n = int(np.prod(list(shape.values())))
        cpus = jax.devices("cpu")
        if len(cpus) < n:
            return Row(a["path"], f"restore sharded ({plan_name})", None, None, "not runnable here",
                       f"needs {n} devices, {len(cpus)} here")
        mesh = jax.sharding.Mesh(np.array(cpus[:n]).reshape(tuple(shape.values())), tuple(shape))
        plan = ShardingPlan.from_dict(self.manifest["plans"][plan_name])
        specs = flatten(stored_specs(self.family, plan, self.config, get_policy(a["precisions"][0])))
        flat = self.params(a["path"])
        shardings = {k: NamedSharding(mesh, specs[k]) for k in flat}
        host_bytes = {k: n * int(np.prod(shardings[k].shard_shape(v.shape))) * v.dtype.itemsize for k, v in flat.items()}
        keys = sorted(flat)
        note = f"{n} devices, plan {plan_name}"
        if sum(host_bytes.values()) > HOST_BUDGET:
            sharded = sorted((k for k in keys if any(specs[k])), key=lambda k: -flat[k].size)[:8]
            replicated = [k for k in keys if not any(specs[k])][:1]
            keys = sharded + replicated
            note += (f"; {len(keys)} of {len(flat)} arrays (all would take "
                     f"{sum(host_bytes.values()) / 2 ** 30:.1f} GiB of host memory across the simulated devices)")
        abstract = {k: jax.ShapeDtypeStruct(flat[k].shape, flat[k].dtype, sharding=shardings[k]) for k in keys}
        restored = params_io.restore(mf.confined(self.bundle, a["path"]), abstract, partial=True)
        same = all(np.array_equal(np.asarray(restored[k]), np.asarray(flat[k])) for k in keys)
        placed = all(restored[k].sharding.spec == specs[k] for k in keys)
        ok = same and placed
        return Row(a["path"], f"restore sharded ({plan_name})", None, None, "pass" if ok else "FAIL",
                   note if ok else "values or placement differ")

    def check_processor(self, a: dict) -> list[Row]:
        if self.family.check_assets is None:
            return [Row(a["path"], "load", None, None, "FAIL", f"model {self.family.name} writes no processor")]
        note = self.family.check_assets(mf.confined(self.bundle, a["path"]), self.config)
        return [Row(a["path"], "load", None, None, "pass", note)]

    def check_export(self, a: dict) -> list[Row]:
        exported = stablehlo.load(mf.confined(self.bundle, a["path"]))
        inputs, want = self.reference(a["entry"], a["precision"], a["params"], VERIFY_BATCH)
        got = exported.call(self.params(a["params"]), *inputs)
        return _compare(a["path"], jax.tree.map(np.asarray, got), want, a["precision"], self._ties_for(a, VERIFY_BATCH))

    def _template(self, precision: str) -> dict:
        return stored_template(self.family, self.config, get_policy(precision))

    def check_saved_model(self, a: dict) -> list[Row]:
        rows = []
        params_rel = next(p["path"] for p in self.manifest["artifacts"]
                          if p["kind"] == "params" and a["precision"] in p["precisions"])
        loaded = saved_model.load(mf.confined(self.bundle, a["path"]))
        for sig in a["signatures"]:
            signature, entry = sig["name"], sig["entry"]
            inputs, want = self.reference(entry, a["precision"], params_rel, VERIFY_BATCH)
            got = saved_model.run(loaded, signature, dict(zip(self.family.entry(entry).inputs, inputs)))
            if isinstance(want, dict):
                got = {k: got[k] for k in want}
            else:
                got = next(iter(got.values()))
            ties = self._ties(entry, a["precision"], params_rel, inputs)
            rows += _compare(f"{a['path']}:{signature}", got, want, a["precision"], ties)
        return rows

    def _sharded_args(self, a: dict, compiled_shardings=None):
        inputs, want = self.reference(a["entry"], a["precision"], a["params"], a["batch"])
        args = (self.params(a["params"]), *inputs)
        if compiled_shardings is not None:
            args = place(args, compiled_shardings)
        return args, want

    def _ties_for(self, a: dict, batch: int):
        inputs, _ = self.reference(a["entry"], a["precision"], a["params"], batch)
        return self._ties(a["entry"], a["precision"], a["params"], inputs)

    def _ties(self, entry: str, precision: str, params_rel: str, inputs):
        """The family's near-tie check for an entry that generates tokens; None where ids must
        match exactly."""
        if self.family.tie_check is None:
            return None
        key = (entry, precision, params_rel, hashlib.sha256(b"".join(
            np.ascontiguousarray(x).tobytes() for x in jax.tree.leaves(inputs))).hexdigest())
        if key not in self._tie_checks:
            params = unflatten(self.params(params_rel), self._template(precision))
            self._tie_checks[key] = self.family.tie_check(self.config, self.options, entry, params, inputs,
                                                          TOLERANCE[precision])
        return self._tie_checks[key]

    def check_executable(self, a: dict) -> list[Row]:
        refused = self.opened.executables_refused()
        if refused:
            return [Row(a["path"], "*", None, None, UNSIGNED, refused)]
        mf.check_toolchain(self.manifest, a["path"])
        ok, why = executables.runnable_here(self.manifest, a)
        if not ok:
            return [Row(a["path"], "*", None, None, "not runnable here", why)]
        loaded = executables.load(mf.confined(self.bundle, a["path"]), mf.confined(self.bundle, a["trees"]),
                                  self.manifest["mesh"]["platform"], executables.execution_devices(self.manifest))
        args, want = self._sharded_args(a, loaded.input_shardings[0])
        return _compare(a["path"], jax.tree.map(np.asarray, loaded(*args)), want, a["precision"],
                        self._ties_for(a, a["batch"]))

    def check_sharded_export(self, a: dict) -> list[Row]:
        ok, why = executables.runnable_here(self.manifest, a)
        if not ok:
            return [Row(a["path"], "*", None, None, "not runnable here", why)]
        exported = stablehlo.load(mf.confined(self.bundle, a["path"]))
        args, want = self._sharded_args(a)
        leaves, tree = jax.tree.flatten(args)
        placed = place(leaves, list(exported.in_shardings_jax(self.mesh())))
        got = exported.call(*jax.tree.unflatten(tree, placed))
        return _compare(a["path"], jax.tree.map(np.asarray, got), want, a["precision"], self._ties_for(a, a["batch"]))

    def mesh(self) -> jax.sharding.Mesh:
        """The bundle's mesh on this machine's devices of its platform, in the recorded order."""
        m = self.manifest["mesh"]
        by_id = {d.id: d for d in jax.devices(m["platform"])}
        ids = np.array(m["device_ids"])   # (data, model), or (dcn, data, model) on several slices
        grid = np.array([by_id[int(i)] for i in ids.flat], dtype=object).reshape(ids.shape)
        return jax.sharding.Mesh(grid, tuple(m["axis_names"]))

    # -------------------------------------------------------------- all
    def run(self) -> list[Row]:
        rows: list[Row] = []
        refused = set()
        for a in self.manifest["artifacts"]:
            problem = mf.check_hash(self.bundle, a)
            if problem:
                rows.append(Row(a["path"], "sha256", None, None, "FAIL", problem))
                refused.add(a["path"])
        for a in self.manifest["artifacts"]:  # read each without running it, before anything loads
            if a["path"] in refused:
                continue
            problem = inspect_artifact(self.opened, a)
            if problem:
                rows.append(Row(a["path"], "static check", None, None, "FAIL", problem))
                refused.add(a["path"])
        checks = {"params": self.check_params, "jax.export": self.check_export, "saved_model": self.check_saved_model,
                  "executable": self.check_executable, "jax.export-sharded": self.check_sharded_export,
                  "processor": self.check_processor}
        for a in self.manifest["artifacts"]:
            interrupts.check()  # between artifacts: a Ctrl-C swallowed by a GC callback still stops verify
            check = checks.get(a["kind"])
            if check is None or a["path"] in refused:
                continue
            depends = [a.get("params"), a.get("trees")]
            if any(d in refused for d in depends if d):
                rows.append(Row(a["path"], "*", None, None, "FAIL", "depends on an artifact that failed its checks"))
                continue
            try:
                rows += check(a)
            except BundleError as err:
                rows.append(Row(a["path"], "*", None, None, "FAIL", str(err)))
            except Exception as err:  # a broken artifact surfaces as any library error; report it, go on
                rows.append(Row(a["path"], "*", None, None, "error", f"{type(err).__name__}: {str(err)[:200]}"))
        return rows
