"""Atomic outputs: a failed, interrupted or terminated run leaves no half-written artifact.

Outputs are built in a temporary folder or file beside their destination and renamed into place
on success; on any failure (an exception, Ctrl-C, SIGTERM: see `vitprune.cli`) the temporary is
removed, with any parent folders the run created. A run killed outright (SIGKILL, the out-of-memory
killer) cannot clean up: its temporaries are named after the output, the host and the run's pid,
so the next run of the same output removes those whose run is dead (and nothing else). Outputs get the usual permissions under the
user's umask (0644 files, 0755 folders with umask 022), not the 0600/0700 of temporary files.
"""
from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import shutil
import socket
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
    remove_dead_temporaries(path)
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
    remove_dead_temporaries(path)
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


# a temporary's tag: HOST.PID.RANDOM (48 random bits; making it is exclusive, so a clash is an error)
_TAG = r"(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[0-9a-f]{12}"
_ANY_TAG = r"[A-Za-z0-9-]+\.\d+\.[0-9a-f]{12}"


def _temporary_name(path: Path) -> Path:
    """A fresh hidden name beside `path` naming this run: `.NAME.HOST.PID.RANDOM.tmp`."""
    return path.resolve().parent / f".{path.name}.{run_host()}.{os.getpid()}.{secrets.token_hex(6)}.tmp"


def run_host() -> str:
    """This machine's name as it appears in temporary names and owner files."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "localhost"


def is_dead_run(host: str, pid: int) -> bool:
    """A run of this machine that no longer exists (another machine's runs cannot be checked: never dead)."""
    if host != run_host() or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def remove_dead_temporaries(path: Path) -> list[Path]:
    """Remove the temporaries of `path` (its own, and those of files written inside one, such as the graph
    torch.onnx writes into an export's temporary) left by dead runs of this machine; the removed paths."""
    path = Path(path).resolve()
    name = re.escape(path.name)
    pattern = re.compile(rf"^\.(?:\.{name}\.{_ANY_TAG}\.tmp|{name})\.{_TAG}\.tmp$")
    removed = []
    try:
        children = list(path.parent.iterdir())
    except OSError:
        return removed
    for child in children:
        found = pattern.match(child.name)
        if found and is_dead_run(found["host"], int(found["pid"])):
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
            removed.append(child)
    return removed


def claim(folder: Path, owner_file: str) -> None:
    """Record in `folder` that this run (host and pid) writes it."""
    (folder / owner_file).write_text(f"{run_host()} {os.getpid()}\n")


def live_owner(folder: Path, owner_file: str) -> str | None:
    """'pid N on HOST' when the run that claimed `folder` may still be running, else None (no owner
    recorded, or its run is dead)."""
    try:
        host, pid = (folder / owner_file).read_text().split()
        pid_number = int(pid)
    except (OSError, ValueError):
        return None
    return None if is_dead_run(host, pid_number) else f"pid {pid_number} on {host}"


def _replace_dir(tmp: Path, path: Path) -> None:
    if path.exists():
        old = _temporary_name(path)  # removed below; after a kill, by the next run of `path`
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
