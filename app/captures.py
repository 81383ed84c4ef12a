"""Requests and their captures: which models, weights, images and input side a view needs, and the traces.

Every forward pass goes through ``compute_traces``, the one function to route to a worker.
Captures run as background jobs (``jobs``); ``captured`` returns the traces or raises ``Pending``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import streamlit as st

from choices import (NAMED_WEIGHTS, SWEEP_WEIGHTS_PREFIX, WEIGHTS_FILE_PREFIX, WEIGHTS_UPLOAD_PREFIX, sweep_checkpoint,
                     weights_id, weights_label, weights_path)
from figures import model_colours, role_of, role_rank
from jobs import Job, boards, watch
from resources import engine, settings
from uploads import image
from vitlens.analysis.outliers import LayerOutliers, layer_outliers
from vitlens.capture import Trace
from vitlens.errors import HubUnavailableError, OptionError, VitlensError, WeightsError
from vitlens.images import DecodedImage
from vitlens.interventions import TestTimeRegister
from vitlens.store import CaptureOptions
from vitlens.synthetic import DEMO_CELLS, demo_layer

HUB_RETRY_S = 300.0  # after a hub failure, use the offline fallback without asking the hub again for this long
OFFLINE_WEIGHTS = "synthetic"  # what the app shows when pretrained weights cannot be had (random if it cannot be built)


class CaptureFailed(VitlensError):
    """The model was built but vitlens cannot run or read it."""


@st.cache_resource(show_spinner=False)
def _hub_failures() -> dict[str, tuple[float, str]]:
    return {}


@st.cache_resource(show_spinner=False)
def _fallbacks() -> dict[str, str]:
    """The weights each model's pretrained weights were last replaced by (``OFFLINE_WEIGHTS`` or random)."""
    return {}


def offline_fallback(names: Sequence[str]) -> tuple[str, ...]:
    """What pretrained weights of these models are replaced by while the hub is deemed unreachable (a failure
    less than ``HUB_RETRY_S`` ago): their fallback weights, each once, sorted; empty when none failed."""
    now, failures = time.monotonic(), _hub_failures()
    return tuple(sorted({_fallbacks().get(name, OFFLINE_WEIGHTS) for name in names
                         if name in failures and now - failures[name][0] < HUB_RETRY_S}))


@dataclass(frozen=True)
class ModelChoice:
    """A model and its weights: ``hub``, ``synthetic``, ``random``, ``file:<name>`` or ``upload:<name>``;
    ``register``: run it with this test-time register (``vitlens.interventions``)."""

    name: str
    weights: str
    register: TestTimeRegister | None = None

    @property
    def key(self) -> str:
        register = f"|ttr{self.register.key()}" if self.register else ""
        return f"{self.name}|{weights_id(self.weights)}{register}"


@dataclass(frozen=True)
class Request:
    """Everything the captures of a view depend on: models (the pair second), images, input side."""

    models: tuple[ModelChoice, ...]
    images: tuple[str, ...]
    side: int

    @property
    def key(self) -> str:
        parts = [m.key for m in self.models]
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
        return f"{self.choice.name} ({weights_label(self.weights, self.trained_registers > 0)}){self._register_words}"

    @property
    def short(self) -> str:
        """Short label, for legends."""
        words = "random weights" if self.weights == "random" else weights_label(self.weights, self.trained_registers > 0)
        return f"{self.choice.name} ({words}){self._register_words}"

    @property
    def name(self) -> str:
        """The model's name, and whether it runs with a test-time register."""
        return f"{self.choice.name}{self._register_words}"

    @property
    def _register_words(self) -> str:
        return " with test-time register" if self.choice.register else ""

    @property
    def role(self) -> str:
        """Its role in the comparison (``figures.ROLES``), which fixes where it is drawn and its colour."""
        return role_of(self.trained_registers, self.choice.register is not None)

    @property
    def num_registers(self) -> int:
        """Registers in the token sequence, a test-time register included."""
        return self.traces[0].layout.num_registers

    @property
    def trained_registers(self) -> int:
        layout = self.traces[0].layout
        return layout.num_registers - layout.num_test_time

    @property
    def num_layers(self) -> int:
        return self.traces[0].num_layers

    @property
    def num_heads(self) -> int:
        return self.traces[0].num_heads

    @property
    def has_final_norm(self) -> bool:
        """Whether the model normalises every token at the end (False: average pooling with
        fc_norm after it, or no final norm), so that there are norms "after the final norm"."""
        return all(trace.has_final_norm for trace in self.traces)


@dataclass(frozen=True, eq=False)
class Captured:
    """The traces of a request: one ``ModelRun`` per model, in drawing order (``in_drawing_order``), which is not
    the request's: the sidebar's own model is ``primary``."""

    request: Request
    runs: tuple[ModelRun, ...]

    @property
    def primary(self) -> ModelRun:
        """The run of the sidebar's model (``request.models[0]``)."""
        return next(run for run in self.runs if run.choice == self.request.models[0])

    @property
    def colours(self) -> list[str]:
        """Each run's colour: its role's, the same on every page (``figures.model_colours``)."""
        return model_colours([run.role for run in self.runs])

    @property
    def num_layers(self) -> int:
        return min(run.num_layers for run in self.runs)

    @property
    def notes(self) -> list[str]:
        return [run.note for run in self.runs if run.note]

    @property
    def without_final_norm(self) -> list[str]:
        """Names of the models that have no per-token final norm."""
        return [run.choice.name for run in self.runs if not run.has_final_norm]

    @property
    def synthetic(self) -> bool:
        """Whether any model shows the synthetic demo."""
        return any(run.weights == "synthetic" for run in self.runs)


def synthetic_note(result: Captured) -> str:
    """What the synthetic demo is, in the words of this request's models (markdown)."""
    planted = [run for run in result.runs if run.weights == "synthetic" and not run.trained_registers]
    clean = [run for run in result.runs if run.weights == "synthetic" and run.trained_registers]
    parts = ["**Synthetic demo, not a trained model.**"]
    if planted:
        run = planted[0]
        parts.append(f"Random weights in which `{run.choice.name}` has high-norm tokens planted at {len(DEMO_CELLS)} fixed "
                     f"cells from block {demo_layer(run.num_layers)} of {run.num_layers} on (the same cells, at the same "
                     "relative positions, whatever the picture, input side and aspect: four distinct cells on any grid "
                     "of at least 2 x 2 patches).")
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

    report = (lambda status: progress(status.done, max(status.total, 1))) if progress else None
    return get_client(settings()).compute_traces(images, model, worker_weights(weights), options, report)


def worker_weights(weights: str) -> str:
    """How the worker names a weights choice: hub/random/synthetic, or a file name in the weights folder.

    Raises:
        WeightsError: an uploaded file, or a sweep's checkpoint outside the weights folder.
    """
    if weights.startswith(WEIGHTS_UPLOAD_PREFIX):
        raise WeightsError("Uploaded weights files work only when the app runs its own captures (VITLENS_MODE=embedded); "
                           "put the file in the weights folder instead.")
    if weights.startswith(SWEEP_WEIGHTS_PREFIX):
        return _worker_name(sweep_checkpoint(weights))
    return weights[len(WEIGHTS_FILE_PREFIX):] if weights.startswith(WEIGHTS_FILE_PREFIX) else weights


def _worker_name(weights: str) -> str:
    """How the worker names a sweep's checkpoint: as it is when named, else its file name in the weights folder.

    Raises:
        WeightsError: the checkpoint is not a file directly in the weights folder.
    """
    folder = settings().weights_dir
    if weights in NAMED_WEIGHTS:
        return weights
    if folder is None or Path(weights).parent.resolve() != folder.resolve():
        raise WeightsError("In hosted mode the worker loads only files in the weights folder (VITLENS_WEIGHTS_DIR), "
                           "and this checkpoint is not there; copy it there or run the app in embedded mode.")
    return Path(weights).name


def _capture(request: Request, state_layers: tuple[int, ...], job: Job) -> Captured:
    images = [image(ref) for ref in request.images]
    total = len(images) * len(request.models)
    runs = []
    for index, choice in enumerate(request.models):
        def progress(done: int, count: int, index: int = index, name: str = choice.name) -> None:
            job.report(index * len(images) + done, total, f"{name}: {done} of {count} images")

        job.report(index * len(images), total, f"loading {choice.name}")
        options = CaptureOptions(side=request.side, state_layers=state_layers, test_time_register=choice.register)
        failure = _hub_failures().get(choice.name)
        if choice.weights == "hub" and failure and time.monotonic() - failure[0] < HUB_RETRY_S:
            (weights, traces), note = _offline_traces(images, choice.name, options, progress), failure[1]
            _fallbacks()[choice.name] = weights
        else:
            weights, note = choice.weights, None
            try:
                traces = compute_traces(images, choice.name, weights, options, progress)
            except HubUnavailableError as error:
                if weights != "hub":
                    raise
                (weights, traces), note = _offline_traces(images, choice.name, options, progress), str(error)
                _fallbacks()[choice.name] = weights
                _hub_failures()[choice.name] = (time.monotonic(), str(error))
        register = f"|ttr{choice.register.key()}" if choice.register else ""
        ids = tuple(f"{choice.name}|{weights_id(weights)}{register}|{image.digest}|{request.side}|{state_layers}"
                    for image in images)
        runs.append(ModelRun(choice=choice, weights=weights, note=note, traces=tuple(traces), ids=ids))
    return Captured(request=request, runs=in_drawing_order(runs))


def in_drawing_order(runs: Sequence[ModelRun]) -> tuple[ModelRun, ...]:
    """Runs in the order every page draws them, whichever model the sidebar names: without registers first
    (left), then with registers, then with a test-time register (``figures.ROLES``); the request's order
    within a role."""
    return tuple(sorted(runs, key=lambda run: role_rank(run.role)))


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
    if len(set(request.images)) > settings().max_images:
        raise OptionError(f"A view shows at most {settings().max_images} images; choose fewer in the sidebar.")
    board = boards()["capture"]
    what = f"{len(request.images)} image{'s' * (len(request.images) > 1)} x {len(request.models)} model{'s' * (len(request.models) > 1)}"
    label = f"Capturing {what}" + (" with token vectors" if state_layers else "")
    job = watch(board.run(f"capture|{request.key}|{state_layers}", label, lambda job: _capture(request, state_layers, job)))
    return board.result(job)


@st.cache_data(max_entries=1024, show_spinner=False)
def _layer_outliers(trace_id: str, threshold: float | None, _trace: Trace) -> LayerOutliers:
    return layer_outliers(_trace, threshold)


def outliers_of(run: ModelRun, index: int, threshold: float | None) -> LayerOutliers:
    return _layer_outliers(run.ids[index], threshold, run.traces[index])


def check_layer(layer: int, num_layers: int) -> int:
    if not 0 <= layer < num_layers:
        raise OptionError(f"Layer {layer} is out of range: the model has {num_layers} layers (0 to {num_layers - 1}).")
    return layer
