"""Background jobs shared by every session of this process.

Captures and UMAP run in background threads (a ``JobBoard`` per kind of work), so long work goes
on while the user browses other pages: a data function either returns its result or raises
``Pending(job)``, which the page shows as a progress bar with a cancel button (``ui.fetch``)
before asking again.

A job lives only while someone waits for it: every page that shows its progress, and the
sidebar panel of a session that started it, touch it; a job nobody touched for ``ABANDON_S``
seconds (its tabs were closed) stops at its next progress report. In hosted mode a capture
thread only polls the worker's queue, and that report is what cancels the queue job too (see
``vitlens.client``): a cancel, or a capture nobody waits for, stops on the worker. The worker
threads are daemon threads, so SIGTERM stops the server at once instead of after the running capture.
"""
from __future__ import annotations

import queue
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, wait
from typing import TYPE_CHECKING, Callable

import streamlit as st

from vitlens.errors import VitlensError
from vitlens.settings import Settings

if TYPE_CHECKING:
    from vitlens.client import Client
    from vitlens.jobs import JobStatus

ABANDON_S = 20.0  # seconds without anyone waiting after which a job stops
WORKER_POLL_S = 0.5  # seconds between reads of a worker job's status while a page waits for it
SESSION_JOBS = "my_jobs"  # session-state key: the keys of the jobs this session asked for
HOSTED_CAPTURE_THREADS = 4  # hosted mode: capture threads only wait on the queue (the worker batches their jobs)


class Pending(Exception):
    """The result is being computed in the background by ``job``."""

    def __init__(self, job: Job) -> None:
        super().__init__(job.label)
        self.job = job


class Cancelled(VitlensError):
    """The user cancelled the job that would compute this result (or every session waiting for it left)."""

    def __init__(self, message: str, key: str, abandoned: bool = False) -> None:
        super().__init__(message)
        self.key = key
        self.abandoned = abandoned


class Job:
    """One piece of background work with its progress, shared by every page that asks for it."""

    def __init__(self, key: str, label: str) -> None:
        self.key = key
        self.label = label
        self.done = 0
        self.total = 0
        self.stage = "waiting for a free worker thread"
        self.started = time.monotonic()
        self.seen = time.monotonic()
        self.future: Future | None = None
        self._cancel = threading.Event()

    @property
    def finished(self) -> bool:
        return self.future is not None and self.future.done()

    @property
    def fraction(self) -> float | None:
        return min(1.0, self.done / self.total) if self.total else None

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def report(self, done: int, total: int, stage: str, check: bool = True) -> None:
        """Record progress; raises ``Cancelled`` once the user has cancelled (unless ``check`` is False:
        work that stops itself by polling ``cancelled``)."""
        if check:
            self.check()
        self.done, self.total, self.stage = done, total, stage

    def wait(self, timeout: float) -> bool:
        """Wait at most ``timeout`` seconds for the job to end (returning as soon as it does); whether it has."""
        if self.future is not None:
            wait([self.future], timeout=timeout)
        return self.finished

    def touch(self) -> None:
        """Someone is still waiting for this job."""
        self.seen = time.monotonic()

    @property
    def abandoned(self) -> bool:
        return time.monotonic() - self.seen > ABANDON_S

    def check(self) -> None:
        """Raise ``Cancelled`` when the user cancelled, or when nobody has waited for ``ABANDON_S`` seconds."""
        if self._cancel.is_set():
            raise Cancelled(f"Cancelled: {self.label}.", self.key)
        if self.abandoned:
            raise Cancelled(f"Stopped: {self.label} (nobody was waiting for it).", self.key, abandoned=True)

    def cancel(self) -> None:
        self._cancel.set()
        if self.future is not None:
            self.future.cancel()  # succeeds only while it is still queued

    def describe(self) -> str:
        elapsed = time.monotonic() - self.started
        return f"{self.label}: {self.stage} ({elapsed:.0f} s)"


class WorkerJob:
    """A job in the worker's queue (hosted mode), shown like a ``Job``: progress, images/s and a cancel button.

    It runs on the worker whether or not a page waits for it; ``cancel`` stops it at the worker's
    next batch boundary.
    """

    def __init__(self, client: Client, job_id: str, label: str) -> None:
        self.client, self.key, self.label = client, job_id, label
        self._status = client.status(job_id)
        self._read = time.monotonic()

    @property
    def status(self) -> JobStatus | None:
        """The job's status (read again at most every ``WORKER_POLL_S``); None when it left the queue."""
        if time.monotonic() - self._read > WORKER_POLL_S:
            self._status, self._read = self.client.status(self.key), time.monotonic()
        return self._status

    @property
    def finished(self) -> bool:
        return self.status is None or self.status.finished

    @property
    def done(self) -> int:
        return self.status.done if self.status is not None else 0

    @property
    def total(self) -> int:
        return self.status.total if self.status is not None else 0

    @property
    def fraction(self) -> float | None:
        return min(1.0, self.done / self.total) if self.total else None

    def wait(self, timeout: float) -> bool:
        """Wait at most ``timeout`` seconds for the job to end, looking every 0.1 s; whether it has."""
        deadline = time.monotonic() + timeout
        while not self.finished and time.monotonic() < deadline:
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        return self.finished

    def touch(self) -> None:
        """Nothing to keep alive: the worker runs the job until it ends or is cancelled."""

    def cancel(self) -> None:
        self.client.cancel(self.key, "Cancelled by its user; the rows already written are kept.")
        self._read = 0.0  # read the status again at the next look

    def describe(self) -> str:
        """Queue position, or images done of total and images/s, or how it ended."""
        status = self.status
        if status is None:
            return f"{self.label}: no longer in the job queue"
        if status.state == "running" and status.total:
            rate = f", {status.rate:.1f} images/s" if status.rate else ""
            return f"{self.label} on the worker: {status.done} of {status.total} images{rate}"
        if status.state == "queued" and not self.client.queue.workers():
            return f"{self.label}: {status.describe()}; no worker is running (start `python -m vitlens worker`)"
        return f"{self.label}: {status.describe()}"


class JobBoard:
    """Background jobs by key: asking twice for the same key gives the same job."""

    def __init__(self, workers: int = 1, keep: int = 32) -> None:
        self._queue: queue.SimpleQueue[tuple[Job, Callable[[Job], object]]] = queue.SimpleQueue()
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()
        self._keep = keep
        for index in range(workers):  # daemon threads: a running job never holds up the server's exit
            threading.Thread(target=self._serve, name=f"vitlens-job-{index}", daemon=True).start()

    def run(self, key: str, label: str, work: Callable[[Job], object]) -> Job:
        with self._lock:
            job = self._jobs.get(key)
            if job is not None and not _stopped_unwatched(job):
                self._jobs.move_to_end(key)
                job.touch()
                return job
            job = Job(key, label)
            job.future = Future()
            self._queue.put((job, work))
            self._jobs[key] = job
            finished = [k for k, j in self._jobs.items() if j.finished]
            for old in finished[:max(0, len(self._jobs) - self._keep)]:
                del self._jobs[old]
            return job

    def _serve(self) -> None:
        while True:
            job, work = self._queue.get()
            if job.future.set_running_or_notify_cancel():
                try:
                    job.future.set_result(self._call(job, work))
                except BaseException as error:  # handed to whoever asks for the result
                    job.future.set_exception(error)

    @staticmethod
    def _call(job: Job, work: Callable[[Job], object]) -> object:
        job.check()
        job.started = time.monotonic()
        job.stage = "starting"
        return work(job)

    def get(self, key: str) -> Job | None:
        """The job of ``key`` if this board holds one."""
        with self._lock:
            return self._jobs.get(key)

    def forget(self, key: str) -> None:
        with self._lock:
            self._jobs.pop(key, None)

    def active(self) -> list[Job]:
        with self._lock:
            return [job for job in self._jobs.values() if not job.finished]

    def result(self, job: Job) -> object:
        """The job's value; raises ``Pending`` while it runs and its error (forgotten, so a rerun retries) after."""
        job.touch()
        if not job.finished:
            raise Pending(job)
        if job.future.cancelled():
            raise Cancelled(f"Cancelled: {job.label}.", job.key)
        error = job.future.exception()
        if error is not None:
            if not isinstance(error, Cancelled):
                self.forget(job.key)
            raise error
        return job.future.result()


def _stopped_unwatched(job: Job) -> bool:
    """A job that stopped because nobody waited: whoever asks again gets a fresh one."""
    if not job.finished or job.future.cancelled():
        return False
    error = job.future.exception()
    return isinstance(error, Cancelled) and error.abandoned


@st.cache_resource(show_spinner=False)
def boards() -> dict[str, JobBoard]:
    """One thread for captures (the model is the bottleneck; hosted: a few, which only wait on the
    worker), one for analyses such as UMAP, one for sweeps."""
    captures = HOSTED_CAPTURE_THREADS if Settings.from_env().mode == "hosted" else 1
    return {"capture": JobBoard(workers=captures, keep=8), "analysis": JobBoard(workers=1, keep=16),  # older results: the disk store
            "sweep": JobBoard(workers=1, keep=8)}


def watch(job: Job) -> Job:
    """Remember that this session waits for ``job`` (its sidebar keeps the job alive and shows it)."""
    mine = st.session_state.setdefault(SESSION_JOBS, [])
    if job.key not in mine:
        mine.append(job.key)
        del mine[:-32]
    return job


def running_jobs() -> list[Job]:
    """This session's jobs still running (for the sidebar status); asking keeps them alive."""
    mine = set(st.session_state.get(SESSION_JOBS, []))
    jobs = [job for board in boards().values() for job in board.active() if job.key in mine]
    for job in jobs:
        job.touch()
    return jobs


def forget(key: str) -> None:
    """Drop a (cancelled) job so the next request starts it again."""
    for board in boards().values():
        board.forget(key)
