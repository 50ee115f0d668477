"""The README.md inside each bundle: what is here, the trust and compatibility rules, and
recipes in plain JAX / TensorFlow / transformers that run as written from the bundle folder
(tests/test_bundle_readme.py runs every code block in a fresh process that never imports
capibara-export)."""

from __future__ import annotations

# Rebuilds a treedef from the JSON tree description (executables/<unit>.trees.json).
_TREE_RECIPE = '''def rebuild(d):
    (kind, v), = d.items()
    if kind == "leaf": return LEAF
    if kind == "none": return None
    if kind == "dict": return {k: rebuild(x) for k, x in v}
    items = [rebuild(x) for x in v]
    return tuple(items) if kind == "tuple" else items'''


# Each device restores only its shards of the parameters (the plan's PartitionSpecs from the
# manifest), and the inputs are placed with theirs: shared by the sharded-export and
# executable recipes, each of which must run on its own.
_SHARDED_ARGUMENTS = [
    "store = next(a for a in m['artifacts'] if a['path'] == art['params'])",
    "plan = store['shardings'][art['plan']]",
    "abstract = {t['name']: jax.ShapeDtypeStruct(t['shape'], t['dtype'], sharding=spec(plan[t['name']]))",
    "            for t in store['arrays']}",
    "params = ocp.StandardCheckpointer().restore(os.path.abspath(art['params']), abstract)",
    "value = lambda t: (np.ones if t['name'].endswith('mask') else np.zeros)(t['shape'], t['dtype'])",
    "inputs = [jax.device_put(value(t), spec(t['sharding'])) for t in art['inputs']]",
]


def _block(*lines: str) -> list[str]:
    return ["```python", *lines, "```", ""]


def _header(m: dict) -> list[str]:
    c, tools, mesh = m["compatibility"], m["toolchain"], m["mesh"]
    loads = c["loads_in"]
    return [
        f"# {m['model']['name']} bundle for serving",
        "",
        f"Made {m['created']} by capibara-export for {m['target']['name']} ({mesh['device_kind']}, mesh "
        f"{mesh['shape']}, {mesh['devices']} devices), jax {tools['jax']}, jaxlib {tools['jaxlib']}, libtpu "
        f"{tools['libtpu']}. Weights: {m['model']['weights']}.",
        "",
        "## Trust and compatibility",
        "",
        "- `manifest.json` lists every file with its sha256 and is described by `manifest.schema.json` "
        "(JSON Schema); `ARTIFACTS.md` documents the format. A signed bundle has `manifest.json.sig` "
        "(ed25519): check it with `python -m capibara_export verify . --trust-key PUB.pem` before using anything.",
        "- Serialized executables (`executables/`) are compiled code inside a pickle: load them only from a bundle "
        "whose signature you checked. They run only with exactly "
        f"jax {tools['jax']}, jaxlib {tools['jaxlib']}, libtpu {tools['libtpu']}, on {mesh['devices']} "
        f"{mesh['device_kind']} devices in the order of `mesh.device_ids`, at the batch size they were compiled "
        "for (another batch fails with a shape error, missing devices with `No matching device found`). Plain "
        "JAX does not check the toolchain: the recipe below does.",
        f"- `jax.export` artifacts (`stablehlo/`) were serialized by jaxlib {c['serialized_by']['jaxlib']} (released "
        f"{c['serialized_by']['released']}). JAX's compatibility promise is by jaxlib build: they load in a "
        f"jaxlib released {loads['jaxlib_released_from']} .. {loads['jaxlib_released_until']} (3 weeks older to "
        f"6 months newer; known releases: {', '.join(loads['known_releases'])}; {c['source']}). Newer JAX needs "
        f"Python >= 3.12 and the `flatbuffers` package.",
        "",
        "## Calling convention",
        "",
        "Every program takes the parameters as one flat dict (`params/<storage>/`, an orbax checkpoint; "
        "`manifest.json` lists its arrays) and then its inputs, in the order and with the shapes the manifest "
        "lists (`inputs`, `outputs`: name, shape, dtype; `b` is the batch)." + _blip_convention(m),
        "",
    ]


def _is_blip(m: dict) -> bool:
    """A bundle of the semiotic (BLIP) model: its recipes feed images and captions."""
    return m["model"].get("family", "blip") == "blip"


def _blip_convention(m: dict) -> str:
    if not _is_blip(m):
        return ""
    return (" pixel_values come from the "
            "processor below (bicubic resize, CLIP mean/std, NCHW, float32). The caption prompt is "
            f"{m['model']['options']['prompt_len']} token(s) (`[BOS]` = {m['model']['config']['text']['bos_token_id']} "
            "for an unprompted caption), with `prompt_mask` (1 per token, 0 for right padding: prompts of different "
            "lengths in one batch give the tokens of transformers' `generate(input_ids, attention_mask=...)`); caption "
            "outputs are the prompt then "
            f"{m['model']['options']['max_new_tokens']} new token ids, PAD after [SEP]. score and text programs take "
            f"{m['model']['options']['text_len']}-token right-padded `input_ids` with an `attention_mask`.")


def _on_the_slice(m: dict, sharded: dict) -> list[str]:
    """The multi-host recipe: the same serve command on every host (capibara-export installed there),
    and the same across local processes with `launch` (tests run both as written)."""
    hosts = m["mesh"].get("hosts") or {}
    n, per = int(hosts.get("processes", 1)), int(hosts.get("devices_per_process", m["mesh"]["devices"]))
    if n == 1:
        return []
    run = f"serve . --entry {sharded['entry']} --precision {sharded['precision']} --inputs ../in.npz --out ../out.npz"
    return [f"### On the slice: {n} processes, one per host, {per} devices each", "",
            f"`mesh.hosts` in the manifest says which host owns each mesh position ({hosts.get('chip_config', '')}; "
            f"{hosts.get('runtime', '')}). Run the same command on every host, each with its own `--process-id`; "
            "process 0 hosts JAX's coordinator and writes the outputs. Each host restores only its parameter shards "
            "and places only its slice of the batch. A host that does not join within `--join-timeout` seconds, or "
            "stops for `--heartbeat-timeout` seconds, makes every other process exit 1 with one line naming it. "
            "The same from Python: `capibara_export.export.multihost.join` then "
            "`capibara_export.export.sharded_server.ShardedServer.open(bundle, entry, precision)(inputs)`.", "",
            "Inputs are an `.npz` of the program's inputs by name (the whole batch; every host passes the same "
            "file); for a first try, ones of the right shapes:", "",
            "```bash",
            "python -c \"import json, numpy as np; a = next(a for a in json.load(open('manifest.json'))['artifacts'] "
            f"if a['path'] == '{sharded['path']}'); np.savez('../in.npz', **{{t['name']: np.ones(t['shape'], t['dtype']) "
            "for t in a['inputs']})\"",
            "```", "",
            "```bash",
            f"python -m capibara_export {run} \\",
            f"    --coordinator HOST0:8476 --num-processes {n} --process-id $I   # I = 0..{n - 1}, one per host",
            "```", "",
            f"To try it on one machine first: {n} local processes, each simulating its host's {per} devices on CPU "
            "(gloo collectives), their output prefixed `[I]`:", "",
            "```bash", f"python -m capibara_export launch {n} -- {run}", "```", "",
            f"Before shipping, every sharded program across {n} local processes against the single-process "
            "reference:", "",
            "```bash", f"python -m capibara_export verify . --processes {n}", "```", "",
            "### Live traffic on the slice", "",
            "`server` serves every sharded program as a model (KServe v2 over HTTP and gRPC, TF Serving REST) with "
            "dynamic batching to the compiled batch sizes, every host in lockstep: the same command on every host "
            "(in a Kubernetes LeaderWorkerSet the three slice flags come from its variables). Readiness probe "
            "`GET :8000/v2/health/ready`, liveness `GET :8000/v2/health/live`, metrics `GET :8000/metrics`, on "
            "process 0 only (capibara-export's docs/server.md):", "",
            "```bash",
            f"python -m capibara_export server . --precision {sharded['precision']} --http-port 8000 --grpc-port 8001 "
            "\\",
            f"    --coordinator HOST0:8476 --num-processes {n} --process-id $I   # I = 0..{n - 1}, one per host",
            "```", "",
            f"On one machine: `python -m capibara_export launch {n} -- server . --precision {sharded['precision']}`.",
            ""]


# decode_step's cache is a dict argument: the manifest lists its leaves as `cache/cross_kv`,
# `cache/self_kv` (JAX's flattening order, keys sorted); `nest` turns such names back into the
# nested arguments. The cross cache is the image tokens through each decoder layer's
# cross-attention key/value projection, in the bundle's storage and cache layouts.
_DECODE_STEP = '''def nest(names, leaves):   # 'cache/cross_kv' -> {'cache': {'cross_kv': leaf}}
    tree = {}
    for name, leaf in zip(names, leaves):
        *path, last = name.split('/')
        node = tree
        for key in path:
            node = node.setdefault(key, {})
        node[last] = leaf
    return tree
def stacked(name):   # (layers, ...) whether the bundle stores layers stacked or one by one
    if text['layer_storage'] == 'stacked':
        return np.asarray(params[f'text_decoder/blocks/{name}'])
    return np.stack([np.asarray(params[f'text_decoder/blocks/{i}/{name}']) for i in range(text['depth'])])
kernel, bias = stacked('cross_kv/kernel'), stacked('cross_kv/bias')
if text['kernel_layout'] == 'out-in':   # (L, 2, heads, head_dim, width) -> (L, width, 2, heads, head_dim)
    kernel = np.moveaxis(kernel, -1, 1)
kv = np.einsum('bpd,ldknh->lbpknh', np.asarray(image), kernel) + bias[:, None, None]   # (L, B, patches, 2, N, H)
order = {'patch-major': (0, 1, 2, 3, 4, 5), 'head-major': (0, 1, 3, 4, 5, 2), 'kv-major': (0, 3, 1, 2, 4, 5)}
names = [t['name'] for t in step['inputs']]
shapes = {t['name']: [2 if d == 'b' else d for d in t['shape']] for t in step['inputs']}
leaves = {'cache/cross_kv': kv.transpose(order[text['cross_cache']]).astype(np.float32),
          'cache/self_kv': np.zeros(shapes['cache/self_kv'], np.float32)}
ids = prompt
tokens = [prompt]
for position in range(caption.shape[1] - 1):
    leaves.update({'input_ids': ids, 'position': np.int32(position)})
    args = nest(names, [leaves[n] for n in names])   # {'input_ids', 'position', 'cache': {...}}
    logits, cache = decode.call(params, *args.values())   # the new cache comes back nested too
    leaves.update({f'cache/{k}': v for k, v in cache.items()})
    ids = np.asarray(logits).argmax(-1)[:, None].astype(np.int32)
    tokens.append(ids)
tokens = np.concatenate(tokens, axis=1)
after_sep = (np.cumsum(tokens == text['sep_token_id'], axis=1) - (tokens == text['sep_token_id'])) > 0
print('decode_step loop == caption:', bool(((tokens == caption) | after_sep).all()), tokens.shape)'''


def _decode_step_recipe(m: dict, size: int, bos: int) -> list[str]:
    """decode_step from plain JAX: the nested cache rebuilt from the manifest's flat names, a
    greedy loop checked against the caption program (fp32; the int8 storage is not shown)."""
    arts = m["artifacts"]
    pick = {e: next((a for a in arts if a["kind"] == "jax.export" and a["entry"] == e and a["precision"] == "fp32"),
                    None) for e in ("decode_step", "encode_image", "caption")}
    if not all(pick.values()):
        return []
    return ["### decode_step from plain JAX: the nested cache", "",
            "A `/` in an input or output name is a path into a nested argument: `cache/cross_kv` is "
            "`cache['cross_kv']`, and the manifest lists the leaves in JAX's flattening order (dict keys sorted). "
            "The cross cache is the image tokens through each decoder layer's cross-attention key/value projection; "
            "the self cache starts as zeros; each step returns the updated cache in the same structure. This loop "
            "reproduces the caption program's ids:", ""] + _block(
        "import json, os, jax, numpy as np, orbax.checkpoint as ocp",
        "m = json.load(open('manifest.json'))",
        "text = m['model']['config']['text']",
        "art = lambda e: next(a for a in m['artifacts'] if a['kind'] == 'jax.export' and a['entry'] == e "
        "and a['precision'] == 'fp32')",
        "step = art('decode_step')",
        "load = lambda a: jax.export.deserialize(bytearray(open(a['path'], 'rb').read()))",
        "decode, encode, captioner = load(step), load(art('encode_image')), load(art('caption'))",
        "params = ocp.StandardCheckpointer().restore(os.path.abspath(step['params']))",
        f"pixels = np.random.default_rng(0).normal(size=(2, 3, {size}, {size})).astype(np.float32)",
        f"prompt = np.full((2, 1), {bos}, np.int32)",
        "image = encode.call(params, pixels)                       # (B, patches, vision width)",
        "caption = np.asarray(captioner.call(params, pixels, prompt, np.ones_like(prompt)))",
        *_DECODE_STEP.splitlines())


def _tf_serving(m: dict, arts: list[dict]) -> list[str]:
    """TF Serving loads `<base path>/<version>/`: each precision's SavedModel is a base path."""
    saved = [a for a in arts if a["kind"] == "saved_model"]
    name = m["model"]["name"]
    first = saved[0]
    base = first["path"].rsplit("/", 1)[0]
    return ["### TF Serving", "",
            "Each `saved_model/<precision>/` is a model base path in TF Serving's layout, version `1` inside "
            f"({', '.join('`' + a['path'] + '/`' for a in saved)}); the warmup requests sit where TF Serving reads "
            "them. A SavedModel is the portable single-device program: TF Serving runs it on one device of one "
            "host. The sharded programs for the slice are served with `python -m capibara_export serve` (below).", "",
            "```bash",
            f"docker run --rm -p 8501:8501 -v \"$PWD/{base}:/models/{name}\" -e MODEL_NAME={name} tensorflow/serving"
            f"   # {first['precision']}",
            f"curl -s localhost:8501/v1/models/{name}/metadata",
            "```", ""]


def _first_rows_program(arts: list[dict], kind: str) -> dict | None:
    """The recipe's program of `kind`: BLIP's encode_image or caption, else the first whose
    inputs are all batched rows (the recipe feeds them zeros of the manifest's shapes)."""
    of_kind = [a for a in arts if a["kind"] == kind]
    preferred = [a for a in of_kind if a["entry"] in ("encode_image", "caption")]
    rows = [a for a in of_kind if all(i["shape"] and i["shape"][0] == a["batch"] for i in a["inputs"])]
    return (preferred or rows or [None])[0]


def render_readme(manifest: dict) -> str:
    m = manifest
    arts = m["artifacts"]
    config = m["model"]["config"]
    size = config["vision"]["image_size"] if _is_blip(m) else None
    bos = config["text"]["bos_token_id"] if _is_blip(m) else config.get("bos_token_id", 0)
    lines = _header(m)
    lines += ["## Recipes", "", "Run each from this folder.", ""]
    export = next((a for a in arts if a["kind"] == "jax.export" and a["entry"] == "caption"), None)
    portable = _first_rows_program([{**a, "batch": "b"} for a in arts], "jax.export")
    if not _is_blip(m) and portable:
        lines += ["### A portable jax.export program (any single CPU, GPU or TPU device)", ""] + _block(
            "import json, os, jax, numpy as np, orbax.checkpoint as ocp",
            "m = json.load(open('manifest.json'))",
            f"art = next(a for a in m['artifacts'] if a['path'] == '{portable['path']}')",
            "params = ocp.StandardCheckpointer().restore(os.path.abspath(art['params']))",
            "exp = jax.export.deserialize(bytearray(open(art['path'], 'rb').read()))",
            "value = lambda t: (np.ones if t['name'].endswith('mask') else np.zeros)([2, *t['shape'][1:]], t['dtype'])",
            "out = exp.call(params, *[value(t) for t in art['inputs']])",
            "print([o['name'] for o in art['outputs']], jax.tree.map(np.shape, out))")
    if export:
        lines += ["### A portable jax.export program (any single CPU, GPU or TPU device)", ""] + _block(
            "import json, os, jax, numpy as np, orbax.checkpoint as ocp",
            "m = json.load(open('manifest.json'))",
            "art = next(a for a in m['artifacts'] if a['kind'] == 'jax.export' and a['entry'] == 'caption')",
            "params = ocp.StandardCheckpointer().restore(os.path.abspath(art['params']))",
            "exp = jax.export.deserialize(bytearray(open(art['path'], 'rb').read()))",
            f"pixels = np.zeros((2, 3, {size}, {size}), np.float32)",
            f"prompt = np.full((2, 1), {bos}, np.int32)      # [BOS]; longer prompts: right-padded",
            "mask = np.ones((2, 1), np.int32)                 # 1 for prompt tokens, 0 for padding",
            "ids = exp.call(params, pixels, prompt, mask)",
            "print([o['name'] for o in art['outputs']], ids.shape)")
    if _is_blip(m):
        lines += _decode_step_recipe(m, size, bos)
    saved = next((a for a in arts if a["kind"] == "saved_model"), None)
    if saved:
        sig = next(s for s in saved["signatures"] if s["name"] == saved["default_signature"])
        def feed(t):
            shape = f"[2, {', '.join(str(d) for d in t['shape'][1:])}]"
            if t["name"] == "prompt_ids":
                return f"{t['name']}=tf.fill({shape}, {bos})"
            maker = "tf.ones" if t["name"].endswith(("mask", "input_ids")) else "tf.zeros"
            return f"{t['name']}={maker}({shape}, tf.{t['dtype']})"
        feeds = ", ".join(feed(t) for t in sig["inputs"])
        lines += [f"### The TF SavedModel (TF Serving: `serving_default` is the {sig['entry']} signature)", ""] + _block(
            "import tensorflow as tf",
            f"sm = tf.saved_model.load('{saved['path']}')",
            "print(sorted(sm.signatures))",
            f"out = sm.signatures['{saved['default_signature']}']({feeds})",
            "print({k: v.shape for k, v in out.items()})")
        lines += [f"Warmup requests for every signature at batch sizes {saved['warmup']['batch_sizes']} are in "
                  f"`{saved['path']}/{saved['warmup']['path']}`.", ""]
        lines += _tf_serving(m, arts)
    if any(a["kind"] == "processor" for a in arts) and _is_blip(m):
        lines += ["### The tokenizer and image processor", ""] + _block(
            "from PIL import Image",
            "from transformers import BlipProcessor",
            "proc = BlipProcessor.from_pretrained('processor')",
            "batch = proc(images=Image.new('RGB', (640, 480)), text='a picture of', return_tensors='np')",
            "print(batch['pixel_values'].shape)")
    sharded = _first_rows_program(arts, "jax.export-sharded")
    cpu_flag = [f"os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count={m['mesh']['devices']}')"
                "  # a CPU bundle: simulated devices"] if m["mesh"]["platform"] == "cpu" else []
    mesh_lines = [
        "from jax.sharding import Mesh, NamedSharding, PartitionSpec",
        "m = json.load(open('manifest.json'))",
        "by_id = {d.id: d for d in jax.devices()}",
        "ids = np.array(m['mesh']['device_ids'])  # (data, model), or (dcn, data, model) for several slices",
        "mesh = Mesh(np.array([by_id[i] for i in ids.flat]).reshape(ids.shape), m['mesh']['axis_names'])",
        "spec = lambda s: NamedSharding(mesh, PartitionSpec(*[tuple(x) if isinstance(x, list) else x for x in s]))",
    ]
    if sharded:
        lines += [f"### The selected plan's sharded program on its mesh ({m['mesh']['devices']} "
                  f"{m['mesh']['device_kind']} devices)", "",
                  "Each device restores only its shards of the parameters (the manifest's shardings for the plan).",
                  ""] + _block(
            "import json, os",
            *cpu_flag,
            "import jax, numpy as np, orbax.checkpoint as ocp",
            *mesh_lines,
            f"art = next(a for a in m['artifacts'] if a['path'] == '{sharded['path']}')",
            *_SHARDED_ARGUMENTS,
            "exp = jax.export.deserialize(bytearray(open(art['path'], 'rb').read()))",
            "# the XLA options the bundle's executables were compiled with (null: XLA's defaults)",
            "out = jax.jit(exp.call, compiler_options=m['mesh'].get('compiler_options'))(params, *inputs)",
            "print(art['entry'], out.shape, out.sharding.spec)")
    if sharded:
        lines += _on_the_slice(m, sharded)
    exe = _first_rows_program(arts, "executable")
    if exe:
        lines += ["### A serialized executable (plain JAX; signed bundles only)", "",
                  "JAX's `deserialize_and_load` unpickles the payload with no restriction: use it only on a bundle "
                  "whose signature you checked (capibara-export's own loader also refuses any class outside "
                  "JAX's serializer). The trees file is JSON; `rebuild` turns it into JAX treedefs.", ""] + _block(
            "import json, os",
            *cpu_flag,
            "import jax, jaxlib, numpy as np, orbax.checkpoint as ocp",
            "from jax.experimental import serialize_executable",
            *mesh_lines,
            f"art = next(a for a in m['artifacts'] if a['path'] == '{exe['path']}')",
            "need = art['requires']",
            "assert (jax.__version__, jaxlib.__version__) == (need['jax'], need['jaxlib']), 'rebuild the bundle'",
            "LEAF = object()",
            *_TREE_RECIPE.splitlines(),
            "trees = json.load(open(art['trees']))",
            "in_tree, out_tree = (jax.tree_util.tree_structure(rebuild(trees[k]), is_leaf=lambda x: x is LEAF)",
            "                     for k in ('in_tree', 'out_tree'))",
            "devices = [by_id[i] for i in np.ravel(m['mesh']['device_ids'])]  # need['devices'], in this order",
            "compiled = serialize_executable.deserialize_and_load(open(art['path'], 'rb').read(), in_tree, out_tree,",
            "                                                     backend=m['mesh']['platform'],"
            " execution_devices=devices)",
            *_SHARDED_ARGUMENTS,
            "out = compiled(params, *inputs)",
            "print(art['entry'], out.shape)")
    lines += ["## What is here", "", "| path | kind | entry | precision | plan | batch | size |", "|---|---|---|---|---|---|---|"]
    for a in arts:
        lines.append(f"| {a['path']} | {a['kind']} | {a.get('entry', '')} | {a.get('precision', a.get('storage', ''))} "
                     f"| {a.get('plan', '')} | {a.get('batch', '')} | {a['size'] / 2 ** 20:.1f} MiB |")
    lines += ["", "`python -m capibara_export inspect .` prints every program's inputs, outputs and requirements.", ""]
    return "\n".join(lines)
