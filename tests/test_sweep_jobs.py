"""Sweep jobs on the worker (hosted mode): the spec, progress, cancel between batches, resume; one sweep per folder."""
from __future__ import annotations

import signal
import threading
from pathlib import Path

import pandas as pd
import pytest

from conftest import image_bytes, photo
from job_fixtures import MODEL, job_settings, start_worker, wait_for
from vitlens.client import Client
from vitlens.errors import OptionError, WeightsError
from vitlens.jobs import CANCELLED, DONE, QUEUED, RUNNING, JobQueue, JobSpec, SweepJobSpec
from vitlens.sweep import run_sweep
from vitlens.worker import Worker

KEY = ["model", "weights", "image", "layer"]
DEPTH = 6  # blocks of MODEL


def _settings(tmp_path: Path, count: int = 12, **overrides):
    folder = tmp_path / "datasets" / "imgs"
    folder.mkdir(parents=True)
    for index in range(count):
        (folder / f"img{index:02d}.png").write_bytes(image_bytes(photo(40, 40, seed=index)))
    (tmp_path / "results").mkdir()
    return job_settings(tmp_path, datasets_dir=tmp_path / "datasets", results_dir=tmp_path / "results", **overrides)


SPEC = SweepJobSpec(images="imgs", models=(MODEL,), weights=("random",), out="run", size=64)


def test_a_sweep_spec_round_trips_and_differs_from_capture_specs() -> None:
    assert SweepJobSpec.from_json(SPEC.to_json()) == SPEC
    assert SPEC.group is None and SPEC.job_id != SweepJobSpec("imgs", (MODEL,), ("random",), "other", 64).job_id
    with pytest.raises(Exception, match="malformed"):
        JobSpec.from_json(SPEC.to_json())


def test_a_sweep_job_records_its_total_and_summary_and_can_be_queued_again(tmp_path: Path) -> None:
    queue = JobQueue(tmp_path / "jobs")
    job_id = queue.submit(SPEC).job_id
    assert queue.cancel(job_id, "Cancelled by its user.")
    assert queue.submit(SPEC).state == QUEUED  # a cancelled sweep can be started again
    queue.register("w")
    assert [job.job_id for job in queue.claim("w", max_images=8)] == [job_id]
    assert queue.progress(job_id, "w", 2, 10)
    assert (queue.status(job_id).done, queue.status(job_id).total) == (2, 10)
    assert queue.finish_sweep(job_id, "w", {"rows": 12})
    status = queue.status(job_id)
    assert (status.state, status.summary, status.keys) == (DONE, {"rows": 12}, ())
    assert queue.submit(SPEC, rerun=True).state == QUEUED  # done, but a rerun continues whatever the folder holds now


def test_the_client_refuses_names_the_deployment_does_not_offer(tmp_path: Path) -> None:
    client = Client(_settings(tmp_path, count=1, mode="hosted"))
    with pytest.raises(OptionError):
        client.submit_sweep(SweepJobSpec("../etc", (MODEL,), ("random",), "run"))
    with pytest.raises(WeightsError):
        client.submit_sweep(SweepJobSpec("imgs", (MODEL,), ("/tmp/x.pth",), "run"))


def test_a_worker_runs_a_sweep_job_in_process(tmp_path: Path) -> None:
    settings = _settings(tmp_path, count=3, worker_batch=2)
    worker = Worker(settings, worker_id="w")
    job_id = worker.queue.submit(SPEC).job_id
    worker.queue.register("w")
    assert worker.run_once() == 1
    status = worker.queue.status(job_id)
    assert (status.state, status.done, status.total) == (DONE, 3, 3)
    assert status.summary["rows"] == 3 * DEPTH and status.summary["skipped"] == 0
    rows = pd.read_parquet(settings.results_dir / "run")
    assert len(rows) == 3 * DEPTH and not rows.duplicated(KEY).any()


@pytest.mark.slow
def test_a_worker_process_sweeps_with_progress_stops_on_cancel_and_continues(tmp_path: Path) -> None:
    settings = _settings(tmp_path, count=12, worker_batch=4, mode="hosted")
    client = Client(settings)
    process = start_worker(settings, 1.0, log=tmp_path / "worker.log")  # each forward pass of 4 images takes >= 1 s
    try:
        job_id = client.submit_sweep(SPEC).job_id
        seen = []
        wait_for(lambda: seen.append(client.status(job_id).done) or seen[-1] >= 4, timeout=120)
        assert min(seen) < 4 and client.status(job_id).state == RUNNING and client.status(job_id).total == 12
        assert client.cancel(job_id) and client.status(job_id).state == CANCELLED
        log = tmp_path / "worker.log"
        wait_for(lambda: "stopped after" in log.read_text(), timeout=60)  # at the batch boundary
        written = len(pd.read_parquet(settings.results_dir / "run")) // DEPTH
        assert 4 <= written < 12  # rows already written stay; the rest was not run
        assert client.submit_sweep(SPEC).state == QUEUED  # the same sweep again: continues
        wait_for(lambda: client.status(job_id).state == DONE, timeout=120)
        finished = client.status(job_id)
        assert (finished.done, finished.total) == (12 - written,) * 2  # only what was missing ran
        assert finished.summary["skipped"] == written and finished.summary["rows"] == 12 * DEPTH
        assert finished.rate > 0
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    rows = pd.read_parquet(settings.results_dir / "run")
    assert len(rows) == 12 * DEPTH and not rows.duplicated(KEY).any()  # every row exactly once
    assert sorted(set(rows.image)) == [f"img{index:02d}.png" for index in range(12)]


def test_two_sweeps_into_one_folder_at_once_write_every_row_once(tmp_path: Path) -> None:
    """A sweep cancelled on one worker may still finish its batch while another takes it up again: the
    folder's lock makes the second plan from the rows the first wrote."""
    settings = _settings(tmp_path, count=4)
    args = (settings.datasets_dir / "imgs", [MODEL], ["random"], settings.results_dir / "run")
    summaries = []
    threads = [threading.Thread(target=lambda: summaries.append(run_sweep(*args, size=64, batch=1))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert sorted(summary.computed for summary in summaries) == [0, 4]
    rows = pd.read_parquet(settings.results_dir / "run")
    assert len(rows) == 4 * DEPTH and not rows.duplicated(KEY).any()
