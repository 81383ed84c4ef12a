"""The job queue: lifecycle, dedupe, batching claims, ownership, leases and crash recovery."""
from __future__ import annotations

import multiprocessing
import os
import sqlite3
import time
from pathlib import Path

import pytest

from job_fixtures import image, job_settings
from vitlens.errors import StorageError, UnknownModelError, WeightsError
from vitlens.jobs import CANCELLED, DONE, FAILED, QUEUED, RUNNING, JobQueue, JobSpec, MalformedJobError
from vitlens.store import CaptureOptions


def _spec(queue: JobQueue, *seeds: int, model: str = "test_vit", side: int = 64) -> JobSpec:
    return JobSpec(model=model, weights="random", images=tuple(queue.put_image(image(seed)) for seed in seeds),
                   options=CaptureOptions(side=side))


@pytest.fixture
def queue(tmp_path: Path) -> JobQueue:
    return JobQueue(tmp_path / "jobs", lease=2.0, max_attempts=2)


def test_jobs_queue_in_order_with_positions(queue: JobQueue) -> None:
    statuses = [queue.submit(_spec(queue, seed)) for seed in range(3)]
    assert [status.state for status in statuses] == [QUEUED] * 3
    assert [status.position for status in statuses] == [0, 1, 2]
    assert statuses[0].describe() == "Queued (next in line)"
    assert statuses[2].describe() == "Queued (2 jobs ahead)"


def test_identical_requests_share_one_job(queue: JobQueue) -> None:
    first, second = queue.submit(_spec(queue, 1, 2)), queue.submit(_spec(queue, 1, 2))
    assert first.job_id == second.job_id
    assert queue.counts()[QUEUED] == 1
    assert len(list(queue.images_dir.glob("*.png"))) == 2
    assert queue.submit(_spec(queue, 2, 1)).job_id != first.job_id  # image order is part of the request


def test_job_lifecycle_running_progress_done(queue: JobQueue) -> None:
    spec = _spec(queue, 1, 2, 3)
    queue.submit(spec)
    queue.register("w1")
    [claimed] = queue.claim("w1", max_images=8)
    assert claimed.job_id == spec.job_id and JobSpec.from_json(claimed.spec) == spec
    assert queue.progress(spec.job_id, "w1", 2)
    status = queue.status(spec.job_id)
    assert (status.state, status.done, status.total, status.attempts, status.worker) == (RUNNING, 2, 3, 1, "w1")
    assert status.describe() == "Running: 2 of 3 images captured"
    assert queue.complete(spec.job_id, "w1", ["k1", "k2", "k3"], [False, True, False])
    status = queue.status(spec.job_id)
    assert (status.state, status.done, status.keys, status.cached) == (DONE, 3, ("k1", "k2", "k3"), (False, True, False))
    assert queue.submit(spec).state == DONE  # joins the finished job
    assert queue.submit(spec, rerun=True).state == QUEUED  # results evicted: run it again


def test_claim_batches_compatible_jobs_behind_the_oldest(queue: JobQueue) -> None:
    a = queue.submit(_spec(queue, 1)).job_id
    b = queue.submit(_spec(queue, 2, model="vit_tiny_patch16_224")).job_id
    c = queue.submit(_spec(queue, 3, 4)).job_id
    d = queue.submit(_spec(queue, 5, 6, 7)).job_id
    e = queue.submit(_spec(queue, 8, side=32)).job_id
    assert [job.job_id for job in queue.claim("w1", max_images=4)] == [a, c]  # d would make 6 images
    assert queue.status(b).position == 0
    assert [job.job_id for job in queue.claim("w1", max_images=4)] == [b]
    assert [job.job_id for job in queue.claim("w1", max_images=1)] == [d]  # the oldest job always goes, even if large
    assert [job.job_id for job in queue.claim("w1", max_images=4)] == [e]
    assert queue.claim("w1", max_images=4) == []


def _claim_all(directory: str, worker: str, found) -> None:
    queue = JobQueue(Path(directory))
    while claimed := queue.claim(worker, max_images=1):
        found.extend([job.job_id for job in claimed])


def test_concurrent_claims_from_processes_never_share_a_job(queue: JobQueue) -> None:
    ids = [queue.submit(_spec(queue, seed)).job_id for seed in range(40)]
    context = multiprocessing.get_context("fork")
    with context.Manager() as manager:
        found = manager.list()
        processes = [context.Process(target=_claim_all, args=(str(queue.directory), f"w{i}", found)) for i in range(4)]
        for process in processes:
            process.start()
        for process in processes:
            process.join(30)
        claimed = list(found)
    assert sorted(claimed) == sorted(ids)  # every job once, none twice
    assert all(queue.status(job_id).attempts == 1 for job_id in ids)


def test_only_the_holding_worker_may_update_a_job(queue: JobQueue) -> None:
    job_id = queue.submit(_spec(queue, 1)).job_id
    queue.claim("w1", max_images=8)
    assert not queue.complete(job_id, "w2", ["k"], [False])
    assert not queue.fail(job_id, "w2", "nope")
    assert queue.status(job_id).state == RUNNING
    assert queue.fail(job_id, "w1", "bad thing\nhappened")
    status = queue.status(job_id)
    assert (status.state, status.message) == (FAILED, "bad thing happened.")
    assert queue.submit(_spec(queue, 1)).state == QUEUED  # a failed request is tried again when asked again


def _register_claim_and_die(directory: str) -> None:
    queue = JobQueue(Path(directory))
    queue.register("doomed")
    queue.claim("doomed", max_images=8)
    os._exit(0)  # no clean-up, as after SIGKILL


def _crash_a_worker(queue: JobQueue) -> None:
    process = multiprocessing.get_context("fork").Process(target=_register_claim_and_die, args=(str(queue.directory),))
    process.start()
    process.join(30)


def test_jobs_of_a_dead_worker_are_requeued_then_failed_with_a_reason(queue: JobQueue) -> None:
    job_id = queue.submit(_spec(queue, 1)).job_id
    _crash_a_worker(queue)
    assert queue.status(job_id).state == RUNNING
    [status] = queue.recover()
    assert (status.state, status.attempts, status.position) == (QUEUED, 1, 0)
    assert "stopped" in status.message
    assert queue.workers() == []
    _crash_a_worker(queue)
    [status] = queue.recover()
    assert status.state == FAILED
    assert status.message == "The worker stopped while running this job 2 times (crash or out of memory), so it was not tried again."


def test_recovery_leaves_live_workers_alone(queue: JobQueue) -> None:
    job_id = queue.submit(_spec(queue, 1)).job_id
    queue.register("alive")
    queue.claim("alive", max_images=8)
    assert queue.recover() == []
    assert queue.status(job_id).state == RUNNING
    assert [worker.worker_id for worker in queue.workers()] == ["alive"]


def test_a_stale_heartbeat_ends_the_lease(tmp_path: Path) -> None:
    queue = JobQueue(tmp_path / "jobs", lease=0.2)
    job_id = queue.submit(_spec(queue, 1)).job_id
    queue.register("frozen")
    queue.claim("frozen", max_images=8)
    time.sleep(0.3)
    assert queue.workers() == []
    assert [status.job_id for status in queue.recover()] == [job_id]
    assert queue.status(job_id).state == QUEUED
    assert not queue.heartbeat("frozen")  # it learns it was declared dead


def test_release_requeues_without_counting_an_attempt(queue: JobQueue) -> None:
    job_id = queue.submit(_spec(queue, 1)).job_id
    queue.claim("w1", max_images=8)
    assert queue.release("w1") == 1
    status = queue.status(job_id)
    assert (status.state, status.attempts) == (QUEUED, 0)


def test_malformed_specs_are_refused() -> None:
    good = JobSpec("test_vit", "random", ("ab",), CaptureOptions(side=64)).to_json()
    assert JobSpec.from_json(good).options.side == 64
    for bad in ("not json", "{}", good.replace('"side":64', '"side":"64"'), good.replace('["ab"]', "[]"),
                good.replace('"antialias":true', '"antialias":1')):
        with pytest.raises(MalformedJobError):
            JobSpec.from_json(bad)


def test_read_image_checks_digest_and_presence(queue: JobQueue) -> None:
    digest = queue.put_image(image(1))
    assert queue.read_image(digest, max_pixels=10**6).digest == digest
    for bad in ("../../etc/passwd", "f" * 24, ""):
        with pytest.raises(MalformedJobError):
            queue.read_image(bad, max_pixels=10**6)


def test_prune_drops_old_finished_jobs_and_unused_images(queue: JobQueue) -> None:
    done_id = queue.submit(_spec(queue, 1)).job_id
    queue.claim("w1", max_images=1)
    queue.complete(done_id, "w1", ["k"], [False])
    queued_id = queue.submit(_spec(queue, 2)).job_id
    assert queue.prune(max_age=-1) == 1
    assert queue.status(done_id) is None and queue.status(queued_id).state == QUEUED
    assert [path.stem for path in queue.images_dir.glob("*.png")] == [image(2).digest]


def test_weights_only_from_the_weights_folder(tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "mine.safetensors").write_bytes(b"x")
    (tmp_path / "secret.pth").write_bytes(b"x")
    settings = job_settings(tmp_path, weights_dir=tmp_path / "weights")
    assert settings.resolve_weights("mine.safetensors") == str(tmp_path / "weights" / "mine.safetensors")
    assert settings.resolve_weights("random") == "random"
    assert settings.weights_files() == ["mine.safetensors"]
    for bad in ("../secret.pth", str(tmp_path / "secret.pth"), "sub/mine.safetensors", "..", "missing.pth", "notes.txt"):
        with pytest.raises(WeightsError):
            settings.resolve_weights(bad)
    with pytest.raises(WeightsError, match="not enabled"):
        job_settings(tmp_path).resolve_weights("mine.safetensors")


def test_allowed_models(tmp_path: Path) -> None:
    settings = job_settings(tmp_path, allowed_models=("test_vit",))
    settings.check_model("test_vit")
    with pytest.raises(UnknownModelError, match="not offered"):
        settings.check_model("vit_large_patch14_dinov2")


def _overwrite_header(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.write(b"this is not a SQLite file at all" * 4)


def _drop_jobs_table(queue: JobQueue) -> None:
    conn = sqlite3.connect(queue.db_path)
    conn.execute("DROP TABLE jobs")
    conn.commit()
    conn.close()


@pytest.mark.parametrize("damage", ["header", "drop_table", "delete_file"])
def test_a_damaged_or_deleted_job_table_is_rebuilt_not_raised(queue: JobQueue, damage: str) -> None:
    queue.submit(_spec(queue, 1))
    for suffix in ("-wal", "-shm"):  # checkpointed state, as after the last connection closed
        assert not queue.db_path.with_name(queue.db_path.name + suffix).exists()
    if damage == "header":
        _overwrite_header(queue.db_path)
    elif damage == "drop_table":
        _drop_jobs_table(queue)
    else:
        queue.db_path.unlink()
    status = queue.submit(_spec(queue, 2))  # no sqlite3 error: the queue is repaired first
    assert status.state == QUEUED and queue.counts()[QUEUED] >= 1
    assert queue.db_path.with_name("jobs.sqlite.damaged").exists() == (damage == "header")


def test_storage_errors_are_one_sentence_storage_errors(queue: JobQueue, monkeypatch: pytest.MonkeyPatch) -> None:
    def locked(*args, **kwargs):
        raise sqlite3.OperationalError(f"database is locked: {queue.db_path}")

    monkeypatch.setattr(JobQueue, "_probe", locked)
    with pytest.raises(StorageError) as refused:
        queue.status("x")
    assert not isinstance(refused.value, sqlite3.Error)
    assert str(queue.directory) not in str(refused.value) and str(refused.value).endswith(".")


def test_a_watched_job_nobody_touches_is_cancelled_instead_of_claimed(tmp_path: Path) -> None:
    queue = JobQueue(tmp_path / "jobs", watch_lease=0.3)
    kept, left, unwatched = _spec(queue, 1), _spec(queue, 2), _spec(queue, 3)
    queue.submit(kept, watched=True)
    queue.submit(left, watched=True)
    queue.submit(unwatched)
    for _ in range(4):  # only ``kept`` has a client still polling it
        time.sleep(0.1)
        assert queue.touch(kept.job_id)
    claimed = queue.claim("w1", max_images=8)
    assert sorted(job.job_id for job in claimed) == sorted([kept.job_id, unwatched.job_id])
    status = queue.status(left.job_id)
    assert status.state == CANCELLED and status.finished
    assert status.message.startswith("Cancelled: nobody was waiting for it any more")
    assert not queue.touch(left.job_id)
    assert queue.submit(left, watched=True).state == QUEUED  # asked for again: queued afresh


def test_wanted_drops_cancelled_and_abandoned_running_jobs(tmp_path: Path) -> None:
    queue = JobQueue(tmp_path / "jobs", watch_lease=0.3)
    specs = [_spec(queue, seed) for seed in (1, 2, 3)]
    for spec in specs:
        queue.submit(spec, watched=True)
    ids = [job.job_id for job in queue.claim("w1", max_images=8)]
    assert queue.wanted(ids, "w1") == set(ids)
    assert queue.cancel(specs[0].job_id, "Cancelled by its user")
    time.sleep(0.2)
    queue.touch(specs[1].job_id)
    time.sleep(0.2)  # specs[2] untouched for 0.4 s, specs[1] for 0.2 s
    assert queue.wanted(ids, "w1") == {specs[1].job_id}
    assert [queue.status(spec.job_id).state for spec in specs] == [CANCELLED, RUNNING, CANCELLED]
    assert queue.status(specs[0].job_id).message == "Cancelled by its user."
    assert not queue.progress(specs[0].job_id, "w1", 1)  # the worker's late updates are dropped
    assert not queue.complete(specs[0].job_id, "w1", ["k"], [False])
    assert not queue.cancel(specs[0].job_id, "again")  # already finished
    assert queue.counts()[CANCELLED] == 2


def test_joining_an_unwatched_job_keeps_it_running_without_watchers(tmp_path: Path) -> None:
    queue = JobQueue(tmp_path / "jobs", watch_lease=0.2)
    spec = _spec(queue, 1)
    queue.submit(spec)  # e.g. a batch submitter that does not poll
    queue.submit(spec, watched=True)
    time.sleep(0.3)
    assert [job.job_id for job in queue.claim("w1", max_images=8)] == [spec.job_id]


def test_a_queue_made_before_watching_gains_the_column(tmp_path: Path) -> None:
    folder = tmp_path / "jobs"
    folder.mkdir()
    with sqlite3.connect(folder / "jobs.sqlite") as conn:  # the table as it was, with one queued job
        conn.executescript("CREATE TABLE jobs (id TEXT PRIMARY KEY, seq INTEGER NOT NULL, spec TEXT NOT NULL, grp TEXT, "
                           "state TEXT NOT NULL, total INTEGER NOT NULL, done INTEGER NOT NULL DEFAULT 0, "
                           "attempts INTEGER NOT NULL DEFAULT 0, worker TEXT, message TEXT, error TEXT, result TEXT, "
                           "submitted REAL NOT NULL, started REAL, finished REAL);"
                           "INSERT INTO jobs (id, seq, spec, state, total, submitted) VALUES ('old', 1, '{}', 'queued', 1, 0);")
    queue = JobQueue(folder, watch_lease=0.1)
    assert queue.status("old").state == QUEUED  # kept, and unwatched
    time.sleep(0.2)
    assert [job.job_id for job in queue.claim("w1", max_images=8)] == ["old"]
