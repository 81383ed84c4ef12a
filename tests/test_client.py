"""The client the app calls: embedded and hosted mode, progress, errors, timeouts, eviction."""
from __future__ import annotations

import multiprocessing
import os
import threading
from pathlib import Path

import numpy as np
import pytest

import vitlens.client
from job_fixtures import MODEL, OPTIONS, image, job_settings
from vitlens.client import Client, get_client
from vitlens.engine import Engine
from vitlens.errors import OptionError, UnknownModelError, WeightsError
from vitlens.jobs import (CANCELLED, DONE, QUEUED, RUNNING, JobCancelledError, JobError, JobQueue, JobSpec, JobTimeoutError,
                          NoWorkerError)
from vitlens.store import CaptureOptions
from vitlens.worker import Worker


@pytest.fixture
def hosted(tmp_path: Path):
    """A hosted-mode client plus a worker thread standing in for the worker process."""
    settings = job_settings(tmp_path, mode="hosted")
    client = Client(settings)
    stop = threading.Event()
    worker = Worker(settings)
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    yield client
    stop.set()
    thread.join(30)


def test_embedded_mode_runs_its_own_worker(tmp_path: Path) -> None:
    client = Client(job_settings(tmp_path))
    seen = []
    results = client.compute_traces([image(1), image(2)], MODEL, "random", OPTIONS, progress=seen.append)
    direct = Engine(None, device="cpu").traces([image(1), image(2)], MODEL, "random", OPTIONS)
    for result, expected in zip(results, direct):
        np.testing.assert_allclose(result.trace.norms, expected.trace.norms, rtol=1e-5)
    assert [result.cached for result in results] == [False, False]
    assert seen[0].state in (QUEUED, RUNNING) and seen[-1].state == DONE
    again = client.compute_traces([image(1), image(2)], MODEL, "random", OPTIONS)
    assert [result.cached for result in again] == [True, True]
    client.close()


def test_hosted_mode_queues_and_never_loads_a_model(hosted: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vitlens.client.Client, "ensure_worker", lambda self: pytest.fail("hosted client started a worker"))
    states = []
    results = hosted.compute_traces([image(3)], MODEL, "random", OPTIONS, progress=lambda s: states.append(s.state))
    assert results[0].trace.layout.grid == (3, 4)
    assert states[-1] == DONE
    assert hosted._worker_thread is None


def test_a_failed_job_raises_the_workers_error_type(tmp_path: Path) -> None:
    weights_dir = tmp_path / "weights"
    weights_dir.mkdir()
    (weights_dir / "broken.safetensors").write_bytes(b"garbage")
    settings = job_settings(tmp_path, mode="hosted", weights_dir=weights_dir)
    client, stop = Client(settings), threading.Event()
    thread = threading.Thread(target=Worker(settings).run, args=(stop,), daemon=True)
    thread.start()
    try:
        with pytest.raises(WeightsError, match="'broken.safetensors' could not be read"):
            client.compute_traces([image(1)], MODEL, "broken.safetensors", OPTIONS)
    finally:
        stop.set()
        thread.join(30)


def test_bad_requests_are_refused_before_queueing(tmp_path: Path) -> None:
    settings = job_settings(tmp_path, mode="hosted", allowed_models=(MODEL, "no_such_vit"), max_side=128)
    client = Client(settings)
    with pytest.raises(UnknownModelError, match="not offered"):
        client.compute_traces([image(1)], "vit_large_patch14_dinov2", "random", OPTIONS)
    with pytest.raises(UnknownModelError, match="Unknown model 'no_such_vit'"):
        client.compute_traces([image(1)], "no_such_vit", "random", OPTIONS)
    with pytest.raises(WeightsError, match="not enabled"):
        client.compute_traces([image(1)], MODEL, "/etc/passwd", OPTIONS)
    with pytest.raises(OptionError, match="between 1 and 128"):
        client.compute_traces([image(1)], MODEL, "random", CaptureOptions(side=224))
    assert sum(client.queue.counts().values()) == 0


def test_no_worker_gives_a_clear_error_instead_of_spinning(tmp_path: Path) -> None:
    client = Client(job_settings(tmp_path, mode="hosted", worker_wait=0.3))
    with pytest.raises(NoWorkerError, match="No vitlens worker is running on this machine; start one with"):
        client.compute_traces([image(1)], MODEL, "random", OPTIONS, timeout=30)


def test_client_timeout_gives_a_clear_error(tmp_path: Path) -> None:
    client = Client(job_settings(tmp_path, mode="hosted", worker_lease=60))
    client.queue.register("busy-elsewhere")  # alive (this process), but never takes the job
    with pytest.raises(JobTimeoutError) as raised:
        client.compute_traces([image(1)], MODEL, "random", OPTIONS, timeout=0.3)
    assert str(raised.value) == ("The capture did not finish within 0.3 s (queued (next in line)); "
                                 "try again later or with fewer images.")


def _take_job_and_die(directory: str) -> None:
    queue = JobQueue(Path(directory))
    queue.register("doomed")
    queue.claim("doomed", max_images=8)
    os._exit(0)


def test_a_job_stranded_by_a_dead_worker_ends_with_a_reason(tmp_path: Path) -> None:
    settings = job_settings(tmp_path, mode="hosted", job_attempts=1)
    client = Client(settings)
    client.queue.put_image(image(1))
    spec = JobSpec(MODEL, "random", (image(1).digest,), OPTIONS)
    client.queue.submit(spec)
    process = multiprocessing.get_context("fork").Process(target=_take_job_and_die, args=(str(settings.queue_dir),))
    process.start()
    process.join(30)
    with pytest.raises(JobError, match="The worker stopped while running this job 1 time"):
        client.wait(spec.job_id, timeout=10)


def test_evicted_results_are_computed_again(hosted: Client) -> None:
    [first] = hosted.compute_traces([image(4)], MODEL, "random", OPTIONS)
    status = hosted.queue.status(hosted.submit([image(4)], MODEL, "random", OPTIONS).job_id)
    hosted.store._cache.delete(status.keys[0])  # evicted by the size limit
    [again] = hosted.compute_traces([image(4)], MODEL, "random", OPTIONS)
    assert not again.cached
    np.testing.assert_array_equal(again.trace.norms, first.trace.norms)


def test_get_client_is_one_per_settings(tmp_path: Path) -> None:
    settings = job_settings(tmp_path, mode="hosted")
    assert get_client(settings) is get_client(settings)
    assert get_client(job_settings(tmp_path / "other", mode="hosted")) is not get_client(settings)


def test_a_damaged_queue_is_rebuilt_and_the_worker_keeps_serving(tmp_path: Path) -> None:
    settings = job_settings(tmp_path, mode="hosted")
    client, stop = Client(settings), threading.Event()
    thread = threading.Thread(target=Worker(settings).run, args=(stop,), daemon=True)
    thread.start()
    try:
        assert len(client.compute_traces([image(1)], MODEL, "random", OPTIONS)) == 1
        with open(client.queue.db_path, "r+b") as handle:
            handle.write(b"garbage over the SQLite header" * 4)
        results = client.compute_traces([image(2)], MODEL, "random", OPTIONS)  # no sqlite3 error reaches us
        assert len(results) == 1 and thread.is_alive()
    finally:
        stop.set()
        thread.join(30)


def test_a_job_lost_to_a_rebuilt_queue_is_submitted_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    client = Client(job_settings(tmp_path))
    original, lost = client.wait, []

    def wait_once_lost(job_id, *args, **kwargs):
        if not lost:
            lost.append(job_id)
            client.queue.db_path.unlink()  # the table vanishes while the session waits
        return original(job_id, *args, **kwargs)

    monkeypatch.setattr(client, "wait", wait_once_lost)
    results = client.compute_traces([image(3)], MODEL, "random", OPTIONS)
    assert lost and len(results) == 1
    client.close()


def test_a_waiting_client_keeps_its_job_alive_past_the_lease(tmp_path: Path) -> None:
    client = Client(job_settings(tmp_path, mode="hosted", job_lease=0.5, worker_wait=30.0))
    with pytest.raises(JobTimeoutError):  # no worker: the job stays queued while the client polls for 1.5 s
        client.compute_traces([image(1)], MODEL, "random", OPTIONS, timeout=1.5)
    [claimed] = client.queue.claim("w1", max_images=8)  # still wanted: touched until just now
    assert claimed.total == 1


def test_a_raising_progress_callback_cancels_the_job(tmp_path: Path) -> None:
    client = Client(job_settings(tmp_path, mode="hosted", worker_wait=30.0))
    seen = []

    def stop_waiting(status) -> None:
        seen.append(status)
        raise KeyError("the cancel button")

    with pytest.raises(KeyError):
        client.compute_traces([image(1)], MODEL, "random", OPTIONS, progress=stop_waiting)
    status = client.queue.status(seen[0].job_id)
    assert (seen[0].state, status.state, status.message) == (QUEUED, CANCELLED, "'the cancel button'.")
    assert client.queue.claim("w1", max_images=8) == []


def test_a_job_cancelled_elsewhere_raises_its_reason(tmp_path: Path) -> None:
    client = Client(job_settings(tmp_path, mode="hosted", worker_wait=30.0))
    spec = client.submit([image(1)], MODEL, "random", OPTIONS, watched=True)
    assert client.cancel(spec.job_id, "Cancelled by another tab")
    with pytest.raises(JobCancelledError, match="^Cancelled by another tab.$"):
        client.wait(spec.job_id)
    assert not client.cancel(spec.job_id)
