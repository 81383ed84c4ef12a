"""The worker: the one place that owns the accelerator in hosted mode.

It takes capture jobs from the shared ``JobQueue``, runs compatible ones (same model, weights
and options) as one batched ``Engine.traces`` call, writes the traces to the ``TraceStore``
and records their keys in the job. A heartbeat thread renews its lease, so a worker that dies
(even by SIGKILL) has its running jobs re-queued by the next worker, or failed with a reason
once they have been started ``job_attempts`` times. A failure fails only the jobs it belongs to.
Sweep jobs (``SweepJobSpec``) run one at a time through ``vitlens.sweep_job``.
Between batches the worker asks the queue which of its jobs are still wanted: a batch whose
jobs were all cancelled (by their user, or because nobody polled them for ``job_lease``
seconds) stops there, and the worker takes the next job.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, replace
from typing import Sequence

import torch

from .capture import PRECISIONS
from .engine import Engine
from .errors import OptionError, StorageError, VitlensError
from .images import DecodedImage
from .jobs import ClaimedJob, JobQueue, JobSpec, MalformedJobError, is_sweep
from .models import resolve_spec
from .settings import Settings
from .store import CaptureOptions, TraceStore
from .sweep_job import SweepJobRunner

log = logging.getLogger(__name__)
PRUNE_EVERY = 600.0  # seconds between clean-ups of old jobs and images


@dataclass(frozen=True)
class _Ready:
    """A claimed job that passed validation: what the engine needs."""

    job: ClaimedJob
    spec: JobSpec
    weights: str  # resolved: hub, random, synthetic or a path inside Settings.weights_dir
    options: CaptureOptions  # with the worker's precision applied
    images: tuple[DecodedImage, ...]


class _Unwanted(Exception):
    """Every job of the running group was cancelled: stop capturing for it."""


class Worker:
    """Runs capture jobs from the queue until stopped.

    Args:
        settings: Deployment settings (cache, queue, device, batch, precision, limits).
        queue: The job queue; default: the one in ``settings.queue_dir``.
        store: The trace store; default: the one in ``settings.cache_dir``.
        engine: The engine; default: one on ``settings.device``.
        worker_id: Name in the queue's worker table; default: host, pid and a random suffix.
    """

    def __init__(self, settings: Settings, queue: JobQueue | None = None, store: TraceStore | None = None,
                 engine: Engine | None = None, worker_id: str | None = None) -> None:
        self.settings = settings
        self.queue = queue or JobQueue.from_settings(settings)
        self.store = store or TraceStore(settings.cache_dir, settings.cache_size)
        self.engine = engine or Engine(self.store, device=settings.device, max_models=settings.worker_max_models,
                                       max_batch=settings.worker_batch)
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.jobs_run = 0
        self.stopping = threading.Event()  # ``run``'s stop: a running sweep ends at its next batch boundary

    def run(self, stop: threading.Event | None = None, max_jobs: int | None = None) -> None:
        """Register, then claim and run jobs until ``stop`` is set (or ``max_jobs`` are finished).

        A stop request lets the running batch finish; jobs still held on the way out (an
        exception, a second signal) go back to the queue.
        """
        stop = self.stopping = stop or threading.Event()
        self.queue.register(self.worker_id, device=str(self.engine.device))
        beating = threading.Event()
        heart = threading.Thread(target=self._beat, args=(beating,), name="vitlens-heartbeat", daemon=True)
        heart.start()
        log.info("worker %s on %s: queue %s, batch %d, up to %d models", self.worker_id, self.engine.device,
                 self.queue.directory, self.engine.max_batch, self.engine.max_models)
        last_recovery = last_prune = 0.0
        try:
            while not stop.is_set() and (max_jobs is None or self.jobs_run < max_jobs):
                now = time.monotonic()
                try:
                    if now - last_recovery > min(5.0, self.queue.lease / 2):
                        self.queue.recover()
                        last_recovery = now
                    if now - last_prune > PRUNE_EVERY:
                        self.queue.prune()
                        last_prune = now
                    claimed = self.run_once()
                except StorageError as error:  # the queue repairs itself where it can; keep serving
                    log.error("worker %s: %s", self.worker_id, error)
                    claimed = 0
                if not claimed:
                    stop.wait(self.settings.poll_interval)
        finally:
            beating.set()
            self._leave()
            heart.join(timeout=5)

    def _leave(self) -> None:
        """Put this worker's running jobs back in the queue and unregister it."""
        try:
            released = self.queue.release(self.worker_id)
            self.queue.unregister(self.worker_id)
        except StorageError as error:
            log.error("worker %s could not release its jobs on the way out: %s", self.worker_id, error)
            return
        if released:
            log.warning("worker %s stopping: %d running job(s) put back in the queue", self.worker_id, released)

    def _beat(self, stopped: threading.Event) -> None:
        interval = max(0.05, self.queue.lease / 5)
        while not stopped.wait(interval):
            try:
                if not self.queue.heartbeat(self.worker_id):
                    log.error("worker %s lost its lease (declared dead); re-registering", self.worker_id)
                    self.queue.register(self.worker_id, device=str(self.engine.device))
            except Exception:  # a locked or unreachable queue must not kill the heartbeat
                log.exception("heartbeat of worker %s failed", self.worker_id)

    def run_once(self) -> int:
        """Claim one batch of compatible jobs and run it; returns the number of jobs claimed."""
        claimed = self.queue.claim(self.worker_id, max_images=self.engine.max_batch)
        sweeps = [job for job in claimed if is_sweep(job.spec)]  # claimed alone: a sweep has no batch group
        for job in sweeps:
            SweepJobRunner(self.settings, self.queue, self.store, self.worker_id, str(self.engine.device), self.stopping).run(job)
        captures = [job for job in claimed if job not in sweeps]
        ready = [job for job in map(self._prepare, captures) if job is not None]
        groups: dict[tuple, list[_Ready]] = {}
        for job in ready:
            groups.setdefault((job.spec.model, job.weights, job.options), []).append(job)
        for group in groups.values():
            self._run_group(group)
        self.jobs_run += len(claimed)
        return len(claimed)

    def _prepare(self, job: ClaimedJob) -> _Ready | None:
        """Validate a claimed job; a bad one is failed here and None returned."""
        try:
            spec = JobSpec.from_json(job.spec)
            self.settings.check_model(spec.model)
            resolve_spec(spec.model)
            weights = self.settings.resolve_weights(spec.weights)
            options = self._options(spec.options)
            images = tuple(self.queue.read_image(digest, self.settings.max_pixels) for digest in spec.images)
        except VitlensError as error:
            self._fail([job], str(error), error)
            return None
        except Exception as error:  # anything else in a job's content is a malformed job, not a worker bug
            log.exception("job %s is malformed", job.job_id)
            self._fail([job], f"The job is malformed ({type(error).__name__}).", MalformedJobError())
            return None
        return _Ready(job, spec, weights, options, images)

    def _options(self, options: CaptureOptions) -> CaptureOptions:
        if options.precision not in PRECISIONS:
            raise OptionError(f"Precision must be one of {', '.join(PRECISIONS)}, not '{options.precision}'.")
        self.settings.check_side(options.side)
        if self.settings.precision is not None:
            options = replace(options, precision=self.settings.precision)
        return options

    def _run_group(self, group: Sequence[_Ready]) -> None:
        """One batched capture for jobs sharing model, weights and options.

        A ``VitlensError`` fails the whole group (it is about what they share). Any other error
        in a batch of several jobs is retried job by job, so only the job that causes it fails.
        """
        try:
            self._capture(group)
        except _Unwanted:
            log.info("jobs %s were cancelled; stopped their capture", [ready.job.job_id for ready in group])
        except VitlensError as error:
            self._fail([ready.job for ready in group], str(error), error)
        except torch.cuda.OutOfMemoryError:
            log.warning("out of GPU memory even at batch size 1 for jobs %s", [ready.job.job_id for ready in group])
            self._fail([ready.job for ready in group],
                       "The GPU ran out of memory even with one image per batch; try a smaller image size.")
        except Exception as error:
            if len(group) > 1:
                log.warning("batch of %d jobs failed (%s); retrying them one by one", len(group), error)
                for ready in group:
                    self._run_group([ready])
                return
            log.exception("job %s failed", group[0].job.job_id)
            self._fail([group[0].job], f"The capture failed unexpectedly ({type(error).__name__}: {str(error)[:120]}).")

    def _capture(self, group: Sequence[_Ready]) -> None:
        first = group[0]
        depth = len(self.engine.model(first.spec.model, first.weights).model.blocks)
        for layer in first.options.state_layers:
            if not -depth <= layer < depth:
                raise OptionError(f"Layer {layer} is out of range: '{first.spec.model}' has {depth} blocks.")
        unique: dict[str, DecodedImage] = {}
        for ready in group:
            for image in ready.images:
                unique.setdefault(image.digest, image)
        images = list(unique.values())
        progress = _ProgressSplitter(self.queue, self.worker_id, [(r.job.job_id, len(r.images)) for r in group])
        results = self.engine.traces(images, first.spec.model, first.weights, first.options, progress=progress)
        by_digest = dict(zip(unique, results))
        key_of = dict(zip(unique, self.engine.trace_keys(images, first.spec.model, first.weights, first.options)))
        for ready in group:  # the group shares model, weights and options, so its keys differ only by image
            if ready.job.job_id not in progress.live:
                continue  # cancelled meanwhile: its traces are in the store, its job says why it stopped
            keys = [key_of[image.digest] for image in ready.images]
            cached = [by_digest[image.digest].cached for image in ready.images]
            self.queue.complete(ready.job.job_id, self.worker_id, keys, cached)

    def _fail(self, jobs: Sequence[ClaimedJob], message: str, error: BaseException | None = None) -> None:
        name = type(error).__name__ if isinstance(error, VitlensError) else None
        for job in jobs:
            log.info("job %s failed: %s", job.job_id, message)
            self.queue.fail(job.job_id, self.worker_id, message, name)


class _ProgressSplitter:
    """Turns engine progress over a merged batch into per-job progress (proportional), and stops
    the batch (``_Unwanted``) once none of its jobs is wanted any more.

    Attributes:
        live: The jobs still wanted at the last report.
    """

    def __init__(self, queue: JobQueue, worker_id: str, jobs: list[tuple[str, int]]) -> None:
        self.queue, self.worker_id, self.jobs = queue, worker_id, jobs
        self.live = {job_id for job_id, _ in jobs}

    def __call__(self, done: int, total: int) -> None:
        self.live = self.queue.wanted([job_id for job_id, _ in self.jobs], self.worker_id)
        if not self.live:
            raise _Unwanted()
        if not total:
            return
        for job_id, size in self.jobs:
            if job_id in self.live:
                self.queue.progress(job_id, self.worker_id, min(size, done * size // total))
