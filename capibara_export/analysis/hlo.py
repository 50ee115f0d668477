"""Read optimized (or pre-partition) HLO text and count what one run of the program does.

Written by hand: XLA's own HloCostAnalysis (behind `Compiled.cost_analysis()`) counts a
while-loop body once, so a 12-layer scan reports a twelfth of its FLOPs, and no Python
API exposes per-computation costs. This module parses the text, finds each loop's trip
count (`known_trip_count` in the backend config when present, otherwise the loop
condition `counter < N` and the counter's initial constant) and multiplies every
computation by how many times it runs.

Per instruction it counts, following HloCostAnalysis' conventions:
  flops           dot: 2·|out|·|contracted|; convolution: 2·|out|·|kernel|/out_features;
                  reduce: |in|; other element-wise arithmetic: |out|
  transcendentals exp, log, tanh, rsqrt, sqrt, erf, logistic, power, ...: |out|
  bytes accessed  for instructions outside fusions: operands read plus result written, each
                  as its layout stores it (TPU tiles padded: hlo_text.Shape.moved_bytes),
                  where a fusion reading a stacked parameter through dynamic-slice reads
                  only the slice, and an in-place dynamic-update-slice writes only the update
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .hlo_text import Computation, Instruction, parse_module

TRANSCENDENTAL = {"exponential", "exponential-minus-one", "log", "log-plus-one", "tanh", "rsqrt", "sqrt", "cbrt",
                  "erf", "logistic", "power", "sine", "cosine", "tan", "atan2"}
ELEMENTWISE = {"add", "subtract", "multiply", "divide", "maximum", "minimum", "negate", "abs", "compare", "select",
               "and", "or", "xor", "not", "clamp", "remainder", "floor", "ceil", "round-nearest-even",
               "round-nearest-afz", "sign", "convert", "shift-left", "shift-right-logical",
               "shift-right-arithmetic", "is-finite", "real", "imag"}
NO_MEMORY = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while", "call", "conditional",
             "after-all", "partition-id", "replica-id", "opt-barrier", "iota", "add-dependency"}
MATMULS = frozenset({"dot", "convolution"})
MATVEC = "dot/matvec"  # a marker among a fused computation's opcodes (hlo.HloProgram._fused_opcodes)
GATHERS_ELEMENTS = "transpose/elements"  # the same, for a transpose or copy that changes the minor dimension
COLLECTIVES = {"all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute"}

_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_DIMS = re.compile(r"(lhs_contracting_dims|dimensions)=\{([\d,]*)\}")
_DOT_DIMS = re.compile(r"\b([lr]hs_(?:contracting|batch)_dims)=\{([\d,]*)\}")
_GEMM_TARGET = re.compile(r'custom_call_target="(__cublas\$gemm|__cublas\$lt\$matmul[\w$]*)"')
_GEMM_CONTRACTING = re.compile(r'"lhs_contracting_dimensions":\[([^\]]*)\]')
_DIRECTION = re.compile(r"direction=(\w+)")
_DIM_LABELS = re.compile(r"dim_labels=(\w+)_(\w+)->(\w+)")
_WINDOW = re.compile(r"window=\{([^}]*)\}")
_WINDOW_FIELD = re.compile(r"(\w+)=([\w\-]+)")


@dataclass
class Costs:
    flops: float = 0.0            # every floating-point operation, XLA's convention
    matmul_flops: float = 0.0     # dots and convolutions only: what analytic model counts measure
    transcendentals: float = 0.0
    bytes: float = 0.0

    def add(self, other: Costs, times: float = 1.0) -> None:
        self.flops += other.flops * times
        self.matmul_flops += other.matmul_flops * times
        self.transcendentals += other.transcendentals * times
        self.bytes += other.bytes * times


@dataclass(frozen=True)
class Kernel:
    """One instruction that runs as its own kernel: a fusion, a library call (cuBLAS, oneDNN)
    or an unfused op, with its own FLOPs (a fusion's: everything fused into it) and bytes."""
    name: str
    flops: float
    bytes: float
    times: float         # runs per program call, loop-corrected
    transposes: bool = False   # gathers single elements: a transpose or copy in it changes the innermost dimension
    matmul: bool = False       # a dot or convolution (or one fused into it, or a library GEMM call)
    matvec: bool = False       # its dots are matrix-vector products (one row or column: XLA:CPU streams them)
    reduces: bool = False      # a reduce runs in it (the TPU compiler's batch-1 matvecs are multiply-reduces)


@dataclass
class KernelProfile:
    """What a per-kernel cost model needs: every kernel and the while-loop iterations."""
    kernels: list[Kernel]
    iterations: float    # loop iterations per program call, nested loops multiplied out

    @property
    def launches(self) -> float:
        return sum(k.times for k in self.kernels)


@dataclass
class Loop:
    name: str
    trip_count: int
    source: str          # known_trip_count | condition | unknown (counted once)
    multiplier: float    # how many times the loop instruction itself runs


def _gathers_elements(comp: Computation, inst: Instruction) -> bool:
    """A transpose or layout-changing copy whose output's innermost dimension is not its
    operand's: it reads single elements at a stride. One that keeps the innermost dimension
    (attention's (B, T, H, D) -> (B, H, T, D)) moves whole rows, a strided copy at the
    streaming rate; on the 2-core host the first kind ran at 0.6-0.9x an add's bandwidth on
    attention shapes, the second at 1.1x (docs/performance.md)."""
    if inst.opcode not in ("transpose", "copy") or not inst.operands:
        return False
    source = comp.by_name.get(inst.operands[0])
    out = inst.shape.minor
    if source is None:          # an operand not seen: assume the worse for a transpose
        return inst.opcode == "transpose"
    if out is None:             # a scalar
        return False
    if inst.opcode == "transpose":
        perm = [int(d) for d in dict(_DIMS.findall(inst.attrs)).get("dimensions", "").split(",") if d]
        out = perm[out] if out < len(perm) else out
    return out != source.shape.minor


def _matvec(comp: Computation, inst: Instruction) -> bool:
    """A dot with a single row or column beside its batch and contracting dimensions (a
    batch-1 decode step's projections): XLA:CPU runs it as a matrix-vector product that
    streams the matrix at the copy rate, where a skinny GEMM of a few rows runs at 0.4x it."""
    dims = {k: [int(d) for d in v.split(",") if d] for k, v in _DOT_DIMS.findall(inst.attrs)}
    free = []
    for side, operand in zip(("lhs", "rhs"), inst.operands[:2]):
        shape = comp.by_name[operand].shape.dims if operand in comp.by_name else ()
        bound = set(dims.get(f"{side}_contracting_dims", [])) | set(dims.get(f"{side}_batch_dims", []))
        free.append(math.prod(n for d, n in enumerate(shape) if d not in bound))
    return len(free) == 2 and min(free) == 1


def _users(comp: Computation) -> dict[str, list[Instruction]]:
    """Each value's users within one computation."""
    users: dict[str, list[Instruction]] = {}
    for i in comp.instructions:
        for o in i.operands:
            users.setdefault(o, []).append(i)
    return users


class HloProgram:
    """One module's computations, loop trip counts and per-computation run counts."""

    def __init__(self, text: str):
        self.computations = parse_module(text)
        self.entry = next(c for c in self.computations.values() if c.is_entry)
        self.loops: list[Loop] = []
        self.multiplier: dict[str, float] = {}
        self.fused: set[str] = set()      # fusion bodies: no memory traffic of their own
        self.applied: set[str] = set()    # reducers and comparators: counted at the calling op
        self._visit(self.entry.name, 1.0)

    # ---------------------------------------------------------------- loops
    def _constant(self, comp: Computation, name: str) -> int | None:
        inst = comp.by_name.get(name)
        while inst is not None and inst.opcode in ("copy", "bitcast", "convert") and inst.operands:
            inst = comp.by_name.get(inst.operands[0])
        if inst is None or inst.opcode != "constant" or not inst.operands:
            return None
        try:
            return int(inst.operands[0])  # constant(19): the literal is the "operand"
        except ValueError:
            return None

    def trip_count(self, caller: Computation, inst: Instruction) -> tuple[int, str]:
        known = _TRIP.search(inst.attrs)
        if known:
            return int(known.group(1)), "known_trip_count"
        cond_name = dict(inst.called()).get("condition")
        cond = self.computations.get(cond_name or "")
        root = cond.root if cond else None
        if root is None or root.opcode != "compare" or len(root.operands) != 2:
            return 1, "unknown"
        direction = (_DIRECTION.search(root.attrs) or [None, "LT"])[1]
        a, b = (cond.by_name.get(o) for o in root.operands)
        if a is not None and a.opcode == "constant":
            a, b = b, a
            direction = {"GT": "LT", "GE": "LE", "LT": "GT", "LE": "GE"}.get(direction, direction)
        if a is None or b is None or a.opcode != "get-tuple-element" or b.opcode != "constant":
            return 1, "unknown"
        limit = self._constant(cond, b.name)
        index = int(re.search(r"index=(\d+)", a.attrs).group(1))
        init_tuple = caller.by_name.get(inst.operands[0]) if inst.operands else None
        start = 0
        if init_tuple is not None and init_tuple.opcode == "tuple" and index < len(init_tuple.operands):
            value = self._constant(caller, init_tuple.operands[index])
            start = 0 if value is None else value
        if limit is None:
            return 1, "unknown"
        step = self._step(dict(inst.called()).get("body"), index)
        span = {"LT": limit - start, "LE": limit - start + 1, "GT": start - limit, "GE": start - limit + 1,
                "NE": abs(limit - start)}.get(direction)
        if span is None:
            return 1, "unknown"
        return max(-(-span // step), 0), "condition"

    def _step(self, body_name: str | None, index: int) -> int:
        """How much the loop body adds to tuple element `index` per iteration (1 if unclear).
        The compiler's windowed-einsum loops handle two chunks per iteration and count by 2."""
        body = self.computations.get(body_name or "")
        root = body.root if body else None
        if root is None or root.opcode != "tuple" or index >= len(root.operands):
            return 1
        update = body.by_name.get(root.operands[index])
        if update is None or update.opcode != "add" or len(update.operands) != 2:
            return 1
        for a, b in (update.operands, update.operands[::-1]):
            counter = body.by_name.get(a)
            if counter is not None and counter.opcode == "get-tuple-element" and f"index={index}" in counter.attrs:
                step = self._constant(body, b)
                return abs(step) if step else 1
        return 1

    def _visit(self, name: str, times: float) -> None:
        comp = self.computations.get(name)
        if comp is None:
            return
        self.multiplier[name] = self.multiplier.get(name, 0.0) + times
        for inst in comp.instructions:
            calls = inst.called()
            if not calls:
                continue
            if inst.opcode == "while":
                trips, source = self.trip_count(comp, inst)
                self.loops.append(Loop(inst.name, trips, source, times))
                for kind, callee in calls:
                    if kind == "body":
                        self._visit(callee, times * trips)
                continue
            for kind, callee in calls:
                if kind == "to_apply" and inst.opcode != "call":
                    self.applied.add(callee)
                elif inst.opcode == "fusion" and kind == "calls":
                    self.fused.add(callee)
                    self._visit(callee, times)
                else:
                    self._visit(callee, times)

    # ---------------------------------------------------------------- costs
    def instruction_costs(self, comp: Computation, inst: Instruction) -> Costs:
        c = Costs()
        op, out = inst.opcode, inst.shape
        if op == "dot":
            lhs = comp.by_name.get(inst.operands[0]) if inst.operands else None
            dims = dict(_DIMS.findall(inst.attrs)).get("lhs_contracting_dims", "")
            contracted = math.prod(lhs.shape.dims[int(d)] for d in dims.split(",") if d) if lhs else 1
            c.flops = c.matmul_flops = 2.0 * out.elements * contracted
        elif op == "convolution":
            c.flops = c.matmul_flops = self._convolution_flops(comp, inst)
        elif op == "custom-call" and _GEMM_TARGET.search(inst.attrs):
            c.flops = c.matmul_flops = self._gemm_flops(comp, inst)
        elif op == "reduce":
            src = comp.by_name.get(inst.operands[0]) if inst.operands else None
            c.flops = float(src.shape.elements if src else out.elements)
        elif op in TRANSCENDENTAL:
            c.transcendentals = float(out.elements)
        elif op in ELEMENTWISE:
            c.flops = float(out.elements)
        if comp.name not in self.fused and op not in NO_MEMORY and not op.endswith("-done"):
            c.bytes = self._bytes(comp, inst)
        return c

    @staticmethod
    def _gemm_flops(comp: Computation, inst: Instruction) -> float:
        """A GPU matmul the compiler handed to cuBLAS: a custom-call whose result is the first
        tuple leaf (the second is cuBLAS's workspace) and whose contracting dims sit in the
        backend_config JSON."""
        found = _GEMM_CONTRACTING.search(inst.attrs)
        lhs = comp.by_name.get(inst.operands[0]) if inst.operands else None
        if not found or lhs is None or not inst.shape.leaves:
            return 0.0
        dims = [int(d.strip().strip('"')) for d in found.group(1).split(",") if d.strip()]
        return 2.0 * math.prod(inst.shape.leaves[0][1]) * math.prod(lhs.shape.dims[d] for d in dims)

    @staticmethod
    def _convolution_flops(comp: Computation, inst: Instruction) -> float:
        """2 · |out| · in_features · Π(valid window taps per output position).

        The TPU compiler writes matmuls as convolutions, batched ones with the batch dims as
        dilated spatial dims (lhs_dilate=n, window n, stride n-1): there only one tap per
        output position is real, so taps are counted, not read off the window size."""
        lhs = comp.by_name.get(inst.operands[0]) if inst.operands else None
        kernel = comp.by_name.get(inst.operands[1]) if len(inst.operands) > 1 else None
        labels = _DIM_LABELS.search(inst.attrs)
        if lhs is None or kernel is None or not labels or "i" not in labels.group(2):
            return 0.0
        lhs_labels, rhs_labels, out_labels = labels.groups()
        window = dict(_WINDOW_FIELD.findall(_WINDOW.search(inst.attrs).group(1))) if _WINDOW.search(inst.attrs) else {}
        spatial = sorted(ch for ch in rhs_labels if ch.isdigit())
        taps = 1.0
        for n, d in enumerate(spatial):
            def field_of(key, default, n=n):
                values = window.get(key)
                return values.split("x")[n] if values else default
            size, stride = int(field_of("size", "1")), int(field_of("stride", "1"))
            pad_lo = int(field_of("pad", "0_0").split("_")[0])
            lhs_dil, rhs_dil = int(field_of("lhs_dilate", "1")), int(field_of("rhs_dilate", "1"))
            in_size = lhs.shape.dims[lhs_labels.index(d)]
            out_size = inst.shape.dims[out_labels.index(d)]
            pos = (np.arange(out_size)[:, None] * stride + np.arange(size)[None, :] * rhs_dil - pad_lo)
            valid = (pos >= 0) & (pos <= (in_size - 1) * lhs_dil) & (pos % lhs_dil == 0)
            taps *= valid.sum() / max(out_size, 1)
        in_features = kernel.shape.dims[rhs_labels.index("i")]
        return 2.0 * inst.shape.elements * in_features * taps

    def _operand_bytes(self, comp: Computation, name: str) -> float:
        src = comp.by_name.get(name)
        return src.shape.moved_bytes if src is not None else 0.0

    def _bytes(self, comp: Computation, inst: Instruction) -> float:
        if inst.opcode in ("dynamic-slice", "slice", "gather"):
            return 2.0 * inst.shape.moved_bytes
        if inst.opcode == "dynamic-update-slice" and len(inst.operands) > 1:
            return 2.0 * self._operand_bytes(comp, inst.operands[1])
        if inst.opcode == "fusion":
            fused = self.computations.get(dict(inst.called()).get("calls", ""))
            if fused is not None:
                return self._fusion_bytes(comp, inst, fused)
        # a buffer passed twice is read once (the Pallas decode kernel takes the fused KV cache as
        # its keys operand and its values operand: counted twice, the H200 caption b32 read 2x)
        return inst.shape.moved_bytes + sum(self._operand_bytes(comp, o) for o in dict.fromkeys(inst.operands))

    def _sliced_bytes(self, fused: Computation, pname: str, users: dict[str, list[Instruction]],
                      depth: int = 0) -> float | None:
        """The bytes a fused computation reads of parameter `pname` when every use slices it
        (dynamic-slice, slice, gather), directly or inside a nested fusion that only slices the
        parameter it becomes (the TPU compiler nests the per-layer dynamic-slice of a stacked
        weight in the fusion that uses it; read whole, a 12-layer stack was charged 12 times
        per layer, which libtpu's own estimates exposed: docs/measurements/2026-12-07-libtpu-
        estimates-beside-the-roofline.md). None: some use reads the whole buffer."""
        uses = users.get(pname, [])
        if not uses or depth > 8:
            return None
        total = 0.0
        for u in uses:
            if u.opcode in ("dynamic-slice", "slice", "gather") and u.operands[0] == pname:
                total += u.shape.moved_bytes
                continue
            nested = self.computations.get(dict(u.called()).get("calls", "")) if u.opcode == "fusion" else None
            if nested is None:
                return None
            inner_users = _users(nested)
            for position, operand in enumerate(u.operands):
                if operand != pname:
                    continue
                inner = next((i.name for i in nested.instructions
                              if i.opcode == "parameter" and i.operands and i.operands[0] == str(position)), None)
                read = self._sliced_bytes(nested, inner, inner_users, depth + 1) if inner else None
                if read is None:
                    return None
                total += read
        return total

    def _fusion_bytes(self, comp: Computation, inst: Instruction, fused: Computation) -> float:
        params = {i.name: int(i.operands[0]) for i in fused.instructions if i.opcode == "parameter"}
        users = _users(fused)
        total = 0.0
        root = fused.root
        dus_buffer = root.operands[0] if root is not None and root.opcode == "dynamic-update-slice" else None
        for pname, index in params.items():
            if index >= len(inst.operands):
                continue
            if pname == dus_buffer:
                continue  # updated in place: only the update is written
            sliced = self._sliced_bytes(fused, pname, users)
            total += self._operand_bytes(comp, inst.operands[index]) if sliced is None else sliced
        if dus_buffer is not None and len(root.operands) > 1:
            update = fused.by_name.get(root.operands[1])
            total += update.shape.moved_bytes if update is not None else 0.0
        else:
            total += inst.shape.moved_bytes
        return total

    def costs(self, loop_corrected: bool = True) -> Costs:
        """Whole-program totals; with loop_corrected=False, each computation counts once
        per call site, as XLA's cost analysis does (for cross-checking)."""
        total = Costs()
        for name, comp in self.computations.items():
            if name in self.applied or name not in self.multiplier:
                continue
            times = self.multiplier[name] if loop_corrected else 1.0
            for inst in comp.instructions:
                total.add(self.instruction_costs(comp, inst), times)
        return total

    def kernel_profile(self) -> KernelProfile:
        """Every kernel launch of one call, outside fusion bodies, reducers and collectives
        (the roofline prices those on their own), and the loop iterations."""
        kernels = []
        for name, comp in self.computations.items():
            if name in self.applied or name in self.fused or name not in self.multiplier:
                continue
            for inst in comp.instructions:
                op = inst.opcode
                if op in NO_MEMORY or op.endswith("-done") or op.removesuffix("-start") in COLLECTIVES:
                    continue
                own = self.instruction_costs(comp, inst)
                fused = dict(inst.called()).get("calls", "") if op == "fusion" else ""
                flops = own.flops + (self._fused_flops(fused) if fused else 0.0)
                ops = self._fused_opcodes(fused) | {op} if fused else {op}
                transposes = GATHERS_ELEMENTS in ops if fused else _gathers_elements(comp, inst)
                matmul = own.matmul_flops > 0 or bool(ops & MATMULS)
                matvec = matmul and (MATVEC in ops if fused else op == "dot" and _matvec(comp, inst))
                kernels.append(Kernel(inst.name, flops, own.bytes, self.multiplier[name], transposes, matmul, matvec,
                                      "reduce" in ops))
        iterations = sum(loop.trip_count * loop.multiplier for loop in self.loops)
        return KernelProfile(kernels, iterations)

    @cached_property
    def _opcode_memo(self) -> dict[str, frozenset[str]]:
        return {}

    def _fused_opcodes(self, name: str, depth: int = 0) -> frozenset[str]:
        """Every opcode in a fused computation and the fusions nested in it (one walk each,
        remembered: a fused computation is read once however many flags ask), MATVEC where
        every dot in it is a matrix-vector product and GATHERS_ELEMENTS where a transpose or
        copy in it changes the innermost dimension."""
        memo = self._opcode_memo
        if name not in memo:
            comp = self.computations.get(name)
            ops: set[str] = set()
            dots = []
            for inst in comp.instructions if comp is not None and depth <= 8 else ():
                ops.add(inst.opcode)
                if _gathers_elements(comp, inst):
                    ops.add(GATHERS_ELEMENTS)
                if inst.opcode == "dot":
                    dots.append(_matvec(comp, inst))
                if inst.opcode == "fusion":   # a nested fusion's dots count as this one's, its marker does not
                    nested = self._fused_opcodes(dict(inst.called()).get("calls", ""), depth + 1)
                    ops |= nested - {MATVEC}
                    if "dot" in nested:
                        dots.append(MATVEC in nested)
            if dots and all(dots):
                ops.add(MATVEC)
            memo[name] = frozenset(ops)
        return memo[name]

    def _fused_flops(self, name: str, depth: int = 0) -> float:
        comp = self.computations.get(name)
        if comp is None or depth > 8:
            return 0.0
        total = 0.0
        for inst in comp.instructions:
            total += self.instruction_costs(comp, inst).flops
            if inst.opcode == "fusion":
                total += self._fused_flops(dict(inst.called()).get("calls", ""), depth + 1)
        return total

    def instructions(self):
        """(computation, instruction, times run) for every counted instruction."""
        for name, comp in self.computations.items():
            if name in self.applied or name not in self.multiplier:
                continue
            for inst in comp.instructions:
                yield comp, inst, self.multiplier[name]

    def scope_of(self, comp: Computation, inst: Instruction) -> str:
        """The model scope an instruction belongs to, from its op_name metadata: for a fusion
        without metadata, its root's; for an instruction XLA made without metadata inside a
        called computation (a cloned fusion's converts and multiplies), its caller's."""
        name = inst.op_name
        if not name and inst.opcode == "fusion":
            fused = self.computations.get(dict(inst.called()).get("calls", ""))
            name = fused.root.op_name if fused is not None and fused.root is not None else ""
        return scope(name or self._inherited.get(comp.name, ""))

    @cached_property
    def _inherited(self) -> dict[str, str]:
        """Per called computation, the op_name its metadata-less instructions take: the calling
        instruction's, else the callee root's, else the most common one inside it; nested
        callees inherit through their callers."""
        callers: dict[str, tuple[str, Instruction]] = {}
        for comp in self.computations.values():
            for inst in comp.instructions:
                for _, callee in inst.called():
                    callers.setdefault(callee, (comp.name, inst))
        out: dict[str, str] = {}

        def own(name: str) -> str:
            comp = self.computations.get(name)
            if comp is None:
                return ""
            if comp.root is not None and comp.root.op_name:
                return comp.root.op_name
            names = [i.op_name for i in comp.instructions if i.op_name]
            return max(set(names), key=names.count) if names else ""

        def resolve(name: str, depth: int = 0) -> str:
            if name in out:
                return out[name]
            caller = callers.get(name)
            found = ""
            if caller is not None:
                found = caller[1].op_name or (resolve(caller[0], depth + 1) if depth < 8 else "")
            out[name] = found = found or own(name)
            return found

        for name in callers:
            resolve(name)
        return out


_WRAPPER = re.compile(r"^(?:[\w\-]+\()+([^()]*?)\)+$")
_INTERNAL = {"while", "body", "cond", "closed_call", "checkpoint", "remat", "rematted_computation", "pjit",
             "core_call", "custom_jvp_call", "custom_vjp_call", "jvp", "transpose"}


def scope(op_name: str) -> str:
    """'jit(fn)/text_decoder/while/body/closed_call/self_attention/dot_general' → 'text_decoder/self_attention'."""
    if not op_name:
        return "(unattributed)"
    parts = op_name.split("/")[:-1]
    out = []
    for p in parts:
        if p.startswith("jit(") or p.startswith("vmap(") or p.startswith("dynamic_index"):
            continue
        inner = _WRAPPER.match(p)
        p = inner.group(1) if inner else p
        if p and p not in _INTERNAL and "(" not in p and "->" not in p:   # "->": an einsum's equation
            out.append(p)
    return "/".join(dict.fromkeys(out)) or "(top level)"
