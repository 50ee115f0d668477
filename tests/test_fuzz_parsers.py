"""Property-based fuzzing of the parsers that read files from elsewhere: whatever the bytes,
each raises only the project's one-line user error (or accepts the input), never another
exception. Fixed seed and 200 examples per parser in `make test`; set CAPIBARA_FUZZ_EXAMPLES
for a longer run (e.g. 20000)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from capibara_export.export import manifest as mf
from model import get_preset
from model.config import BlipConfig, ConfigError
from sharding.plans import PlanError, parse_plans

EXAMPLES = int(os.environ.get("CAPIBARA_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
PLANS = (Path(__file__).parent.parent / "sharding" / "plans.toml").read_text()
HF_CONFIG = get_preset("tiny").with_towers("caption").to_hf_dict()

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                      max_size=4), max_leaves=12)


def mutate(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    """Flip, delete or insert bytes at the given (position, value) pairs."""
    out = bytearray(data)
    for position, value in edits:
        if not out:
            out.append(value)
            continue
        i = position % len(out)
        op = value % 3
        if op == 0:
            out[i] ^= value or 1
        elif op == 1:
            del out[i]
        else:
            out.insert(i, value)
    return bytes(out)


edits = st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=6)


@seed(20261126)
@FUZZ
@given(edits)
def test_mutated_plan_files_raise_only_plan_errors(edit):
    try:
        parse_plans(mutate(PLANS.encode(), edit).decode("utf-8", errors="replace"), "fuzz.toml")
    except PlanError:
        pass


@seed(20261126)
@FUZZ
@given(st.data())
def test_configs_with_any_value_anywhere_raise_only_config_errors(data):
    raw = json.loads(json.dumps(HF_CONFIG))
    section = data.draw(st.sampled_from(["vision_config", "text_config", None]))
    target = raw[section] if section else raw
    key = data.draw(st.sampled_from(sorted(target)) | st.text(max_size=12))
    target[key] = data.draw(json_values)
    try:
        BlipConfig.from_hf_dict(raw, "fuzz/config.json")
    except ConfigError:
        pass


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> tuple[Path, bytes]:
    """A schema-valid manifest (taken from a real export's shape, with no files behind it)."""
    folder = tmp_path_factory.mktemp("bundle")
    manifest = {
        "schema": mf.SCHEMA, "schema_version": mf.SCHEMA_VERSION, "created": "2026-11-26T12:00:00+00:00",
        "for": "fuzz", "toolchain": {"python": "3.11", "jax": "0.10.2", "jaxlib": "0.10.2", "libtpu": "0.0.42.1"},
        "target": {"name": "cpu", "platform": "cpu"},
        "mesh": {"axis_names": ["data", "model"], "shape": {"data": 1, "model": 1}, "platform": "cpu",
                 "device_kind": "cpu", "device_ids": [[0]], "devices": 1},
        "model": {"name": "tiny", "config": {}, "hash": "0", "towers": ["caption"], "weights": "none", "options": {}},
        "compatibility": {"serialized_by": {"jaxlib": "0.10.2", "released": "2026-06-17"},
                          "loads_in": {"jaxlib_released_from": "2026-05-27", "jaxlib_released_until": "2026-12-17",
                                       "known_releases": ["0.10.2"]},
                          "rule": "", "source": "", "requirements": {}},
        "selection": [], "plans": {},
        "artifacts": [{"path": "stablehlo/x.jaxexport", "kind": "jax.export", "sha256": "0" * 64, "size": 1,
                       "entry": "caption", "precision": "fp32", "params": "params/float32", "platforms": ["cpu"],
                       "batch": "b", "inputs": [{"name": "pixel_values", "shape": ["b", 3], "dtype": "float32"}],
                       "outputs": [{"name": "token_ids", "shape": ["b", 21], "dtype": "int32"}]}],
    }
    data = json.dumps(manifest).encode()
    mf.parse(folder, data)  # the unmutated manifest is accepted
    return folder, data


@seed(20261126)
@FUZZ
@given(edits)
def test_mutated_manifests_raise_only_bundle_errors(bundle_dir, edit):
    folder, data = bundle_dir
    try:
        mf.parse(folder, mutate(data, edit))
    except mf.BundleError:
        pass


@seed(20261126)
@FUZZ
@given(st.sampled_from(["artifacts", "mesh", "compatibility", "toolchain", "model"]), json_values)
def test_manifests_with_any_value_in_a_field_raise_only_bundle_errors(bundle_dir, field, value):
    folder, data = bundle_dir
    manifest = json.loads(data)
    manifest[field] = value
    try:
        mf.parse(folder, json.dumps(manifest).encode())
    except mf.BundleError:
        pass


@seed(20261126)
@FUZZ
@given(json_values | st.dictionaries(st.just("weight_map"), json_values, min_size=1))
def test_safetensors_indexes_of_any_shape_raise_only_checkpoint_errors(tmp_path_factory, index):
    from model.hf import CheckpointError, read_safetensors

    folder = tmp_path_factory.mktemp("ckpt")
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError):
        read_safetensors(folder)


def test_binary_files_where_text_is_expected_are_one_line_errors(tmp_path):
    from capibara_export.bench_report import BenchReportError, load
    from sharding.plans import load_plans

    binary = bytes(range(256)) * 4
    (tmp_path / "config.json").write_bytes(binary)
    (tmp_path / "plans.toml").write_bytes(binary)
    (tmp_path / "out.json").write_bytes(binary)
    with pytest.raises(ConfigError, match="not a text file|not valid JSON"):
        BlipConfig.from_hf(tmp_path)
    with pytest.raises(PlanError, match="not a text file"):
        load_plans([tmp_path / "plans.toml"])
    with pytest.raises(BenchReportError, match="not a text file|not valid JSON"):
        load(tmp_path / "out.json")
    (tmp_path / "out.json").write_text(json.dumps({"benchmarks": [{"fullname": "x", "stats": None}]}))
    with pytest.raises(BenchReportError, match="lacks fullname or stats.median"):
        load(tmp_path / "out.json")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, bytes, dict]:
    """A real tiny captioning checkpoint: (folder, safetensors bytes, parsed header)."""
    from model.hf import load_checkpoint
    from tests.test_hf_loading import _write

    folder = tmp_path_factory.mktemp("ckpt")
    _write(folder, "caption")
    load_checkpoint(folder)  # the unmutated folder loads
    data = (folder / "model.safetensors").read_bytes()
    size = int.from_bytes(data[:8], "little")
    return folder, data, json.loads(data[8:8 + size])


def _load_with_header(folder: Path, data: bytes, header: bytes, tmp_path_factory) -> None:
    from model.hf import CheckpointError, load_checkpoint

    size = int.from_bytes(data[:8], "little")
    target = tmp_path_factory.mktemp("h")
    (target / "config.json").write_bytes((folder / "config.json").read_bytes())
    (target / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + data[8 + size:])
    try:
        load_checkpoint(target)
    except (CheckpointError, ConfigError) as err:
        assert "\n" not in str(err)


@seed(20261126)
@FUZZ
@given(edits)
def test_mutated_safetensors_headers_raise_only_checkpoint_errors(checkpoint, tmp_path_factory, edit):
    folder, data, _ = checkpoint
    size = int.from_bytes(data[:8], "little")
    _load_with_header(folder, data, mutate(data[8:8 + size], edit), tmp_path_factory)


@seed(20261126)
@FUZZ
@given(st.data())
def test_safetensors_headers_with_any_value_in_a_tensor_entry_raise_only_checkpoint_errors(
        checkpoint, tmp_path_factory, data):
    folder, raw, header = checkpoint
    header = json.loads(json.dumps(header))
    name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
    header[name][field] = data.draw(json_values | st.sampled_from(["F16", "BF16", "I8", "BOOL", "U8", "F64", "I64"])
                                    | st.lists(st.integers(0, 1 << 40), max_size=3))
    _load_with_header(folder, raw, json.dumps(header).encode(), tmp_path_factory)
