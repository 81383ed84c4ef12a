"""The trace cache: the one place that uses diskcache.

Keys name everything a trace depends on (model and weights fingerprint, image pixels,
preprocessing options, device type, capture version), so a hit is always the trace a new pass
would give (up to the float rounding of another accelerator of the same type).
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import diskcache

from .capture import CAPTURE_VERSION, Trace
from .errors import StorageError
from .interventions import TestTimeRegister

log = logging.getLogger(__name__)
DEFAULT_SIZE_LIMIT = 4 * 2**30  # bytes; least recently used traces are evicted beyond it
_INDEX = "cache.db"  # diskcache's SQLite index; values live in two-hex-digit subfolders beside it
_VALUE_FOLDER = re.compile(r"[0-9a-f]{2}")
T = TypeVar("T")


@dataclass(frozen=True)
class CaptureOptions:
    """How an image is fed to the model and what is kept.

    Attributes:
        side: Longer input side in pixels (a multiple of the patch size); None: the model's own.
        antialias: Antialiased position-embedding resampling when the grid changes.
        precision: ``fp32``, ``bf16`` or ``fp16``.
        state_layers: Blocks whose token vectors are kept (for embeddings).
        test_time_register: Run with this extra register (``vitlens.interventions``); None: the model as it is.
    """

    side: int | None = None
    antialias: bool = True
    precision: str = "fp32"
    state_layers: tuple[int, ...] = ()
    test_time_register: TestTimeRegister | None = None


def trace_key(model_key: str, image_digest: str, options: CaptureOptions, device: str) -> str:
    """Cache key of one trace.

    Args:
        model_key: Architecture and weights fingerprint (so also the native size).
        image_digest: The image's pixel digest.
        options: How the image is fed and what is kept.
        device: Device type the pass runs on (``cpu``, ``cuda``, ``mps``): kernels and reduced
            precision differ between them.
    """
    layers = ",".join(map(str, sorted(set(options.state_layers))))
    side = options.side or "native"
    register = f"/ttr{options.test_time_register.key()}" if options.test_time_register else ""
    return (f"trace/v{CAPTURE_VERSION}/{model_key}/{image_digest}/side{side}/aa{int(options.antialias)}"
            f"/{options.precision}/{device}/states[{layers}]{register}")


class TraceStore:
    """A size-limited, process-safe disk cache of traces.

    A damaged index (overwritten header, malformed pages) is moved aside and the cache starts
    empty: every trace in it can be computed again. Other SQLite failures are logged and the
    store behaves as a miss, so a broken cache never breaks a capture. When another process
    replaced the index, this one reopens it before the next operation.
    """

    def __init__(self, directory: str | Path, size_limit: int = DEFAULT_SIZE_LIMIT) -> None:
        self.directory = Path(directory)
        self.size_limit = size_limit
        try:
            self._open()
        except sqlite3.DatabaseError as error:
            self._rebuild(error)

    def _open(self) -> None:
        self._cache = diskcache.Cache(str(self.directory), size_limit=self.size_limit, eviction_policy="least-recently-used")
        self._index_id = _file_id(self.directory / _INDEX)

    def get(self, key: str) -> Trace | None:
        """The stored trace, or None; an unreadable entry is dropped so it gets recomputed."""
        try:
            value = self._guarded(lambda: self._cache.get(key), None)
        except StorageError:
            raise
        except Exception as error:  # unpickling damaged bytes can raise almost anything (MemoryError, OverflowError, ...)
            log.warning("dropping unreadable cache entry %s: %s", key, error)
            self._guarded(lambda: self._cache.delete(key), False)
            return None
        if value is not None and not isinstance(value, Trace):
            log.warning("dropping cache entry %s of unexpected type %s", key, type(value).__name__)
            self._guarded(lambda: self._cache.delete(key), False)
            return None
        return value

    def put(self, key: str, trace: Trace) -> None:
        """Store a trace (after a rebuild of a damaged index, into the new one)."""
        if not self._guarded(lambda: self._cache.set(key, trace), False):
            self._guarded(lambda: self._cache.set(key, trace), False)

    def __contains__(self, key: str) -> bool:
        return self._guarded(lambda: key in self._cache, False)

    def volume(self) -> int:
        """Bytes on disk."""
        return self._guarded(self._cache.volume, 0)

    def close(self) -> None:
        self._cache.close()

    def _guarded(self, operation: Callable[[], T], fallback: T) -> T:
        """Run a cache operation; on a SQLite error repair the index and return ``fallback``."""
        try:
            if _file_id(self.directory / _INDEX) != self._index_id:  # moved aside or deleted by another process
                self._cache.close()
                self._open()
            return operation()
        except sqlite3.DatabaseError as error:
            self._rebuild(error)
            return fallback

    def _rebuild(self, error: sqlite3.DatabaseError) -> None:
        """Reopen the index; a damaged one is moved aside (``cache.db.damaged``) with its value files.

        Raises:
            StorageError: the cache folder cannot hold a new index (read-only, full disk).
        """
        log.error("trace cache %s failed (%s); repairing it", self.directory, error)
        with contextlib.suppress(AttributeError):
            self._cache.close()
        try:
            with _folder_lock(self.directory):
                if not _index_usable(self.directory / _INDEX):
                    _discard_index(self.directory)
                self._open()
        except (sqlite3.DatabaseError, OSError) as failure:
            raise StorageError("The trace cache cannot be repaired (its folder is read-only or full); "
                               "ask the operator to check VITLENS_CACHE_DIR.") from failure


def _file_id(path: Path) -> tuple[int, int] | None:
    """(device, inode) of a file, None when it is missing."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    return info.st_dev, info.st_ino


@contextlib.contextmanager
def _folder_lock(directory: Path) -> Iterator[None]:
    """One repairing process at a time; the others then find the index already repaired."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "repair.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _index_usable(path: Path) -> bool:
    """True when the index opens and its tables read (a missing index counts as usable: it is created)."""
    if not path.exists():
        return True
    try:
        conn = sqlite3.connect(path, timeout=30.0)
        try:
            conn.execute("SELECT COUNT(*) FROM Cache").fetchone()
            return conn.execute("PRAGMA quick_check").fetchone()[0] == "ok"
        finally:
            conn.close()
    except sqlite3.DatabaseError:
        return False


def _discard_index(directory: Path) -> None:
    """Move a damaged index aside and delete the value files it pointed to (they are recomputable)."""
    log.error("trace cache index %s is damaged; moving it to %s.damaged and starting empty", directory / _INDEX, _INDEX)
    for suffix in ("", "-wal", "-shm"):
        source = directory / (_INDEX + suffix)
        if source.exists():
            os.replace(source, directory / (_INDEX + ".damaged" + suffix))
    for folder in directory.iterdir():
        if folder.is_dir() and _VALUE_FOLDER.fullmatch(folder.name):
            shutil.rmtree(folder, ignore_errors=True)
