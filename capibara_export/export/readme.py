"""The README.md inside each bundle: what is here and how to load and call each kind."""

from __future__ import annotations


def render_readme(manifest: dict) -> str:
    m = manifest
    exports = [a for a in m["artifacts"] if a["kind"] == "jax.export"]
    example = next((a for a in exports if a["entry"] == "caption"), exports[0] if exports else None)
    saved = next((a for a in m["artifacts"] if a["kind"] == "saved_model"), None)
    size = m["model"]["config"]["vision"]["image_size"]
    bos = m["model"]["config"]["text"]["bos_token_id"]
    call = (["ids = exp.call(params, pixels, prompt)                   # (2, 1 + max_new_tokens)"]
            if example and example["entry"] == "caption" else ["out = exp.call(params, pixels)"])
    lines = [
        f"# {m['model']['name']} bundle for serving",
        "",
        f"Made {m['created']} by capibara-export for {m['target']['name']} ({m['mesh']['device_kind']}, mesh "
        f"{m['mesh']['shape']}), jax {m['toolchain']['jax']}, jaxlib {m['toolchain']['jaxlib']}, "
        f"libtpu {m['toolchain']['libtpu']}. Weights: {m['model']['weights']}.",
        "",
        f"jax.export artifacts load in JAX releases from {m['compatibility']['oldest_jax_release']} "
        f"to {m['compatibility']['valid_until']}. Serialized executables load only with exactly the toolchain "
        "above, on the same topology.",
        "",
        "**Bundles are trusted input.** Executables are pickled compiled code: check hashes first with "
        "`python -m capibara_export verify <this folder>`, which refuses a mismatch.",
        "",
        "## Calling convention",
        "",
        "Every program takes the parameters as one flat dict (`params/<storage>/`, an orbax checkpoint) and "
        "then its inputs: encode_image(pixel_values), caption(pixel_values, prompt_ids), "
        "score(pixel_values, input_ids, attention_mask), decode_step(input_ids, position, cache). "
        "pixel_values come from transformers' BlipImageProcessor (bicubic resize, CLIP mean/std, NCHW, float32); "
        "prompt_ids is `[[BOS]]` per row for an unprompted caption. Caption outputs are token ids "
        "(prompt, then the continuation, PAD after [SEP]); decode them with the checkpoint's tokenizer.",
        "",
        "## Load and call (ten lines)",
        "",
        "```python",
        "import os, jax, numpy as np, orbax.checkpoint as ocp, tensorflow as tf",
        f"params = ocp.StandardCheckpointer().restore(os.path.abspath('{example['params'] if example else ''}'))",
        f"exp = jax.export.deserialize(open('{example['path'] if example else ''}', 'rb').read())",
        f"pixels = np.zeros((2, 3, {size}, {size}), np.float32)   # from BlipImageProcessor",
        f"prompt = np.full((2, 1), {bos}, np.int32)               # [BOS]: model.config.text.bos_token_id",
        *call,
        f"sm = tf.saved_model.load('{saved['path'] if saved else 'saved_model/<precision>'}')  # or TF Serving",
        "out = sm.signatures['caption'](pixel_values=tf.constant(pixels), prompt_ids=tf.constant(prompt))",
        "```",
        "",
        "## What is here",
        "",
        "| path | kind | entry | precision | plan | batch | size |",
        "|---|---|---|---|---|---|---|",
    ]
    for a in m["artifacts"]:
        lines.append(f"| {a['path']} | {a['kind']} | {a.get('entry', '')} | {a.get('precision', a.get('storage', ''))} "
                     f"| {a.get('plan', '')} | {a.get('batch', '')} | {a['size'] / 2 ** 20:.1f} MiB |")
    lines += ["", "manifest.json lists every file's sha256, input and output specs and shardings; "
              "docs/artifacts.md in capibara-export documents the schema.", ""]
    return "\n".join(lines)
