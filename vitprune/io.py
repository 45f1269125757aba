"""Atomic outputs: a failed, interrupted or terminated run leaves no half-written artifact.

Outputs are built in a temporary folder or file beside their destination and renamed into place
on success; on any failure (an exception, Ctrl-C, SIGTERM: see `vitprune.cli`) the temporary is
removed, with any parent folders the run created. Outputs get the usual permissions under the
user's umask (0644 files, 0755 folders with umask 022), not the 0600/0700 of temporary files.
"""
from __future__ import annotations

import errno
import hashlib
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vitprune.errors import VitpruneError


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, read in chunks (weights files run to gigabytes)."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def check_output_dir(path: str | Path, force: bool) -> Path:
    """Refuse an existing output folder unless `force`, and outputs that cannot be written; call
    before any long work."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise VitpruneError(f"output {path} exists and is not a folder", param="output")
    if path.exists() and not force:
        raise VitpruneError(f"output folder {path} already exists; pass force to replace it", param="force")
    resolved = path.resolve()
    if resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents or resolved == resolved.parent:
        raise VitpruneError(f"output {path} is the current folder or holds it; give a new folder", param="output")
    ancestor = resolved.parent
    while not ancestor.exists():  # missing parent folders are made when the artifact is written
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK):
        raise VitpruneError(f"cannot write {path}: folder {ancestor} is not writable", param="output")
    return path


def writable_parent(path: Path) -> Path:
    """The folder `path` will be written in, checked to exist and be writable."""
    parent = path.resolve().parent
    if not parent.is_dir():
        raise VitpruneError(f"cannot write {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise VitpruneError(f"cannot write {path}: folder {parent} is not writable")
    return parent


def write_error(path: Path, error: OSError) -> VitpruneError:
    """An OS error while writing `path`, as the one-line error a user reads."""
    if error.errno == errno.ENOSPC:
        return VitpruneError(f"disk full while writing {path}")
    return VitpruneError(f"cannot write {path}: {error.strerror or error}")


def output_mode(directory: bool) -> int:
    """The permissions a new file or folder gets under the current umask."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


@contextmanager
def atomic_output_dir(path: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` in one rename."""
    path = check_output_dir(path, force)
    made = _missing_parents(path.resolve().parent)
    tmp: Path | None = None
    try:
        path.resolve().parent.mkdir(parents=True, exist_ok=True)
        # named before it is made: a signal landing right after the mkdir still finds it to remove
        tmp = _temporary_name(path)
        tmp.mkdir(mode=0o700)
        yield tmp
        _fix_modes(tmp)
        _replace_dir(tmp, path)
    except OSError as error:
        raise write_error(path, error) from None
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if not path.exists():
            _remove_empty(made)


@contextmanager
def atomic_output_file(path: str | Path, force: bool = True) -> Iterator[Path]:
    """Yield a temporary file path beside `path`; on success it replaces `path`."""
    path = Path(path)
    if path.exists() and not force:
        raise VitpruneError(f"output file {path} already exists; pass force to replace it", param="force")
    parent = writable_parent(path)
    tmp: Path | None = None
    try:
        tmp = _temporary_name(parent / path.name)
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        yield tmp
        tmp.chmod(output_mode(directory=False))
        os.replace(tmp, path)
    except OSError as error:
        raise write_error(path, error) from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def _temporary_name(path: Path) -> Path:
    """A fresh hidden name beside `path` (48 random bits; making it is exclusive, so a clash is an error)."""
    return path.resolve().parent / f".{path.name}.{secrets.token_hex(6)}.tmp"


def _replace_dir(tmp: Path, path: Path) -> None:
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(path)


def _fix_modes(folder: Path) -> None:
    """mkdtemp makes 0700 folders: give the tree the umask's modes (files written with open() have them)."""
    folder.chmod(output_mode(directory=True))
    for child in folder.rglob("*"):
        child.chmod(output_mode(directory=child.is_dir()))


def _missing_parents(folder: Path) -> list[Path]:
    """The folders above an output that do not exist yet, deepest first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return
