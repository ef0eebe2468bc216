"""Data files on disk: where they live, checksums, and downloads that leave nothing half-done.

Checksum policy (``config.data.checksums``), for files whose official MD5 is
known:

- ``"warn"`` (default): files that differ from the official release (a
  re-encoded or otherwise modified copy) give one `DataChecksumWarning`
  naming them, and training goes on with them;
- ``"strict"``: such files stop the load with a `DataFileError`;
- ``"off"``: files are not hashed.

Downloads go to a temporary sibling directory first and are checked against
their official hash there, so a failed or corrupt download never leaves
partial files where the loader looks. From an archive only the regular files
of its data folder are copied out (no links, subfolders or paths that leave
it; no ``tarfile`` extraction filter needed, which older Python 3.10 and 3.11
releases lack). Several processes may download into the same empty directory
at once (the processes of a run on one shared disk): the first to move its
copy in wins, the others keep the files already there.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pathlib
import posixpath
import shutil
import tarfile
import tempfile
import warnings
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence

import pooch

from jbn.train.datasets.base import DataChecksumWarning, DataFileError, DataNotFoundError

__all__ = [
    "CHECKSUM_MODES",
    "DATA_DIR_ENV",
    "base_dir",
    "download_archive",
    "download_files",
    "md5sum",
    "verify_checksums",
]

DATA_DIR_ENV = "JBN_DATA_DIR"
CHECKSUM_MODES = ("warn", "strict", "off")
DOWNLOAD_TIMEOUT_S = 10.0


def base_dir(data_dir: str | os.PathLike | None) -> pathlib.Path:
    """``data_dir`` if given, else ``$JBN_DATA_DIR``, else the user cache (``pooch.os_cache("jbn")``)."""
    if data_dir is None:
        data_dir = os.environ.get(DATA_DIR_ENV) or pooch.os_cache("jbn")
    return pathlib.Path(data_dir).expanduser()


def md5sum(path: str | os.PathLike) -> str:
    """Hex MD5 of a file (the digest the official releases publish; integrity, not security)."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_checksums(
    directory: pathlib.Path, official_md5: Mapping[str, str], mode: str, title: str
) -> list[str]:
    """Compares the files of ``directory`` named in ``official_md5`` with their official MD5.

    Files that are absent are skipped (the loader reports missing files).

    Args:
        directory: Where the files are.
        official_md5: File name -> MD5 of the official release.
        mode: One of `CHECKSUM_MODES`.
        title: The data set's name in messages, e.g. ``"CIFAR-10"``.

    Returns:
        The names of the files that differ (empty with ``mode="off"``).

    Raises:
        DataFileError: If files differ and ``mode="strict"``.
    """
    if mode not in CHECKSUM_MODES:
        raise ValueError(f"checksums={mode!r}; expected one of {CHECKSUM_MODES}.")
    if mode == "off":
        return []
    differ = [
        name
        for name, md5 in official_md5.items()
        if (directory / name).is_file() and md5sum(directory / name) != md5
    ]
    if not differ:
        return []
    what = (
        f"{title} files in {directory} differ from the official release "
        f"(MD5 mismatch: {', '.join(differ)})"
    )
    if mode == "strict":
        raise DataFileError(
            f"{what}. Refusing them (config.data.checksums='strict'); replace them with the "
            "official files, or set --config.data.checksums=warn to train on this copy."
        )
    warnings.warn(
        f"{what}: a re-encoded or modified copy. Training goes on with it; set "
        "--config.data.checksums=strict to refuse such files or =off to skip this check.",
        DataChecksumWarning,
        stacklevel=3,
    )
    return differ


def _staging_dir(directory: pathlib.Path) -> pathlib.Path:
    directory.parent.mkdir(parents=True, exist_ok=True)
    return pathlib.Path(tempfile.mkdtemp(prefix=f".jbn-{directory.name}-", dir=directory.parent))


def _retrieve(url: str, known_hash: str, path: pathlib.Path, fname: str) -> str:
    return pooch.retrieve(
        url,
        known_hash=known_hash,
        fname=fname,
        path=path,
        downloader=pooch.HTTPDownloader(timeout=DOWNLOAD_TIMEOUT_S),
        progressbar=False,
    )


def _move_into(source: pathlib.Path, directory: pathlib.Path, names: Iterable[str]) -> None:
    """Moves the files ``names`` that ``directory`` lacks; one there already is kept.

    Two processes may both find a file missing and both move theirs: a rename
    replaces the file atomically, and both copies passed the same hash.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        if not (directory / name).exists():
            (source / name).rename(directory / name)


def _publish(unpacked: pathlib.Path, directory: pathlib.Path) -> None:
    """Moves the folder ``unpacked`` to ``directory``, or its files into one that exists.

    The rename is atomic on one filesystem; when another process got there
    first (``directory`` exists and is not empty), its files stay and only the
    missing ones are moved in.
    """
    try:
        unpacked.rename(directory)
    except OSError:
        if not directory.is_dir():
            raise
        _move_into(unpacked, directory, [p.name for p in unpacked.iterdir()])


def _extract_files(archive: str, member_dir: str, destination: pathlib.Path) -> None:
    """Copies the regular files directly inside ``member_dir`` of a ``.tar.gz`` to ``destination``.

    Nothing else is written: no links or devices, no subfolders, no member
    whose path leaves ``member_dir`` (``a/../b`` is read as ``b``).
    """
    destination.mkdir(parents=True)
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            folder, name = posixpath.split(posixpath.normpath(member.name))
            if member.isfile() and folder == member_dir and name not in ("", ".", ".."):
                with tar.extractfile(member) as data, open(destination / name, "wb") as out:
                    shutil.copyfileobj(data, out)


def download_archive(
    directory: pathlib.Path,
    url: str,
    sha256: str,
    *,
    member_dir: str,
    required: Sequence[str],
    not_found: Callable[[str], DataNotFoundError],
) -> None:
    """Fetches a ``.tar.gz``, checks its SHA-256 and moves ``member_dir``'s files into ``directory``.

    ``directory`` gets the regular files directly inside ``member_dir`` (see
    `_extract_files`); if another process filled it meanwhile, its files stay.

    Args:
        directory: Destination of the files.
        url: The archive.
        sha256: Its expected SHA-256 hex digest.
        member_dir: The folder inside the archive that holds the files.
        required: Files the archive must provide.
        not_found: Builds the error to raise from a reason.

    Raises:
        DataNotFoundError: (from ``not_found``) if the download fails, the hash
            differs or the archive lacks ``required``; ``directory`` is then untouched.
    """
    staging = _staging_dir(directory)
    try:
        try:
            archive = _retrieve(url, f"sha256:{sha256}", staging, pathlib.Path(url).name)
        except ValueError as e:  # pooch's hash mismatch
            raise not_found(f"checksum mismatch for {url}: {e}") from e
        except Exception as e:  # requests' connection / timeout / HTTP errors
            raise not_found(f"download from {url} failed ({e!r}).") from e
        unpacked = staging / "unpacked"
        try:
            _extract_files(archive, member_dir, unpacked)
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise not_found(f"archive from {url} is unreadable ({e!r}).") from e
        if any(not (unpacked / name).is_file() for name in required):
            raise not_found(f"archive from {url} lacks {member_dir}/ with {', '.join(required)}.")
        _publish(unpacked, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def download_files(
    directory: pathlib.Path,
    mirrors: Sequence[str],
    official_md5: Mapping[str, str],
    *,
    not_found: Callable[[str], DataNotFoundError],
) -> None:
    """Fetches every file of ``official_md5`` from the first mirror that serves it intact.

    Args:
        directory: Destination of the files.
        mirrors: Base URLs (ending in ``/``), tried in order.
        official_md5: File name -> expected MD5.
        not_found: Builds the error to raise from a reason.

    Raises:
        DataNotFoundError: (from ``not_found``) if a file is on no mirror with
            the right hash; ``directory`` then gets none of the files.
    """
    staging = _staging_dir(directory)
    try:
        for name, md5 in official_md5.items():
            failures = []
            for mirror in mirrors:
                try:
                    _retrieve(mirror + name, f"md5:{md5}", staging, name)
                    break
                except Exception as e:  # hash mismatch or connection error: next mirror
                    failures.append(f"{mirror + name}: {e!r}")
            else:
                raise not_found("download failed (" + "; ".join(failures) + ").")
        _move_into(staging, directory, official_md5)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
