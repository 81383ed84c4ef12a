"""The persistent capture-job queue shared by every app session and worker on one machine.

A job is one capture request: images (by pixel digest; the worker reads their PNG from the
queue's image folder), a model, its weights and the ``CaptureOptions``; or one sweep of an
image folder into a results folder (``SweepJobSpec``, names only). Its id is a hash of all of
that, so identical requests share one job. Status: ``queued`` (with its position), ``running``
(images done of total), ``done`` (the ``TraceStore`` keys of the results, or a sweep's summary;
traces never travel through the queue), ``failed`` (one sentence) or ``cancelled`` (one
sentence: who cancelled it, or that nobody was waiting for it any more).

A client that waits for a job submits it *watched* and touches it while it polls; a watched
job nobody touched for ``watch_lease`` seconds (its page was closed, its app process died) is
cancelled by the worker before it starts it or between two of its batches. Jobs submitted
unwatched run whether or not anyone polls them.

The queue is a table in one SQLite file (stdlib ``sqlite3``, WAL mode). Queue libraries were
weighed and none gave what a GPU worker that may be SIGKILLed needs:

- huey (``SqliteHuey``): dequeue deletes the message, so a task in flight when the consumer
  is killed is lost (huey documents at-most-once delivery; acknowledgements were declined
  upstream), it has no dedupe key, and its consumer runs one task at a time (no batching).
- persist-queue (``SQLiteAckQueue``): has ack/nack, but ``get`` selects and then updates under
  a *thread* lock only, so two worker processes can take the same item, and its
  ``resume_unack_tasks`` hands back every unacknowledged item, a live worker's too.
- litequeue: atomic multi-process pop with lock times, but no lease renewal, no dedupe key
  and no way to take the compatible jobs behind the first one; releases after 0.9 need
  Python 3.12.

Every one of them would need the same job table beside it for status, progress and crash
recovery, which then is the real queue. So the table is the queue, and the protocol is
a few SQL statements inside ``BEGIN IMMEDIATE`` transactions (SQLite's cross-process write
lock): claim (oldest queued job plus compatible ones, marked running by one worker), renew
(worker heartbeat), recover (jobs of a worker whose heartbeat is stale, or whose process
is gone, go back to the queue or fail after ``max_attempts``), and touch / cancel (the client's
side of a watched job).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import socket
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from .errors import StorageError, VitlensError
from .images import DecodedImage, decode_image
from .interventions import TestTimeRegister
from .settings import Settings
from .store import CaptureOptions

log = logging.getLogger(__name__)

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = (DONE, FAILED, CANCELLED)
ACTIVE = (QUEUED, RUNNING)
SWEEP = "sweep"  # ``kind`` of a sweep job's spec (capture specs carry no kind)
JOB_RETENTION = 24 * 3600.0  # seconds finished jobs and unused images are kept
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    spec TEXT NOT NULL,
    grp TEXT,
    state TEXT NOT NULL,
    total INTEGER NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    worker TEXT,
    message TEXT,
    error TEXT,
    result TEXT,
    submitted REAL NOT NULL,
    started REAL,
    finished REAL,
    watched REAL
);
CREATE INDEX IF NOT EXISTS jobs_state_seq ON jobs (state, seq);
CREATE TABLE IF NOT EXISTS workers (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    device TEXT,
    started REAL NOT NULL,
    heartbeat REAL NOT NULL
);
"""


class JobError(VitlensError):
    """A capture job failed; the message is the worker's sentence."""


class MalformedJobError(JobError):
    """A job in the queue cannot be read (bad spec, missing image)."""


class JobLostError(JobError):
    """The job is no longer in the queue (pruned, or the queue was rebuilt after damage)."""


class JobTimeoutError(JobError):
    """A job did not finish in the time the caller was willing to wait."""


class JobCancelledError(JobError):
    """The job was cancelled (by a user, or because nobody was waiting for it any more)."""


class NoWorkerError(JobError):
    """No worker process is alive to run queued jobs."""


@dataclass(frozen=True)
class JobSpec:
    """What to capture. Everything here is part of the job id.

    Attributes:
        model: Preset or timm ViT name.
        weights: ``hub``, ``random``, ``synthetic``, or a file name inside the deployment's weights folder.
        images: Pixel digests (``DecodedImage.digest``) of images put into the queue.
        options: Capture options.
        fingerprint: The weights' fingerprint when the job was submitted (``weights_fingerprint``),
            so a rewritten weights file makes a new job instead of joining the done one; None when
            it is not known before loading (hub weights not downloaded yet).
    """

    model: str
    weights: str
    images: tuple[str, ...]
    options: CaptureOptions = CaptureOptions()
    fingerprint: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> JobSpec:
        """Parse a stored spec.

        Raises:
            MalformedJobError: not JSON, or fields missing or of the wrong type.
        """
        try:
            data = json.loads(text)
            options = data["options"]
            spec = cls(
                model=_typed(data["model"], str),
                weights=_typed(data["weights"], str),
                images=tuple(_typed(digest, str) for digest in data["images"]),
                options=CaptureOptions(
                    side=None if options["side"] is None else _typed(options["side"], int),
                    antialias=_typed(options["antialias"], bool),
                    precision=_typed(options["precision"], str),
                    state_layers=tuple(_typed(layer, int) for layer in options["state_layers"]),
                    test_time_register=_register(options.get("test_time_register")),
                ),
                fingerprint=None if data.get("fingerprint") is None else _typed(data["fingerprint"], str),
            )
        except (ValueError, KeyError, TypeError, VitlensError) as error:
            raise MalformedJobError(f"The job is malformed ({type(error).__name__}: {str(error)[:80]}).") from error
        if not spec.images:
            raise MalformedJobError("The job has no images.")
        return spec

    @property
    def job_id(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:24]

    @property
    def total(self) -> int:
        """Images in the job."""
        return len(self.images)

    @property
    def group(self) -> str:
        """Jobs with the same group can run in one batch (same model, weights and options)."""
        return json.dumps([self.model, self.weights, asdict(self.options)], sort_keys=True)


@dataclass(frozen=True)
class SweepJobSpec:
    """A sweep run by a worker (``vitlens.sweep_job``): names the deployment resolves, never paths.

    Attributes:
        images: Image folder inside ``Settings.datasets_dir`` (``.`` for the folder itself).
        models: Presets or timm ViT names.
        weights: ``hub``, ``random``, ``synthetic`` or file names inside ``Settings.weights_dir``.
        out: Results folder inside ``Settings.results_dir``.
        size: Input side in pixels; None: each model's own.
    """

    images: str
    models: tuple[str, ...]
    weights: tuple[str, ...]
    out: str
    size: int | None = None

    def to_json(self) -> str:
        return json.dumps({"kind": SWEEP, **asdict(self)}, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> SweepJobSpec:
        """Parse a stored sweep spec.

        Raises:
            MalformedJobError: not JSON, not a sweep, or fields missing or of the wrong type.
        """
        try:
            data = json.loads(text)
            if data["kind"] != SWEEP:
                raise ValueError(f"kind {str(data['kind'])[:20]}")
            spec = cls(images=_typed(data["images"], str), models=tuple(_typed(m, str) for m in data["models"]),
                       weights=tuple(_typed(w, str) for w in data["weights"]), out=_typed(data["out"], str),
                       size=None if data["size"] is None else _typed(data["size"], int))
        except (ValueError, KeyError, TypeError) as error:
            raise MalformedJobError(f"The sweep job is malformed ({type(error).__name__}: {str(error)[:80]}).") from error
        if not spec.models or not spec.weights:
            raise MalformedJobError("The sweep job names no model or no weights.")
        return spec

    @property
    def job_id(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:24]

    @property
    def total(self) -> int:
        """Unknown until the worker has looked at the folders: 0 (the worker sets it)."""
        return 0

    @property
    def group(self) -> None:
        """Sweeps never share a batch."""
        return None


def is_sweep(spec: str) -> bool:
    """Whether a stored spec is a sweep's (anything unreadable is left to ``JobSpec.from_json`` to reject)."""
    try:
        data = json.loads(spec)
    except ValueError:
        return False
    return isinstance(data, dict) and data.get("kind") == SWEEP


def _register(data: dict | None) -> TestTimeRegister | None:
    """A ``TestTimeRegister`` from its ``asdict`` form (None stays None)."""
    if data is None:
        return None
    neurons = tuple((_typed(layer, int), _typed(neuron, int)) for layer, neuron in data["neurons"])
    return TestTimeRegister(neurons=neurons, init=_typed(data["init"], str), patch_values=_typed(data["patch_values"], str))


def _typed(value, kind: type):
    if type(value) is not kind:  # bool is an int subclass; be strict
        raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class JobStatus:
    """Where a job stands.

    Attributes:
        job_id: Stable id of the request.
        state: ``queued``, ``running``, ``done``, ``failed`` or ``cancelled``.
        position: Queued jobs ahead of this one (queued only).
        done: Images captured so far (a sweep: image x weights pairs).
        total: Images in the job (a sweep: pairs to run, 0 until the worker has planned it).
        attempts: How many times a worker took the job.
        message: Why it failed or was cancelled, or a note such as a re-queue after a worker died.
        error: Name of the ``VitlensError`` subclass behind a failure, if any.
        keys: ``TraceStore`` keys of the results in image order (done only).
        cached: Per image, whether the worker found the trace in the store (done only).
        worker: The worker that holds the job (running) or that finished it.
        summary: A done sweep's ``SweepSummary.to_json()``.
        started: When a worker last took the job (``time.time()``), None before.
        finished_at: When it finished, None before.
    """

    job_id: str
    state: str
    position: int | None = None
    done: int = 0
    total: int = 0
    attempts: int = 0
    message: str | None = None
    error: str | None = None
    keys: tuple[str, ...] = ()
    cached: tuple[bool, ...] = ()
    worker: str | None = None
    summary: dict | None = None
    started: float | None = None
    finished_at: float | None = None

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    @property
    def rate(self) -> float | None:
        """Images (a sweep: pairs) per second since a worker took the job; None before it did."""
        if self.started is None or not self.done:
            return None
        elapsed = (self.finished_at or time.time()) - self.started
        return self.done / elapsed if elapsed > 0 else None

    def describe(self) -> str:
        """A short line for a status panel."""
        if self.state == QUEUED:
            ahead = "next in line" if not self.position else f"{self.position} job{'s' * (self.position != 1)} ahead"
            return f"Queued ({ahead})"
        if self.state == RUNNING:
            return f"Running: {self.done} of {self.total} image{'s' * (self.total != 1)} captured"
        if self.state == DONE:
            return "Done"
        if self.state == CANCELLED:
            return self.message or "Cancelled"
        return f"Failed: {self.message}"


@dataclass(frozen=True)
class ClaimedJob:
    """A job a worker has taken; ``spec`` is the raw text (it may turn out malformed)."""

    job_id: str
    spec: str
    total: int
    attempts: int


@dataclass(frozen=True)
class WorkerInfo:
    """A registered worker process."""

    worker_id: str
    host: str
    pid: int
    device: str | None
    heartbeat: float


@dataclass
class JobQueue:
    """The job table and image folder in ``directory``; safe to use from many processes.

    Attributes:
        directory: Shared folder (``Settings.job_dir``).
        lease: Seconds without a heartbeat after which a worker counts as dead.
        max_attempts: Times a job is started before a worker crash fails it for good.
        watch_lease: Seconds a watched job is kept without its client touching it; then it is cancelled.
    """

    directory: Path
    lease: float = 30.0
    max_attempts: int = 2
    watch_lease: float = 30.0
    _host: str = field(default_factory=socket.gethostname, repr=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> JobQueue:
        """The deployment's queue (``settings.queue_dir``) with its leases and attempts."""
        return cls(settings.queue_dir, lease=settings.worker_lease, max_attempts=settings.job_attempts,
                   watch_lease=settings.job_lease)

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)
        self.images_dir.mkdir(parents=True, exist_ok=True)
        with self._connect():
            pass  # creates (or repairs) the tables

    @property
    def images_dir(self) -> Path:
        return self.directory / "images"

    @property
    def db_path(self) -> Path:
        return self.directory / "jobs.sqlite"

    # -- images ------------------------------------------------------------------------------
    def put_image(self, image: DecodedImage) -> str:
        """Store the decoded pixels as PNG (once per digest) and return the digest."""
        path = self.images_dir / f"{image.digest}.png"
        if not path.exists():
            buffer = io.BytesIO()
            image.image.save(buffer, format="PNG", compress_level=1)
            temporary = path.with_suffix(f".{os.getpid()}.{time.monotonic_ns()}.tmp")
            temporary.write_bytes(buffer.getvalue())
            os.replace(temporary, path)
        else:
            os.utime(path)  # keeps it from being pruned while in use
        return image.digest

    def read_image(self, digest: str, max_pixels: int) -> DecodedImage:
        """The image a job refers to.

        Raises:
            MalformedJobError: the digest is not a hex name, the file is gone or its pixels differ.
        """
        if not digest or not all(c in "0123456789abcdef" for c in digest):
            raise MalformedJobError(f"The job names an invalid image digest '{digest[:40]}'.")
        path = self.images_dir / f"{digest}.png"
        try:
            data = path.read_bytes()
        except OSError as error:
            raise MalformedJobError(f"The job's image {digest} is no longer in the queue folder.") from error
        image = decode_image(data, name=digest, max_pixels=max_pixels)
        if image.digest != digest:
            raise MalformedJobError(f"The job's image {digest} is damaged (its pixels no longer match).")
        return image

    # -- submitting and reading --------------------------------------------------------------
    def submit(self, spec: JobSpec | SweepJobSpec, rerun: bool = False, watched: bool = False) -> JobStatus:
        """Queue ``spec`` unless the same job is queued, running or done; a failed or cancelled job is queued again.

        Args:
            spec: The request; a capture's images must have been stored with ``put_image``.
            rerun: Queue it again even when it is done (its results were evicted from the store; a sweep
                to run again, which continues where its results folder stands).
            watched: The caller will ``touch`` the job while it waits; once nobody has for
                ``watch_lease`` seconds, the worker cancels it. Joining a job someone submitted
                unwatched leaves it unwatched (that submitter wants it whatever happens).
        """
        job_id, now = spec.job_id, time.time()
        watch = now if watched else None
        with self._transaction() as conn:
            row = conn.execute("SELECT state, watched FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                conn.execute("INSERT INTO jobs (id, seq, spec, grp, state, total, submitted, watched) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             (job_id, _next_seq(conn), spec.to_json(), spec.group, QUEUED, spec.total, now, watch))
            elif row[0] in (FAILED, CANCELLED) or (rerun and row[0] == DONE):
                conn.execute("UPDATE jobs SET state = ?, seq = ?, done = 0, total = ?, attempts = 0, worker = NULL, "
                             "message = NULL, error = NULL, result = NULL, submitted = ?, started = NULL, finished = NULL, "
                             "watched = ? WHERE id = ?", (QUEUED, _next_seq(conn), spec.total, now, watch, job_id))
            elif row[0] in ACTIVE and (not watched or row[1] is not None):
                conn.execute("UPDATE jobs SET watched = ? WHERE id = ?", (watch, job_id))
        return self.status(job_id)

    def touch(self, job_id: str) -> bool:
        """Renew a watched job's lease (its client still waits); False when it is not queued or running."""
        with self._transaction() as conn:
            row = conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            conn.execute("UPDATE jobs SET watched = ? WHERE id = ? AND watched IS NOT NULL", (time.time(), job_id))
        return row is not None and row[0] in ACTIVE

    def cancel(self, job_id: str, reason: str) -> bool:
        """Cancel a queued or running job with one sentence; a worker running it stops after its current batch.

        Returns:
            False when the job had already finished (or does not exist).
        """
        with self._transaction() as conn:
            return bool(conn.execute("UPDATE jobs SET state = ?, message = ?, error = NULL, finished = ? "
                                     "WHERE id = ? AND state IN (?, ?)",
                                     (CANCELLED, _sentence(reason), time.time(), job_id, *ACTIVE)).rowcount)

    def status(self, job_id: str) -> JobStatus | None:
        """The job's status, or None when there is no such job."""
        with self._connect() as conn:
            row = conn.execute("SELECT state, seq, done, total, attempts, message, error, result, worker, started, finished "
                               "FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            state, seq, done, total, attempts, message, error, result, worker, started, finished = row
            position = None
            if state == QUEUED:
                position = conn.execute("SELECT COUNT(*) FROM jobs WHERE state = ? AND seq < ?", (QUEUED, seq)).fetchone()[0]
        stored = json.loads(result) if result else {}
        return JobStatus(job_id=job_id, state=state, position=position, done=done, total=total, attempts=attempts,
                         message=message, error=error, keys=tuple(stored.get("keys", ())),
                         cached=tuple(stored.get("cached", ())), worker=worker, summary=stored.get("summary"),
                         started=started, finished_at=finished)

    def counts(self) -> dict[str, int]:
        """Number of jobs per state."""
        with self._connect() as conn:
            rows = conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        return {state: 0 for state in (*ACTIVE, *FINISHED)} | dict(rows)

    # -- worker side -------------------------------------------------------------------------
    def claim(self, worker_id: str, max_images: int) -> list[ClaimedJob]:
        """Take the oldest queued job and, behind it, compatible ones up to ``max_images`` images.

        Atomic across processes: a job is handed to exactly one worker. Watched jobs nobody
        waits for any more are cancelled first, not handed out.
        """
        now = time.time()
        with self._transaction() as conn:
            _abandon(conn, now, self.watch_lease)
            first = conn.execute("SELECT id, grp FROM jobs WHERE state = ? ORDER BY seq LIMIT 1", (QUEUED,)).fetchone()
            if first is None:
                return []
            if first[1] is None:
                rows = conn.execute("SELECT id, spec, total, attempts FROM jobs WHERE id = ?", (first[0],)).fetchall()
            else:
                rows = conn.execute("SELECT id, spec, total, attempts FROM jobs WHERE state = ? AND grp = ? ORDER BY seq",
                                    (QUEUED, first[1])).fetchall()
            taken, images = [], 0
            for job_id, spec, total, attempts in rows:
                if taken and images + total > max_images:
                    break
                taken.append(ClaimedJob(job_id, spec, total, attempts + 1))
                images += total
            conn.executemany("UPDATE jobs SET state = ?, worker = ?, attempts = attempts + 1, done = 0, started = ? "
                             "WHERE id = ? AND state = ?", [(RUNNING, worker_id, now, job.job_id, QUEUED) for job in taken])
        return taken

    def wanted(self, job_ids: Sequence[str], worker_id: str) -> set[str]:
        """Which of ``job_ids`` this worker should go on with: still its running jobs, after
        cancelling those whose watchers have gone (the worker asks between batches)."""
        with self._transaction() as conn:
            _abandon(conn, time.time(), self.watch_lease)
            rows = conn.execute(f"SELECT id FROM jobs WHERE state = ? AND worker = ? AND id IN ({','.join('?' * len(job_ids))})",
                                (RUNNING, worker_id, *job_ids)).fetchall()
        return {row[0] for row in rows}

    def progress(self, job_id: str, worker_id: str, done: int, total: int | None = None) -> bool:
        """Record images done (and the total, when given); False when the job is no longer this worker's."""
        return self._update_own(job_id, worker_id, "done = ?, total = COALESCE(?, total)", (done, total))

    def complete(self, job_id: str, worker_id: str, keys: Sequence[str], cached: Sequence[bool]) -> bool:
        """Mark the job done with the store keys of its traces; False when it is no longer this worker's."""
        result = json.dumps({"keys": list(keys), "cached": [bool(c) for c in cached]})
        return self._update_own(job_id, worker_id, "state = ?, done = total, result = ?, message = NULL, error = NULL, finished = ?",
                                (DONE, result, time.time()))

    def finish_sweep(self, job_id: str, worker_id: str, summary: dict) -> bool:
        """Mark a sweep done with its summary; False when it is no longer this worker's (e.g. cancelled)."""
        return self._update_own(job_id, worker_id, "state = ?, result = ?, message = NULL, error = NULL, finished = ?",
                                (DONE, json.dumps({"summary": summary}), time.time()))

    def fail(self, job_id: str, worker_id: str, message: str, error: str | None = None) -> bool:
        """Mark the job failed with one sentence; False when it is no longer this worker's."""
        return self._update_own(job_id, worker_id, "state = ?, message = ?, error = ?, finished = ?",
                                (FAILED, _sentence(message), error, time.time()))

    def release(self, worker_id: str) -> int:
        """Put a stopping worker's running jobs back in the queue (not counted as an attempt)."""
        with self._transaction() as conn:
            return conn.execute("UPDATE jobs SET state = ?, worker = NULL, done = 0, attempts = MAX(attempts - 1, 0), "
                                "message = ? WHERE state = ? AND worker = ?",
                                (QUEUED, "Re-queued: its worker was stopped.", RUNNING, worker_id)).rowcount

    def _update_own(self, job_id: str, worker_id: str, assignments: str, values: tuple) -> bool:
        with self._transaction() as conn:
            changed = conn.execute(f"UPDATE jobs SET {assignments} WHERE id = ? AND state = ? AND worker = ?",
                                   (*values, job_id, RUNNING, worker_id)).rowcount
        if not changed:
            log.warning("job %s is no longer held by worker %s; its update was dropped", job_id, worker_id)
        return bool(changed)

    # -- workers, leases and recovery --------------------------------------------------------
    def register(self, worker_id: str, device: str | None = None) -> None:
        now = time.time()
        with self._transaction() as conn:
            conn.execute("INSERT OR REPLACE INTO workers (id, host, pid, device, started, heartbeat) VALUES (?, ?, ?, ?, ?, ?)",
                         (worker_id, self._host, os.getpid(), device, now, now))

    def heartbeat(self, worker_id: str) -> bool:
        """Renew the worker's lease; False when it was declared dead meanwhile (it should stop)."""
        with self._transaction() as conn:
            return bool(conn.execute("UPDATE workers SET heartbeat = ? WHERE id = ?", (time.time(), worker_id)).rowcount)

    def unregister(self, worker_id: str) -> None:
        with self._transaction() as conn:
            conn.execute("DELETE FROM workers WHERE id = ?", (worker_id,))

    def workers(self) -> list[WorkerInfo]:
        """Registered workers that are alive (fresh heartbeat, and a live process on this host)."""
        with self._connect() as conn:
            rows = conn.execute("SELECT id, host, pid, device, heartbeat FROM workers").fetchall()
        now = time.time()
        return [WorkerInfo(*row) for row in rows if self._alive(row[1], row[2], row[4], now)]

    def recover(self) -> list[JobStatus]:
        """Re-queue (or, after ``max_attempts`` starts, fail) the running jobs of dead workers.

        Any process may call this; it never touches a live worker's jobs.
        """
        now, changed = time.time(), []
        with self._transaction() as conn:
            workers = conn.execute("SELECT id, host, pid, heartbeat FROM workers").fetchall()
            alive = {row[0] for row in workers if self._alive(row[1], row[2], row[3], now)}
            orphans = [row for row in conn.execute("SELECT id, worker, attempts FROM jobs WHERE state = ?", (RUNNING,))
                       if row[1] not in alive]
            for job_id, worker, attempts in orphans:
                if attempts >= self.max_attempts:
                    message = (f"The worker stopped while running this job {attempts} time{'s' * (attempts != 1)} "
                               "(crash or out of memory), so it was not tried again.")
                    conn.execute("UPDATE jobs SET state = ?, message = ?, error = NULL, finished = ? WHERE id = ?",
                                 (FAILED, message, now, job_id))
                else:
                    message = f"Re-queued after worker {worker} stopped during attempt {attempts}."
                    conn.execute("UPDATE jobs SET state = ?, worker = NULL, done = 0, message = ? WHERE id = ?",
                                 (QUEUED, message, job_id))
                log.warning("job %s of dead worker %s: %s", job_id, worker, message)
                changed.append(job_id)
            dead = [row[0] for row in workers if row[0] not in alive]
            conn.executemany("DELETE FROM workers WHERE id = ?", [(worker,) for worker in dead])
        return [self.status(job_id) for job_id in changed]

    def _alive(self, host: str, pid: int, heartbeat: float, now: float) -> bool:
        if now - heartbeat > self.lease:
            return False
        return host != self._host or _process_alive(pid)

    def prune(self, max_age: float = JOB_RETENTION) -> int:
        """Delete finished jobs and unreferenced images older than ``max_age`` seconds; returns jobs deleted."""
        cutoff = time.time() - max_age
        with self._transaction() as conn:
            deleted = conn.execute(f"DELETE FROM jobs WHERE state IN ({','.join('?' * len(FINISHED))}) AND finished < ?",
                                   (*FINISHED, cutoff)).rowcount
            active = conn.execute("SELECT spec FROM jobs WHERE state IN (?, ?)", (QUEUED, RUNNING)).fetchall()
        in_use = set()
        for (text,) in active:
            with contextlib.suppress(MalformedJobError):
                in_use.update(() if is_sweep(text) else JobSpec.from_json(text).images)
        for path in self.images_dir.glob("*.png"):
            with contextlib.suppress(OSError):
                if path.stem not in in_use and path.stat().st_mtime < cutoff:
                    path.unlink()
        return deleted

    # -- sqlite plumbing ---------------------------------------------------------------------
    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A short-lived connection (one per call, so threads and processes never share one).

        The tables are checked first: a missing table is created again, a damaged file is
        moved aside and replaced by an empty queue. Any other SQLite error becomes one
        ``StorageError`` sentence.

        Raises:
            StorageError: the queue cannot be opened, repaired or written.
        """
        conn = self._open()
        try:
            yield conn
        except sqlite3.DatabaseError as error:
            conn.close()
            if _damaged(error):
                with self._repair_lock():
                    self._move_aside(error)
                    self._create_tables()
            raise StorageError(_storage_sentence(error)) from error
        finally:
            conn.close()

    def _open(self) -> sqlite3.Connection:
        """A connection to a queue whose tables are readable (repairing it first when needed)."""
        try:
            return self._probe()
        except sqlite3.DatabaseError as error:  # a new queue has no tables yet: only other errors are worth a warning
            log.log(logging.INFO if "no such" in str(error) else logging.WARNING,
                    "job queue %s is unusable (%s); repairing it", self.db_path, error)
        try:
            with self._repair_lock():
                self._repair()
                return self._probe()
        except (sqlite3.DatabaseError, OSError) as error:
            raise StorageError(_storage_sentence(error)) from error

    def _probe(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.db_path, timeout=30.0, isolation_level=None)
        try:
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("SELECT jobs.watched FROM jobs, workers LIMIT 0")
        except BaseException:
            conn.close()
            raise
        return conn

    @contextlib.contextmanager
    def _repair_lock(self) -> Iterator[None]:
        """One repairing process at a time (the others wait, then find the queue repaired)."""
        with open(self.directory / "jobs.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _repair(self) -> None:
        """Create missing tables; move a damaged database aside (``jobs.sqlite.damaged``) and start empty."""
        try:
            self._create_tables()
        except sqlite3.DatabaseError as error:
            self._move_aside(error)
            self._create_tables()

    def _move_aside(self, error: sqlite3.DatabaseError) -> None:
        log.error("job queue %s is damaged (%s); moving it to %s.damaged and starting an empty queue",
                  self.db_path, error, self.db_path.name)
        for suffix in ("", "-wal", "-shm"):
            source = self.db_path.with_name(self.db_path.name + suffix)
            if source.exists():
                os.replace(source, source.with_name(self.db_path.name + ".damaged" + suffix))

    def _create_tables(self) -> None:
        conn = sqlite3.connect(self.db_path, timeout=30.0, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(_SCHEMA)
            columns = {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}
            if "watched" not in columns:  # a queue made before jobs could be watched
                conn.execute("ALTER TABLE jobs ADD COLUMN watched REAL")
        finally:
            conn.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE``: takes SQLite's write lock up front, so read-then-write is atomic."""
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                with contextlib.suppress(sqlite3.DatabaseError):
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")


def _damaged(error: sqlite3.DatabaseError) -> bool:
    text = str(error).lower()
    return "malformed" in text or "not a database" in text


def _storage_sentence(error: BaseException) -> str:
    """One sentence for a SQLite failure, without paths or SQL."""
    text = str(error).lower()
    if isinstance(error, sqlite3.DatabaseError) and _damaged(error):
        return "The job queue's database was damaged and has been rebuilt empty; submit the request again."
    if "locked" in text or "busy" in text:
        return "The job queue is busy; try again in a moment."
    if "readonly" in text or "read-only" in text or isinstance(error, PermissionError):
        return "The job queue's folder is read-only, so no job can be queued; ask the operator to fix its permissions."
    return "The job queue's storage failed and could not be repaired; try again, or ask the operator to check its disk."


def _abandon(conn: sqlite3.Connection, now: float, lease: float) -> None:
    """Cancel the queued and running watched jobs nobody touched for ``lease`` seconds (inside a transaction)."""
    message = (f"Cancelled: nobody was waiting for it any more (no client polled it for {lease:g} s; "
               "its page was closed or its session ended).")
    abandoned = conn.execute("UPDATE jobs SET state = ?, message = ?, error = NULL, finished = ? "
                             "WHERE state IN (?, ?) AND watched < ?", (CANCELLED, message, now, *ACTIVE, now - lease)).rowcount
    if abandoned:
        log.info("cancelled %d job(s) nobody was waiting for", abandoned)


def _next_seq(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()[0]


def _sentence(message: str, limit: int = 300) -> str:
    """One line, at most ``limit`` characters, ending in a full stop."""
    line = " ".join(str(message).split())
    if len(line) > limit:
        line = line[:limit - 1].rstrip() + "…"
    return line if line.endswith((".", "!", "?", "…")) else line + "."


def _process_alive(pid: int) -> bool:
    """True when ``pid`` is a running (not zombie) process on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"
