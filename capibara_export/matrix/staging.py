"""Writing output folders safely: where a build or bundle may go, and how it gets there.

- `check_output_folder`, `check_folder_name`, `ensure_replaceable`: refusals before any
  work (a file as --out, no room, `--name ../x`, a folder the tool did not write).
- `folder_lock`: one writer per folder; a second build or export into the same folder is
  refused at once instead of racing the first one's rename.
- `staged_folder`: everything is written into a hidden sibling and renamed into place only
  when complete, so an interrupted or failed run leaves the previous folder as it was.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from .programs import ProgramError

MIN_FREE_BYTES = 256 * 2 ** 20  # a build writes records, gzipped HLO and a report: tens of MB for base


def check_output_folder(out: Path) -> None:
    """--out must be (or be creatable as) a writable folder with room, checked before the
    first unit compiles rather than after minutes of compiling."""
    here = Path(out).absolute()
    while not here.exists() and here != here.parent:
        here = here.parent
    if not here.is_dir():
        raise ProgramError(f"--out {out}: {here} is a file, not a folder; choose a folder")
    if not os.access(here, os.W_OK | os.X_OK):
        raise ProgramError(f"--out {out}: {here} is not writable; choose a writable folder")
    free = shutil.disk_usage(here).free
    if free < MIN_FREE_BYTES:
        raise ProgramError(f"--out {out}: only {free / 2 ** 20:.0f} MiB free on that disk; a build needs at least "
                           f"{MIN_FREE_BYTES / 2 ** 20:.0f} MiB: free some space or choose another --out")




# Written into every folder the tool creates, with a random id that is also recorded beside
# the folder (`.capibara-export-NAME.id` in its parent). A folder is only ever replaced when
# both agree: a build.json, a manifest.json or a marker that came with a copied or received
# folder proves nothing, since its id was never recorded here.
MARKER = ".capibara-export"
_MARKER_TEXT = "written by capibara-export; this folder may be replaced by the next run\n"
_MAX_MARKER_BYTES = 4096


def _id_file(final: Path) -> Path:
    return final.parent / f".capibara-export-{final.name}.id"


def _read_small(path: Path) -> str | None:
    """A regular file's text, or None (missing, a link, a device, too large, not text)."""
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > _MAX_MARKER_BYTES:
            return None
        return path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError):
        return None


def _marker_id(text: str | None) -> str | None:
    for line in (text or "").splitlines():
        if line.startswith("id: "):
            return line[4:].strip() or None
    return None


def recorded_id(final: Path) -> str | None:
    """The id of the folder this tool wrote at `final`, if it can prove it did: the folder's
    marker and the record beside it agree. Folders from before ids (the marker's first line
    alone) count as the tool's only where this parent also holds the tool's lock file."""
    final = Path(final)
    marker = _read_small(final / MARKER)
    if marker is None:
        return None
    mine, recorded = _marker_id(marker), (_read_small(_id_file(final)) or "").strip()
    if mine:
        return mine if recorded == mine else None
    if marker == _MARKER_TEXT and (final.parent / _LEGACY_LOCK_FILE).is_file() and not recorded:
        return ""   # written by an earlier version here: replaceable once, then given an id
    return None


def ensure_replaceable(final: Path, flag: str = "--out/--name") -> None:
    """Refuse, before any work, to replace a folder the tool cannot prove it wrote."""
    final = Path(final)
    if not os.path.lexists(final):
        return
    if final.is_symlink() or not final.is_dir():
        raise ProgramError(f"{final}: exists and is not a folder capibara-export wrote; refusing to replace it: "
                           f"choose another {flag}")
    if recorded_id(final) is None:
        what = next((f"holds a {sign}, but " for sign in ("build.json", "manifest.json") if (final / sign).exists()), "")
        raise ProgramError(f"{final}: exists and {what}this capibara-export did not write it here (no marker id "
                           f"recorded beside it); refusing to replace it: choose another {flag}, or remove it "
                           "yourself")


def check_folder_name(name: str | None) -> None:
    """`--name` becomes one folder inside --out: one plain path component."""
    if name is None:
        return
    if (not name or name in (".", "..") or name.startswith(".") or any(c in name for c in "/\\\0")
            or len(name) > 200 or not name.isprintable() or name != name.strip()):
        raise ProgramError(f"--name {name!r}: must be one folder name (no '/', not '.' or '..', not hidden, no control "
                           "characters or surrounding spaces), "
                           "e.g. --name base-v4-32-run2")


_LOCK_SUFFIX = ".capibara-export.lock"
_LEGACY_LOCK_FILE = ".capibara-export.lock"   # the one shared lock file earlier versions left in --out
_held: dict[str, int] = {}        # folder -> nesting depth of this process's hold on it


def lock_file(final: Path) -> Path:
    """The hidden lock file beside `final` while a process writes it: `.NAME.capibara-export.lock`."""
    return final.parent / f".{final.name}{_LOCK_SUFFIX}"


@contextlib.contextmanager
def folder_lock(final: Path, flag: str = "--out/--name") -> Iterator[None]:
    """Hold the right to write `final` for the block; refused at once (never waited for) when
    another process holds it. The lock is an fcntl lock on a hidden file beside `final`
    (`lock_file`), so the kernel releases it when the holder exits however it exits and a
    crash never leaves a lock held. The file is removed when the block ends (a killed
    process leaves an empty file that the next run takes over). Re-entrant within a process
    (a build that exports takes its folder's lock once). Leftovers of a process that died
    while writing `final` are cleaned up (and a replaced folder restored) under it.

    Take it only once a request has been accepted: it creates `final`'s parent folder."""
    final = Path(final).absolute()
    key = str(final)
    if _held.get(key):
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    path = lock_file(final)
    fd = _acquire(path)
    if fd is None:
        raise ProgramError(f"{final}: another capibara-export process is writing it right now; wait for it to "
                           f"finish, or choose another {flag}")
    _held[key] = 1
    try:
        _recover(final)
        yield
    finally:
        _held[key] = 0
        # unlinked while still locked: a process that opened the old file before this point
        # finds, once it gets the lock, that the path no longer names its file, and starts over
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)   # closing the only fd this process has on the file releases the lock


def _acquire(path: Path) -> int | None:
    """An fd holding an exclusive lock on the file at `path`, or None when another process
    holds it. Retried when the file was removed or replaced between open and lock (its
    holder released it), so two processes never hold locks on two different files."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            return None
        if _same_file(fd, path):
            return fd
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _recover(final: Path) -> None:
    """Under `final`'s lock, any `.tmp-NAME-PID` / `.old-NAME-PID` sibling is a dead process's:
    a staging folder (removed) or the previous folder moved aside in the instant before the
    new one took its place (put back if `final` is missing, so no finished build is lost)."""
    pattern = re.compile(rf"\.(tmp|old)-{re.escape(final.name)}-\d+")
    leftovers = [p for p in final.parent.iterdir() if pattern.fullmatch(p.name) and p.is_dir()
                 and not p.is_symlink()]
    olds = sorted((p for p in leftovers if p.name.startswith(".old-")), key=lambda p: p.stat().st_mtime)
    if olds and not os.path.lexists(final):
        os.replace(olds[-1], final)
        leftovers.remove(olds[-1])
    for p in leftovers:
        shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def staged_folder(final: Path) -> Iterator[Path]:
    """A temporary sibling folder that replaces `final` only if the block completes, and
    only if `final` is absent or a folder this tool wrote (ensure_replaceable), all under
    `final`'s lock, so two processes never swap the same folder at once."""
    final = Path(final)
    with folder_lock(final):
        ensure_replaceable(final)
        folder_id = (recorded_id(final) if final.exists() else None) or uuid.uuid4().hex   # kept across rewrites
        tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir()
            (tmp / MARKER).write_text(f"{_MARKER_TEXT}id: {folder_id}\n", encoding="ascii")
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        _id_file(final).write_text(folder_id + "\n", encoding="ascii")   # before the swap: a crash keeps it true
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
