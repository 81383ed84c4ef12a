"""The app's one door to vitlens: settings, images, captures and analyses, cached.

This is the only ``st.cache_*`` site. Models live in the ``Engine`` (``st.cache_resource``);
results of pure analyses in ``st.cache_data``. Captures and UMAP run in background threads
(a ``JobBoard`` shared by every session of this process), so long work goes on while the user
browses other pages: a data function either returns its result or raises ``Pending(job)``,
which the page shows as a progress bar with a cancel button (``ui.fetch``) before asking again.
Every forward pass goes through ``compute_traces``, the one function to route to a worker.
"""
from __future__ import annotations

import hashlib
import io
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import streamlit as st
import timm

import figures
from figures import EmergenceCurve, NormHistogram, Overlay, Table
# ui.py and the pages reach vitlens only through this module (it re-exports parse_threshold and the error types).
from vitlens.analysis.attention import ClsOutlierAttention, attention_maps, cls_outlier_attention
from vitlens.analysis.embedding import TokenEmbedding, token_embedding
from vitlens.analysis.outliers import LayerOutliers, OutlierResult, find_outliers, layer_outliers, parse_threshold  # noqa: F401
from vitlens.capture import Trace
from vitlens.engine import Engine
from vitlens.errors import (HubUnavailableError, ImageError, OptionError, UnknownModelError,  # noqa: F401
                            VitlensError, WeightsError)
from vitlens.images import GALLERY, DecodedImage, decode_image, gallery_image
from vitlens.models import PRESETS, WEIGHT_SUFFIXES, ModelSpec, resolve_spec
from vitlens.settings import Settings
from vitlens.store import CaptureOptions, TraceStore
from vitlens.synthetic import DEMO_CELLS, SYNTHETIC_SIDE, demo_layer

UPLOAD_PREFIX = "upload-"
WEIGHTS_UPLOAD_PREFIX = "upload:"
WEIGHTS_FILE_PREFIX = "file:"
MAX_UPLOAD_BYTES = 512 * 2**20  # decoded uploads kept in memory (shared by sessions, so a URL can name them)
STATES_BUDGET = 20_000  # layers x tokens: up to this, an embedding capture keeps every layer's vectors
HUB_RETRY_S = 300.0  # after a hub failure, use the offline fallback without asking the hub again for this long
NAMED_WEIGHTS = ("hub", "synthetic", "random")  # weights choices that are not files
OFFLINE_WEIGHTS = "synthetic"  # what the app shows when pretrained weights cannot be had (random if it cannot be built)
RANDOM_NOTE = "random weights: no artifacts expected"
SYNTHETIC_NOTE = "synthetic demo: planted artifacts"
SYNTHETIC_TWIN_NOTE = "synthetic demo, registers: no planted artifacts"


# ----------------------------------------------------------------------------------------------
# Settings and long-lived resources
# ----------------------------------------------------------------------------------------------

def settings() -> Settings:
    """Deployment settings (``VITLENS_*`` environment variables)."""
    return Settings.from_env()


@st.cache_resource(show_spinner=False)
def _engine(cache_dir: str, cache_size: int, device: str) -> Engine:
    engine = Engine(TraceStore(cache_dir, cache_size), device=device, max_models=2)
    engine.max_batch = 8 if engine.device.type == "cuda" else 1  # one image at a time on CPU: finer progress, quick cancel
    return engine


def engine() -> Engine:
    config = settings()
    return _engine(str(config.cache_dir), config.cache_size, config.device)


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


class CaptureFailed(VitlensError):
    """The model was built but vitlens cannot run or read it."""


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
def _boards() -> dict[str, JobBoard]:
    """One thread for captures (the model is the bottleneck) and one for analyses such as UMAP."""
    return {"capture": JobBoard(workers=1, keep=8), "analysis": JobBoard(workers=1, keep=16)}  # older results: the disk store


def running_jobs() -> list[Job]:
    """Jobs still running in this process (for the sidebar status)."""
    return [job for board in _boards().values() for job in board.active()]


def forget(key: str) -> None:
    """Drop a (cancelled) job so the next request starts it again."""
    for board in _boards().values():
        board.forget(key)


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------

GALLERY_NAMES: tuple[str, ...] = tuple(GALLERY)


class _Uploads:
    """Decoded uploads by reference, shared by the sessions of this process (newest kept)."""

    def __init__(self, limit: int = MAX_UPLOAD_BYTES) -> None:
        self.images: OrderedDict[str, DecodedImage] = OrderedDict()
        self.lock = threading.Lock()
        self.limit = limit

    def add(self, decoded: DecodedImage) -> str:
        ref = UPLOAD_PREFIX + decoded.digest[:16]
        with self.lock:
            self.images[ref] = decoded
            self.images.move_to_end(ref)
            while len(self.images) > 1 and sum(_nbytes(i) for i in self.images.values()) > self.limit:
                self.images.popitem(last=False)
        return ref


def _nbytes(decoded: DecodedImage) -> int:
    return decoded.image.width * decoded.image.height * 3


@st.cache_resource(show_spinner=False)
def _uploads() -> _Uploads:
    return _Uploads()


@st.cache_resource(show_spinner=False)
def _gallery(name: str) -> DecodedImage:
    return gallery_image(name)


def add_upload(name: str, content: bytes) -> str:
    """Decode an uploaded file and keep it; returns its reference (``upload-<digest>``).

    Raises:
        ImageError: the file is not a usable image.
    """
    return _uploads().add(decode_image(content, name=name, max_pixels=settings().max_pixels))


def has_image(ref: str) -> bool:
    return ref in GALLERY or ref in _uploads().images


def image(ref: str) -> DecodedImage:
    """A gallery photograph or an upload, by reference.

    Raises:
        ImageError: an upload this server no longer holds.
    """
    if ref in GALLERY:
        return _gallery(ref)
    decoded = _uploads().images.get(ref)
    if decoded is None:
        raise ImageError(f"Image '{ref}' is not on this server any more (uploads are kept in memory); upload it again.")
    return decoded


def image_label(ref: str) -> str:
    if ref in GALLERY:
        return f"{ref} (gallery)"
    decoded = _uploads().images.get(ref)
    return f"{decoded.name} (upload)" if decoded is not None else f"{ref} (missing)"


def image_name(ref: str) -> str:
    """Short name for hover text and file names."""
    decoded = _uploads().images.get(ref) if ref not in GALLERY else None
    return decoded.name if decoded is not None else ref


@st.cache_data(max_entries=256, show_spinner=False)
def _display_uri(ref: str, input_size: tuple[int, int]) -> str:
    """The picture stretched to the box the patch grid covers (the model's input), as a figure background."""
    height, width = input_size
    scale = 448 / max(height, width)
    picture = image(ref).image.resize((max(1, round(width * scale)), max(1, round(height * scale))))
    return figures.image_uri(picture)


def display_uri(ref: str, trace: Trace) -> str:
    return _display_uri(ref, tuple(trace.input_size))


# ----------------------------------------------------------------------------------------------
# Models and weights
# ----------------------------------------------------------------------------------------------

def presets() -> list[ModelSpec]:
    """The presets this deployment offers."""
    allowed = settings().allowed_models
    return [spec for spec in PRESETS.values() if allowed is None or spec.name in allowed]


def check_model(name: str) -> ModelSpec:
    """The spec of a preset or timm ViT name the deployment offers.

    Raises:
        UnknownModelError: empty, unknown, or not offered here.
    """
    name = name.strip()
    if not name:
        raise UnknownModelError("Choose a model: a preset or a timm Vision Transformer name.")
    settings().check_model(name)
    return resolve_spec(name)


def pair_of(name: str) -> str | None:
    """The same model with (or without) registers: the preset's pair, or the timm name swapped."""
    if name in PRESETS:
        pair = PRESETS[name].pair
    elif "_reg4_dinov2" in name:
        pair = name.replace("_reg4_dinov2", "_dinov2")
    elif "_dinov2" in name:
        pair = name.replace("_dinov2", "_reg4_dinov2")
    else:
        return None
    allowed = settings().allowed_models
    if pair is None or (allowed is not None and pair not in allowed):
        return None
    return pair if pair in PRESETS or timm.is_model(pair.split(".")[0]) else None


def patch_size(spec: ModelSpec) -> int:
    """Patch size from the timm architecture name (``patch14`` -> 14); 16 when it does not say."""
    match = re.search(r"patch(\d+)", spec.arch)
    return int(match.group(1)) if match else 16


def weights_files() -> list[str]:
    """Weights files the operator put in ``Settings.weights_dir`` (names only)."""
    return settings().weights_files()


def _uploaded_weights_dir() -> Path:
    return settings().cache_dir / "uploaded_weights"


def add_weights_upload(name: str, content: bytes) -> str:
    """Keep an uploaded weights file; returns its weights choice ``upload:<digest><suffix>``.

    Raises:
        WeightsError: wrong suffix or empty file.
    """
    suffix = Path(name).suffix.lower()
    if suffix not in WEIGHT_SUFFIXES:
        raise WeightsError(f"Weights file '{name}' must end in {', '.join(WEIGHT_SUFFIXES)}.")
    if not content:
        raise WeightsError(f"Weights file '{name}' is empty.")
    folder = _uploaded_weights_dir()
    folder.mkdir(parents=True, exist_ok=True)
    file_name = hashlib.sha256(content).hexdigest()[:16] + suffix
    path = folder / file_name
    if not path.exists():
        path.write_bytes(content)
    return WEIGHTS_UPLOAD_PREFIX + file_name


def weights_path(weights: str) -> str:
    """What ``load_model`` takes: ``hub``, ``synthetic``, ``random`` or a path; never a path typed in the browser.

    Raises:
        WeightsError: a file choice that is not a plain name in the weights folder (or uploads).
    """
    if weights in NAMED_WEIGHTS:
        return weights
    if weights.startswith(WEIGHTS_FILE_PREFIX):
        return settings().resolve_weights(weights[len(WEIGHTS_FILE_PREFIX):])
    if weights.startswith(WEIGHTS_UPLOAD_PREFIX):
        name = weights[len(WEIGHTS_UPLOAD_PREFIX):]
        path = _uploaded_weights_dir() / name
        if name != Path(name).name or name.startswith(".") or not path.is_file():
            raise WeightsError("The uploaded weights file is not on this server any more; upload it again.")
        return str(path)
    raise WeightsError(f"Weights must be hub, synthetic, random or a weights file, not '{weights[:80]}'.")


def weights_label(weights: str, registers: bool | None = None) -> str:
    """How the weights are named in titles and legends; the synthetic demo says what it is
    (``registers``: whether the model has registers, None when unknown)."""
    if weights == "hub":
        return "pretrained"
    if weights == "random":
        return RANDOM_NOTE
    if weights == "synthetic":
        return {True: SYNTHETIC_TWIN_NOTE, False: SYNTHETIC_NOTE, None: "synthetic demo"}[registers]
    return weights.split(":", 1)[-1]


def _weights_id(weights: str) -> str:
    """Weights plus, for files, size and modification time (so a replaced file is not served stale)."""
    if weights in NAMED_WEIGHTS:
        return weights
    stat = Path(weights_path(weights)).stat()
    return f"{weights}:{stat.st_size}:{stat.st_mtime_ns}"


@st.cache_resource(show_spinner=False)
def _hub_failures() -> dict[str, tuple[float, str]]:
    return {}


# ----------------------------------------------------------------------------------------------
# Requests and captures
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelChoice:
    """A model and its weights: ``hub``, ``synthetic``, ``random``, ``file:<name>`` or ``upload:<name>``."""

    name: str
    weights: str


@dataclass(frozen=True)
class Request:
    """Everything the captures of a view depend on: models (the pair second), images, input side."""

    models: tuple[ModelChoice, ...]
    images: tuple[str, ...]
    side: int

    @property
    def key(self) -> str:
        parts = [f"{m.name}|{_weights_id(m.weights)}" for m in self.models]
        return f"{settings().cache_dir}|{';'.join(parts)}|{','.join(self.images)}|{self.side}"


@dataclass(frozen=True, eq=False)
class ModelRun:
    """One model's traces for the request's images.

    Attributes:
        choice: What was asked for.
        weights: The weights used (``OFFLINE_WEIGHTS`` or ``random`` when the hub could not be reached).
        note: Why the weights differ from the choice, or None.
        traces: One per image, in request order.
        ids: Cache ids of the traces (for ``st.cache_data`` keys).
    """

    choice: ModelChoice
    weights: str
    note: str | None
    traces: tuple[Trace, ...]
    ids: tuple[str, ...]

    @property
    def label(self) -> str:
        """Full label, for panel titles: says when weights are random or the synthetic demo."""
        return f"{self.choice.name} ({weights_label(self.weights, self.num_registers > 0)})"

    @property
    def short(self) -> str:
        """Short label, for legends."""
        words = "random weights" if self.weights == "random" else weights_label(self.weights, self.num_registers > 0)
        return f"{self.choice.name} ({words})"

    @property
    def num_registers(self) -> int:
        return self.traces[0].layout.num_registers

    @property
    def num_layers(self) -> int:
        return self.traces[0].num_layers

    @property
    def num_heads(self) -> int:
        return self.traces[0].num_heads


@dataclass(frozen=True, eq=False)
class Captured:
    """The traces of a request: one ``ModelRun`` per model."""

    request: Request
    runs: tuple[ModelRun, ...]

    @property
    def num_layers(self) -> int:
        return min(run.num_layers for run in self.runs)

    @property
    def notes(self) -> list[str]:
        return [run.note for run in self.runs if run.note]

    @property
    def synthetic(self) -> bool:
        """Whether any model shows the synthetic demo."""
        return any(run.weights == "synthetic" for run in self.runs)


def synthetic_note(result: Captured) -> str:
    """What the synthetic demo is, in the words of this request's models (markdown)."""
    planted = [run for run in result.runs if run.weights == "synthetic" and not run.num_registers]
    clean = [run for run in result.runs if run.weights == "synthetic" and run.num_registers]
    parts = ["**Synthetic demo, not a trained model.**"]
    if planted:
        run = planted[0]
        parts.append(f"Random weights in which `{run.choice.name}` has high-norm tokens planted at {len(DEMO_CELLS)} fixed "
                     f"cells from block {demo_layer(run.num_layers)} of {run.num_layers} on (exact at {SYNTHETIC_SIDE} px, "
                     "the same cells whatever the picture).")
    else:
        parts.append("Random weights; models with registers get nothing planted.")
    if clean:
        parts.append(f"`{clean[0].choice.name}`, with registers, is left clean.")
    parts.append("Attention and embeddings are those of random weights.")
    return " ".join(parts)


def compute_traces(
        images: Sequence[DecodedImage],
        model: str,
        weights: str,
        options: CaptureOptions,
        progress: Callable[[int, int], None] | None = None,
) -> list[Trace]:
    """Every forward pass of the app goes through here.

    ``embedded`` mode (default) runs the captures on this process's ``Engine``; ``hosted`` mode
    queues them for ``python -m vitlens worker`` through ``vitlens.client`` (weights files by name).

    Raises:
        VitlensError: bad model, weights, option or hub; ``CaptureFailed`` when the model cannot be read.
    """
    try:
        if settings().mode == "hosted":
            results = _hosted_traces(images, model, weights, options, progress)
        else:
            results = engine().traces(images, model, weights_path(weights), options, progress=progress)
    except VitlensError:
        raise
    except (RuntimeError, TypeError, ValueError, IndexError, KeyError) as error:  # a model vitlens cannot hook
        detail = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise CaptureFailed(f"vitlens cannot capture '{model}': {detail}") from error
    return [result.trace for result in results]


def _hosted_traces(images: Sequence[DecodedImage], model: str, weights: str, options: CaptureOptions,
                   progress: Callable[[int, int], None] | None) -> list:
    """Captures queued for ``python -m vitlens worker`` (``VITLENS_MODE=hosted``)."""
    from vitlens.client import get_client

    if weights.startswith(WEIGHTS_UPLOAD_PREFIX):
        raise WeightsError("Uploaded weights files work only when the app runs its own captures (VITLENS_MODE=embedded); "
                           "put the file in the weights folder instead.")
    name = weights[len(WEIGHTS_FILE_PREFIX):] if weights.startswith(WEIGHTS_FILE_PREFIX) else weights
    report = (lambda status: progress(status.done, max(status.total, 1))) if progress else None
    return get_client(settings()).compute_traces(images, model, name, options, report)


def _capture(request: Request, state_layers: tuple[int, ...], job: Job) -> Captured:
    images = [image(ref) for ref in request.images]
    total = len(images) * len(request.models)
    runs = []
    for index, choice in enumerate(request.models):
        def progress(done: int, count: int, index: int = index, name: str = choice.name) -> None:
            job.report(index * len(images) + done, total, f"{name}: {done} of {count} images")

        job.report(index * len(images), total, f"loading {choice.name}")
        options = CaptureOptions(side=request.side, state_layers=state_layers)
        failure = _hub_failures().get(choice.name)
        if choice.weights == "hub" and failure and time.monotonic() - failure[0] < HUB_RETRY_S:
            (weights, traces), note = _offline_traces(images, choice.name, options, progress), failure[1]
        else:
            weights, note = choice.weights, None
            try:
                traces = compute_traces(images, choice.name, weights, options, progress)
            except HubUnavailableError as error:
                if weights != "hub":
                    raise
                _hub_failures()[choice.name] = (time.monotonic(), str(error))
                (weights, traces), note = _offline_traces(images, choice.name, options, progress), str(error)
        ids = tuple(f"{choice.name}|{_weights_id(weights)}|{image.digest}|{request.side}|{state_layers}" for image in images)
        runs.append(ModelRun(choice=choice, weights=weights, note=note, traces=tuple(traces), ids=ids))
    return Captured(request=request, runs=tuple(runs))


def _offline_traces(images: Sequence[DecodedImage], name: str, options: CaptureOptions,
                    progress: Callable[[int, int], None]) -> tuple[str, list[Trace]]:
    """Traces with the weights used when pretrained ones are unavailable: the synthetic demo, or
    random weights for a model the demo cannot plant (no absolute position embeddings, gated MLP)."""
    try:
        return OFFLINE_WEIGHTS, compute_traces(images, name, OFFLINE_WEIGHTS, options, progress)
    except WeightsError:
        return "random", compute_traces(images, name, "random", options, progress)


def captured(request: Request, state_layers: tuple[int, ...] = ()) -> Captured:
    """The request's traces. Raises ``Pending`` while they are computed, or the capture's error."""
    if not request.images:
        raise OptionError("Choose at least one image in the sidebar (gallery or upload).")
    board = _boards()["capture"]
    what = f"{len(request.images)} image{'s' * (len(request.images) > 1)} x {len(request.models)} model{'s' * (len(request.models) > 1)}"
    label = f"Capturing {what}" + (" with token vectors" if state_layers else "")
    job = board.run(f"capture|{request.key}|{state_layers}", label, lambda job: _capture(request, state_layers, job))
    return board.result(job)


# ----------------------------------------------------------------------------------------------
# Pure analyses, cached
# ----------------------------------------------------------------------------------------------

@st.cache_data(max_entries=1024, show_spinner=False)
def _layer_outliers(trace_id: str, threshold: float | None, _trace: Trace) -> LayerOutliers:
    return layer_outliers(_trace, threshold)


def outliers_of(run: ModelRun, index: int, threshold: float | None) -> LayerOutliers:
    return _layer_outliers(run.ids[index], threshold, run.traces[index])


def _post_norm_outliers(trace: Trace) -> OutlierResult:
    return find_outliers(trace.patch_norms(post_norm=True))


def _check_layer(layer: int, num_layers: int) -> int:
    if not 0 <= layer < num_layers:
        raise OptionError(f"Layer {layer} is out of range: the model has {num_layers} layers (0 to {num_layers - 1}).")
    return layer


@dataclass(frozen=True, eq=False)
class NormMaps:
    """One norm map per model for one image, and the numbers behind them."""

    overlays: list[Overlay]
    outliers: list[OutlierResult]
    table: Table


def norm_maps(request: Request, ref: str, layer: int, post_norm: bool, threshold: float | None) -> NormMaps:
    """Token-norm heat maps of one image and layer, one per model (the pair side by side).

    After the final norm there is one map per model (the layer does not apply) and the
    outliers are found on those norms with ``auto``, since a pre-norm threshold means nothing there.
    """
    result = captured(request)
    index = request.images.index(ref)
    overlays, found, rows = [], [], []
    kind = figures.norm_label(post_norm)
    for run in result.runs:
        trace = run.traces[index]
        _check_layer(layer, trace.num_layers)
        if post_norm:
            values, outliers = trace.patch_norms(post_norm=True), _post_norm_outliers(trace)
            where = "output, after the final norm"
        else:
            values, outliers = trace.patch_norms()[layer], outliers_of(run, index, threshold).layer(layer)
            where = f"layer {layer}"
        threshold_text = "no high mode" if outliers.threshold is None else f"threshold {outliers.threshold:.4g}"
        title = (f"{run.choice.name}<br><sup>{weights_label(run.weights, run.num_registers > 0)}<br>"
                 f"{where} · {outliers.count} outliers ({threshold_text}) · {run.num_registers} registers</sup>")
        overlays.append(Overlay(title=title, values=values, image=display_uri(ref, trace), mask=outliers.mask, colorbar=kind))
        found.append(outliers)
        for (row, col), value in np.ndenumerate(values):
            rows.append([run.choice.name, run.weights, image_name(ref), "post" if post_norm else layer, row, col,
                         float(value), bool(outliers.mask[row, col])])
    table = Table(["model", "weights", "image", "layer", "row", "col", "norm", "outlier"], rows)
    return NormMaps(overlays=overlays, outliers=found, table=table)


@dataclass(frozen=True, eq=False)
class HistogramView:
    histograms: list[NormHistogram]
    table: Table


def histogram(request: Request, layers: Sequence[int], post_norm: bool, threshold: float | None) -> HistogramView:
    """Patch-token norms of the chosen layers over all chosen images, pooled per model.

    ``auto`` finds the threshold on the pooled norms of each model.
    """
    result = captured(request)
    histograms, rows = [], []
    for run in result.runs:
        pooled = []
        for trace in run.traces:
            grids = trace.patch_norms(post_norm=True)[None] if post_norm else trace.patch_norms()[[_check_layer(l, trace.num_layers) for l in layers]]
            pooled.append(grids.ravel())
        norms = np.concatenate(pooled)
        cut = find_outliers(norms[None], None if post_norm else threshold).threshold
        hist = NormHistogram(label=run.short, norms=norms, threshold=cut)
        histograms.append(hist)
        rows.append([run.choice.name, run.weights, "post" if post_norm else " ".join(map(str, layers)), norms.size,
                     cut, hist.count, hist.fraction, float(np.median(norms)), float(norms.max())])
    table = Table(["model", "weights", "layers", "tokens", "threshold", "outliers", "fraction", "median", "max"], rows)
    return HistogramView(histograms=histograms, table=table)


def histogram_values(request: Request, layers: Sequence[int], post_norm: bool) -> Table:
    """Every pooled norm, for download."""
    result = captured(request)
    rows = []
    for run in result.runs:
        for ref, trace in zip(request.images, run.traces):
            grids = {"post": trace.patch_norms(post_norm=True)} if post_norm else {l: trace.patch_norms()[l] for l in layers}
            for layer, grid in grids.items():
                rows += [[run.choice.name, image_name(ref), layer, r, c, float(v)] for (r, c), v in np.ndenumerate(grid)]
    return Table(["model", "image", "layer", "row", "col", "norm"], rows)


@dataclass(frozen=True, eq=False)
class EmergenceView:
    curves: list[EmergenceCurve]
    table: Table


def emergence(request: Request, ref: str | None, threshold: float | None) -> EmergenceView:
    """Per layer outlier count/share and max/median norm, for one image or the whole selection."""
    result = captured(request)
    indices = range(len(request.images)) if ref is None else [request.images.index(ref)]
    curves, rows = [], []
    for run in result.runs:
        found = [outliers_of(run, i, threshold) for i in indices]
        grids = [run.traces[i].patch_norms() for i in indices]  # [layer, row, col] each
        depth = min(g.shape[0] for g in grids)
        count = sum(f.counts[:depth] for f in found).astype(np.int64)
        patches = sum(g[0].size for g in grids)
        flat = np.concatenate([g[:depth].reshape(depth, -1) for g in grids], axis=1)  # [layer, token]
        curve = EmergenceCurve(label=run.short, count=count, fraction=count / patches,
                               norm_max=flat.max(axis=1), norm_median=np.median(flat, axis=1))
        curves.append(curve)
        rows += [[run.choice.name, run.weights, layer, int(count[layer]), float(curve.fraction[layer]),
                  float(curve.norm_max[layer]), float(curve.norm_median[layer])] for layer in range(depth)]
    table = Table(["model", "weights", "layer", "outliers", "fraction", "norm_max", "norm_median"], rows)
    return EmergenceView(curves=curves, table=table)


@dataclass(frozen=True, eq=False)
class AttentionPanel:
    """One model's prefix-token attention maps for one image and layer, and CLS's attention on outliers."""

    label: str
    overlays: list[Overlay]
    num_registers: int
    cls_mass: ClsOutlierAttention | None


@dataclass(frozen=True, eq=False)
class AttentionView:
    panels: list[AttentionPanel]
    table: Table


def attention(request: Request, ref: str, layer: int, head: int | None, threshold: float | None) -> AttentionView:
    """Attention maps of CLS and each register over the patches (per head or averaged), per model."""
    result = captured(request)
    index = request.images.index(ref)
    panels, rows = [], []
    head_text = "mean over heads" if head is None else f"head {head}"
    for run in result.runs:
        trace = run.traces[index]
        _check_layer(layer, trace.num_layers)
        maps = attention_maps(trace, layer, head)
        found = outliers_of(run, index, threshold)
        overlays = [Overlay(title=f"{run.choice.name}: <b>{name}</b> ({maps.patch_mass[i]:.0%} on patches)", values=maps.maps[i],
                            image=display_uri(ref, trace), mask=found.masks[layer],
                            colorbar=f"attention (layer {layer}, {head_text})", value_name="attention")
                    for i, name in enumerate(maps.names)]
        mass = cls_outlier_attention(trace, found, head) if trace.layout.cls_index is not None else None
        panels.append(AttentionPanel(label=run.short, overlays=overlays, num_registers=run.num_registers, cls_mass=mass))
        for i, name in enumerate(maps.names):
            rows += [[run.choice.name, image_name(ref), layer, head_text, name, r, c, float(v)] for (r, c), v in np.ndenumerate(maps.maps[i])]
    table = Table(["model", "image", "layer", "head", "query", "row", "col", "attention"], rows)
    return AttentionView(panels=panels, table=table)


def state_layers_for(result: Captured, layer: int) -> tuple[int, ...]:
    """Which layers' token vectors an embedding capture keeps: all of them when that is small."""
    tokens = max(trace.layout.num_tokens for run in result.runs for trace in run.traces)
    depth = result.num_layers
    return tuple(range(depth)) if depth * tokens <= STATES_BUDGET else (layer,)


@st.cache_data(max_entries=64, show_spinner=False)
def _pca(ids: tuple[str, ...], layer: int, threshold: float | None, _traces: tuple[Trace, ...]) -> TokenEmbedding:
    return token_embedding(list(_traces), layer, "pca", threshold)


@dataclass(frozen=True, eq=False)
class EmbeddingView:
    label: str
    embedding: TokenEmbedding
    image_names: list[str]
    image_refs: list[str]
    table: Table


def embedding(request: Request, layer: int, method: str, threshold: float | None, model_index: int = 0) -> EmbeddingView:
    """PCA (instant) or UMAP (background job) of one layer's tokens of one model over the chosen images."""
    plain = captured(request)
    _check_layer(layer, plain.num_layers)
    model_index = min(model_index, len(request.models) - 1)
    result = captured(request, state_layers_for(plain, layer))
    run = result.runs[model_index]
    if method == "pca":
        found = _pca(run.ids, layer, threshold, run.traces)
    else:
        board = _boards()["analysis"]
        job = board.run(f"umap|{run.ids}|{layer}|{threshold}", f"UMAP of {run.choice.name} layer {layer}",
                        lambda job: _umap(job, run.traces, layer, threshold))
        found = board.result(job)
    names = [image_name(ref) for ref in request.images]
    rows = [[run.choice.name, names[i], r, c, float(n), bool(o), float(x), float(y)]
            for i, r, c, n, o, (x, y) in zip(found.image, found.row, found.col, found.norm, found.outlier, found.coords)]
    rows += [[run.choice.name, names[i], None, None, None, name, float(x), float(y)]
             for i, name, (x, y) in zip(found.prefix_image, found.prefix_names, found.prefix_coords)]
    table = Table(["model", "image", "row", "col", "norm", "outlier_or_token", "x", "y"], rows)
    return EmbeddingView(label=run.label, embedding=found, image_names=names, image_refs=list(request.images), table=table)


def _umap(job: Job, traces: tuple[Trace, ...], layer: int, threshold: float | None) -> TokenEmbedding:
    points = sum(trace.layout.num_tokens for trace in traces)
    job.report(0, 0, f"UMAP of {points} tokens (the first run also compiles UMAP, about half a minute)")
    return token_embedding(list(traces), layer, "umap", threshold)


def trace_npz(request: Request, threshold: float | None = None) -> bytes:
    """All arrays of the request's traces (CLI ``--save`` names, prefixed ``m<model>_i<image>_``);
    ``outliers``/``thresholds`` use ``threshold`` (None: auto)."""
    result = captured(request)
    arrays: dict[str, np.ndarray] = {
        "models": np.array([run.label for run in result.runs]),
        "images": np.array([image_name(ref) for ref in request.images]),
    }
    for m, run in enumerate(result.runs):
        for i, trace in enumerate(run.traces):
            found = outliers_of(run, i, threshold)
            prefix = f"m{m}_i{i}_"
            arrays.update({
                prefix + "norms": trace.norms.astype(np.float32),
                prefix + "final_norms": trace.final_norms.astype(np.float32),
                prefix + "attention": trace.attention.astype(np.float32),
                prefix + "outliers": found.masks,
                prefix + "thresholds": found.thresholds,
                prefix + "grid": np.array(trace.layout.grid),
                prefix + "num_prefix_tokens": np.array(trace.layout.num_prefix),
                prefix + "num_registers": np.array(trace.layout.num_registers),
            })
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()
