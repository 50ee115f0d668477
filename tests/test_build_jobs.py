"""`build --jobs N`: units compiled in worker processes give the records, HLO, analysis and
selection a build in one process gives (only timings differ), an uncached parallel build
still hands its executables to the export, a Ctrl-C ends the workers, and bad counts are
refused."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from capibara_export import cli
from capibara_export.analysis import hlo
from capibara_export.matrix.derive import derive
from capibara_export.matrix import workers
from capibara_export.matrix.driver import BuildRequest, kept_executables, run_build
from capibara_export.matrix.programs import ProgramError

TIMINGS = ("compile_s", "lower_s")


def _request(out: Path, use_cache: bool = True, plans: tuple[str, ...] = ("dp", "fsdp")) -> BuildRequest:
    return BuildRequest(model="tiny", entries=("encode_image", "caption"), plans=plans, precisions=("fp32",),
                        batches=(32,), out=out, use_cache=use_cache, derive_rounds=0)


def _content(folder: Path) -> dict:
    records = [{k: v for k, v in json.loads(line).items() if k not in TIMINGS}
               for line in (folder / "records.jsonl").read_text().splitlines()]
    hlo = {p.name: gzip.decompress(p.read_bytes()) for p in sorted((folder / "hlo").iterdir())}
    derived = {name: (folder / name).read_bytes() for name in ("analysis.json", "selection.json", "summary.md",
                                                                "report.html")}
    return {"records": records, "hlo": hlo, "derived": derived}


def test_a_parallel_build_writes_what_a_sequential_one_writes(tmp_path, monkeypatch):
    finish = lambda staging, result: derive(staging, name=result.folder.name)  # noqa: E731
    one = run_build(_request(tmp_path / "one"), finish=finish, jobs=1)
    parsed = []
    real = hlo.HloProgram.__init__
    monkeypatch.setattr(hlo.HloProgram, "__init__", lambda self, text: parsed.append(1) or real(self, text))
    two = run_build(_request(tmp_path / "two"), finish=finish, jobs=2)
    assert [r.status for r in one.records] == ["ok"] * 4
    assert one.compiled and not two.compiled          # the second build compiled nothing in this process ...
    assert parsed == []                               # ... and parsed no HLO: the workers analysed their units
    content = _content(one.folder)
    assert content == _content(two.folder)
    # the HLO kept is the caller's and the checkout's own neither (XLA's Python stack tables are dropped)
    repo = str(Path(__file__).resolve().parents[1]).encode()
    assert not any(b"stack_frame_id" in text or b"StackFrames" in text or repo in text
                   for text in content["hlo"].values())


def test_an_uncached_parallel_build_keeps_its_executables_for_the_export(tmp_path):
    result = run_build(_request(tmp_path, use_cache=False), jobs=2)
    assert sorted(result.kept) == sorted(r.unit.id for r in result.records) and not result.compiled
    payload, trees = kept_executables(result.folder, result.compiled, result.kept)(result.records[0].unit.id)
    assert len(payload) > 10_000 and json.loads(trees)


def test_workers_are_used_only_where_they_pay(monkeypatch):
    monkeypatch.setattr(workers, "cores", lambda: 16)
    assert workers.resolve_jobs(None, "tpu", 3) == 1            # too few units to start workers for
    assert workers.resolve_jobs(None, "tpu", 12) == 3           # 4 units per worker
    assert workers.resolve_jobs(None, "tpu", 200) == 16         # at most the core count
    assert workers.resolve_jobs(None, "cpu", 200) == 1          # XLA:CPU compiles are short: in-process
    assert workers.resolve_jobs(4, "cpu", 200) == 4             # unless asked
    assert workers.resolve_jobs(8, "tpu", 3) == 3               # never more workers than units
    assert workers.resolve_jobs(4, "gpu", 200) == 1             # a local GPU: workers would each claim it


def test_a_bad_jobs_count_is_refused_before_any_compile(tmp_path, capsys):
    with pytest.raises(ProgramError, match="--jobs 0: give a positive number"):
        run_build(_request(tmp_path), jobs=0)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["build", "--model", "tiny", "--jobs", "two", "--out", str(tmp_path)])
    assert exit_.value.code == 2 and "'two' is not a whole number" in capsys.readouterr().err
    assert not list(tmp_path.glob("tiny-*"))


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie (Linux /proc)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _children(pid: int) -> list[int]:
    """Live processes whose parent is `pid` (Linux /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def test_ctrl_c_ends_the_workers_and_keeps_what_they_finished(tmp_path):
    args = [sys.executable, "-m", "capibara_export", "build", "--model", "tiny", "--quiet", "--jobs", "2",
            "--entries", "encode_image,caption,score", "--plans", "replicated,dp,fsdp", "--precisions", "fp32",
            "--derive-rounds", "0", "--out", str(tmp_path)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)   # its own process group: Ctrl-C as a terminal sends it
    results = tmp_path / ".cache" / "results"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(results.glob("*/*.json"))) < 2:
        time.sleep(0.2)
    # the compile workers (multiprocessing's resource tracker, also a child, ends on its own)
    workers_seen = [p for p in _children(proc.pid) if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert len(workers_seen) == 2
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted; finished units are cached" in err
    assert not [p for p in workers_seen if _alive(p)], "the build exited before its workers"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cache"]
    assert not list(results.glob("*/*.tmp"))
    assert 2 <= len(list(results.glob("*/*.json"))) < 9


def test_a_killed_worker_is_one_clear_error_and_no_folder(tmp_path):
    args = [sys.executable, "-m", "capibara_export", "build", "--model", "tiny", "--quiet", "--jobs", "2",
            "--entries", "encode_image,caption,score", "--plans", "replicated,dp,fsdp", "--precisions", "fp32",
            "--derive-rounds", "0", "--out", str(tmp_path)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, spawned = time.time() + 120, []
    while time.time() < deadline and len(spawned) < 2:
        spawned = [p for p in _children(proc.pid) if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
        time.sleep(0.2)
    assert len(spawned) == 2
    time.sleep(3)    # past start-up, into the compiles
    os.kill(spawned[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    (line,) = [line for line in err.splitlines() if line.startswith("capibara-export: error:")]
    assert "a compile worker process ended without its result" in line and "--jobs 1" in line
    assert "Traceback" not in err
    assert not [p.name for p in tmp_path.iterdir() if p.name != ".cache"]
