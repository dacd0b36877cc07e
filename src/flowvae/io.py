"""Atomic file writes: a crash never leaves a half-written file under the final name."""

from __future__ import annotations

import errno
import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

TEMP_SUFFIX = ".flowvae-tmp"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, fsync, then rename over it.

    Only a regular file (or nothing) is replaced: renaming over a directory fails anyway, and
    renaming over ``/dev/null`` or a FIFO would silently swap a special file for a plain one."""
    path = Path(path)
    if path.exists() and not path.is_file():
        kind = "a directory" if path.is_dir() else "not a regular file"
        raise OSError(errno.EISDIR if path.is_dir() else errno.EINVAL, f"{kind}; give a file name", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp creates 0600; the final file gets the usual mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.filename is None:  # a failed write or fsync names no file
            raise OSError(err.errno, err.strerror or str(err), str(path)) from err
        raise


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def existing_ancestor(path: str | Path) -> Path:
    """The nearest of ``path``'s parents that exists (the root at worst)."""
    return next(parent for parent in Path(path).absolute().parents if parent.exists())


def probe_writable(directory: str | Path) -> None:
    """Create and remove a temporary file in ``directory``; raises ``OSError`` if that fails.
    (``os.access`` says yes to root on read-only file systems, /proc and the like: only trying tells.)"""
    fd, probe = tempfile.mkstemp(dir=directory, prefix=".flowvae-probe.", suffix=TEMP_SUFFIX)
    os.close(fd)
    os.unlink(probe)


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete the temporary files that a killed flowvae write left in ``directory``
    (``.NAME.XXXX.flowvae-tmp``); anyone else's files are left alone."""
    stale = [p for p in Path(directory).glob(f".*{TEMP_SUFFIX}") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())
