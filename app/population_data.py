"""View models of the population pages (Training, Models, Dataset) and sweeps started from the app.

A results folder is a subfolder of ``Settings.results_dir`` named in the sidebar; images are
found in the image folders of ``Settings.datasets_dir``. Reading a folder whose sweep is running
raises ``Pending`` (the page shows its progress and a cancel button). A sweep started here runs
in a background thread of this process (embedded mode) or as a job on the worker (hosted mode).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd
import streamlit as st
from PIL import Image

from captures import worker_weights
from choices import check_model, sweep_weights, weights_path
from figures import Table, role_of, role_rank
from jobs import Job, Pending, WorkerJob, boards
from resources import engine, settings
from uploads import add_upload
from vitlens.analysis.population import (LIST_COLUMNS, DatasetSummary, DepthProfile, ImageOutliers, Series,
                                         TrainingSeries, dataset_summary, model_profiles, read_results, series_of,
                                         top_images, training_series)
from vitlens.errors import ImageError, OptionError
from vitlens.jobs import CANCELLED, FAILED, JobError, SweepJobSpec

APP_NOTE = "_vitlens_app.json"  # what a sweep started here records (ignored by Parquet readers: leading underscore)
THUMB_PX = 160


# ----------------------------------------------------------------------------------------------
# Results folders
# ----------------------------------------------------------------------------------------------

def results_folders() -> list[str]:
    """Results folders the deployment offers (names)."""
    return settings().results_folders()


def _signature(path: Path) -> tuple[tuple[str, int, int], ...]:
    return tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(path.glob("*.parquet")))


@st.cache_data(max_entries=8, show_spinner=False)
def _frame(path: str, signature: tuple, lists: bool) -> pd.DataFrame:
    return read_results(path, LIST_COLUMNS if lists else None)


def results(name: str, lists: bool = False) -> pd.DataFrame:
    """The rows of results folder ``name`` (with the list columns when ``lists``).

    Raises:
        Pending: a sweep started here (or, hosted, on the worker) into the folder is running.
        OptionError, ResultsError: no such folder, or not sweep results.
    """
    if _hosted():
        _check_worker_sweep(name)
    else:
        job = boards()["sweep"].get(_sweep_key(name))
        if job is not None:
            boards()["sweep"].result(job)  # Pending while it runs; its error once
    path = settings().resolve_results(name)
    return _frame(str(path), _signature(path), lists)


def models_in(name: str) -> list[str]:
    """The models of a results folder."""
    return sorted(results(name).model.unique())


def series_in(name: str) -> list[Series]:
    """The (model, weights) pairs of a results folder, by model and step."""
    return series_of(results(name))


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class TrainingView:
    series: TrainingSeries
    table: Table


def training(name: str, model: str) -> TrainingView:
    """Outlier share and norms of ``model`` per checkpoint and layer."""
    series = training_series(results(name), model)
    rows = [[model, checkpoint.weights, checkpoint.step, layer, float(series.share[i, layer]),
             float(series.norm_max[i, layer]), float(series.norm_median[i, layer])]
            for i, checkpoint in enumerate(series.checkpoints) for layer in range(series.share.shape[1])]
    return TrainingView(series=series, table=Table(["model", "weights", "step", "layer", "outlier_share", "norm_max",
                                                    "norm_median"], rows))


def images_at(name: str, model: str, checkpoint: int, layer: int) -> list[ImageOutliers]:
    """Every image of one checkpoint, most outliers at ``layer`` first."""
    frame = results(name)
    return top_images(frame, series_of(frame, model)[checkpoint], [layer], count=len(frame))


@dataclass(frozen=True)
class PerImageLink:
    """What the per-image views need to show one checkpoint on one image."""

    model: str
    weights: str
    image: str
    layer: int
    side: int


def checkpoint_link(name: str, model: str, checkpoint: int, layer: int, image: str) -> PerImageLink:
    """Open a checkpoint of a results folder on one of its images in the per-image views.

    The image is read from the folder's image folder and kept as an upload; the weights become a
    ``sweep:`` choice, which loads only weights the results folder names.

    Raises:
        ImageError: the image is not in an image folder of the deployment.
        WeightsError: the checkpoint cannot be loaded here.
    """
    frame = results(name)
    series = series_of(frame, model)[checkpoint]
    weights = sweep_weights(name, series.weights)
    weights_path(weights)
    path = image_path(name, image)
    ref, _ = add_upload(path.name, path.read_bytes())  # older uploads dropped for the budget: not reported here
    size = frame[(frame.model == model) & (frame.weights == series.weights) & (frame.image == image)]["size"]
    return PerImageLink(model=model, weights=weights, image=ref, layer=layer, side=int(size.iloc[0]))


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class ModelsView:
    profiles: list[DepthProfile]
    table: Table


def models(name: str) -> ModelsView:
    """Outlier share per layer against relative depth, one profile per model (its last checkpoint)."""
    profiles = model_profiles(results(name))
    rows = [[p.series.model, p.series.weights, p.series.num_registers, layer, float(p.depth[layer]), float(p.share[layer])]
            for p in profiles for layer in range(p.share.size)]
    return ModelsView(profiles=profiles, table=Table(["model", "weights", "registers", "layer", "relative_depth",
                                                      "outlier_share"], rows))


# ----------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class DatasetView:
    """One summary per results folder, in drawing order (without registers first, ``figures.ROLES``), the chosen
    folder's summary, and thumbnails of its top images."""

    summaries: list[tuple[str, DatasetSummary]]
    chosen: DatasetSummary
    thumbnails: dict[str, Image.Image]
    missing_images: str | None
    table: Table

    @property
    def roles(self) -> list[str]:
        """Each summary's role (``figures.ROLES``), which fixes its colour."""
        return [role_of(summary.series.num_registers) for _, summary in self.summaries]


def _matching(frame: pd.DataFrame, series: Series) -> Series:
    """The pair of another folder to compare with ``series``: the same model's last checkpoint, else the last pair."""
    pairs = series_of(frame)
    same = [pair for pair in pairs if pair.model == series.model]
    return (same or pairs)[-1]


def dataset(name: str, series_index: int, layers: Sequence[int], other: str | None = None, count: int = 12) -> DatasetView:
    """Histogram, per-layer share, grid map and top images of one pair of ``name`` (and of ``other``)."""
    frame = results(name, lists=True)
    series = series_of(frame)[series_index]
    summaries = [(name, dataset_summary(frame, series, layers, count))]
    if other:
        other_frame = results(other, lists=True)
        summaries.append((other, dataset_summary(other_frame, _matching(other_frame, series), layers, count)))
    chosen = summaries[0][1]
    thumbnails, missing = {}, None
    try:
        thumbnails = {top.image: _thumbnail(str(image_path(name, top.image))) for top in chosen.top}
    except ImageError as error:
        missing = str(error)
    summaries.sort(key=lambda item: role_rank(role_of(item[1].series.num_registers)))
    rows = [[label, s.series.model, s.series.weights, layer, float(s.share[layer])]
            for label, s in summaries for layer in range(s.share.size)]
    return DatasetView(summaries=summaries, chosen=chosen, thumbnails=thumbnails, missing_images=missing,
                       table=Table(["results", "model", "weights", "layer", "outlier_share"], rows))


@st.cache_data(max_entries=256, show_spinner=False)
def _thumbnail(path: str) -> Image.Image:
    with Image.open(path) as image:
        image.thumbnail((THUMB_PX, THUMB_PX))
        return image.convert("RGB")


def image_path(name: str, image: str) -> Path:
    """The file of ``image`` (relative to the image folder the sweep of ``name`` read).

    The folder a sweep started here recorded is used; otherwise the first image folder of the
    deployment that holds the file.

    Raises:
        ImageError: image folders are not enabled, or none holds the file.
    """
    config = settings()
    if config.datasets_dir is None:
        raise ImageError("Images of results cannot be shown: image folders are not enabled (VITLENS_DATASETS_DIR).")
    note = _note(name)
    folders = [note["images"]] if "images" in note else config.dataset_folders()
    for folder in folders:
        base = config.resolve_dataset(folder).resolve()
        path = (base / image).resolve()
        if path.is_relative_to(base) and path.is_file():
            return path
    raise ImageError(f"Image '{image[:80]}' is in none of the image folders here (VITLENS_DATASETS_DIR).")


# ----------------------------------------------------------------------------------------------
# Sweeps started from the app
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SweepRequest:
    """A sweep of an image folder into a new or existing results folder (names, never paths)."""

    images: str
    models: tuple[str, ...]
    weights: tuple[str, ...]
    out: str
    size: int | None = None


def _sweep_key(name: str) -> str:
    return f"sweep|{name}"


def _hosted() -> bool:
    return settings().mode == "hosted"


def _note(name: str) -> dict:
    """What the last sweep started here into ``name`` recorded (``images``; hosted: ``job``), {} when none."""
    path = settings().resolve_results(name) / APP_NOTE
    return json.loads(path.read_text()) if path.is_file() else {}


def _client():
    from vitlens.client import get_client  # hosted mode only

    return get_client(settings())


def _worker_sweep(name: str) -> WorkerJob | None:
    """The worker job of the last sweep started from the app into ``name`` (hosted mode), None when none."""
    note = _note(name)
    return WorkerJob(_client(), note["job"], f"Sweep of {note['images']} into {name}") if "job" in note else None


def _check_worker_sweep(name: str) -> None:
    """Raise ``Pending`` while the worker's sweep into ``name`` runs, its failure when it wrote no rows.

    Raises:
        Pending: the sweep is queued or running.
        JobError: it failed before writing any row (otherwise ``sweep_note`` tells).
    """
    job = _worker_sweep(name)
    if job is None:
        return
    if not job.finished:
        raise Pending(job)
    if job.status is not None and job.status.state == FAILED and not any(settings().resolve_results(name).glob("*.parquet")):
        raise JobError(f"The sweep into '{name}' failed on the worker: {job.status.message}")


def sweeping(name: str) -> bool:
    """Whether a sweep started here (hosted: on the worker) into results folder ``name`` is running."""
    job = _worker_sweep(name) if _hosted() else boards()["sweep"].get(_sweep_key(name))
    return job is not None and not job.finished


def start_sweep(request: SweepRequest) -> Job | WorkerJob:
    """Run a sweep in the background (one at a time per results folder); the pages show its progress.

    Embedded, it runs in a thread of this process; hosted, it is queued for the worker (starting
    the same sweep again joins it while it runs, and continues it once it stopped).

    Raises:
        OptionError, UnknownModelError, WeightsError: a name the deployment does not offer.
    """
    config = settings()
    images = config.resolve_dataset(request.images)
    out = config.resolve_results(request.out)
    if not request.models or not request.weights:
        raise OptionError("Choose at least one model and one weights choice for the sweep.")
    for model in request.models:
        check_model(model)
    config.check_side(request.size)
    if _hosted():
        return _queue_sweep(request, out)
    weights = [weights_path(choice) for choice in request.weights]
    board = boards()["sweep"]
    key = _sweep_key(request.out)
    job = board.get(key)
    if job is not None and job.finished:
        board.forget(key)
    label = f"Sweep of {request.images} into {request.out}"
    return board.run(key, label, lambda job: _sweep(job, request, images, weights, out))


def _queue_sweep(request: SweepRequest, out: Path) -> WorkerJob:
    """Queue the sweep for the worker and record its job in the results folder (so every app process finds it)."""
    spec = SweepJobSpec(images=request.images, models=request.models, out=request.out, size=request.size,
                        weights=tuple(worker_weights(choice) for choice in request.weights))
    status = _client().submit_sweep(spec)
    out.mkdir(parents=True, exist_ok=True)
    (out / APP_NOTE).write_text(json.dumps({"images": request.images, "job": status.job_id}))
    return WorkerJob(_client(), status.job_id, f"Sweep of {request.images} into {request.out}")


def _sweep(job: Job, request: SweepRequest, images: Path, weights: list[str], out: Path) -> object:
    from vitlens.sweep import run_sweep  # imports torch-heavy code only when a sweep runs

    out.mkdir(parents=True, exist_ok=True)
    (out / APP_NOTE).write_text(json.dumps({"images": request.images}))

    def progress(done: int, total: int) -> None:
        job.report(done, total, f"{done} of {total} image x weights pairs", check=False)

    return run_sweep(images, list(request.models), weights, out, size=request.size, device=settings().device,
                     store=engine().store, progress=progress, should_stop=lambda: job.cancelled)


def sweep_note(name: str) -> str | None:
    """What the last sweep into ``name`` left to say: failed, stopped early, or files it skipped (None: nothing)."""
    if _hosted():
        return _worker_sweep_note(name)
    job = boards()["sweep"].get(_sweep_key(name))
    if job is None or not job.finished or job.future.cancelled() or job.future.exception() is not None:
        return None
    summary = job.future.result()
    return _summary_note(summary.rows, summary.stopped, summary.failed)


def _worker_sweep_note(name: str) -> str | None:
    job = _worker_sweep(name)
    status = job.status if job is not None else None
    if status is None or not status.finished:
        return None
    if status.state == FAILED:
        return f"The last sweep into this folder failed on the worker: {status.message} The rows it wrote are shown."
    if status.state == CANCELLED:  # the worker stops at its next batch boundary
        return "The sweep was cancelled; the rows it wrote so far are shown. Start it again to continue."
    return _summary_note(status.summary["rows"], False, status.summary["failed"])


def _summary_note(rows: int, stopped: bool, failed: list[dict]) -> str | None:
    notes = [f"The sweep was cancelled; its {rows} rows so far are shown. Start it again to continue."] if stopped else []
    if failed:
        notes.append(f"{len(failed)} files were not readable images and were skipped: "
                     + ", ".join(f"{f['image']} ({f['reason']})" for f in failed[:5]))
    return " ".join(notes) or None


def layer_default(num_layers: int) -> list[int]:
    """The layers a population page starts with: the last third of the blocks."""
    return list(range((2 * num_layers) // 3, num_layers))
