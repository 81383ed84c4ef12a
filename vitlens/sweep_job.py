"""Sweep jobs on the worker: a ``SweepJobSpec`` from the queue run by ``run_sweep`` in the worker process.

Progress (pairs done of total) goes to the job as the results are written; a cancel
(``JobQueue.cancel``) or a stopping worker ends the sweep at the next batch boundary. Rows
already written stay, so the same sweep queued again continues where it stopped.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from .errors import VitlensError
from .jobs import ClaimedJob, JobQueue, SweepJobSpec
from .settings import Settings
from .store import TraceStore
from .sweep import SweepSummary, run_sweep

log = logging.getLogger(__name__)


@dataclass
class SweepJobRunner:
    """Runs claimed sweep jobs for one worker.

    Attributes:
        settings: The worker's settings (folders, device, batch, precision, image limits).
        queue: The job queue.
        store: Trace cache the sweep reuses traces from.
        worker_id: The worker holding the jobs.
        device: Device the worker runs on (``cpu``, ``cuda:0``, ...).
        stop: Set when the worker is stopping.
    """

    settings: Settings
    queue: JobQueue
    store: TraceStore
    worker_id: str
    device: str
    stop: threading.Event

    def run(self, job: ClaimedJob) -> None:
        """Run one claimed sweep job to done or failed; a cancelled one (or one whose worker is stopping,
        which ``Worker`` puts back in the queue) ends at the next batch boundary with its rows kept."""
        try:
            summary = self._sweep(SweepJobSpec.from_json(job.spec), job.job_id)
        except VitlensError as error:
            self.queue.fail(job.job_id, self.worker_id, str(error), type(error).__name__)
            return
        except Exception as error:
            log.exception("sweep job %s failed", job.job_id)
            self.queue.fail(job.job_id, self.worker_id,
                            f"The sweep failed unexpectedly ({type(error).__name__}: {str(error)[:120]}).")
            return
        if summary.stopped:
            log.info("sweep job %s stopped after %d pairs (cancelled, or the worker is stopping)", job.job_id, summary.computed)
            return
        self.queue.finish_sweep(job.job_id, self.worker_id, summary.to_json())

    def _sweep(self, spec: SweepJobSpec, job_id: str) -> SweepSummary:
        """Run the sweep, stopping at a batch boundary once the job is no longer wanted or the worker stops."""
        settings = self.settings
        for model in spec.models:
            settings.check_model(model)
        settings.check_side(spec.size)
        weights = [settings.resolve_weights(name) for name in spec.weights]

        def progress(done: int, total: int) -> None:
            if job_id in self.queue.wanted([job_id], self.worker_id):
                self.queue.progress(job_id, self.worker_id, done, total)

        def should_stop() -> bool:
            return self.stop.is_set() or job_id not in self.queue.wanted([job_id], self.worker_id)

        return run_sweep(settings.resolve_dataset(spec.images), list(spec.models), weights,
                         settings.resolve_results(spec.out), size=spec.size, batch=settings.worker_batch,
                         precision=settings.precision or "fp32", device=self.device, store=self.store,
                         max_pixels=settings.max_pixels, max_image_bytes=settings.max_image_bytes,
                         progress=progress, should_stop=should_stop)
