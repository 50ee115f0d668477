"""What a serving team hits in its first hour with a bundle, and what a careless or hostile
user feeds the tool: arrays that keep bfloat16 across processes, readings compared up to
near-tie beams, the hosts' join naming who is missing, folders replaced only when the tool
can prove it wrote them, and parsers that refuse nesting, size and path attacks in one line."""

from __future__ import annotations

import json
import pickle
import threading
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capibara_export import cli
from capibara_export.matrix.staging import MARKER, ensure_replaceable, recorded_id, staged_folder
from capibara_export.export import manifest as mf
from capibara_export.matrix import pickle_scan
from capibara_export.export.arrays import as_declared, read_npz, write_npz
from capibara_export.export.launch import free_port
from capibara_export.export.manifest import BundleError
from capibara_export.export.multihost import HostRuntime, LostProcesses, rendezvous
from model.errors import UserError
from sharding.plans import parse_plans


# ------------------------------------------------------------------ arrays across processes
def test_bfloat16_survives_an_npz_round_trip_byte_for_byte(tmp_path):
    x = np.random.default_rng(0).standard_normal((3, 5)).astype(ml_dtypes.bfloat16)
    write_npz(tmp_path / "a.npz", {"x": x, "i": np.arange(4, dtype=np.int32)})
    stored = read_npz(tmp_path / "a.npz")
    assert stored["x"].dtype.kind == "V"                      # what numpy alone makes of it
    back = as_declared(stored["x"], "bfloat16")
    assert back.dtype == np.dtype(ml_dtypes.bfloat16) and back.tobytes() == x.tobytes()
    # only a byte-for-byte view, never a cast: other dtypes pass through for the caller's check
    assert as_declared(stored["x"], "float16").dtype.kind == "V"
    assert as_declared(stored["i"], "bfloat16").dtype == np.int32
    assert as_declared(np.zeros(2, "V4"), "bfloat16").dtype.itemsize == 4
    assert not list(tmp_path.glob("*.partial"))


def test_a_file_that_is_not_an_npz_is_one_line(tmp_path):
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(BundleError, match="not an .npz of arrays"):
        read_npz(tmp_path / "bad.npz")


# ------------------------------------------------------------------ readings' near ties
def test_readings_beams_are_accepted_only_when_the_reference_scores_them_alike():
    """Row 1's beams differ: accepted when the reference rescoring puts the artifact's beams
    within tolerance of its own, rank by rank; refused when it rates them clearly worse, and
    when a prompt differs."""
    from capibara_export.export.verify import TOLERANCE
    from model.tie_checks import beam_ties

    want = np.array([[[1, 5, 6, 2], [1, 5, 7, 2]], [[1, 5, 6, 2], [1, 8, 6, 2]]])
    got = want.copy()
    got[1, 1, 1] = 9
    scores = {}
    check = beam_ties(None, None, np.zeros((2, 4, 8), np.float32), 1, TOLERANCE["bf16"],
                      beam_scores=lambda _img, ids: scores[ids.tobytes() == got[1].tobytes()])
    scores.update({True: np.array([-1.00, -1.21]), False: np.array([-1.00, -1.20])})
    accepted, note = check(got, want)
    assert accepted and note.startswith("ids identical up to near-tie beams") and "row 1" in note, note
    scores[True] = np.array([-1.00, -2.5])     # the artifact's second beam is far worse under the reference
    accepted, note = check(got, want)
    assert not accepted and note.startswith("row 1's beams score"), note
    prompt = got.copy()
    prompt[0, 0, 0] = 4
    assert check(prompt, want) == (False, "a row differs in its prompt")


# ------------------------------------------------------------------ the hosts' join
def _join_all(n: int, present: list[int], timeout_s: int = 2, tokens: dict | None = None) -> dict:
    port, results = free_port(), {}

    def run(pid):
        runtime = HostRuntime(f"127.0.0.1:{port}", n, pid, join_timeout_s=timeout_s)
        try:
            rendezvous(runtime, (tokens or {}).get(pid, "bundle-a"))
            results[pid] = "go"
        except LostProcesses as err:
            results[pid] = str(err)
    threads = [threading.Thread(target=run, args=(p,)) for p in present]
    threads[0].start()
    for t in threads[1:]:
        t.start()
    for t in threads:
        t.join(timeout=timeout_s + 30)
    assert not any(t.is_alive() for t in threads)
    return results


def test_the_join_names_the_processes_that_never_came_on_every_process_that_did():
    results = _join_all(4, [0, 1, 3])
    assert set(results) == {0, 1, 3}
    assert all(r.startswith("process(es) 2 of 4 did not join within 2 s (--join-timeout)") for r in results.values()), \
        results


def test_the_join_goes_when_all_are_there_and_refuses_another_bundle_by_name():
    assert _join_all(3, [0, 1, 2]) == {0: "go", 1: "go", 2: "go"}
    refused = _join_all(3, [0, 1, 2], tokens={0: "a" * 64, 1: "a" * 64, 2: "b" * 64})
    assert "process 2 serves another bundle" in refused[0], refused
    # process 1 hears the reason if it reached process 0 before the refusal; a process that comes
    # after it finds no one listening (process 0 has ended the join) and says so
    assert all("process 2 serves another bundle" in refused[p] or "did not join" in refused[p]
               or "did not answer within 2 s" in refused[p] for p in (1, 2)), refused


def test_an_unreachable_coordinator_is_named_within_the_join_timeout():
    runtime = HostRuntime(f"127.0.0.1:{free_port()}", 2, 1, join_timeout_s=1)
    with pytest.raises(LostProcesses, match="did not answer within 1 s"):
        rendezvous(runtime, "x")


# ------------------------------------------------------------------ folders the tool did not write
def test_a_folder_that_looks_like_a_build_is_never_replaced(tmp_path, capsys):
    """`build --name X` where X is someone's folder holding a manifest.json or build.json, or a
    build folder copied from another --out (its marker's id was recorded there, not here)."""
    for sign in ("manifest.json", "build.json"):
        theirs = tmp_path / f"theirs-{sign}"
        theirs.mkdir()
        (theirs / sign).write_text("{}")
        (theirs / "precious.txt").write_text("keep me")
        code = cli.main(["build", "--model", "tiny", "--quiet", "--out", str(tmp_path), "--name", theirs.name])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and f"holds a {sign}, but this capibara-export did not write it" in err[0]
        assert (theirs / "precious.txt").read_text() == "keep me"
    mine = tmp_path / "mine"
    with staged_folder(mine) as staging:
        (staging / "build.json").write_text("{}")
    assert recorded_id(mine)
    ensure_replaceable(mine)                        # the tool's own: replaceable
    copied = tmp_path / "elsewhere" / "mine"
    copied.parent.mkdir()
    (copied.parent / ".capibara-export.lock").write_text("")   # what earlier versions left in --out
    import shutil
    shutil.copytree(mine, copied)                   # same marker and id, but not recorded beside it
    assert (copied / MARKER).is_file()
    with pytest.raises(UserError, match="did not write it here"):
        ensure_replaceable(copied)


# ------------------------------------------------------------------ parsers under attack
def _manifest_bytes(**changes) -> bytes:
    base = {"schema": mf.SCHEMA, "schema_version": mf.SCHEMA_VERSION}
    return json.dumps({**base, **changes}).encode()


@settings(max_examples=25, deadline=None)
@given(depth=st.integers(min_value=1_000, max_value=200_000), bracket=st.sampled_from(["[", "{\"a\":"]))
def test_deeply_nested_manifests_are_one_line(tmp_path_factory, depth, bracket):
    close = "]" if bracket == "[" else "}"
    data = (bracket * depth + "1" + close * depth).encode()
    with pytest.raises(BundleError):
        mf.parse(tmp_path_factory.getbasetemp(), data)


@settings(max_examples=10, deadline=None)
@given(digits=st.integers(min_value=5_000, max_value=100_000))
def test_an_integer_of_thousands_of_digits_is_one_line(tmp_path_factory, digits):
    data = b'{"schema_version": ' + b"7" * digits + b"}"
    with pytest.raises(BundleError, match="not valid JSON"):
        mf.parse(tmp_path_factory.getbasetemp(), data)


@settings(max_examples=40, deadline=None)
@given(rel=st.one_of(st.just("."), st.just("./a"), st.just("a/./b"), st.text(min_size=1, max_size=20).map(lambda s: s * 300),
                     st.builds(lambda n: "a" * n, st.integers(256, 5000))))
def test_artifact_paths_that_no_bundle_writes_are_refused(tmp_path_factory, rel):
    with pytest.raises(BundleError):
        mf.confined(tmp_path_factory.getbasetemp(), rel)


def test_an_artifact_listed_twice_is_refused_before_anything_is_hashed(tmp_path, monkeypatch):
    from capibara_export.export import schema

    monkeypatch.setattr(schema, "validate", lambda manifest: None)   # the rest of this manifest is not the point
    one = {"kind": "processor", "path": "processor", "sha256": "0" * 64, "size": 1}
    with pytest.raises(BundleError, match="lists processor 200 times"):
        mf.parse(tmp_path, _manifest_bytes(artifacts=[one] * 200))


@settings(max_examples=20, deadline=None)
@given(depth=st.integers(min_value=500, max_value=100_000))
def test_deeply_nested_plan_files_are_one_line(depth):
    text = "[p]\nparams = { embed = " + "[" * depth + "]" * depth + " }\n"
    with pytest.raises(UserError):
        parse_plans(text, "plans.toml")


def test_a_plan_file_with_a_huge_string_is_refused_at_once(tmp_path):
    import time

    big = tmp_path / "big.toml"
    big.write_text('[p]\ndescription = "' + "x" * (30 * 2 ** 20) + '"\n')
    begun = time.monotonic()
    code = cli.main(["plans", "--model", "tiny", "--plan-file", str(big)])
    assert code == 2 and time.monotonic() - begun < 30


def test_a_pickle_with_bytes_after_its_end_is_refused():
    data = pickle.dumps({"a": 1}, protocol=4)
    assert pickle_scan.globals_named(data) == set()
    with pytest.raises(pickle_scan.PickleRefused, match="bytes after the pickle's end"):
        pickle_scan.globals_named(data + pickle.dumps(print))


@pytest.mark.parametrize("args, message", [
    (["build", "--batch", ""], "empty list"),
    (["build", "--mesh", "\uff14x8"], "not of the form DATAxMODEL"),
    (["build", "--model", "tiny", "--name", "a\nb"], "must be one folder name"),
    (["verify", "x", "--processes", "0"], "below the minimum of 1"),
    (["verify", "x", "--trust-key", ""], "an empty path"),
    (["export", "x", "--random-weights", "--seed", "-1"], "below the minimum of 0"),
    (["keygen", "/dev/null"], "exists and is not a folder"),
    (["launch", "2", "--", "verify", "x"], "launch runs one of serve, server"),
    (["launch", "2", "--", "serve", "x", "--process-id", "1"], "--process-id is set by launch"),
])
def test_careless_options_are_one_line_and_exit_2(args, message, capsys):
    try:
        code = cli.main(args)
    except SystemExit as exit_:   # argparse's own refusal: one usage line, exit 2
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and message in err, err[-500:]
    assert not Path("/dev/null/signing.pem").exists()
