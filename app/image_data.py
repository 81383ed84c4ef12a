"""View models of the per-image pages (norm maps, histogram, emergence, attention, embedding).

Each page calls one function here with the sidebar's request; it returns what the page draws
(figure inputs from ``figures`` and a ``Table`` for download), or raises ``Pending`` while the
captures run.
"""
from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import streamlit as st

import figures
import grid_image
import intervention_data
from captures import Captured, Request, captured, check_layer, outliers_of
from choices import weights_label
from figures import EmergenceCurve, NormHistogram, Overlay, Table
from jobs import Job, boards, watch
from uploads import display_uri, image, image_name
from vitlens.analysis.attention import (ClsOutlierAttention, PatchAttention, attention_maps, cls_outlier_attention,
                                        head_maps, input_outlier_mask, patch_attention, pool_attention_map)
from vitlens.analysis.embedding import TokenEmbedding, token_embedding
from vitlens.analysis.outliers import OutlierResult, find_outliers
from vitlens.capture import Trace

STATES_BUDGET = 20_000  # layers x tokens: up to this, an embedding capture keeps every layer's vectors


def _post_norm_outliers(trace: Trace) -> OutlierResult:
    return find_outliers(trace.patch_norms(post_norm=True))


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
    for run, colour in zip(result.runs, result.colours):
        trace = run.traces[index]
        check_layer(layer, trace.num_layers)
        if post_norm:
            values, outliers = trace.patch_norms(post_norm=True), _post_norm_outliers(trace)
            where = "output, after the final norm"
        else:
            values, outliers = trace.patch_norms()[layer], outliers_of(run, index, threshold).layer(layer)
            where = f"layer {layer}"
        threshold_text = "no high mode" if outliers.threshold is None else f"threshold {outliers.threshold:.4g}"
        title = (f"{run.name}<br><sup>{weights_label(run.weights, run.trained_registers > 0)}<br>"
                 f"{where} · {outliers.count} outliers ({threshold_text}) · {run.num_registers} registers</sup>")
        overlays.append(Overlay(title=title, values=values, image=display_uri(ref, trace), mask=outliers.mask, colorbar=kind,
                                colour=colour))
        found.append(outliers)
        for (row, col), value in np.ndenumerate(values):
            rows.append([run.name, run.weights, image_name(ref), "post" if post_norm else layer, row, col,
                         float(value), bool(outliers.mask[row, col])])
    table = Table(["model", "weights", "image", "layer", "row", "col", "norm", "outlier"], rows)
    return NormMaps(overlays=overlays, outliers=found, table=table)


def comparison_grid(request: Request, layer: int, threshold: float | None, shared_scale: bool, cell_px: int = 240,
                    opacity: float = 0.6) -> grid_image.ComparisonGrid:
    """Every chosen image (rows) by every model of the request at one layer, outliers outlined, drawable as
    PNG or SVG. Columns: without registers, with trained registers, with a test-time register."""
    result = captured(request)
    runs = result.runs  # in drawing order (captures.in_drawing_order)
    cells = []
    for index, ref in enumerate(request.images):
        picture = image(ref).image
        row = []
        for run in runs:
            trace = run.traces[index]
            check_layer(layer, trace.num_layers)
            row.append(grid_image.GridCell(values=trace.patch_norms()[layer], mask=outliers_of(run, index, threshold).layer(layer).mask,
                                           picture=picture))
        cells.append(row)
    scale = "one colour scale" if shared_scale else "one colour scale per model"
    return grid_image.ComparisonGrid(
        title=f"Token norms after block {layer} (pre-final-norm), {request.side} px input; outliers outlined; {scale}",
        row_labels=[image_name(ref) for ref in request.images],
        column_labels=[run.name for run in runs],
        column_notes=[f"{weights_label(run.weights, run.trained_registers > 0)} · {run.num_registers} registers"
                      for run in runs],
        cells=cells, colorbar=f"token norm (pre-final-norm), layer {layer}", shared_scale=shared_scale,
        aspects=[trace.input_size[0] / trace.input_size[1] for trace in runs[0].traces],
        file_stem=grid_image.file_stem(["vitlens_norm_grid", "_vs_".join(run.name for run in runs),
                                        f"layer{layer}", f"{request.side}px", "shared" if shared_scale else "split"]),
        cell_px=cell_px, opacity=opacity, column_colours=result.colours)


@st.cache_data(max_entries=16, show_spinner=False)
def _grid_png(key: str, layer: int, threshold: float | None, shared_scale: bool, cell_px: int, opacity: float,
              _request: Request) -> bytes:
    return grid_image.to_png(comparison_grid(_request, layer, threshold, shared_scale, cell_px, opacity))


def comparison_grid_png(request: Request, layer: int, threshold: float | None, shared_scale: bool, cell_px: int = 240,
                        opacity: float = 0.6) -> bytes:
    """``comparison_grid`` as a PNG, kept for reruns that do not change it (a large grid takes seconds)."""
    return _grid_png(request.key, layer, threshold, shared_scale, cell_px, opacity, request)


@dataclass(frozen=True, eq=False)
class HistogramView:
    histograms: list[NormHistogram]
    table: Table


def histogram(request: Request, layers: Sequence[int], post_norm: bool, threshold: float | None,
              per_image: bool = False) -> HistogramView:
    """Patch-token norms of the chosen layers over all chosen images, pooled per model.

    ``auto`` finds the threshold on the pooled norms of each model or, with ``per_image``, on each
    image's own grid of each layer (the counts add up). After the final norm it is always ``auto``.
    """
    result = captured(request)
    histograms, rows = [], []
    for run in result.runs:
        grids = [trace.patch_norms(post_norm=True)[None] if post_norm
                 else trace.patch_norms()[[check_layer(l, trace.num_layers) for l in layers]] for trace in run.traces]
        cut = None if post_norm else threshold
        hist = _per_image_histogram(run.short, grids, cut) if per_image else _pooled_histogram(run.short, grids, cut)
        histograms.append(dataclasses.replace(hist, role=run.role))
        rows.append([run.name, run.weights, "post" if post_norm else " ".join(map(str, layers)), hist.norms.size,
                     hist.threshold, hist.count, hist.fraction, float(np.median(hist.norms)), float(hist.norms.max()),
                     hist.reason])
    table = Table(["model", "weights", "layers", "tokens", "threshold", "outliers", "fraction", "median", "max", "decision"],
                  rows)
    return HistogramView(histograms=histograms, table=table)


def _pooled_histogram(label: str, grids: list[np.ndarray], threshold: float | None) -> NormHistogram:
    """One threshold for every image's norms (``grids``: per image, [layer, row, col])."""
    norms = np.concatenate([grid.ravel() for grid in grids])
    found = find_outliers(norms[None], threshold)
    return NormHistogram(label=label, norms=norms, threshold=found.threshold, reason=found.decision.reason)


def _per_image_histogram(label: str, grids: list[np.ndarray], threshold: float | None) -> NormHistogram:
    """Each image's grid of each layer thresholded on its own; the outliers add up."""
    found = [find_outliers(layer_grid, threshold) for grid in grids for layer_grid in grid]
    cuts = [f.threshold for f in found if f.threshold is not None]
    flagged = sum(f.count for f in found)
    span = f" (thresholds {min(cuts):.4g} to {max(cuts):.4g})" if cuts else ""
    reason = (f"each image's grid thresholded on its own: {len(cuts)} of {len(found)} have a separate high mode"
              f"{span}; {flagged} outliers in all")
    norms = np.concatenate([grid.ravel() for grid in grids])
    return NormHistogram(label=label, norms=norms, threshold=None, reason=reason, flagged=flagged)


def histogram_values(request: Request, layers: Sequence[int], post_norm: bool) -> Table:
    """Every pooled norm, for download."""
    result = captured(request)
    rows = []
    for run in result.runs:
        for ref, trace in zip(request.images, run.traces):
            grids = {"post": trace.patch_norms(post_norm=True)} if post_norm else {l: trace.patch_norms()[l] for l in layers}
            for layer, grid in grids.items():
                rows += [[run.name, image_name(ref), layer, r, c, float(v)] for (r, c), v in np.ndenumerate(grid)]
    return Table(["model", "image", "layer", "row", "col", "norm"], rows)


@dataclass(frozen=True, eq=False)
class EmergenceView:
    curves: list[EmergenceCurve]
    table: Table


def emergence(request: Request, ref: str | None, threshold: float | None) -> EmergenceView:
    """Per layer outlier count/share, max/median patch norm, CLS and mean register norm, for one
    image or the whole selection (norms of CLS and registers: mean over the images)."""
    result = captured(request)
    indices = range(len(request.images)) if ref is None else [request.images.index(ref)]
    curves, rows = [], []
    for run in result.runs:
        found = [outliers_of(run, i, threshold) for i in indices]
        traces = [run.traces[i] for i in indices]
        depth = min(trace.num_layers for trace in traces)
        count = sum(f.counts[:depth] for f in found).astype(np.int64)
        patches = sum(trace.layout.num_patches for trace in traces)
        flat = np.concatenate([trace.norms[:depth, trace.layout.patches] for trace in traces], axis=1)  # [layer, patch]
        cls_norm, register_norm = _prefix_norms(traces, depth)
        curve = EmergenceCurve(label=run.short, count=count, fraction=count / patches, norm_max=flat.max(axis=1),
                               norm_median=np.median(flat, axis=1), cls_norm=cls_norm, register_norm=register_norm,
                               role=run.role)
        curves.append(curve)
        rows += [[run.name, run.weights, layer, int(count[layer]), float(curve.fraction[layer]),
                  float(curve.norm_max[layer]), float(curve.norm_median[layer]),
                  None if cls_norm is None else float(cls_norm[layer]),
                  None if register_norm is None else float(register_norm[layer])] for layer in range(depth)]
    table = Table(["model", "weights", "layer", "outliers", "fraction", "norm_max", "norm_median", "cls_norm",
                   "register_norm"], rows)
    return EmergenceView(curves=curves, table=table)


def _prefix_norms(traces: Sequence[Trace], depth: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """CLS norm and mean register norm per layer, averaged over the traces; None where the model has none.

    Returns:
        CLS norms  # [layer]
        and register norms  # [layer]
    """
    layout = traces[0].layout
    cls = None if layout.cls_index is None else np.mean([t.norms[:depth, layout.cls_index] for t in traces], axis=0)
    registers = (None if layout.num_registers == 0
                 else np.mean([t.norms[:depth, layout.registers].mean(axis=1) for t in traces], axis=0))
    return cls, registers


@dataclass(frozen=True, eq=False)
class AttentionPanel:
    """One model's query attention maps for one image and layer, and CLS's attention on outliers.

    Attributes:
        note: What this model has to show, when it is not CLS and registers (e.g. only an
            attention-pool query, or no query at all); None otherwise.
    """

    label: str
    overlays: list[Overlay]
    num_registers: int
    cls_mass: ClsOutlierAttention | None
    note: str | None = None
    role: str | None = None


@dataclass(frozen=True, eq=False)
class AttentionView:
    panels: list[AttentionPanel]
    table: Table


def attention(request: Request, ref: str, layer: int, head: int | None, threshold: float | None) -> AttentionView:
    """Attention maps of CLS, each register and an attention-pool query over the patches, per model."""
    result = captured(request)
    index = request.images.index(ref)
    panels, rows = [], []
    compared_with_registers = any(run.num_registers for run in result.runs)
    for run, colour in zip(result.runs, result.colours):
        trace = run.traces[index]
        check_layer(layer, trace.num_layers)
        found = outliers_of(run, index, threshold)
        queries = [(maps, input_outlier_mask(found, layer), _head_text(head)) for maps in [attention_maps(trace, layer, head)]]
        pool_head = head if head is not None and head < _pool_heads(trace) else None
        pool = pool_attention_map(trace, pool_head)
        if pool is not None:
            queries.append((pool, found.masks[-1], f"after the last block, {_head_text(pool_head, _pool_heads(trace))}"))
        overlays = [Overlay(title=f"<b>{name}</b> ({maps.patch_mass[i]:.0%} on patches)<br><sup>{run.name}</sup>",
                            values=maps.maps[i], image=display_uri(ref, trace), mask=mask,
                            colorbar=f"attention (layer {layer}, {_head_text(head)})", value_name="attention", colour=colour)
                    for maps, mask, _ in queries for i, name in enumerate(maps.names)]
        mass = cls_outlier_attention(trace, found, head) if trace.layout.cls_index is not None else None
        panels.append(AttentionPanel(label=run.short, overlays=overlays, num_registers=run.num_registers, cls_mass=mass,
                                     note=_queries_note(run.name, trace, compared_with_registers),
                                     role=run.role))
        rows += [[run.name, image_name(ref), maps.layer, text, name, r, c, float(v)]
                 for maps, _, text in queries for i, name in enumerate(maps.names) for (r, c), v in np.ndenumerate(maps.maps[i])]
    table = Table(["model", "image", "layer", "head", "query", "row", "col", "attention"], rows)
    return AttentionView(panels=panels, table=table)


PATCH_QUERY = "patch"  # the heads grid's query: the clicked patch (full attention of the block)


@dataclass(frozen=True, eq=False)
class HeadsPanel:
    """Every head of one block for one model: where the query looks and, for a patch, who looks at it.

    Attributes:
        gives: Per head, the query's attention over the patches.
        gets: Per head, every patch's attention to the chosen patch (patch query only, else empty).
        patch: The chosen patch's attention to and from the prefix tokens (patch query only).
        note: Why this model shows nothing (e.g. it has no such register), or None.
    """

    label: str
    gives: list[Overlay]
    gets: list[Overlay]
    patch: PatchAttention | None = None
    note: str | None = None


@dataclass(frozen=True, eq=False)
class HeadsView:
    panels: list[HeadsPanel]
    table: Table


def cell_at(position: tuple[float, float], grid: tuple[int, int]) -> tuple[int, int]:
    """The patch (row, col) at a relative position (y, x in [0, 1]) of a grid: the same place in models
    with different grids."""
    return (min(int(position[0] * grid[0]), grid[0] - 1), min(int(position[1] * grid[1]), grid[1] - 1))


def position_from_selection(selection: dict, grid: tuple[int, int]) -> tuple[float, float] | None:
    """The relative position (y, x) of the first clicked heat-map cell of a plotly selection, or None."""
    for point in selection.get("points", []):
        x, y = point.get("x"), point.get("y")
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and float(x).is_integer() and float(y).is_integer():
            return ((min(max(int(y), 0), grid[0] - 1) + 0.5) / grid[0], (min(max(int(x), 0), grid[1] - 1) + 0.5) / grid[1])
    return None


def heads(request: Request, ref: str, layer: int, query: str, position: tuple[float, float],
          threshold: float | None) -> HeadsView:
    """All heads of block ``layer``: a prefix query's maps (outliers of the block's input outlined), or, for
    ``PATCH_QUERY``, what the patch at ``position`` attends to and who attends to it (full attention)."""
    result = captured(request)
    index = request.images.index(ref)
    panels, rows = [], []
    for run in result.runs:
        trace = run.traces[index]
        check_layer(layer, trace.num_layers)
        picture = display_uri(ref, trace)
        title = f"attention in block {layer}"
        if query == PATCH_QUERY:
            weights, layout = intervention_data.block_attention(request, run.choice, run.weights, ref, layer)
            found = patch_attention(weights.astype(np.float32), layout, layer, cell_at(position, layout.grid))
            mask = np.zeros(layout.grid, dtype=bool)
            mask[found.cell] = True
            chosen = dict(image=picture, mask=mask, colorbar=title, value_name="attention", mask_name="the chosen patch")
            gives = [Overlay(f"head {h} · {found.gives_prefix[h].sum():.0%} to prefix", found.gives[h], **chosen)
                     for h in range(len(found.gives))]
            gets = [Overlay(f"head {h}", found.gets[h], **chosen) for h in range(len(found.gets))]
            panels.append(HeadsPanel(run.name, gives, gets, found))
            grids = {"gives": found.gives, "gets": found.gets}
        elif query not in trace.layout.prefix_names():
            panels.append(HeadsPanel(run.name, [], [], note=f"{run.name} has no '{query}' token."))
            continue
        else:
            maps = head_maps(trace, layer, query)  # [head, row, col]
            mask = input_outlier_mask(outliers_of(run, index, threshold), layer)
            gives = [Overlay(f"head {h} · {maps[h].sum():.0%} on patches", maps[h], image=picture, mask=mask, colorbar=title,
                             value_name="attention") for h in range(len(maps))]
            panels.append(HeadsPanel(run.name, gives, []))
            grids = {"gives": maps}
        rows += [[run.name, image_name(ref), layer, query, direction, h, r, c, float(v)]
                 for direction, grid in grids.items() for (h, r, c), v in np.ndenumerate(grid)]
    table = Table(["model", "image", "layer", "query", "direction", "head", "row", "col", "attention"], rows)
    return HeadsView(panels=panels, table=table)


def _head_text(head: int | None, num_heads: int | None = None) -> str:
    if head is not None:
        return f"head {head}"
    return "mean over heads" if num_heads is None else f"mean over its {num_heads} heads"


def _pool_heads(trace: Trace) -> int:
    return 0 if trace.pool_attention is None else trace.pool_attention.shape[0]


def _queries_note(name: str, trace: Trace, compared_with_registers: bool) -> str | None:
    """What there is to see for a model without the usual CLS-and-registers prefix; None when it has them
    (a model with registers is suggested unless one is already on the page)."""
    layout, pool = trace.layout, trace.pool_attention is not None
    pool_text = (" Its attention-pool head's query (what the model pools the image with, reading the last block's "
                 "output) is shown instead, with the last block's outliers outlined.")
    if layout.num_prefix == 0:
        return f"{name} has no class token and no registers, so no token queries the others." + (
            pool_text if pool else " It has no attention-pool head either: there is no attention map to show.")
    if layout.num_registers == 0:
        return (f"{name} has no register tokens, so only CLS attention is shown"
                + (" with its attention-pool query." if pool else ".")
                + ("" if compared_with_registers else
                   " Choose a model with registers (for example dinov2_vits14_reg4) to see what registers attend to."))
    return None


def state_layers_for(result: Captured, layer: int) -> tuple[int, ...]:
    """Which layers' token vectors an embedding capture keeps: all of them when that is small."""
    tokens = max(trace.layout.num_tokens for run in result.runs for trace in run.traces)
    depth = result.num_layers
    return tuple(range(depth)) if depth * tokens <= STATES_BUDGET else (layer,)


@st.cache_data(max_entries=64, show_spinner=False)
def _pca(ids: tuple[str, ...], layer: int, threshold: float | None, normalize: bool,
         _traces: tuple[Trace, ...]) -> TokenEmbedding:
    return token_embedding(list(_traces), layer, "pca", threshold, normalize=normalize)


@dataclass(frozen=True, eq=False)
class EmbeddingView:
    label: str
    weights: str  # what the weights are, in words
    embedding: TokenEmbedding
    image_names: list[str]
    image_refs: list[str]
    colour: str | None = None  # the model's (figures.model_colours)


@dataclass(frozen=True, eq=False)
class EmbeddingViews:
    """One embedding per model of the request (drawn side by side) and the numbers of all of them."""

    views: list[EmbeddingView]
    table: Table


def embeddings(request: Request, layer: int, method: str, threshold: float | None, normalize: bool) -> EmbeddingViews:
    """PCA (instant) or UMAP (background jobs, all queued at once) of one layer's tokens over the chosen
    images, for every model of the request; ``normalize``: unit-length tokens first (cosine geometry)."""
    plain = captured(request)
    check_layer(layer, plain.num_layers)
    result = captured(request, state_layers_for(plain, layer))
    if method == "pca":
        found = [_pca(run.ids, layer, threshold, normalize, run.traces) for run in result.runs]
    else:
        board = boards()["analysis"]
        jobs = [watch(board.run(f"umap|{run.ids}|{layer}|{threshold}|{normalize}", f"UMAP of {run.name} layer {layer}",
                                lambda job, run=run: _umap(job, run.traces, layer, threshold, normalize)))
                for run in result.runs]
        found = [board.result(job) for job in jobs]
    names = [image_name(ref) for ref in request.images]
    rows = []
    for run, emb in zip(result.runs, found):
        rows += [[run.name, names[i], r, c, float(n), bool(o), float(x), float(y)]
                 for i, r, c, n, o, (x, y) in zip(emb.image, emb.row, emb.col, emb.norm, emb.outlier, emb.coords)]
        rows += [[run.name, names[i], None, None, None, name, float(x), float(y)]
                 for i, name, (x, y) in zip(emb.prefix_image, emb.prefix_names, emb.prefix_coords)]
    table = Table(["model", "image", "row", "col", "norm", "outlier_or_token", "x", "y"], rows)
    views = [EmbeddingView(label=run.name, weights=weights_label(run.weights, run.trained_registers > 0), embedding=emb,
                           image_names=names, image_refs=list(request.images), colour=colour)
             for run, emb, colour in zip(result.runs, found, result.colours)]
    return EmbeddingViews(views=views, table=table)


def picked_cell(request: Request, layer: int, threshold: float | None,
                picked: tuple[int, int, int, int] | None) -> Overlay | None:
    """The norm map of the clicked point's model and image with only its cell outlined; None when
    nothing is picked (or the pick no longer fits the request)."""
    if picked is None or len(picked) != 4 or picked[0] >= len(request.models) or picked[1] >= len(request.images):
        return None
    model, image_index, row, col = picked
    ref = request.images[image_index]
    overlay = norm_maps(request, ref, layer, False, threshold).overlays[model]
    if not (0 <= row < overlay.grid[0] and 0 <= col < overlay.grid[1]):
        return None
    mask = np.zeros_like(overlay.mask)
    mask[row, col] = True
    name = captured(request).runs[model].label
    return Overlay(title=f"{name}<br><sup>{image_name(ref)}: row {row}, col {col} (layer {layer})</sup>",
                   values=overlay.values, image=overlay.image, mask=mask, colorbar=overlay.colorbar, colour=overlay.colour,
                   mask_name="the picked cell")


def _umap(job: Job, traces: tuple[Trace, ...], layer: int, threshold: float | None, normalize: bool) -> TokenEmbedding:
    points = sum(trace.layout.num_tokens for trace in traces)
    job.report(0, 0, f"UMAP of {points} tokens (the first run also compiles UMAP, about half a minute)")
    return token_embedding(list(traces), layer, "umap", threshold, normalize=normalize)


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
                prefix + "final_norms": trace.final_norms_or_nan(),
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
