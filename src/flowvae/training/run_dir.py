"""The run directory ``--out`` as a place to work in: checked before a run starts, locked while it
runs, left as it was when a new run fails before its first checkpoint, and seen by every worker.

A new run starts in a directory that holds no run (or only the files of a start that was killed
before its first checkpoint, :func:`interrupted_start`); ``resume`` needs its ``checkpoint.pt``.
The lock ``.flowvae.lock`` holds the pid of the process at work; a second process gets a one-line
:class:`RunDirError` naming it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

import torch

from flowvae import distributed
from flowvae.io import TEMP_SUFFIX, atomic_write_text, existing_ancestor, probe_writable, remove_stale_temporaries
from flowvae.training.checkpoint import CheckpointError, saved_epoch

logger = logging.getLogger(__name__)

LOCK_NAME = ".flowvae.lock"
SHARED_PROBE_NAME = ".flowvae.shared"
RUN_FILES = ("config.yaml", LOCK_NAME, SHARED_PROBE_NAME)
# What a new run writes before its first checkpoint (besides TensorBoard's folder and temporaries).
FIRST_EPOCH_FILES = ("config.yaml", "best.pt", "metrics.jsonl", "metrics.csv", "curves.png")


class RunDirError(RuntimeError):
    """A run directory that cannot be used: not writable, not a run, or in use by another process."""


# ------------------------------------------------------------------------------------------ the lock


def _open_lock(out: Path, create: bool = True) -> TextIO:
    """The run's lock file, opened for reading and writing without following a symbolic link: a lock
    that is a link, a FIFO or anything but a regular file is refused, so nothing outside the run is
    ever written through it."""
    path = out / LOCK_NAME
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as err:
        if err.errno == errno.ELOOP or path.is_symlink():
            raise RunDirError(f"{path} is a symbolic link; flowvae does not write through it (remove it)") from None
        raise RunDirError(f"--out {out} cannot be written: {path}: {err.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise RunDirError(f"{path} is not a regular file; flowvae does not write to it (remove it)")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "r+")


def _take_lock(handle: TextIO, out: Path) -> None:
    """Lock the open lock file without waiting, or raise a one-line error naming its holder's pid."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        raise RunDirError(f"{out} is in use by another flowvae process (pid {holder})") from None


@contextlib.contextmanager
def run_lock(out: Path, on_error: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on the run directory; a second process gets a one-line error.
    When the body raises, temporaries are removed and ``on_error`` runs, still under the lock."""
    handle = _open_lock(out)
    try:
        _take_lock(handle, out)
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()))
            handle.flush()
            yield
        except BaseException:
            remove_stale_temporaries(out)  # a write cut short by a signal between mkstemp and its try
            if on_error is not None:
                on_error()
            raise
    finally:
        handle.close()


# ------------------------------------------------------------------------ debris of a start that failed


def interrupted_start(out: Path) -> list[Path]:
    """The files that a new run killed before its first checkpoint left in ``out`` (config.yaml, the
    first epoch's best.pt, metrics, curves, TensorBoard events, temporaries), the lock excepted;
    [] when ``out`` holds a checkpoint or anything else, which is then never taken for debris."""
    if not out.is_dir() or (out / "checkpoint.pt").exists() or (out / "checkpoint.pt").is_symlink():
        return []
    entries = [p for p in out.iterdir() if p.name != LOCK_NAME]
    for p in entries:
        ours = (p.name in FIRST_EPOCH_FILES or p.name.endswith(TEMP_SUFFIX)) and p.is_file() and not p.is_symlink()
        if not (ours or (p.name == "tensorboard" and p.is_dir() and not p.is_symlink())):
            return []
    if not (out / "config.yaml").is_file() and not all(p.name.endswith(TEMP_SUFFIX) for p in entries):
        return []  # flowvae writes config.yaml before any other file: without it, these are someone else's
    # The first epoch's weights only (a truncated write is debris too): a later epoch's are a user's result.
    if (out / "best.pt").exists() and saved_epoch(out / "best.pt") not in (None, 1):
        return []
    return entries


def clear_interrupted_start(out: Path) -> None:
    """Remove what :func:`interrupted_start` finds, saying so."""
    for path in interrupted_start(out):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        logger.info("removed %s, left by a start that was interrupted before its first checkpoint", path)


def remove_failed_start(out: Path, created: Path | None, *, ours: bool) -> None:
    """Undo a start that failed before its first checkpoint.  ``ours``: this process held the run's
    lock, so every flowvae file in ``out`` is its own (a new run starts in a directory holding at most
    config.yaml and the lock) and is removed; then the directories it created, if empty."""
    if ours:
        for name in {*RUN_FILES, *FIRST_EPOCH_FILES}:
            (out / name).unlink(missing_ok=True)
        if (out / "tensorboard").is_dir() and not (out / "tensorboard").is_symlink():
            shutil.rmtree(out / "tensorboard", ignore_errors=True)
        remove_stale_temporaries(out)
    if created is None:
        return
    for directory in (out, *out.parents):
        with contextlib.suppress(OSError):
            directory.rmdir()  # only succeeds when empty: a user's file is never removed
        if directory == created or directory.exists():
            break


# ----------------------------------------------------------------------------- before a run starts


def prepare_out_dir(out: Path, resume: bool) -> Path | None:
    """Check ``out`` can hold this run; returns the topmost directory created now (``out`` or one of
    its parents), or None.  One-line errors."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file, not a directory")
    parent = existing_ancestor(out)
    if not parent.is_dir():
        raise RunDirError(f"--out {out}: {parent} is a file, not a directory")
    if (out / LOCK_NAME).exists() or (out / LOCK_NAME).is_symlink():  # another process at work here comes first
        with _open_lock(out, create=False) as handle:
            _take_lock(handle, out)
            fcntl.flock(handle, fcntl.LOCK_UN)
    if resume:
        if not (out / "checkpoint.pt").is_file():
            raise CheckpointError(f"--resume given but {out / 'checkpoint.pt'} does not exist")
        return None
    if (out / "checkpoint.pt").exists():
        raise CheckpointError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if out.is_dir() and any(p.name not in RUN_FILES for p in out.iterdir()) and not interrupted_start(out):
        raise RunDirError(f"--out {out} is a non-empty directory that holds no flowvae run; choose another --out")
    missing = [d for d in (out, *out.parents) if not d.exists()]
    created = missing[-1] if missing else None
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe_writable(out)
    except OSError as err:
        if created is not None:
            remove_failed_start(out, created, ours=False)
        raise RunDirError(f"--out {out} cannot be written: {err.strerror}") from None
    return created


# ----------------------------------------------------------------------------- seen by every worker


def require_visible(path: Path, context: distributed.Context, device: torch.device) -> None:
    """Every worker must see ``path``: flowvae needs ``--out`` on a filesystem that all nodes share."""
    if not context.distributed:
        return
    missing = torch.tensor(0.0 if path.is_file() else 1.0, device=device)
    if context.all_reduce_sum(missing).item() > 0:
        raise CheckpointError(
            f"{int(missing.item())} worker(s) cannot see {path}: with several nodes, --out must "
            "be on a filesystem that all of them share"
        )


def require_shared_out(out: Path, context: distributed.Context, device: torch.device) -> None:
    """Every worker must see what worker 0 writes in ``out``: checked before any work, with a file
    of a random token that worker 0 writes, every worker reads, and worker 0 removes."""
    if not context.distributed:
        return
    probe = out / SHARED_PROBE_NAME
    token = torch.zeros((), dtype=torch.int64, device=device)
    if context.is_main:
        token.fill_(int.from_bytes(os.urandom(7), "little"))
        atomic_write_text(probe, str(int(token)))
    context.all_reduce_sum(token)  # every worker gets worker 0's token, after the file is written
    try:
        seen = probe.read_text().strip() == str(int(token))
    except OSError:
        seen = False
    missing = context.all_reduce_sum(torch.tensor(0.0 if seen else 1.0, device=device))
    if context.is_main:
        probe.unlink(missing_ok=True)
    if missing.item() > 0:
        raise RunDirError(
            f"{int(missing.item())} worker(s) cannot see {out}: with several nodes, --out must be on "
            "a filesystem that all of them share"
        )
