"""HLO text as data: shapes (with their layouts), instructions and computations.

Written by hand: XLA exposes no Python API over an optimized module's instructions (the
`Compiled.as_text()` dump is the portable form every backend gives), so analysis/hlo.py
reads its costs from this parse of the text.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import cached_property

DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
               "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "token": 0}

_HEAD = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_OPCODE = re.compile(r"\s*([\w\-]+)\(")
_LEAF = re.compile(r"([a-z]+\d*)\[([\d,]*)\]")
_LAYOUT = re.compile(r"^[\s(]*[a-z]+\d*\[[\d,]*\]\{([\d,]+)")   # the first leaf's minor-to-major order
_TILED_LEAF = re.compile(r"([a-z]+\d*)\[([\d,]*)\](?:\{([\d,]*)(?::T\(([\d,]+)\))?)?")
_CALLS = re.compile(r"\b(calls|to_apply|condition|body|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def _matching(text: str, start: int, open_ch: str = "(", close_ch: str = ")") -> int:
    """Index just past the bracket that closes text[start]."""
    depth = 0
    for i in range(start, len(text)):
        c = text[i]
        if c == open_ch:
            depth += 1
        elif c == close_ch:
            depth -= 1
            if depth == 0:
                return i + 1
    return len(text)


def _split_top(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, c in enumerate(text):
        if c in "({[":
            depth += 1
        elif c in ")}]":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _padded_elements(dims: tuple[int, ...], order: str, tile: str) -> int:
    """Elements a tiled layout stores: the most-minor dimensions rounded up to the tile's
    (TPU layouts: `{1,0:T(8,128)}` stores rows in multiples of 8 and columns of 128)."""
    minor_to_major = [int(d) for d in order.split(",") if d] or list(range(len(dims) - 1, -1, -1))
    padded = list(dims)
    for d, t in zip(minor_to_major, reversed([int(t) for t in tile.split(",") if t])):
        padded[d] = -(-padded[d] // t) * t if t > 0 else padded[d]
    return math.prod(padded)


@dataclass
class Shape:
    leaves: list[tuple[str, tuple[int, ...]]]
    layout: tuple[int, ...] = ()   # the first leaf's minor-to-major order (): none written (row-major)
    stored_bytes: float | None = None   # with a tiled layout (TPU): the bytes its tiles hold

    @classmethod
    def parse(cls, text: str) -> Shape:
        layout = _LAYOUT.search(text)
        leaves, stored, tiled = [], 0.0, False
        for dt, dims_text, order, tile in _TILED_LEAF.findall(text):
            dims = tuple(int(d) for d in dims_text.split(",") if d)
            leaves.append((dt, dims))
            elements = _padded_elements(dims, order, tile) if tile and dims else math.prod(dims)
            tiled |= bool(tile) and elements != math.prod(dims)
            stored += elements * DTYPE_BYTES.get(dt, 4)
        return cls(leaves, tuple(int(d) for d in layout.group(1).split(",")) if layout else (),
                   stored if tiled else None)

    @property
    def minor(self) -> int | None:
        """The physically innermost dimension with more than one element (None: a scalar's)."""
        dims = self.dims
        order = self.layout if len(self.layout) == len(dims) else tuple(range(len(dims) - 1, -1, -1))
        return next((d for d in order if dims[d] > 1), None)

    @property
    def elements(self) -> int:
        return sum(math.prod(dims) for _, dims in self.leaves)

    @property
    def bytes(self) -> float:
        """The logical size: elements times their width."""
        return sum(math.prod(dims) * DTYPE_BYTES.get(dt, 4) for dt, dims in self.leaves)

    @property
    def moved_bytes(self) -> float:
        """What reading or writing the buffer moves: the bytes its tiles hold where the layout
        is tiled (a TPU's HBM stores arrays in (8,128) tiles, so bf16[577,12,64] moves 2.67x
        its logical size), else the logical size. Counted so, the roofline's data-movement
        kernels came from 4.6x to 2.0x of libtpu's own estimates on the default build
        (docs/measurements/2026-12-07-libtpu-estimates-beside-the-roofline.md)."""
        return self.bytes if self.stored_bytes is None else self.stored_bytes

    @property
    def dims(self) -> tuple[int, ...]:
        return self.leaves[0][1] if self.leaves else ()


@dataclass
class Instruction:
    name: str
    shape: Shape
    opcode: str
    operands: list[str]
    attrs: str
    is_root: bool = False

    @cached_property
    def op_name(self) -> str:
        m = _OP_NAME.search(self.attrs)
        return m.group(1) if m else ""

    def called(self) -> list[tuple[str, str]]:
        """(kind, computation) pairs this instruction calls."""
        out = [(k, c) for k, c in _CALLS.findall(self.attrs)]
        for group in _BRANCHES.findall(self.attrs):
            out += [("branch", c.strip().lstrip("%")) for c in group.split(",") if c.strip()]
        return out


@dataclass
class Computation:
    name: str
    instructions: list[Instruction] = field(default_factory=list)
    is_entry: bool = False

    @cached_property
    def by_name(self) -> dict[str, Instruction]:
        return {i.name: i for i in self.instructions}

    @property
    def root(self) -> Instruction | None:
        return next((i for i in self.instructions if i.is_root), self.instructions[-1] if self.instructions else None)


def parse_instruction(line: str) -> Instruction | None:
    head = _HEAD.match(line)
    if not head:
        return None
    rest = line[head.end():]
    if rest.startswith("("):
        end = _matching(rest, 0)
        type_text, rest = rest[:end], rest[end:]
    else:
        space = rest.find(" ")
        type_text, rest = (rest, "") if space < 0 else (rest[:space], rest[space:])
    op = _OPCODE.match(rest)
    if not op:
        return None
    open_at = op.end() - 1
    close_at = _matching(rest, open_at)
    operands = [o.split()[-1].lstrip("%") for o in _split_top(rest[open_at + 1:close_at - 1])]
    return Instruction(head.group(2), Shape.parse(type_text), op.group(1), operands, rest[close_at:],
                       is_root=bool(head.group(1)))


def parse_module(text: str) -> dict[str, Computation]:
    comps: dict[str, Computation] = {}
    current: Computation | None = None
    for line in text.splitlines():
        if not line:
            continue
        if line[0] not in " \t}" and line.rstrip().endswith("{") and not line.startswith("HloModule"):
            header = line.split("(")[0].split()
            is_entry = header[0] == "ENTRY"
            name = (header[1] if is_entry else header[0]).lstrip("%")
            current = comps[name] = Computation(name, is_entry=is_entry)
            continue
        if line.startswith("}"):
            current = None
            continue
        if current is not None:
            inst = parse_instruction(line)
            if inst is not None:
                current.instructions.append(inst)
    return comps
