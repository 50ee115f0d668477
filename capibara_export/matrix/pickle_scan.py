"""What a pickle would import, read without running it.

JAX serializes a compiled executable as a pickle (jax.experimental.serialize_executable),
and unpickling calls whatever callables the stream names. Python's own answer to that is
an Unpickler whose `find_class` admits an allow-list ("Restricting Globals" in the pickle
docs), and `executables.load` uses one. But that check only happens while unpickling, and
a TPU executable cannot be unpickled on a CPU host at all (its devices are not here), so
`verify` would never look at it. This module reads the opcode stream with `pickletools`
and a symbolic stack to list every global the pickle names, without importing or calling
anything; no library does this (pickletools only disassembles), hence written by hand.

A stream whose globals cannot be resolved statically (names computed at unpickle time,
the copyreg extension registry) is refused as a whole.
"""

from __future__ import annotations

import pickletools

_MARK = object()
_STRING_OPS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE",
               "BINUNICODE8"}
_REFUSED_OPS = {"EXT1", "EXT2", "EXT4"}  # globals from the copyreg extension registry: not statically known


class PickleRefused(ValueError):
    """The stream names something outside the allow-list, or hides what it names."""


def globals_named(data: bytes) -> set[tuple[str, str]]:
    """Every (module, name) the pickle would import. Raises PickleRefused if that cannot be
    known without running it, or if the stream is malformed."""
    stack: list = []
    memo: dict = {}
    found: set[tuple[str, str]] = set()
    try:
        ops = list(pickletools.genops(data))
    except Exception as err:  # pickletools raises ValueError and others on garbage
        raise PickleRefused(f"not a well-formed pickle ({err})") from None
    end = ops[-1][2] + 1 if ops and ops[-1][2] is not None else len(data)
    if end != len(data):   # bytes after STOP: nothing JAX writes; a second stream could hide there
        raise PickleRefused(f"has {len(data) - end} bytes after the pickle's end (STOP at byte {end - 1})")
    for op, arg, _ in ops:
        name = op.name
        if name in _REFUSED_OPS:
            raise PickleRefused(f"uses {name} (the copyreg extension registry), which no JAX executable does")
        if name in ("GLOBAL", "INST"):
            module, _, attr = str(arg).partition(" ")
            found.add((module, attr))
        if name == "STACK_GLOBAL":
            if len(stack) < 2 or not all(isinstance(x, str) for x in stack[-2:]):
                raise PickleRefused("imports a global whose name is computed while unpickling")
            found.add((stack[-2], stack[-1]))
        _step(op, arg, stack, memo)
    return found


def _step(op, arg, stack: list, memo: dict) -> None:
    """Apply one opcode's stack effect, tracking only string values (and the memo)."""
    name = op.name
    if name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
        if stack:
            memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1]
        return
    if name in ("GET", "BINGET", "LONG_BINGET"):
        stack.append(memo.get(arg))
        return
    if name == "DUP":
        stack.append(stack[-1] if stack else None)
        return
    for item in reversed(op.stack_before):
        if item is pickletools.stackslice:
            while stack and stack[-1] is not _MARK:
                stack.pop()
        elif item is pickletools.markobject:
            if stack:
                stack.pop()
        elif stack:
            stack.pop()
    for item in op.stack_after:
        if item is pickletools.markobject:
            stack.append(_MARK)
        elif name in _STRING_OPS:
            stack.append(arg if isinstance(arg, str) else None)
        else:
            stack.append(None)


def check(data: bytes, allowed: frozenset[tuple[str, str]]) -> None:
    """Refuse a pickle naming any global outside `allowed`, naming the first such one."""
    named = globals_named(data)
    foreign = sorted(named - allowed)
    if foreign:
        module, attr = foreign[0]
        raise PickleRefused(f"names {module}.{attr}, which a JAX executable never holds"
                            + (f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""))
