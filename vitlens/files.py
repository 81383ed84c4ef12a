"""Reading user-named files safely: regular files only, with a byte cap checked before reading.

A path can name a directory, a FIFO (reading blocks forever), a device such as ``/dev/zero``
(reading never ends) or a symlink to one of them. ``open_regular`` opens without blocking,
checks what the path really is and how big it is, and only then hands out the file.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import VitlensError

MIB = 2**20


def open_regular(path: str | os.PathLike, max_bytes: int, error: type[VitlensError], what: str) -> tuple[int, int]:
    """Open ``path`` for reading if it is a regular file of at most ``max_bytes`` bytes.

    Args:
        path: The file (symlinks are followed, then judged by what they point to).
        max_bytes: Largest size accepted.
        error: Exception type raised for a refused path.
        what: How the message names the file (``Image``, ``Weights file``).

    Returns:
        An open file descriptor (the caller closes it) and the file's size in bytes.

    Raises:
        error: missing, unreadable, not a regular file, or larger than ``max_bytes``.
    """
    path = Path(path)
    name = path.name or str(path)  # messages name the file, not the server's folders
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # O_NONBLOCK: a FIFO cannot hang us
    except OSError as failure:
        raise error(f"{what} '{name}' cannot be read: {_reason(failure)}.") from failure
    try:
        info = os.fstat(descriptor)
        _check_kind(info, name, error, what)
        if info.st_size > max_bytes:
            raise error(f"{what} '{name}' is {_size(info.st_size)}, more than the limit of {_size(max_bytes)}.")
        os.set_blocking(descriptor, True)
    except BaseException:
        os.close(descriptor)
        raise
    return descriptor, info.st_size


def read_regular(path: str | os.PathLike, max_bytes: int, error: type[VitlensError], what: str) -> bytes:
    """The bytes of a regular file of at most ``max_bytes`` bytes (see ``open_regular``).

    Raises:
        error: as ``open_regular``, or the file grew past the cap while it was read.
    """
    descriptor, _ = open_regular(path, max_bytes, error, what)
    with os.fdopen(descriptor, "rb") as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise error(f"{what} '{Path(path).name}' is more than the limit of {_size(max_bytes)}.")
    return data


def check_regular(path: str | os.PathLike, max_bytes: int, error: type[VitlensError], what: str) -> int:
    """Refuse anything but a regular file of at most ``max_bytes`` bytes; returns its size."""
    descriptor, size = open_regular(path, max_bytes, error, what)
    os.close(descriptor)
    return size


def _check_kind(info: os.stat_result, name: str, error: type[VitlensError], what: str) -> None:
    if stat.S_ISREG(info.st_mode):
        return
    if stat.S_ISDIR(info.st_mode):
        kind = "a folder"
    elif stat.S_ISFIFO(info.st_mode):
        kind = "a pipe"
    elif stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode):
        kind = "a device"
    else:
        kind = "a special file"
    raise error(f"{what} '{name}' is {kind}, not a regular file.")


def _reason(failure: OSError) -> str:
    if isinstance(failure, FileNotFoundError):
        return "no such file"
    if isinstance(failure, PermissionError):
        return "permission denied"
    return (failure.strerror or type(failure).__name__).lower()


def _size(count: int) -> str:
    return f"{count / MIB:,.1f} MiB" if count >= MIB else f"{count:,} bytes"
