"""Background jobs shared by every session of this process.

Captures and UMAP run in background threads (a ``JobBoard`` per kind of work), so long work goes
on while the user browses other pages: a data function either returns its result or raises
``Pending(job)``, which the page shows as a progress bar with a cancel button (``ui.fetch``)
before asking again.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import streamlit as st

from vitlens.errors import VitlensError


class Pending(Exception):
    """The result is being computed in the background by ``job``."""

    def __init__(self, job: Job) -> None:
        super().__init__(job.label)
        self.job = job


class Cancelled(VitlensError):
    """The user cancelled the job that would compute this result."""

    def __init__(self, message: str, key: str) -> None:
        super().__init__(message)
        self.key = key


class Job:
    """One piece of background work with its progress, shared by every page that asks for it."""

    def __init__(self, key: str, label: str) -> None:
        self.key = key
        self.label = label
        self.done = 0
        self.total = 0
        self.stage = "waiting for a free worker thread"
        self.started = time.monotonic()
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

    def report(self, done: int, total: int, stage: str) -> None:
        """Record progress; raises ``Cancelled`` once the user has cancelled."""
        self.check()
        self.done, self.total, self.stage = done, total, stage

    def check(self) -> None:
        if self._cancel.is_set():
            raise Cancelled(f"Cancelled: {self.label}.", self.key)

    def cancel(self) -> None:
        self._cancel.set()
        if self.future is not None:
            self.future.cancel()  # succeeds only while it is still queued

    def describe(self) -> str:
        elapsed = time.monotonic() - self.started
        return f"{self.label}: {self.stage} ({elapsed:.0f} s)"


class JobBoard:
    """Background jobs by key: asking twice for the same key gives the same job."""

    def __init__(self, workers: int = 1, keep: int = 32) -> None:
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vitlens-job")
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()
        self._keep = keep

    def run(self, key: str, label: str, work: Callable[[Job], object]) -> Job:
        with self._lock:
            job = self._jobs.get(key)
            if job is not None:
                self._jobs.move_to_end(key)
                return job
            job = Job(key, label)
            job.future = self._executor.submit(self._call, job, work)
            self._jobs[key] = job
            finished = [k for k, j in self._jobs.items() if j.finished]
            for old in finished[:max(0, len(self._jobs) - self._keep)]:
                del self._jobs[old]
            return job

    @staticmethod
    def _call(job: Job, work: Callable[[Job], object]) -> object:
        job.check()
        job.started = time.monotonic()
        job.stage = "starting"
        return work(job)

    def forget(self, key: str) -> None:
        with self._lock:
            self._jobs.pop(key, None)

    def active(self) -> list[Job]:
        with self._lock:
            return [job for job in self._jobs.values() if not job.finished]

    def result(self, job: Job) -> object:
        """The job's value; raises ``Pending`` while it runs and its error (forgotten, so a rerun retries) after."""
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


@st.cache_resource(show_spinner=False)
def boards() -> dict[str, JobBoard]:
    """One thread for captures (the model is the bottleneck) and one for analyses such as UMAP."""
    return {"capture": JobBoard(workers=1, keep=8), "analysis": JobBoard(workers=1, keep=16)}  # older results: the disk store


def running_jobs() -> list[Job]:
    """Jobs still running in this process (for the sidebar status)."""
    return [job for board in boards().values() for job in board.active()]


def forget(key: str) -> None:
    """Drop a (cancelled) job so the next request starts it again."""
    for board in boards().values():
        board.forget(key)
