"""Fault injection: a disk that fills up mid-write, a process killed while it swapped folders,
two processes writing one folder, a Ctrl-C that Python swallows. Nothing the tool finished is
lost, nothing half-written stays, and each failure is one line with its fix."""

from __future__ import annotations

import errno
import gc
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from capibara_export.matrix import driver as build_module
from capibara_export import cli, interrupts
from capibara_export.matrix.cache import ResultCache
from capibara_export.matrix.staging import folder_lock

ONE_UNIT = ["build", "--model", "tiny", "--quiet", "--entries", "encode_image", "--plans", "dp", "--precisions",
            "fp32", "--batch", "32"]
NAME = "tiny-tpu-v4-64-4x8"


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(out: Path) -> list[str]:
    staging = [p.name for p in out.iterdir() if p.name.startswith((".tmp-", ".old-"))]
    return staging + [str(p) for p in out.glob(".cache/**/*.tmp")]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """--out holding one finished build (and its cache, so later runs compile nothing)."""
    out = tmp_path_factory.mktemp("out")
    assert cli.main([*ONE_UNIT, "--out", str(out)]) == 0
    return out


def _full_disk(path: Path, *args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", str(path))


def test_a_full_disk_while_writing_the_build_leaves_the_previous_one_intact(built, monkeypatch, capsys):
    before = snapshot(built / NAME)
    monkeypatch.setattr(build_module, "write_records", _full_disk)
    assert cli.main([*ONE_UNIT, "--out", str(built)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "records.jsonl: No space left on device; free some space or choose another --out" in err[0]
    assert snapshot(built / NAME) == before
    assert leftovers(built) == []


def test_a_full_disk_while_writing_the_cache_leaves_no_temporary_file(tmp_path, monkeypatch, capsys):
    real = Path.write_bytes

    def half_then_full(self: Path, data: bytes):
        if self.name.endswith(".tmp") and ".cache" in self.parts:
            real(self, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", half_then_full)
    assert cli.main([*ONE_UNIT, "--out", str(tmp_path)]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert leftovers(tmp_path) == [] and not (tmp_path / NAME).exists()


def test_a_process_killed_while_swapping_folders_loses_no_build(built, monkeypatch, capsys):
    """The instant between moving the old folder aside and renaming the new one into place:
    a process killed there left `.old-NAME-PID` and `.tmp-NAME-PID` and no folder. The next
    run puts the old build back before it does anything, so even a run that then fails
    leaves the previous build where it was; a run that succeeds replaces it."""
    before = snapshot(built / NAME)
    dead = 4_000_000  # above pid_max: no live process has it
    os.replace(built / NAME, built / f".old-{NAME}-{dead}")
    (built / f".tmp-{NAME}-{dead}" / "hlo").mkdir(parents=True)
    monkeypatch.setattr(build_module, "write_records", _full_disk)
    assert cli.main([*ONE_UNIT, "--out", str(built)]) == 2
    assert snapshot(built / NAME) == before and leftovers(built) == []
    monkeypatch.undo()
    capsys.readouterr()
    assert cli.main([*ONE_UNIT, "--out", str(built)]) == 0
    assert (built / NAME / "records.jsonl").is_file() and leftovers(built) == []


def test_temporary_cache_files_of_dead_processes_are_swept(built):
    cache = ResultCache(built / ".cache")
    shard = next(p for p in cache.root.iterdir() if p.is_dir())
    dead, live = shard / ".x.json.4000000.tmp", shard / f".x.json.{os.getpid()}.tmp"
    dead.write_bytes(b"half")
    live.write_bytes(b"being written")
    assert cli.main([*ONE_UNIT, "--out", str(built)]) == 0
    assert not dead.exists() and live.exists()
    live.unlink()


def test_a_second_process_writing_the_same_folder_is_refused_at_once(built):
    """This process holds the folder (as a running build does); a build or an export of the
    same folder from another process is refused before it compiles, in one line; a build
    into another folder of the same --out goes ahead."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    with folder_lock(built / NAME):
        assert (built / f".{NAME}.capibara-export.lock").is_file()
        started = time.perf_counter()
        second = subprocess.run([sys.executable, "-m", "capibara_export", *ONE_UNIT, "--out", str(built)],
                                capture_output=True, text=True, timeout=120, env=env)
        export = subprocess.run([sys.executable, "-m", "capibara_export", "export", str(built / NAME),
                                 "--random-weights", "--no-saved-model"], capture_output=True, text=True, timeout=300,
                                env=env)
        other = subprocess.run([sys.executable, "-m", "capibara_export", *ONE_UNIT, "--out", str(built), "--name",
                                "other"], capture_output=True, text=True, timeout=300, env=env)
    assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
    assert "another capibara-export process is writing it right now" in second.stderr
    assert time.perf_counter() - started < 300
    assert export.returncode == 2 and "another capibara-export process is writing it" in export.stderr, export.stderr
    assert "Traceback" not in second.stderr + export.stderr
    assert other.returncode == 0, other.stderr[-2000:]
    assert not (built / NAME / "bundle").exists()
    assert not list(built.glob(".*.capibara-export.lock")), "a lock file outlived its holder"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallowed one, as intended
def test_a_ctrl_c_swallowed_by_a_gc_callback_still_ends_the_command_with_130(monkeypatch, capsys):
    """Python prints and drops a KeyboardInterrupt raised inside a garbage-collection callback
    (XLA has one); the command notices the remembered Ctrl-C when it returns."""
    swallowed = []

    def callback(phase, info):
        if phase == "start" and not swallowed:
            swallowed.append(True)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler runs here, inside the callback

    def command(args):
        gc.callbacks.append(callback)
        try:
            gc.collect()
        finally:
            gc.callbacks.remove(callback)
        return 0

    monkeypatch.setitem(cli.COMMANDS, "plans", command)
    assert cli.main(["plans"]) == 130
    assert swallowed and "interrupted after the work had finished" in capsys.readouterr().err
    assert not interrupts.requested()   # acted on, so the next build in this process is not interrupted


def test_a_cpu_run_the_host_memory_cannot_hold_is_not_started(monkeypatch):
    """Simulated CPU devices share the host's memory: an executable whose compiled peak times
    its device count exceeds what is available is reported as not runnable, never started."""
    from capibara_export.export import executables

    manifest = {"mesh": {"platform": "cpu", "devices": 8, "device_kind": "cpu"}}
    artifact = {"analysis": {"peak_bytes_per_device": 3 * 2 ** 30}}
    monkeypatch.setattr(executables, "host_available_bytes", lambda: 16 * 2 ** 30)
    ok, why = executables.runnable_here(manifest, artifact)
    assert not ok and why == ("needs about 24.0 GiB of host memory (3.00 GiB per device x 8 simulated devices, "
                              "the compiled peak); 16.0 GiB are available here")
    monkeypatch.setattr(executables, "host_available_bytes", lambda: 32 * 2 ** 30)
    assert executables.runnable_here(manifest, artifact) == (True, "")
    assert executables.runnable_here(manifest, {"analysis": {"peak_bytes_per_device": "3 GiB"}}) == (True, "")


def test_every_bad_input_error_is_one_user_error_type():
    """The CLI catches one type: every package's bad-input error subclasses UserError, and a
    bug (any other exception) is not mistaken for one."""
    import importlib

    from capibara_export.errors import is_user_error, one_line_report
    from model.errors import UserError

    errors = {"model.config": "ConfigError", "model.hf": "CheckpointError", "model.processor": "ProcessorError",
              "sharding.plans": "PlanError", "sharding.precision": "PrecisionError",
              "capibara_export.matrix.programs": "ProgramError", "capibara_export.matrix.targets": "TargetError",
              "capibara_export.export.manifest": "BundleError", "capibara_export.matrix.folder": "BuildFolderError",
              "capibara_export.bench_report": "BenchReportError", "capibara_export.semiotic.module": "SemioticError",
              "capibara_export.semiotic.codes": "CodesError"}
    for module, name in errors.items():
        cls = getattr(importlib.import_module(module), name)
        assert issubclass(cls, UserError), f"{module}.{name}"
        assert is_user_error(cls("x")) and one_line_report(cls("bad\ninput:  fix")) == "bad input: fix"
    assert is_user_error(FileNotFoundError("no such file"))
    assert not is_user_error(ValueError("a bug")) and one_line_report(KeyError("a bug")) is None
