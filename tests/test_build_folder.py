"""A build folder is input: damaged or crafted records, build.json and HLO files give one
BuildFolderError line (or another of the project's user errors), never a traceback, and a
record can never point the analysis at a file outside the folder's hlo/."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from capibara_export.matrix.analyze import analyze_build
from capibara_export.matrix.driver import BuildRequest, run_build
from capibara_export.matrix.folder import BuildFolderError, build_parts, read_build, read_records
from capibara_export.matrix.derive import derive
from capibara_export.errors import is_user_error
from tests.test_fuzz_parsers import edits, json_values, mutate

EXAMPLES = int(os.environ.get("CAPIBARA_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    """A real (tiny, one-unit, default target) build folder, copied before each change."""
    out = tmp_path_factory.mktemp("build")
    request = BuildRequest(model="tiny", entries=("encode_image",), plans=("dp",),
                           precisions=("fp32",), batches=(32,), out=out, use_cache=False)
    folder = run_build(request, finish=lambda staging, _: derive(staging)).folder
    (record,) = read_records(folder)
    assert record.status == "ok" and record.hlo_file and record.pre_hlo_file
    return folder


@pytest.fixture
def copy(build, tmp_path) -> Path:
    return Path(shutil.copytree(build, tmp_path / "copy"))


def _analyze(folder: Path) -> None:
    """What `report` does with the folder before it writes anything."""
    build = read_build(folder)
    build_parts(build, folder)
    analyze_build(folder)


def _only_user_errors(folder: Path) -> None:
    try:
        _analyze(folder)
    except Exception as err:  # noqa: BLE001 - the assertion is that every error is a user error
        assert is_user_error(err), f"{type(err).__name__}: {err}"
        assert "\n" not in str(err)


def test_the_unchanged_folder_analyses(copy):
    _analyze(copy)


@seed(20261126)
@FUZZ
@given(edits)
def test_mutated_record_lines_raise_only_user_errors(build, tmp_path_factory, edit):
    folder = Path(shutil.copytree(build, tmp_path_factory.mktemp("f") / "b"))
    path = folder / "records.jsonl"
    path.write_bytes(mutate(path.read_bytes(), edit))
    _only_user_errors(folder)


RECORD_FIELDS = ["unit", "status", "reason", "memory", "cost", "hlo_file", "pre_hlo_file", "hlo_sha256",
                 "analytic_flops", "needed_bytes", "compile_s", "cached", "mesh", "toolchain"]


@seed(20261126)
@FUZZ
@given(st.sampled_from(RECORD_FIELDS), st.sampled_from([None, "entry", "batch", "precision", "options", "peak",
                                                        "flops", "optimal_seconds"]), json_values)
def test_records_with_any_value_in_a_field_raise_only_user_errors(build, tmp_path_factory, field, key, value):
    folder = Path(shutil.copytree(build, tmp_path_factory.mktemp("f") / "b"))
    record = json.loads((folder / "records.jsonl").read_text())
    if key is not None and isinstance(record.get(field), dict):
        record[field][key] = value
    else:
        record[field] = value
    (folder / "records.jsonl").write_text(json.dumps(record) + "\n")
    _only_user_errors(folder)


BUILD_FIELDS = ["request", "mesh", "target", "hardware", "toolchain", "model_config", "plans"]


@seed(20261126)
@FUZZ
@given(st.sampled_from(BUILD_FIELDS), st.one_of(st.none(), st.text(max_size=12)), json_values)
def test_build_json_with_any_value_in_a_field_raises_only_user_errors(build, tmp_path_factory, field, key, value):
    folder = Path(shutil.copytree(build, tmp_path_factory.mktemp("f") / "b"))
    data = json.loads((folder / "build.json").read_text())
    if key and isinstance(data.get(field), dict):
        data[field][key] = value
    else:
        data[field] = value
    (folder / "build.json").write_text(json.dumps(data))
    _only_user_errors(folder)


@pytest.mark.parametrize("path", ["/etc/passwd", "../../../../etc/passwd", "hlo/../../x.gz", "records.jsonl",
                                  "hlo/sub/x.gz", "hlo\\..\\x.gz"])
def test_a_record_cannot_point_outside_the_folders_hlo(copy, path):
    record = json.loads((copy / "records.jsonl").read_text())
    record["pre_hlo_file"] = path
    (copy / "records.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(BuildFolderError, match=r"records.jsonl:1: .*is not hlo/<name>.gz inside the build folder"):
        _analyze(copy)


def test_a_linked_hlo_file_is_refused(copy, tmp_path):
    record = json.loads((copy / "records.jsonl").read_text())
    outside = tmp_path / "outside.gz"
    outside.write_bytes(gzip.compress(b"HloModule secret"))
    (copy / record["pre_hlo_file"]).unlink()
    (copy / record["pre_hlo_file"]).symlink_to(outside)
    with pytest.raises(BuildFolderError, match="not a regular file"):
        _analyze(copy)


def test_an_hlo_file_changed_after_the_build_is_named(copy):
    record = json.loads((copy / "records.jsonl").read_text())
    path = copy / record["hlo_file"]
    text = gzip.decompress(path.read_bytes()).decode()
    path.write_bytes(gzip.compress(text.replace("f32", "f16", 1).encode()))
    with pytest.raises(BuildFolderError, match="does not hash to its record's hlo_sha256"):
        _analyze(copy)
    path.write_bytes(b"not gzip at all")
    with pytest.raises(BuildFolderError, match="not gzipped HLO text"):
        _analyze(copy)


def test_a_pre_partition_text_that_is_not_hlo_is_one_line(copy):
    record = json.loads((copy / "records.jsonl").read_text())
    (copy / record["pre_hlo_file"]).write_bytes(gzip.compress(b"garbage"))
    with pytest.raises(BuildFolderError, match="not HLO text this version can analyse"):
        _analyze(copy)


def test_report_on_a_damaged_folder_is_one_line_and_exit_2(copy):
    (copy / "records.jsonl").write_bytes(b'{"schema": "capibara-export/compile-record", "schema_version": 1}\n\xff\n')
    result = subprocess.run([sys.executable, "-m", "capibara_export", "report", str(copy)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "records.jsonl:1: not a compile record" in lines[0] and "build` again" in lines[0]
