"""Atomic outputs: a failed run leaves no half-written artifact."""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vitprune.errors import VitpruneError


def check_output_dir(path: str | Path, force: bool) -> Path:
    """Refuse an existing output folder unless `force`; call before any long work."""
    path = Path(path)
    if path.exists() and not force:
        raise VitpruneError(f"output folder {path} already exists; pass --force to replace it")
    if path.exists() and not path.is_dir():
        raise VitpruneError(f"output path {path} exists and is not a folder")
    ancestor = path.resolve().parent
    while not ancestor.exists():  # missing parent folders are made when the artifact is written
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK):
        raise VitpruneError(f"cannot write {path}: folder {ancestor} is not writable")
    return path


def writable_parent(path: Path) -> Path:
    """The folder `path` will be written in, checked to exist and be writable."""
    parent = path.resolve().parent
    if not parent.is_dir():
        raise VitpruneError(f"cannot write {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise VitpruneError(f"cannot write {path}: folder {parent} is not writable")
    return parent


@contextmanager
def atomic_output_dir(path: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` in one rename."""
    path = check_output_dir(path, force)
    parent = path.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_output_file(path: str | Path, force: bool = True) -> Iterator[Path]:
    """Yield a temporary file path beside `path`; on success it replaces `path`."""
    path = Path(path)
    if path.exists() and not force:
        raise VitpruneError(f"output file {path} already exists; pass --force to replace it")
    parent = writable_parent(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
