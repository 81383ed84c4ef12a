"""Cached captures: look each trace up in the store, run forward passes in batches for the rest.

An ``Engine`` owns the models it loads (a small LRU) and the device they sit on. The worker and
the one-shot CLI each hold one; nothing else loads models.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .capture import Trace, capture
from .errors import OptionError
from .images import DecodedImage, resize_for_model, to_tensor
from .models import LoadedModel, load_model, resolve_spec, weights_fingerprint
from .store import CaptureOptions, TraceStore, trace_key

Progress = Callable[[int, int], None]  # (images done, images in total)


@dataclass(frozen=True)
class TraceResult:
    """A trace and whether it came from the cache."""

    trace: Trace
    cached: bool


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when there is a GPU, else the CPU.

    Raises:
        OptionError: not a device name, or a CUDA device that this process cannot see.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise OptionError(f"Device must be auto, cpu, mps, cuda or cuda:N, not '{device[:40]}'.") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"Device '{device}' was asked for, but no CUDA GPU is visible to this process.")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise OptionError(f"Device '{device}' does not exist: this process sees {torch.cuda.device_count()} CUDA GPU(s).")
    return resolved


def _unchanged(loaded: LoadedModel, weights: str) -> bool:
    """False when the weights behind ``loaded`` changed since it was loaded (a rewritten file)."""
    fingerprint = weights_fingerprint(loaded.spec, weights)
    return fingerprint is None or fingerprint == loaded.fingerprint


class Engine:
    """Loads models, runs captures on one device and keeps the results in a ``TraceStore``."""

    def __init__(self, store: TraceStore | None = None, device: str = "auto", max_models: int = 2, max_batch: int = 8) -> None:
        self.store = store
        self.device = resolve_device(device)
        self.max_models = max_models
        self.max_batch = max_batch
        self._models: OrderedDict[tuple[str, str], LoadedModel] = OrderedDict()
        self._models_lock = threading.Lock()
        self._fits: dict[tuple, int] = {}  # (model, input shape, precision, states) -> batch size that fit after an OOM

    def model(self, name: str, weights: str = "hub") -> LoadedModel:
        """The loaded model, from the LRU when it is there with unchanged weights (evicting the oldest
        beyond ``max_models``)."""
        key = (name, str(weights))
        with self._models_lock:
            if key in self._models and _unchanged(self._models[key], weights):
                self._models.move_to_end(key)
                return self._models[key]
            loaded = load_model(name, weights, device=self.device)
            self._models[key] = loaded
            self._models.move_to_end(key)
            while len(self._models) > self.max_models:
                self._models.popitem(last=False)
            return loaded

    def model_key(self, name: str, weights: str) -> str:
        """Architecture plus weights fingerprint, loading the model only when there is no other way."""
        spec = resolve_spec(name)
        fingerprint = weights_fingerprint(spec, weights) or self.model(name, weights).fingerprint
        return f"{spec.arch}|{fingerprint}"

    def trace_keys(self, images: Sequence[DecodedImage], name: str, weights: str = "hub",
                   options: CaptureOptions = CaptureOptions()) -> list[str]:
        """The store keys ``traces`` reads and writes for these images (the worker records them in jobs)."""
        model_key = self.model_key(name, weights)
        return [trace_key(model_key, image.digest, options, self.device.type) for image in images]

    def traces(
            self,
            images: Sequence[DecodedImage],
            name: str,
            weights: str = "hub",
            options: CaptureOptions = CaptureOptions(),
            progress: Progress | None = None,
    ) -> list[TraceResult]:
        """One trace per image, from the store where possible; the rest in batched forward passes."""
        keys = self.trace_keys(images, name, weights, options)
        results: list[TraceResult | None] = [self._lookup(key) for key in keys]
        missing = [i for i, result in enumerate(results) if result is None]
        done = len(images) - len(missing)
        if progress:
            progress(done, len(images))
        if missing:
            loaded = self.model(name, weights)
            for batch, traces in self._capture_batches(loaded, [images[i] for i in missing], options):
                for index, trace in zip([missing[j] for j in batch], traces):
                    results[index] = TraceResult(trace, cached=False)
                    if self.store is not None:
                        self.store.put(keys[index], trace)
                done += len(batch)
                if progress:
                    progress(done, len(images))
        return results

    def _lookup(self, key: str) -> TraceResult | None:
        trace = self.store.get(key) if self.store is not None else None
        return TraceResult(trace, cached=True) if trace is not None else None

    def _capture_batches(self, loaded: LoadedModel, images: Sequence[DecodedImage], options: CaptureOptions):
        """Yield (indices into ``images``, traces) per batch of same-size inputs."""
        side = options.side or max(loaded.native_size)
        tensors = [to_tensor(resize_for_model(image.image, side, loaded.patch_size), loaded.mean, loaded.std) for image in images]
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for index, tensor in enumerate(tensors):
            by_shape.setdefault(tuple(tensor.shape), []).append(index)
        for indices in by_shape.values():
            yield from self._capture_adaptive(loaded, tensors, indices, options)

    def _capture_adaptive(self, loaded: LoadedModel, tensors: list[torch.Tensor], indices: list[int], options: CaptureOptions):
        """Capture in batches of ``max_batch``, halving the batch after a CUDA out-of-memory error.

        The size that fit is remembered per model, input shape and precision, so later requests
        start there instead of running out of memory again.
        """
        fit = (loaded.key, tuple(tensors[indices[0]].shape), options.precision, tuple(options.state_layers),
               options.test_time_register is not None)
        batch_size, start = min(self.max_batch, self._fits.get(fit, self.max_batch)), 0
        while start < len(indices):
            batch = indices[start:start + batch_size]
            try:
                traces = capture(loaded, torch.stack([tensors[i] for i in batch]), antialias=options.antialias,
                                 state_layers=options.state_layers, precision=options.precision,
                                 test_time_register=options.test_time_register)
            except torch.cuda.OutOfMemoryError:
                if batch_size == 1:
                    raise
                torch.cuda.empty_cache()
                batch_size //= 2
                self._fits[fit] = batch_size  # later batches of this model and input start here, not at max_batch
                continue
            start += len(batch)
            yield batch, traces
