"""The trace cache: the one place that uses diskcache.

Keys name everything a trace depends on (model and weights fingerprint, image pixels,
preprocessing options, capture version), so a hit is always the trace a new pass would give.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import diskcache

from .capture import CAPTURE_VERSION, Trace

log = logging.getLogger(__name__)
DEFAULT_SIZE_LIMIT = 4 * 2**30  # bytes; least recently used traces are evicted beyond it


@dataclass(frozen=True)
class CaptureOptions:
    """How an image is fed to the model and what is kept.

    Attributes:
        side: Longer input side in pixels (a multiple of the patch size); None: the model's own.
        antialias: Antialiased position-embedding resampling when the grid changes.
        precision: ``fp32``, ``bf16`` or ``fp16``.
        state_layers: Blocks whose token vectors are kept (for embeddings).
    """

    side: int | None = None
    antialias: bool = True
    precision: str = "fp32"
    state_layers: tuple[int, ...] = ()


def trace_key(model_key: str, image_digest: str, options: CaptureOptions) -> str:
    """Cache key of one trace (``model_key`` names architecture and weights, so also the native size)."""
    layers = ",".join(map(str, sorted(set(options.state_layers))))
    side = options.side or "native"
    return (f"trace/v{CAPTURE_VERSION}/{model_key}/{image_digest}/side{side}/aa{int(options.antialias)}"
            f"/{options.precision}/states[{layers}]")


class TraceStore:
    """A size-limited, process-safe disk cache of traces."""

    def __init__(self, directory: str | Path, size_limit: int = DEFAULT_SIZE_LIMIT) -> None:
        self.directory = Path(directory)
        self._cache = diskcache.Cache(str(self.directory), size_limit=size_limit,
                                      eviction_policy="least-recently-used")

    def get(self, key: str) -> Trace | None:
        """The stored trace, or None; an unreadable entry is dropped so it gets recomputed."""
        try:
            value = self._cache.get(key)
        except Exception as error:  # unpickling damaged bytes can raise almost anything (MemoryError, OverflowError, ...)
            log.warning("dropping unreadable cache entry %s: %s", key, error)
            self._cache.delete(key)
            return None
        if value is not None and not isinstance(value, Trace):
            log.warning("dropping cache entry %s of unexpected type %s", key, type(value).__name__)
            self._cache.delete(key)
            return None
        return value

    def put(self, key: str, trace: Trace) -> None:
        self._cache.set(key, trace)

    def __contains__(self, key: str) -> bool:
        return key in self._cache

    def volume(self) -> int:
        """Bytes on disk."""
        return self._cache.volume()

    def close(self) -> None:
        self._cache.close()
