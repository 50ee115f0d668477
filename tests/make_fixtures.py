"""Write tests/fixtures/parity_tiny.npz: random HF BLIP weights, inputs and HF outputs.

Run with torch installed: `python -m tests.make_fixtures`. The parity tests compare the
Flax model against this file always, and against live transformers when torch is present
(which also checks that this file is still what transformers computes).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from model import get_preset
from tests import hf_reference as ref

FIXTURE = Path(__file__).parent / "fixtures" / "parity_tiny.npz"


def build() -> dict[str, np.ndarray]:
    cfg = get_preset("tiny")
    x = ref.inputs(cfg)
    arrays: dict[str, np.ndarray] = {"config": np.array(json.dumps(cfg.to_dict()))}
    arrays.update({f"inputs.{k}": v for k, v in x.items()})
    for tower, outputs in (("caption", ref.caption_outputs), ("retrieval", ref.retrieval_outputs)):
        model = ref.random_hf_model(cfg, tower)
        arrays.update({f"{tower}.tensor.{k}": v for k, v in ref.hf_tensors(model).items()})
        arrays.update({f"{tower}.out.{k}": v for k, v in outputs(model, x).items()})
    gen = arrays["caption.out.generate"][:, 1:]
    stopped = (gen == cfg.text.sep_token_id).any(axis=1)
    assert stopped.any() and not stopped.all(), f"tune SEP_BIAS: rows stopped early = {stopped}"
    return arrays


if __name__ == "__main__":
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(FIXTURE, **build())
    print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size / 1e6:.2f} MB)")
