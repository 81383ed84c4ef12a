"""The ``ray`` engine of a sweep: the same tasks as the local engine, run by Ray actors.

One actor per GPU of the cluster (each sees one GPU), or one CPU actor per node when there are
no GPUs; each actor keeps its current model loaded, like ``SweepRunner`` in-process. Actors
return rows; the driver writes them (so ``--out`` is written by one process only). Images and
weights files are read by the actors: on a cluster they must be on storage every node mounts.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Sequence

from .errors import OptionError, VitlensError
from .store import TraceStore
from .sweep import SweepConfig, SweepRunner, Task, TaskResult


class _Actor:
    """A ``SweepRunner`` inside a Ray actor (the device is whatever Ray gave it)."""

    def __init__(self, config: SweepConfig, store_dir: str | None) -> None:
        import torch

        from .engine import resolve_device

        device = resolve_device("auto")
        if device.type == "cpu":
            torch.set_num_threads(len(os.sched_getaffinity(0)))  # Ray sets one thread for a one-CPU actor
        store = TraceStore(store_dir) if store_dir is not None else None
        self.runner = SweepRunner(config, device, store)

    def run(self, task: Task) -> TaskResult:
        return self.runner.run(task)


def run_ray(tasks: Sequence[Task], config: SweepConfig, address: str | None, store_dir: Path | None) -> Iterator[TaskResult]:
    """Run ``tasks`` on Ray and yield each result as it finishes (in any order).

    Args:
        address: ``auto``, ``HOST:PORT`` or ``ray://HOST:PORT`` of a running cluster; None starts a
            local Ray for this sweep (stopped at the end).
        store_dir: Trace cache to reuse traces from (local Ray only: cluster nodes have their own disks).

    Raises:
        OptionError: Ray cannot be started or reached.
    """
    import ray
    from ray.util import ActorPool

    started = not ray.is_initialized()
    if started:
        _init(ray, address)
    actors = []
    try:
        actors = _actors(ray, config, str(store_dir) if store_dir is not None and address is None else None)
        pool = ActorPool(actors)
        for task in tasks:
            pool.submit(lambda actor, value: actor.run.remote(value), task)
        while pool.has_next():
            yield _result(ray, pool)
    finally:
        for actor in actors:
            ray.kill(actor)
        if started:
            ray.shutdown()


def _result(ray, pool) -> TaskResult:
    """The next finished task; a user error inside an actor is raised here as itself (one sentence)."""
    try:
        return pool.get_next_unordered()
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, VitlensError):
            raise error.cause from None
        raise


def _init(ray, address: str | None) -> None:
    try:
        if address is None:
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        else:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as error:
        where = "a local Ray" if address is None else f"the Ray cluster at '{address}'"
        raise OptionError(f"Could not start or reach {where}: {str(error).splitlines()[0] if str(error) else type(error).__name__}.") from error


def _actors(ray, config: SweepConfig, store_dir: str | None) -> list:
    """One actor per GPU, else one CPU actor per alive node."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus:
        actor = ray.remote(num_gpus=1)(_Actor)
        return [actor.remote(config, store_dir) for _ in range(gpus)]
    nodes = max(1, sum(1 for node in ray.nodes() if node.get("Alive")))
    actor = ray.remote(num_cpus=1)(_Actor)
    return [actor.remote(config, store_dir) for _ in range(nodes)]
