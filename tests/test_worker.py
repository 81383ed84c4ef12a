"""The worker: batched runs, failure isolation, CUDA out-of-memory retries, and real worker
processes (two at once; SIGKILL mid-job then restart; SIGTERM)."""
from __future__ import annotations

import signal
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import vitlens.engine
from job_fixtures import MODEL, OPTIONS, image, job_settings, start_worker, wait_for
from vitlens.engine import Engine
from vitlens.client import Client
from vitlens.jobs import CANCELLED, DONE, FAILED, QUEUED, RUNNING, JobSpec
from vitlens.store import CaptureOptions
from vitlens.worker import Worker


def _worker(tmp_path: Path, **overrides) -> Worker:
    return Worker(job_settings(tmp_path, **overrides), worker_id="test-worker")


def _submit(worker: Worker, *seeds: int, model: str = MODEL, weights: str = "random",
            options: CaptureOptions = OPTIONS) -> str:
    images = tuple(worker.queue.put_image(image(seed)) for seed in seeds)
    return worker.queue.submit(JobSpec(model, weights, images, options)).job_id


def _drain(worker: Worker) -> None:
    worker.queue.register(worker.worker_id)
    while worker.run_once():
        pass


def test_a_job_runs_and_its_traces_land_in_the_store(tmp_path: Path) -> None:
    worker = _worker(tmp_path)
    job_id = _submit(worker, 1, 2)
    _drain(worker)
    status = worker.queue.status(job_id)
    assert (status.state, status.done, status.cached) == (DONE, 2, (False, False))
    direct = Engine(None, device="cpu").traces([image(1), image(2)], MODEL, "random", OPTIONS)
    for key, expected in zip(status.keys, direct):
        np.testing.assert_allclose(worker.store.get(key).norms, expected.trace.norms, rtol=1e-5)


def test_compatible_jobs_share_one_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    worker = _worker(tmp_path, worker_batch=4)
    calls = []
    original = worker.engine.traces
    monkeypatch.setattr(worker.engine, "traces", lambda images, *args, **kwargs: calls.append(len(images)) or original(images, *args, **kwargs))
    ids = [_submit(worker, seed) for seed in (1, 2, 3)]
    other = _submit(worker, 4, options=CaptureOptions(side=32))
    ids.append(_submit(worker, 5))
    worker.queue.register(worker.worker_id)
    assert worker.run_once() == 4  # the three side-64 jobs queued before `other`, plus the one after it
    assert calls == [4]
    assert worker.queue.status(other).state == QUEUED
    assert worker.run_once() == 1 and calls == [4, 1]
    assert all(worker.queue.status(job_id).state == DONE for job_id in [*ids, other])


def test_a_bad_job_fails_alone(tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "broken.pth").write_bytes(b"not a checkpoint")
    worker = _worker(tmp_path, weights_dir=tmp_path / "weights")
    good = _submit(worker, 1)
    unknown = _submit(worker, 2, model="no_such_vit")
    missing = _submit(worker, 3, weights="gone.safetensors")
    broken = _submit(worker, 4, weights="broken.pth")
    escape = _submit(worker, 5, weights="../../etc/passwd.pth")
    lost_image = worker.queue.submit(JobSpec(MODEL, "random", ("ab" * 12,), OPTIONS)).job_id
    bad_layer = _submit(worker, 6, options=CaptureOptions(side=64, state_layers=(99,)))
    with sqlite3.connect(worker.queue.db_path) as conn:
        conn.execute("INSERT INTO jobs (id, seq, spec, grp, state, total, submitted) VALUES ('garbage', 99, '{oops', NULL, 'queued', 1, 0)")
    _drain(worker)
    status = worker.queue.status
    assert status(good).state == DONE
    expected = {
        unknown: ("UnknownModelError", "Unknown model 'no_such_vit'"),
        missing: ("WeightsError", "Weights file 'gone.safetensors' is not in the weights folder."),
        broken: ("WeightsError", "Weights file 'broken.pth' could not be read"),
        escape: ("WeightsError", "Weights must be a file name inside the weights folder"),
        lost_image: ("MalformedJobError", "is no longer in the queue folder"),
        bad_layer: ("OptionError", "Layer 99 is out of range: 'test_vit' has 6 blocks."),
        "garbage": ("MalformedJobError", "The job is malformed (JSONDecodeError"),
    }
    for job_id, (error, words) in expected.items():
        result = status(job_id)
        assert (result.state, result.error) == (FAILED, error), job_id
        assert words in result.message
        assert result.message.endswith(".") and "\n" not in result.message


def test_an_unexpected_error_in_a_shared_batch_fails_only_its_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    worker = _worker(tmp_path)
    original = vitlens.engine.capture

    def capture(loaded, pixels, **kwargs):
        if tuple(pixels.shape[-2:]) == (64, 48):  # only image(9, size=(40, 52)) is taller than wide
            raise RuntimeError("kernel exploded")
        return original(loaded, pixels, **kwargs)

    monkeypatch.setattr(vitlens.engine, "capture", capture)
    images = (worker.queue.put_image(image(9, size=(40, 52))),)
    culprit = worker.queue.submit(JobSpec(MODEL, "random", images, OPTIONS)).job_id
    fine = [_submit(worker, seed) for seed in (1, 2)]
    _drain(worker)
    assert [worker.queue.status(job_id).state for job_id in fine] == [DONE, DONE]
    failed = worker.queue.status(culprit)
    assert failed.state == FAILED
    assert failed.message == "The capture failed unexpectedly (RuntimeError: kernel exploded)."


def _oom_above(limit: int, sizes: list[int]):
    original = vitlens.engine.capture

    def capture(loaded, pixels, **kwargs):
        sizes.append(pixels.shape[0])
        if pixels.shape[0] > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(loaded, pixels, **kwargs)
    return capture


def test_cuda_out_of_memory_retries_with_smaller_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sizes = []
    monkeypatch.setattr(vitlens.engine, "capture", _oom_above(1, sizes))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    worker = _worker(tmp_path, worker_batch=4)
    job_id = _submit(worker, 1, 2, 3, 4)
    _drain(worker)
    assert worker.queue.status(job_id).state == DONE
    assert sizes == [4, 2, 1, 1, 1, 1]
    sizes.clear()
    _submit(worker, 5, 6)  # same model and input shape: starts at the size that fit
    _drain(worker)
    assert sizes == [1, 1]


def test_cuda_out_of_memory_at_batch_one_fails_the_job_with_a_sentence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vitlens.engine, "capture", _oom_above(0, []))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    worker = _worker(tmp_path, worker_batch=2)
    job_id = _submit(worker, 1, 2)
    _drain(worker)
    status = worker.queue.status(job_id)
    assert status.state == FAILED
    assert status.message == "The GPU ran out of memory even with one image per batch; try a smaller image size."


def test_worker_precision_applies_to_every_job(tmp_path: Path) -> None:
    worker = _worker(tmp_path, precision="bf16")
    job_id = _submit(worker, 1)
    _drain(worker)
    [key] = worker.queue.status(job_id).keys
    assert "/bf16/" in key and worker.store.get(key) is not None


@pytest.mark.slow
def test_two_worker_processes_never_run_the_same_job(tmp_path: Path) -> None:
    settings = job_settings(tmp_path, worker_batch=1, worker_lease=15.0)  # no heartbeat goes stale on a busy machine
    worker = Worker(settings)  # used only for its queue and store
    processes = [start_worker(settings, 0.05, log=tmp_path / f"worker{i}.log") for i in range(2)]
    try:
        wait_for(lambda: len(worker.queue.workers()) == 2, timeout=120)  # both up before the jobs arrive
        ids = [_submit(worker, seed) for seed in range(16)]
        wait_for(lambda: worker.queue.counts()[DONE] == len(ids), timeout=120)
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        assert [process.wait(30) for process in processes] == [0, 0]
    statuses = [worker.queue.status(job_id) for job_id in ids]
    assert [status.attempts for status in statuses] == [1] * len(ids)  # each job was claimed exactly once
    assert len({status.worker for status in statuses}) == 2  # and both workers took part
    assert all(worker.store.get(status.keys[0]) is not None for status in statuses)
    assert worker.queue.workers() == []  # both unregistered on SIGTERM


@pytest.mark.slow
@pytest.mark.parametrize("attempts, final", [(2, DONE), (1, FAILED)])
def test_sigkill_mid_job_then_restart_ends_every_job(tmp_path: Path, attempts: int, final: str) -> None:
    settings = job_settings(tmp_path, worker_batch=1, job_attempts=attempts)
    worker = Worker(settings)
    victim = _submit(worker, 1, 2, 3, 4)
    others = [_submit(worker, seed) for seed in (5, 6)]
    process = start_worker(settings, 0.3, log=tmp_path / "killed.log")
    try:
        wait_for(lambda: worker.queue.status(victim).done >= 1, timeout=60)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    assert worker.queue.status(victim).state == RUNNING  # held by a dead worker
    restarted = start_worker(settings, 0.0, log=tmp_path / "restarted.log")
    try:
        wait_for(lambda: all(worker.queue.status(job_id).finished for job_id in [victim, *others]), timeout=60)
    finally:
        restarted.send_signal(signal.SIGTERM)
        restarted.wait(30)
    status = worker.queue.status(victim)
    assert (status.state, status.attempts) == (final, attempts)
    if final == FAILED:
        assert status.message == "The worker stopped while running this job 1 time (crash or out of memory), so it was not tried again."
    assert [worker.queue.status(job_id).state for job_id in others] == [DONE, DONE]


@pytest.mark.slow
def test_sigterm_finishes_the_running_batch_then_exits(tmp_path: Path) -> None:
    settings = job_settings(tmp_path, worker_batch=2)
    worker = Worker(settings)
    running = _submit(worker, 1, 2)
    waiting = _submit(worker, 3, options=CaptureOptions(side=32))
    process = start_worker(settings, 1.0, log=tmp_path / "worker.log")
    wait_for(lambda: worker.queue.status(running).state == RUNNING, timeout=60)
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0
    assert worker.queue.status(running).state == DONE
    assert worker.queue.status(waiting).state == QUEUED  # not started, left for the next worker


class _UserCancelled(Exception):
    """Stands in for the app's cancel button (its progress callback raises)."""


@pytest.mark.slow
def test_jobs_whose_clients_left_or_cancelled_stop_on_the_worker_which_takes_the_next(tmp_path: Path) -> None:
    settings = job_settings(tmp_path, worker_batch=1, job_lease=1.0, mode="hosted")
    client = Client(settings)
    queue = client.queue
    log = tmp_path / "worker.log"
    process = start_worker(settings, 0.2, log=log)  # 0.2 s per image: 60 images take 12 s or more
    try:
        left = client.submit([image(seed) for seed in range(60)], MODEL, "random", OPTIONS, watched=True).job_id
        wait_for(lambda: queue.touch(left) and queue.status(left).done >= 2, timeout=120)  # the client polls...
        gone = time.monotonic()  # ...and is gone: no touch from now on
        wait_for(lambda: queue.status(left).state == CANCELLED, timeout=30)
        assert time.monotonic() - gone < settings.job_lease + 3.0
        stopped = queue.status(left)
        assert stopped.done < stopped.total and stopped.message.startswith("Cancelled: nobody was waiting")

        seen = []

        def cancel_button(status) -> None:
            seen.append(status.job_id)
            if status.done >= 1:
                raise _UserCancelled("Cancelled by its user.")

        start = time.monotonic()
        with pytest.raises(_UserCancelled):
            client.compute_traces([image(seed) for seed in range(100, 160)], MODEL, "random", OPTIONS, progress=cancel_button)
        cancelled = queue.status(seen[-1])
        assert (cancelled.state, cancelled.message) == (CANCELLED, "Cancelled by its user.")
        [result] = client.compute_traces([image(999)], MODEL, "random", OPTIONS)  # the worker moved on at once
        assert time.monotonic() - start < 0.2 * 50  # well before the cancelled job's 60 images could have run
        assert not result.cached and process.poll() is None
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    counts = queue.counts()
    assert (counts[DONE], counts[CANCELLED], counts[QUEUED], counts[RUNNING], counts[FAILED]) == (1, 2, 0, 0, 0)
    assert [queue.status(job).attempts for job in (left, cancelled.job_id)] == [1, 1]  # never re-run
    assert log.read_text().count("were cancelled; stopped their capture") == 2

