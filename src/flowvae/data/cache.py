"""Where data files live, and how they get there: a checksummed, atomic download cache.

Checksums are written as ``"<algorithm>:<hex digest>"`` with any :mod:`hashlib` algorithm
(``"md5:c58f..."``); a bare hex digest means SHA-256. ``None`` means "unknown": the file is then
only checked by the loader that parses it.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from flowvae.io import current_umask

from .errors import DataError

__all__ = ["default_data_dir", "sha256_of", "file_digest", "download", "fetch"]

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20
_TIMEOUT_S = 60.0


def default_data_dir() -> Path:
    """The data directory: ``$FLOWVAE_DATA`` if set (and non-empty), else ``~/.cache/flowvae``."""
    env = os.environ.get("FLOWVAE_DATA")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "flowvae"


def _parse_checksum(checksum: str) -> tuple[str, str]:
    """Split ``"algo:hex"`` (or a bare SHA-256 hex digest) into ``(algo, hex)``."""
    algo, sep, digest = checksum.partition(":")
    if not sep:
        algo, digest = "sha256", checksum
    algo = algo.lower()
    if algo not in hashlib.algorithms_available:
        raise ValueError(f"unknown hash algorithm {algo!r} in checksum {checksum!r}")
    return algo, digest.lower()


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_of(path: str | Path) -> str:
    """Hex SHA-256 of a file."""
    return file_digest(path, "sha256")


def _verify(path: Path, checksum: str) -> None:
    """Raise :class:`DataError` ("corrupt") if ``path`` does not match ``checksum``."""
    algo, expected = _parse_checksum(checksum)
    actual = file_digest(path, algo)
    if actual != expected:
        raise DataError(
            f"{path}: corrupt file ({algo} is {actual}, expected {expected}); delete it or replace it with a good copy"
        )


def download(url: str, dest: str | Path, sha256: str | None) -> Path:
    """Download ``url`` to ``dest`` atomically, checking ``sha256`` (see module doc) if given.

    The bytes go to a temporary file beside ``dest`` that is renamed onto ``dest`` only once the
    checksum matches, so ``dest`` is never half-written; the temporary file is removed on any
    failure. Any ``urllib`` scheme works, ``file://`` included.

    Raises:
        DataError: on a network or write failure, or a checksum mismatch.
    """
    dest = Path(dest)
    algo, expected = _parse_checksum(sha256) if sha256 is not None else ("sha256", None)
    created = [d for d in (dest.parent, *dest.parent.parents) if not d.exists()]  # removed again on failure
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    except OSError as exc:
        _remove_empty(created)
        raise DataError(
            f"cannot write to data directory {dest.parent} ({exc.strerror or exc}); "
            "pass another data_dir or set FLOWVAE_DATA"
        ) from None
    tmp = Path(tmp_name)
    try:
        h = hashlib.new(algo)
        logger.info("downloading %s to %s", url, dest)
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response:
                    while chunk := response.read(_CHUNK):
                        h.update(chunk)
                        out.write(chunk)
            except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
                reason = getattr(exc, "reason", None) or exc
                raise DataError(
                    f"could not download {url} ({reason}); download it yourself and place it at {dest}"
                ) from None
        actual = h.hexdigest()
        if expected is not None and actual != expected:
            raise DataError(f"{dest.name}: checksum mismatch for {url} ({algo} expected {expected}, got {actual})")
        tmp.chmod(0o666 & ~current_umask())  # mkstemp made it 0600; the file gets the mode the umask asks for
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        _remove_empty(created)
        raise
    return dest


def _remove_empty(directories: list[Path]) -> None:
    """Remove the directories a failed download created, deepest first, as long as they are empty."""
    for directory in directories:
        try:
            directory.rmdir()
        except OSError:
            return


_download_file = download  # `fetch` has a parameter named `download`


def fetch(
    filename: str,
    data_dir: str | Path,
    url: str | Sequence[str] | None,
    sha256: str | None,
    download: bool,
) -> Path:
    """Path of ``data_dir/filename``, downloading it first if it is missing and allowed.

    A cached file is checked against ``sha256`` when that is known. ``url`` may be a sequence of
    mirrors, tried in turn; ``None`` means the file cannot be downloaded.

    Raises:
        DataError: the cached file is corrupt, or the file is missing and cannot be downloaded.
    """
    data_dir = Path(data_dir)
    path = data_dir / filename
    if path.is_file():
        if sha256 is not None:
            _verify(path, sha256)
        return path
    urls = [url] if isinstance(url, str) else list(url or ())
    if not urls:
        raise DataError(f"{filename} not found in {data_dir} and there is no URL to download it from")
    if not download:
        raise DataError(
            f"{filename} not found in {data_dir}; download it from {urls[0]} into that directory "
            "(or call with download=True)"
        )
    for i, candidate in enumerate(urls):
        try:
            return _download_file(candidate, path, sha256)
        except DataError as exc:
            if i == len(urls) - 1:
                raise
            logger.warning("%s; trying the next mirror", exc)
    raise AssertionError("unreachable")
