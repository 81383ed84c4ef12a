"""View models of the evidence pages: redundancy, probes, LOST, and the HTML report download.

Redundancy and probes read the sidebar's captures. LOST and the report run their own forward
passes (LOST needs a block's keys, which traces do not keep) as background jobs on the capture
board, through the app's ``Engine``.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from captures import Request, captured, check_layer, outliers_of
from choices import weights_path
from figures import Overlay, Table, norm_label
from jobs import Job, boards
from resources import engine
from uploads import display_uri, image, image_name
from vitlens.analysis.probes import LocalProbeResult, LocalSample, local_probes
from vitlens.analysis.population import read_results
from vitlens.analysis.redundancy import RedundancyResult, redundancy, results_redundancy
from vitlens.discovery import Discovery, discover
from vitlens.errors import DataError
from resources import settings
from vitlens.evidence import EvidenceOptions, GlobalProbeResult, Run, global_probe_run, patch_pixels
from vitlens.evidence_figures import draw_discovery
from vitlens.report import ReportOptions, build_report
from vitlens.store import CaptureOptions


@dataclass(frozen=True, eq=False)
class RedundancyView:
    """Per model: the norm and similarity maps of one image, and the distributions over all images."""

    overlays: list[tuple[Overlay, Overlay]]
    results: list[tuple[str, RedundancyResult]]
    table: Table


def redundancy_view(request: Request, ref: str, layer: int, threshold: float | None) -> RedundancyView:
    """Neighbour similarity beside the norm map of ``ref``, and outlier vs normal cells over the request's images."""
    result = captured(request)
    index = request.images.index(ref)
    overlays, results, rows = [], [], []
    for run, colour in zip(result.runs, result.colours):
        check_layer(layer, run.num_layers)
        masks = [outliers_of(run, i, threshold).masks[layer] for i in range(len(run.traces))]
        trace, mask = run.traces[index], masks[index]
        uri = display_uri(ref, trace)
        overlays.append((Overlay(f"{run.short}<br><sup>norms, layer {layer}</sup>", trace.patch_norms()[layer], uri, mask,
                                 norm_label(False), colour=colour),
                         Overlay(f"{run.short}<br><sup>neighbour similarity (patch embedding)</sup>", trace.neighbor_similarity,
                                 uri, mask, "cosine similarity", "similarity", colour=colour)))
        found = redundancy([t.neighbor_similarity for t in run.traces], masks)
        results.append((run.short, found))
        rows.append([run.name, run.weights, layer, *found.summary().values()])
    columns = ["model", "weights", "layer", "num_images", "num_outlier", "num_normal", "outlier_mean", "normal_mean", "auroc"]
    return RedundancyView(overlays, results, Table(columns, rows))


def results_redundancy_view(name: str, layer: int) -> list[tuple[str, RedundancyResult]]:
    """Outlier (at ``layer``) vs normal cells per (model, weights) of results folder ``name`` of the deployment.

    Raises:
        OptionError: results are not enabled, or ``name`` is not a plain folder name.
        ResultsError: not sweep results, no row at ``layer``, or swept before neighbour similarity was recorded.
    """
    frame = read_results(settings().resolve_results(name), ("outlier_cells", "neighbor_similarity"))
    return [(f"{model} ({Path(weights).name})", found) for (model, weights), found in results_redundancy(frame, layer).items()]


def local_probe_view(request: Request, layer: int, threshold: float | None) -> list[tuple[str, LocalProbeResult]]:
    """Position and pixel probes per model on the request's images (needs at least 2 images).

    Raises:
        DataError: fewer than two images.
    """
    if len(request.images) < 2:
        raise DataError("Local probes need at least 2 images (one to train, one to test); add images in the sidebar.")
    result = captured(request, state_layers=(layer,))
    views = []
    for run in result.runs:
        check_layer(layer, run.num_layers)
        grids = {trace.layout.grid for trace in run.traces}
        if len(grids) > 1:
            raise DataError("Local probes need images with the same patch grid (same aspect ratio); the CLI "
                            "`python -m vitlens probes` crops every image to a square.")
        loaded = engine().model(run.choice.name, weights_path(run.weights))
        samples = [LocalSample(trace.states[layer][trace.layout.patches],
                               patch_pixels(image(ref).image, request.side, loaded.patch_size, loaded.mean, loaded.std),
                               outliers_of(run, index, threshold).masks[layer].ravel())
                   for index, (ref, trace) in enumerate(zip(request.images, run.traces))]
        views.append((run.short, local_probes(samples, grids.pop())))
    return views


def global_probe_view(request: Request, dataset: str, layer: int, threshold: float | None) -> list[tuple[str, Run]]:
    """Global probes per model (test-time register column left out) on image folder ``dataset`` of the deployment,
    one subfolder per class (a background job; raises ``Pending`` meanwhile).

    Raises:
        OptionError: image folders are not enabled, or ``dataset`` is not one of them.
        DataError: fewer than two classes, or no readable image.
    """
    root = settings().resolve_dataset(dataset)  # only folders inside VITLENS_DATASETS_DIR, never a path from the page
    models = [(run.choice.name, run.weights, run.short) for run in captured(request).runs if not run.choice.register]
    board = boards()["capture"]
    key = f"global|{request.key}|{models}|{dataset}|{layer}|{threshold}"
    job = board.run(key, f"Global probes on {dataset}", lambda job: _global(request, models, root, layer, threshold, job))
    return board.result(job)


def _global(request: Request, models: list[tuple[str, str, str]], root: Path, layer: int, threshold: float | None,
            job: Job) -> list[tuple[str, Run]]:
    options = EvidenceOptions(layer=layer, threshold=threshold, capture=CaptureOptions(side=request.side))
    runs = []
    try:
        for name, weights, label in models:
            runs.append((label, global_probe_run(engine(), root, name, weights_path(weights), options,
                                                 progress=lambda done, total: job.report(done, total, label))))
    except DataError as error:  # the page names the folder, never its server path
        raise DataError(str(error).replace(str(root), root.name)) from error
    return runs


def global_probe_rows(runs: list[tuple[str, Run]], reference: dict[str, float]) -> list[dict]:
    """One table row per model and token kind: accuracy, counts, the paper's number, or why it was not run."""
    rows = []
    for label, run in runs:
        found: GlobalProbeResult = run.result
        for kind, score in found.scores.items():
            rows.append({"model": label, "token": kind, "accuracy": score.accuracy, "images": score.num_images,
                         "train / test": f"{score.num_train} / {score.num_test}", "classes": score.num_classes,
                         "paper (ImageNet-1k)": reference[kind]})
    return rows


@dataclass(frozen=True, eq=False)
class LostView:
    """LOST per model on one image: the picture with box and seed, and the numbers."""

    pictures: list[tuple[str, Image.Image, Discovery]]
    table: Table


def lost_view(request: Request, ref: str, layer: int, features: str, k: int) -> LostView:
    """LOST on ``ref`` for every model of the request (a background job; raises ``Pending`` meanwhile)."""
    models = [(run.choice.name, run.weights, run.short) for run in captured(request).runs  # weights after any offline fallback
              if not run.choice.register]  # LOST runs the plain model: the test-time register column is left out
    board = boards()["capture"]
    key = f"lost|{request.key}|{models}|{ref}|{layer}|{features}|{k}"
    job = board.run(key, f"LOST on {image_name(ref)}", lambda job: _lost(request, models, ref, layer, features, k, job))
    return board.result(job)


def _lost(request: Request, models: list[tuple[str, str, str]], ref: str, layer: int, features: str, k: int,
          job: Job) -> LostView:
    picture = image(ref).image
    pictures, rows = [], []
    for index, (name, weights, label) in enumerate(models):
        job.report(index, len(models), name)
        loaded = engine().model(name, weights_path(weights))
        found = discover(loaded, picture, request.side, layer, features, k)
        pictures.append((label, draw_discovery(picture, found), found))
        rows.append([name, weights, image_name(ref), layer, features, k, *found.box, *found.result.seed])
    columns = ["model", "weights", "image", "layer", "features", "k", "x0", "y0", "x1", "y1", "seed_row", "seed_col"]
    return LostView(pictures, Table(columns, rows))


def report_html(request: Request, layer: int, threshold: float | None) -> bytes:
    """The HTML report of the sidebar's model on the request's images (a background job)."""
    run = captured(request).primary  # the sidebar's model, not the first drawn
    board = boards()["capture"]
    key = f"report|{request.key}|{run.weights}|{layer}|{threshold}"
    job = board.run(key, "Building the report", lambda job: _report(request, run.choice.name, run.weights, layer, threshold, job))
    return board.result(job)


def _report(request: Request, name: str, weights: str, layer: int, threshold: float | None, job: Job) -> bytes:
    options = ReportOptions(evidence=EvidenceOptions(layer=layer, threshold=threshold,
                                                     capture=CaptureOptions(side=request.side)), lost_layer=-1)
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary) / "images"
        folder.mkdir()
        for number, ref in enumerate(request.images):
            image(ref).image.save(folder / f"{number:03d}_{Path(image_name(ref)).stem}.png")
        steps = iter(range(10))
        page = build_report(engine(), name, weights_path(weights), folder, options,
                            progress=lambda step: job.report(next(steps), 5, step))
    return page.encode("utf-8")
