"""What the app calls to get traces: queue a capture job, follow it, read the results.

In ``hosted`` mode the app never loads a model: it puts the images and a job into the shared
queue, reports the queue position and progress, and reads the traces from the ``TraceStore``
by the keys the worker recorded. The job is submitted *watched*: while the client waits it
touches the job, so a job whose waiter is gone (the app process died) is cancelled by the
worker after ``job_lease`` seconds; when the progress callback raises (the app's user
cancelled, or every session waiting for it left) the client cancels the job at once. In
``embedded`` mode (the default) the same happens, but the client first starts a worker thread
inside this process, shared by every caller of the process and its loaded models. (The app uses the client in hosted mode only; embedded, it runs
captures on its own ``Engine``, see ``app/captures.py``.)
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Sequence

from . import errors
from .engine import TraceResult
from .errors import VitlensError
from .images import DecodedImage
from .jobs import (CANCELLED, DONE, FAILED, JobCancelledError, JobError, JobLostError, JobQueue, JobSpec, JobStatus,
                   JobTimeoutError, MalformedJobError, NoWorkerError, SweepJobSpec)
from .models import resolve_spec, weights_fingerprint
from .settings import Settings
from .store import CaptureOptions, TraceStore

log = logging.getLogger(__name__)
StatusCallback = Callable[[JobStatus], None]
_ERRORS = {cls.__name__: cls for cls in (*vars(errors).values(), MalformedJobError)
           if isinstance(cls, type) and issubclass(cls, VitlensError)}


class Client:
    """Submits capture jobs and waits for them; one per process and settings (see ``get_client``).

    Args:
        settings: Deployment settings; ``mode`` decides whether a worker thread is started here.
        queue: The job queue; default: the one in ``settings.queue_dir``.
        store: The trace store; default: the one in ``settings.cache_dir``.
    """

    def __init__(self, settings: Settings, queue: JobQueue | None = None, store: TraceStore | None = None) -> None:
        self.settings = settings
        self.queue = queue or JobQueue.from_settings(settings)
        self.store = store or TraceStore(settings.cache_dir, settings.cache_size)
        self._worker_thread: threading.Thread | None = None
        self._worker_stop = threading.Event()
        self._lock = threading.Lock()

    def compute_traces(
            self,
            images: Sequence[DecodedImage],
            model: str,
            weights: str = "hub",
            options: CaptureOptions = CaptureOptions(),
            progress: StatusCallback | None = None,
            timeout: float | None = None,
    ) -> list[TraceResult]:
        """One trace per image, computed by a worker (or read from the store).

        Args:
            images: Decoded images.
            model: Preset or timm ViT name (must be in ``Settings.allowed_models`` when set).
            weights: ``hub``, ``random``, ``synthetic`` or a file name inside ``Settings.weights_dir``.
            options: Capture options.
            progress: Called with the job's status at each poll (queue position, images done); when
                it raises, the job is cancelled (with the error as the reason) and the error raised.
            timeout: Seconds to wait; default ``Settings.job_timeout``.

        Raises:
            VitlensError: the request is refused, the job failed (the worker's error type and
                sentence), no worker is running, or the job did not finish in time.
        """
        if not images:
            return []
        spec, joined = self._submit(images, model, weights, options, watched=True)
        try:
            status = self.wait(spec.job_id, progress, timeout)
        except JobLostError:  # pruned, or the queue was rebuilt after damage: its images are still stored
            log.warning("job %s vanished from the queue; submitting it again", spec.job_id)
            spec, joined = self._submit(images, model, weights, options, watched=True)
            status = self.wait(spec.job_id, progress, timeout)
        results = self._read(status, all_cached=joined.state == DONE)
        if results is None:  # done, but traces were evicted from the store since: run again once
            log.info("job %s is done but its traces were evicted; running it again", spec.job_id)
            self.queue.submit(spec, rerun=True, watched=True)
            status = self.wait(spec.job_id, progress, timeout)
            results = self._read(status)
            if results is None:
                raise JobError("The traces were evicted from the cache before they could be read; "
                               "the cache is too small for this request (raise VITLENS_CACHE_SIZE).")
        return results

    def submit(self, images: Sequence[DecodedImage], model: str, weights: str = "hub",
               options: CaptureOptions = CaptureOptions(), watched: bool = False) -> JobSpec:
        """Check the request, store its images and queue the job (or join the identical one).

        Args:
            watched: The caller will ``wait`` for it; when nobody waits for ``job_lease``
                seconds, the worker cancels it. Unwatched jobs run regardless.
        """
        return self._submit(images, model, weights, options, watched)[0]

    def submit_sweep(self, spec: SweepJobSpec) -> JobStatus:
        """Check a sweep request against the deployment and queue it, unwatched (it runs whether or not
        a page waits), or join the same sweep while it runs.

        A sweep that is done, failed or cancelled is queued again: it continues where its results folder stands.

        Raises:
            OptionError, UnknownModelError, WeightsError: a name the deployment does not offer.
        """
        self.settings.resolve_dataset(spec.images)
        self.settings.resolve_results(spec.out)
        self.settings.check_side(spec.size)
        for model in spec.models:
            self.settings.check_model(model)
            resolve_spec(model)
        for weights in spec.weights:
            self.settings.resolve_weights(weights)
        if self.settings.mode == "embedded":
            self.ensure_worker()
        return self.queue.submit(spec, rerun=True)

    def status(self, job_id: str) -> JobStatus | None:
        """The job's status (None: no such job), after handing the jobs of dead workers back to the queue."""
        self.queue.recover()
        return self.queue.status(job_id)

    def cancel(self, job_id: str, reason: str = "Cancelled by its user.") -> bool:
        """Cancel a queued or running job (the worker stops after its current batch); False when already finished."""
        return self.queue.cancel(job_id, reason)

    def _submit(self, images: Sequence[DecodedImage], model: str, weights: str,
                options: CaptureOptions, watched: bool) -> tuple[JobSpec, JobStatus]:
        self.settings.check_model(model)
        fingerprint = weights_fingerprint(resolve_spec(model), self.settings.resolve_weights(weights))
        self.settings.check_side(options.side)
        if self.settings.mode == "embedded":
            self.ensure_worker()
        spec = JobSpec(model=model, weights=weights, images=tuple(self.queue.put_image(image) for image in images),
                       options=options, fingerprint=fingerprint)
        return spec, self.queue.submit(spec, watched=watched)

    def wait(self, job_id: str, progress: StatusCallback | None = None, timeout: float | None = None) -> JobStatus:
        """Poll until the job is done, touching it (a watched job lives while someone waits for it).

        Raises:
            JobError: the job failed (its error type and sentence), was cancelled, vanished, did
                not finish within ``timeout``, or no worker shows up.
            BaseException: whatever ``progress`` raised; the job is cancelled first.
        """
        timeout = self.settings.job_timeout if timeout is None else timeout
        start = time.monotonic()
        no_worker_since: float | None = None
        last_recovery = last_touch = 0.0
        while True:
            now = time.monotonic()
            if now - last_recovery > min(5.0, self.settings.worker_lease / 2):
                self.queue.recover()  # a crashed worker's job goes back to the queue (or fails with a reason)
                last_recovery = now
            if now - last_touch > self.settings.job_lease / 5:
                self.queue.touch(job_id)
                last_touch = now
            status = self.queue.status(job_id)
            if status is None:
                raise JobLostError("The job disappeared from the queue (it was pruned or the queue was rebuilt); "
                                   "submit it again.")
            if progress is not None:
                self._report(status, progress)
            if status.state == DONE:
                return status
            if status.state == FAILED:
                raise _ERRORS.get(status.error or "", JobError)(status.message or "The capture job failed.")
            if status.state == CANCELLED:
                raise JobCancelledError(status.message or "The capture job was cancelled.")
            if self.queue.workers():
                no_worker_since = None
            else:
                no_worker_since = no_worker_since or now
                if now - no_worker_since > self.settings.worker_wait:
                    raise NoWorkerError("No vitlens worker is running on this machine; "
                                        "start one with `python -m vitlens worker` and try again.")
            if now - start > timeout:
                raise JobTimeoutError(f"The capture did not finish within {timeout:g} s "
                                      f"({status.describe().lower()}); try again later or with fewer images.")
            time.sleep(self.settings.poll_interval)

    def _report(self, status: JobStatus, progress: StatusCallback) -> None:
        """Hand ``status`` to ``progress``; when it raises (its caller stopped waiting), cancel the job first."""
        try:
            progress(status)
        except BaseException as error:
            reason = str(error) or f"Cancelled: its caller stopped waiting ({type(error).__name__})."
            if self.queue.cancel(status.job_id, reason):
                log.info("job %s cancelled: %s", status.job_id, reason)
            raise

    def _read(self, status: JobStatus, all_cached: bool = False) -> list[TraceResult] | None:
        """The traces of a done job from the store; None when any was evicted."""
        results = []
        for key, cached in zip(status.keys, status.cached):
            trace = self.store.get(key)
            if trace is None:
                return None
            results.append(TraceResult(trace, cached or all_cached))
        return results

    def ensure_worker(self) -> None:
        """Start this process's worker thread (embedded mode) unless it is running."""
        with self._lock:
            if self._worker_thread is not None and self._worker_thread.is_alive():
                return
            from .worker import Worker  # imported here: hosted app processes never build an engine

            worker = Worker(self.settings, queue=self.queue, store=self.store)
            self._worker_stop.clear()
            self._worker_thread = threading.Thread(target=worker.run, args=(self._worker_stop,),
                                                   name="vitlens-embedded-worker", daemon=True)
            self._worker_thread.start()
            log.info("embedded worker %s started", worker.worker_id)

    def close(self) -> None:
        """Stop the embedded worker thread, if any (it finishes its running batch first)."""
        self._worker_stop.set()
        if self._worker_thread is not None:
            self._worker_thread.join(timeout=60)
        self.store.close()


_clients: dict[Settings, Client] = {}
_clients_lock = threading.Lock()


def get_client(settings: Settings | None = None) -> Client:
    """The process-wide client for ``settings`` (default: ``Settings.from_env()``)."""
    settings = settings or Settings.from_env()
    with _clients_lock:
        if settings not in _clients:
            _clients[settings] = Client(settings)
        return _clients[settings]

