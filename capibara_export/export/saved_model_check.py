"""Read a SavedModel's graph before TensorFlow loads or calls it.

A SavedModel is a program: its signatures may hold any TensorFlow op, including ones that
write files (WriteFile, SaveV2), read them, talk to the network or call Python
(PyFunc, EagerPyFunc). `tf.saved_model.load` and a signature call run those ops. So
`verify`, `analyze` and serving load a bundle's SavedModel only after this check:

- every op anywhere in the graph and its function library is one the project's own
  export emits (SIGNATURE_OPS, plus CHECKPOINT_OPS, which the variables' save/restore
  functions use);
- every op reachable from a signature (the serving signatures and
  `__saved_model_init_op`) is in SIGNATURE_OPS: no file I/O on a serving path;
- an XlaCallModule calls no TensorFlow functions back (empty `function_list`) and has no
  host token (no host callbacks).
The proto is parsed with TensorFlow's generated message classes; nothing is executed.
"""

from __future__ import annotations

from pathlib import Path

from ..bundle_error import BundleError

# What jax2tf + tf.saved_model.save emit for this project's signatures (listed from the
# SavedModels of every entry and precision; a test keeps it so).
SIGNATURE_OPS = frozenset({"Const", "NoOp", "Placeholder", "ReadVariableOp", "VarHandleOp", "Identity",
                           "StatefulPartitionedCall", "PartitionedCall", "PreventGradient", "XlaCallModule",
                           "IdentityN"})
# The variables' checkpoint functions (called by the loader with the bundle's own
# variables/ folder), never reachable from a signature.
CHECKPOINT_OPS = frozenset({"AssignVariableOp", "MergeV2Checkpoints", "RestoreV2", "SaveV2", "ShardedFilename",
                            "StaticRegexFullMatch", "StringJoin", "Select", "Pack", "DisableCopyOnRead"})
MAX_PB_BYTES = 256 * 2 ** 20


def _functions_called(node) -> list[str]:
    names = []
    for value in node.attr.values():
        if value.HasField("func"):
            names.append(value.func.name)
        names += [f.name for f in value.list.func]
    return names


def check(folder: Path) -> list[str]:
    """The SavedModel's signatures, after refusing any graph outside the allow-lists."""
    from tensorflow.core.protobuf import saved_model_pb2

    path = Path(folder) / "saved_model.pb"
    if path.stat().st_size > MAX_PB_BYTES:
        raise BundleError(f"{path}: {path.stat().st_size} bytes of graph; refusing (over {MAX_PB_BYTES})")
    model = saved_model_pb2.SavedModel()
    try:
        model.ParseFromString(path.read_bytes())
    except Exception:
        raise BundleError(f"{path}: not a SavedModel proto") from None
    if len(model.meta_graphs) != 1:
        raise BundleError(f"{path}: {len(model.meta_graphs)} meta graphs; the project writes exactly one")
    graph = model.meta_graphs[0].graph_def
    functions = {f.signature.name: f for f in graph.library.function}
    where = f"SavedModel {Path(folder).name}"

    def refuse(op: str, place: str, why: str):
        raise BundleError(f"{where}: op {op} in {place} {why}; refusing to load this SavedModel")

    for node in graph.node:
        if node.op not in SIGNATURE_OPS | CHECKPOINT_OPS:
            refuse(node.op, "the graph", "is not one the project's export emits")
    for name, fn in functions.items():
        for node in fn.node_def:
            if node.op not in SIGNATURE_OPS | CHECKPOINT_OPS:
                refuse(node.op, f"function {name}", "is not one the project's export emits")

    nodes = {n.name: n for n in graph.node}
    signatures = model.meta_graphs[0].signature_def
    todo = [t.name.split(":")[0] for s in signatures.values() for t in s.outputs.values()]
    seen_nodes, seen_fns, fn_todo = set(), set(), []
    while todo:  # graph nodes feeding the signatures' outputs
        name = todo.pop().lstrip("^")
        if name in seen_nodes or name not in nodes:
            continue
        seen_nodes.add(name)
        node = nodes[name]
        if node.op not in SIGNATURE_OPS:
            refuse(node.op, f"node {name}", "is reachable from a serving signature")
        todo += [i.split(":")[0] for i in node.input]
        fn_todo += _functions_called(node)
    while fn_todo:  # and every function they call, transitively
        name = fn_todo.pop()
        if name in seen_fns:
            continue
        seen_fns.add(name)
        if name not in functions:
            raise BundleError(f"{where}: calls function {name}, which its library does not define")
        for node in functions[name].node_def:
            if node.op not in SIGNATURE_OPS:
                refuse(node.op, f"function {name}", "is reachable from a serving signature")
            if node.op == "XlaCallModule" and (list(node.attr["function_list"].list.func)
                                               or node.attr["has_token_input_output"].b):
                refuse(node.op, f"function {name}", "calls back into TensorFlow or the host")
            fn_todo += _functions_called(node)
    return [k for k in signatures if not k.startswith("__")]
