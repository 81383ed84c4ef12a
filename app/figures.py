"""Plotly figures of the dashboard: pure functions from results to figures (no streamlit here).

Grids are drawn in cell coordinates: x is the patch column, y the patch row (0 at the top), so
hover shows row and col directly and the picture is stretched under the cells it was cut into.
Grid figures get a fixed pixel width and a height computed from the grid's aspect ratio, so the
map fills its plot area and a colour bar as tall as the plot area is as tall as the map (the
app draws them at that width). Layers are 0-based block indices everywhere, as in the CLI.
"""
from __future__ import annotations

import base64
import csv
import io
import itertools
import textwrap
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import plotly.graph_objects as go
from PIL import Image
from plotly.colors import get_colorscale, hex_to_rgb
from plotly.subplots import make_subplots

from vitlens.analysis.attention import ClsOutlierAttention, PatchAttention
from vitlens.analysis.embedding import TokenEmbedding

HEAT = [[position, f"rgb{hex_to_rgb(colour)}"] for position, colour in get_colorscale("Inferno")]  # rgb(): plotly.js misreads "#000004"
OUTLINE = "#00e5ff"  # cyan: stands out on every colour of Inferno
WITHOUT_REGISTERS = "without registers"
WITH_REGISTERS = "with registers"
TEST_TIME_REGISTER = "with test-time register"
ROLES = (WITHOUT_REGISTERS, WITH_REGISTERS, TEST_TIME_REGISTER)  # the order models are drawn in: first (left) to last
ROLE_COLOURS = {WITHOUT_REGISTERS: "#d62728", WITH_REGISTERS: "#1f77b4", TEST_TIME_REGISTER: "#2ca02c"}  # on every page
OTHER_COLOURS = ("#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")  # a second model of one role, series
NORMAL_COLOUR = "#8da0cb"
OUTLIER_COLOUR = "#e41a1c"
CLS_COLOUR = "#111111"
REGISTER_COLOUR = "#1b9e77"
IMAGE_COLOURS = ("#4c78a8", "#f58518", "#54a24b", "#b279a2", "#9d755d", "#72b7b2", "#bab0ac", "#eeca3b")
IMAGE_SYMBOLS = ("circle", "square", "diamond", "triangle-up", "cross", "triangle-down", "pentagon", "hexagon")
COLOURBAR_PX = 80  # what a vertical colour bar with tick labels and a title takes beside the plot
OWN_BAR_PX = 76  # what a thin per-map colour bar with 9-px tick labels (up to 9 characters) takes beside its map
LEGEND_ROW_PX = 40  # height added per legend entry below a plot (two lines of a wrapped entry)
LEGEND_LINE_PX = 16  # height added per one-line legend entry below a plot
LEGEND_CHARS = 34  # a legend line this long fits beside its symbol in a phone-wide (390 px) chart at plotly's 12-px font
ANNOTATION_CHARS = 40  # a subplot title (16-px font) this long fits a phone-wide chart
DOWNLOAD_CONFIG = {"displaylogo": False, "toImageButtonOptions": {"format": "png", "scale": 2}}


def role_of(num_registers: int, test_time_register: bool = False) -> str:
    """A model's role in a comparison: run with a test-time register, with trained registers, or without."""
    if test_time_register:
        return TEST_TIME_REGISTER
    return WITH_REGISTERS if num_registers else WITHOUT_REGISTERS


def role_rank(role: str | None) -> int:
    """Where a model of this role is drawn among the compared ones: in ``ROLES`` order, no role last."""
    return ROLES.index(role) if role in ROLES else len(ROLES)


def model_colours(roles: Sequence[str | None]) -> list[str]:
    """One colour per model: the first model of each role gets its role's colour (the same on every page);
    a second model of a role, or a series without one (layers, results folders), the other colours in turn."""
    colours, seen, others = [], set(), itertools.cycle(OTHER_COLOURS)
    for role in roles:
        fixed = role in ROLE_COLOURS and role not in seen
        colours.append(ROLE_COLOURS[role] if fixed else next(others))
        seen.add(role)
    return colours


def fit_narrow(fig: go.Figure) -> go.Figure:
    """Break long legend entries, legend group titles and annotations (subplot titles) into lines, so that
    a phone-wide chart shows them whole."""
    for trace in fig.data:
        if trace.showlegend is not False:
            trace.name = _lines(trace.name, LEGEND_CHARS)
        if trace.legendgrouptitle.text:
            trace.legendgrouptitle.text = _lines(trace.legendgrouptitle.text, LEGEND_CHARS)
    for annotation in fig.layout.annotations:
        annotation.text = _lines(annotation.text, ANNOTATION_CHARS)
    return fig


def _lines(text: str | None, chars: int) -> str | None:
    """``text`` broken at spaces into lines of at most ``chars`` characters, unless it has its own line breaks."""
    if not text or len(text) <= chars or "<br>" in text:
        return text
    return "<br>".join(textwrap.wrap(text, chars, break_long_words=False))


def norm_label(post_norm: bool) -> str:
    """What a norm value is, for titles and colour bars."""
    return "token norm (post-final-norm)" if post_norm else "token norm (pre-final-norm)"


def image_uri(image: Image.Image, max_side: int = 448) -> str:
    """The picture as a JPEG data URI no larger than ``max_side`` (for figure backgrounds)."""
    scale = min(1.0, max_side / max(image.size))
    if scale < 1.0:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=88)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


@dataclass(frozen=True, eq=False)
class Overlay:
    """One grid of values to draw over one picture.

    Attributes:
        title: Panel title.
        values: One value per patch.  # [row, col]
        image: Picture (``image_uri``) stretched under the grid, or None.
        mask: Cells to outline (outliers), or None.  # [row, col]
        colorbar: Colour bar title: what the values are.
        value_name: Name of the value in the hover text.
        colour: Title colour: the model's (``model_colours``), or None for the default.
        mask_name: What the outlined cells are (legend).
    """

    title: str
    values: np.ndarray
    image: str | None = None
    mask: np.ndarray | None = None
    colorbar: str = "token norm (pre-final-norm)"
    value_name: str = "norm"
    colour: str | None = None
    mask_name: str = "outlier cells"

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.values.shape[0]), int(self.values.shape[1])


def outline_path(mask: np.ndarray) -> tuple[list[float | None], list[float | None]]:
    """x and y of closed squares around the True cells, separated by None (one scatter trace)."""
    xs: list[float | None] = []
    ys: list[float | None] = []
    for row, col in np.argwhere(mask):
        xs += [col - 0.5, col + 0.5, col + 0.5, col - 0.5, col - 0.5, None]
        ys += [row - 0.5, row - 0.5, row + 0.5, row + 0.5, row - 0.5, None]
    return xs, ys


def _cell_axes(fig: go.Figure, grid: tuple[int, int], row: int | None = None, col: int | None = None, anchor: str = "x") -> None:
    rows, cols = grid
    fig.update_xaxes(range=[-0.5, cols - 0.5], showgrid=False, zeroline=False, constrain="domain",
                     title_text="col", row=row, col=col)
    fig.update_yaxes(range=[rows - 0.5, -0.5], showgrid=False, zeroline=False, scaleanchor=anchor,
                     constrain="domain", title_text="row", row=row, col=col)


def shared_range(overlays: Sequence[Overlay], top: float = 1.0) -> tuple[float, float]:
    """One colour range for maps that are compared: the lowest value of all of them to their ``top`` quantile
    (1: the highest; below 1, a few hot cells do not wash out the rest)."""
    values = np.concatenate([o.values.ravel() for o in overlays])
    high = float(np.nanmax(values) if top >= 1.0 else np.nanquantile(values, top))
    return float(np.nanmin(values)), high


def scale_ticks(low: float, high: float, count: int = 3) -> tuple[list[float], list[str]]:
    """``count`` evenly spaced tick values from ``low`` to ``high`` and labels with just enough significant
    digits (2 to 6) to tell them apart; one tick when the range is empty."""
    if not high > low:
        return [low], [f"{low:.3g}"]
    values = list(np.linspace(low, high, count))
    for digits in range(2, 7):
        labels = [f"{value:.{digits}g}" for value in values]
        if len(set(labels)) == len(labels):
            return values, labels
    return values, labels


def _overlay_traces(overlay: Overlay, opacity: float, coloraxis: str | None, show_outline_legend: bool,
                    scale: tuple[float, float] | None = None, hover: bool = True) -> list[go.BaseTraceType]:
    rows, cols = overlay.grid
    heat = go.Heatmap(
        z=overlay.values, x=np.arange(cols), y=np.arange(rows), opacity=opacity, name=overlay.title,
        hovertemplate=f"row %{{y}}, col %{{x}}<br>{overlay.value_name} %{{z:.4g}}<extra></extra>",
    )
    if not hover:
        heat.update(hoverinfo="skip", hovertemplate=None)
    traces: list[go.BaseTraceType] = [heat]
    if coloraxis:
        heat.update(coloraxis=coloraxis)
    else:  # the colour bar comes from an invisible trace, so the heat map's opacity does not fade it
        low, high = scale or (float(np.nanmin(overlay.values)), float(np.nanmax(overlay.values)))
        heat.update(colorscale=HEAT, zmin=low, zmax=high, showscale=False)
        traces.append(go.Scatter(
            x=[None], y=[None], mode="markers", hoverinfo="skip", showlegend=False, name="colour bar",
            marker=dict(colorscale=HEAT, cmin=low, cmax=high, color=[low], showscale=True,
                        colorbar=dict(title=dict(text=overlay.colorbar, side="right"), thickness=14, len=1,
                                      lenmode="fraction", y=0.5, yanchor="middle"))))
    if overlay.mask is not None and overlay.mask.any():
        xs, ys = outline_path(overlay.mask)
        traces.append(go.Scatter(x=xs, y=ys, mode="lines", line=dict(color=OUTLINE, width=2.5), name=overlay.mask_name,
                                 hoverinfo="skip", showlegend=show_outline_legend, legendgroup="outliers"))
    return traces


def _background(overlay: Overlay, xref: str = "x", yref: str = "y") -> dict:
    rows, cols = overlay.grid
    return dict(source=overlay.image, xref=xref, yref=yref, x=-0.5, y=-0.5, sizex=cols, sizey=rows,
                sizing="stretch", xanchor="left", yanchor="top", layer="below")


def grid_plot_height(grid: tuple[int, int], plot_width: float) -> float:
    """Height in pixels of a plot area ``plot_width`` wide that shows ``grid`` with square cells."""
    rows, cols = grid
    return plot_width * rows / cols


def overlay_figure(overlay: Overlay, opacity: float = 0.6, width: int = 460, max_height: int = 900,
                   scale: tuple[float, float] | None = None, stretch: bool = False) -> go.Figure:
    """A heat map over its picture, outlier cells outlined, hover with row, col and value.

    The figure is ``width`` pixels wide and as tall as square cells need (at most ``max_height``).
    ``scale``: the colour range (low, high), e.g. ``shared_range`` of compared maps; None: the map's own.
    ``stretch``: no fixed width, the figure takes its container's (a narrower one shows the map smaller,
    still with square cells); the height is still the one for ``width``.
    """
    fig = go.Figure(_overlay_traces(overlay, opacity, None, show_outline_legend=True, scale=scale))
    if overlay.image:
        fig.add_layout_image(_background(overlay))
    _cell_axes(fig, overlay.grid)
    margin = dict(l=50, r=10, t=44 + 21 * overlay.title.count("<br>"), b=85)
    plot_height = grid_plot_height(overlay.grid, width - margin["l"] - margin["r"] - COLOURBAR_PX)
    height = int(min(max_height, max(160.0, plot_height) + margin["t"] + margin["b"]))
    fig.update_layout(title=dict(text=overlay.title, font=dict(color=overlay.colour)), width=None if stretch else width,
                      height=height, margin=margin,
                      legend=dict(orientation="h", yanchor="top", y=-45 / max(plot_height, 1), x=0),
                      plot_bgcolor="rgba(0,0,0,0)")
    return fig


def overlay_grid(overlays: Sequence[Overlay], opacity: float = 0.6, columns: int | None = None,
                 colorbar: str = "attention", width: int = 900, title: str | None = None,
                 shared_scale: bool = True, clickable: bool = False) -> go.Figure:
    """Several heat maps (same grid) side by side, ``width`` pixels wide, square cells.

    ``shared_scale``: one colour scale for all maps (from the lowest value to the 99.5th
    percentile of all of them), else each map its own (its minimum to its maximum) with a thin
    colour bar beside it. ``clickable``: a click on a cell is a selection event (the app reads it).
    """
    columns = columns or len(overlays)
    rows = -(-len(overlays) // columns)
    grid = overlays[0].grid
    margin = dict(l=10, r=COLOURBAR_PX + 10 if shared_scale else OWN_BAR_PX, t=70 if title else 40, b=40)
    plot_width = width - margin["l"] - margin["r"]
    gap, row_gap = (14 if shared_scale else OWN_BAR_PX), 44  # pixels between maps: a thin colour bar and its labels fit
    cell_width = (plot_width - gap * (columns - 1)) / columns
    cell_height = grid_plot_height(grid, cell_width)
    plot_height = rows * cell_height + (rows - 1) * row_gap
    fig = make_subplots(rows=rows, cols=columns, subplot_titles=[o.title.replace(" · ", "<br>") for o in overlays],
                        horizontal_spacing=gap / plot_width, vertical_spacing=row_gap / plot_height if rows > 1 else 0.0)
    fig.update_annotations(font_size=11)  # two short lines: three or four titles side by side fit a phone
    for annotation, overlay in zip(fig.layout.annotations, overlays):  # the subplot titles, in the models' colours
        annotation.font.color = overlay.colour
    for index, overlay in enumerate(overlays):
        row, col = index // columns + 1, index % columns + 1
        axis = "coloraxis" if shared_scale or index == 0 else f"coloraxis{index + 1}"
        for trace in _overlay_traces(overlay, opacity, axis, show_outline_legend=index == 0, hover=not clickable):
            fig.add_trace(trace, row=row, col=col)
        if clickable:
            fig.add_trace(_click_targets(overlay, cell_width / grid[1]), row=row, col=col)
        suffix = "" if index == 0 else str(index + 1)
        if overlay.image:
            fig.add_layout_image(_background(overlay, f"x{suffix}", f"y{suffix}"))
        _cell_axes(fig, overlay.grid, row=row, col=col, anchor=f"x{suffix}")
        fig.update_xaxes(showticklabels=False, title_text=None, row=row, col=col)
        fig.update_yaxes(showticklabels=False, title_text=None, row=row, col=col)
        if not shared_scale:
            fig.update_layout({axis: _own_scale(overlay, fig.layout[f"xaxis{suffix}"].domain, fig.layout[f"yaxis{suffix}"].domain)})
    if shared_scale:
        values = np.concatenate([o.values.ravel() for o in overlays])
        fig.update_layout(coloraxis=dict(colorscale=HEAT, cmin=float(values.min()), cmax=float(np.quantile(values, 0.995)),
                                         colorbar=dict(title=dict(text=colorbar, side="right"), thickness=14)))
    fig.update_layout(width=width, height=int(plot_height + margin["t"] + margin["b"]), margin=margin,
                      title=dict(text=title) if title else None, plot_bgcolor="rgba(0,0,0,0)",
                      legend=dict(orientation="h", yanchor="top", y=-8 / plot_height, x=0),
                      clickmode="event+select" if clickable else None)
    return fig


def _click_targets(overlay: Overlay, cell_px: float) -> go.Scatter:
    """Invisible square markers on every cell, carrying the hover: plotly selects scatter points on a click,
    not heat-map cells, so these make a click a selection of (x: col, y: row)."""
    rows, cols = overlay.grid
    grid_rows, grid_cols = np.divmod(np.arange(rows * cols), cols)
    return go.Scatter(x=grid_cols, y=grid_rows, mode="markers", name="cells", showlegend=False,
                      marker=dict(symbol="square", size=max(cell_px, 2.0), color="rgba(0,0,0,0)"),
                      customdata=overlay.values.ravel(), selected=dict(marker=dict(opacity=1)),
                      unselected=dict(marker=dict(opacity=1)),
                      hovertemplate=f"row %{{y}}, col %{{x}}<br>{overlay.value_name} %{{customdata:.4g}}<extra></extra>")


def _own_scale(overlay: Overlay, x_domain: Sequence[float], y_domain: Sequence[float]) -> dict:
    """A colour axis spanning one map's values, its thin colour bar just right of the map."""
    low, high = float(np.nanmin(overlay.values)), float(np.nanmax(overlay.values))
    values, labels = scale_ticks(low, high)
    return dict(colorscale=HEAT, cmin=low, cmax=high if high > low else low + 1e-9,
                colorbar=dict(x=x_domain[1] + 0.004, xanchor="left", y=(y_domain[0] + y_domain[1]) / 2, yanchor="middle",
                              len=y_domain[1] - y_domain[0], thickness=9, tickfont=dict(size=9), tickmode="array",
                              tickvals=values, ticktext=labels, outlinewidth=0))


@dataclass(frozen=True, eq=False)
class NormHistogram:
    """Pooled patch-token norms of one model and where its outliers start.

    Attributes:
        label: Model label.
        norms: Patch-token norms of the chosen layers and images.  # [token]
        threshold: Outlier threshold, or None when there is no high mode (or one per image).
        reason: How the threshold was chosen, in one sentence.
        flagged: Outliers when each image had its own threshold (None: ``threshold`` decides).
        role: The model's role (``ROLES``), which fixes its colour; None when it has none.
    """

    label: str
    norms: np.ndarray
    threshold: float | None
    reason: str = ""
    flagged: int | None = None
    role: str | None = None

    @property
    def count(self) -> int:
        if self.flagged is not None:
            return self.flagged
        return 0 if self.threshold is None else int((self.norms > self.threshold).sum())

    @property
    def fraction(self) -> float:
        return self.count / max(1, self.norms.size)


def histogram_edges(histograms: Sequence[NormHistogram], bins: int = 60) -> np.ndarray:
    """Common bin edges spanning every model's norms.  # [bins + 1]"""
    values = np.concatenate([h.norms.ravel() for h in histograms])
    low, high = float(values.min()), float(values.max())
    if high <= low:
        high = low + 1.0
    return np.linspace(low, high, bins + 1)


def histogram_figure(histograms: Sequence[NormHistogram], log_y: bool = True, bins: int = 60,
                     post_norm: bool = False, height: int = 460) -> go.Figure:
    """Overlaid histograms of patch-token norms with each model's threshold drawn.

    Every model's bars are translucent and outlined by a step line of its colour, so where the
    histograms overlap both stay visible. Each bar carries its bin edges as customdata, so a
    click on a bar can set the threshold.
    """
    edges = histogram_edges(histograms, bins)
    centres, widths = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    fig = go.Figure()
    for index, (hist, colour) in enumerate(zip(histograms, model_colours([h.role for h in histograms]))):
        counts, _ = np.histogram(hist.norms, bins=edges)
        fig.add_trace(go.Bar(
            x=centres, y=counts, width=widths, name=hist.label, marker_color=colour, opacity=0.35, legendgroup=hist.label,
            customdata=np.stack([edges[:-1], edges[1:]], axis=1).tolist(),  # lists: selection events return them as such
            hovertemplate="norm %{customdata[0]:.4g} to %{customdata[1]:.4g}<br>%{y} tokens<extra>%{fullData.name}</extra>",
        ))
        fig.add_trace(_step_outline(edges, counts, colour, hist.label, log_y))
        if hist.threshold is not None:
            right_half = hist.threshold > (edges[0] + edges[-1]) / 2  # write the label on the side with room
            fig.add_vline(x=hist.threshold, line=dict(color=colour, dash="dash", width=2),
                          annotation=dict(text=f"threshold {hist.threshold:.4g}:<br>{hist.count} outliers ({hist.fraction:.1%})",
                                          font=dict(color=colour), yanchor="top", y=1 - 0.13 * index,
                                          xanchor="right" if right_half else "left"))
    fig.update_layout(barmode="overlay", bargap=0, height=height + LEGEND_ROW_PX * len(histograms),
                      margin=dict(l=60, r=10, t=30, b=50), legend=dict(orientation="h", yanchor="top", y=-0.16, x=0),
                      clickmode="event+select")  # legend below: its entries take several lines on a phone
    pad = float(widths[0])
    fig.update_xaxes(title_text=f"patch {norm_label(post_norm)}", range=[float(edges[0]) - pad, float(edges[-1]) + pad])
    fig.update_yaxes(title_text="tokens" + (" (log scale)" if log_y else ""), type="log" if log_y else "linear",
                     dtick=1 if log_y else None)
    return fig


def _step_outline(edges: np.ndarray, counts: np.ndarray, colour: str, label: str, log_y: bool) -> go.Scatter:
    """The outline of a histogram: the top of every bin, joined where neighbours are drawn
    (on a log scale empty bins cannot be drawn, so the line breaks there)."""
    xs: list[float | None] = []
    ys: list[float | None] = []
    for low, high, count in zip(edges[:-1], edges[1:], counts):
        if log_y and count == 0:
            if xs and xs[-1] is not None:
                xs.append(None)
                ys.append(None)
            continue
        xs += [float(low), float(high)]
        ys += [float(count), float(count)]
    return go.Scatter(x=xs, y=ys, mode="lines", line=dict(color=colour, width=1.6), name=f"{label} (outline)",
                      legendgroup=label, showlegend=False, hoverinfo="skip")


@dataclass(frozen=True, eq=False)
class EmergenceCurve:
    """Per-layer outlier statistics of one model.

    Attributes:
        label: Model label.
        count: Outlier tokens per layer (summed over images).  # [layer]
        fraction: Outlier share of patch tokens per layer.  # [layer]
        norm_max: Largest patch-token norm per layer.  # [layer]
        norm_median: Median patch-token norm per layer.  # [layer]
        cls_norm: CLS token norm per layer (mean over images); None without a class token.  # [layer]
        register_norm: Mean register-token norm per layer (over registers and images); None
            without registers.  # [layer]
        role: The model's role (``ROLES``), which fixes its colour; None when it has none.
    """

    label: str
    count: np.ndarray
    fraction: np.ndarray
    norm_max: np.ndarray
    norm_median: np.ndarray
    cls_norm: np.ndarray | None = None
    register_norm: np.ndarray | None = None
    role: str | None = None

    @property
    def first_layer(self) -> int | None:
        """The first layer with any outlier, or None."""
        layers = np.flatnonzero(self.count)
        return int(layers[0]) if layers.size else None

    def norm_lines(self) -> list[tuple[str, np.ndarray, dict]]:
        """The bottom panel's lines of this model: (statistic, values per layer, line and marker style)."""
        lines = [("max patch norm", self.norm_max, dict(mode="lines+markers", dash="solid", symbol="circle")),
                 ("median patch norm", self.norm_median, dict(mode="lines", dash="dot", symbol="circle"))]
        if self.cls_norm is not None:
            lines.append(("CLS norm", self.cls_norm, dict(mode="lines+markers", dash="dashdot", symbol="star")))
        if self.register_norm is not None:
            lines.append(("mean register norm", self.register_norm,
                          dict(mode="lines+markers", dash="longdash", symbol="diamond")))
        return lines


def log_decades(values: Sequence[np.ndarray]) -> tuple[list[float], list[str]]:
    """Tick values and labels at every power of ten spanning the positive ``values`` (at least two decades)."""
    positive = np.concatenate([np.asarray(v, dtype=float).ravel() for v in values])
    positive = positive[np.isfinite(positive) & (positive > 0)]
    if not positive.size:
        return [1.0, 10.0], ["1", "10"]
    low, high = int(np.floor(np.log10(positive.min()))), int(np.ceil(np.log10(positive.max())))
    high = max(high, low + 1)
    ticks = [10.0 ** e for e in range(low, high + 1)]
    return ticks, [f"{t:g}" for t in ticks]


def emergence_figure(curves: Sequence[EmergenceCurve], height: int = 660) -> go.Figure:
    """Outlier share (top) and per-layer norms (bottom, log, ticks at every decade): max and median
    patch norm, CLS norm and mean register norm; first outlier layer marked. Legend entries say
    the statistic under a title naming the model (colour: model; line style: statistic), below the plot."""
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.1, row_heights=[0.4, 0.6],
                        subplot_titles=("outlier share of patch tokens",
                                        "token norms per layer (pre-final-norm, log scale)"))
    for index, (curve, colour) in enumerate(zip(curves, model_colours([c.role for c in curves]))):
        layers = np.arange(curve.count.size)
        group = dict(legendgroup=curve.label, legendgrouptitle=dict(text=curve.label))
        fig.add_trace(go.Scatter(x=layers, y=curve.fraction * 100, mode="lines+markers", name="outlier share",
                                 line=dict(color=colour), customdata=curve.count, **group,
                                 hovertemplate=f"layer %{{x}}: %{{y:.2f}}% (%{{customdata}} tokens)<extra>{curve.label}</extra>"),
                      row=1, col=1)
        for statistic, values, style in curve.norm_lines():
            fig.add_trace(go.Scatter(x=layers, y=values, mode=style["mode"], name=statistic,
                                     line=dict(color=colour, dash=style["dash"]), marker=dict(symbol=style["symbol"], size=7),
                                     hovertemplate=f"layer %{{x}}: {statistic} %{{y:.4g}}<extra>{curve.label}</extra>", **group),
                          row=2, col=1)
        if curve.first_layer is not None:
            fig.add_vline(x=curve.first_layer, line=dict(color=colour, dash="dash"), row=1, col=1,
                          annotation=dict(text=f"first outliers: layer {curve.first_layer}", font=dict(color=colour),
                                          yanchor="top", y=1 - 0.08 * index))
            fig.add_vline(x=curve.first_layer, line=dict(color=colour, dash="dash"), row=2, col=1)
    depth = max(c.count.size for c in curves)
    tickvals, ticktext = log_decades([values for c in curves for _, values, _ in c.norm_lines()])
    fig.update_xaxes(range=[-0.5, depth - 0.5], dtick=1 if depth <= 24 else 2)
    fig.update_xaxes(title_text="layer (block index, 0-based)", row=2, col=1)
    fig.update_yaxes(title_text="% of patches", rangemode="tozero", row=1, col=1)
    fig.update_yaxes(title_text="L2 norm (log)", type="log", tickmode="array", tickvals=tickvals, ticktext=ticktext,
                     range=[np.log10(tickvals[0]), np.log10(tickvals[-1])], showgrid=True,
                     minor=dict(ticks="outside", ticklen=4, showgrid=True, gridcolor="rgba(0,0,0,0.06)", dtick="D1"),
                     row=2, col=1)
    fig.update_layout(height=height + LEGEND_LINE_PX * len(fig.data), margin=dict(l=60, r=10, t=40, b=50),
                      legend=dict(orientation="h", y=-0.13, yanchor="top", x=0, groupclick="toggleitem"))
    # taller with each legend entry: on a phone the legend is one entry a line and would squeeze the plots
    return fig


CLS_INPUT_OUTLIERS = "CLS attention in block l to tokens that were outliers in its input (block l-1 output)"


def cls_attention_figures(items: Sequence[tuple[str, ClsOutlierAttention]], layer: int, height: int = 420,
                          roles: Sequence[str | None] | None = None) -> tuple[go.Figure, go.Figure]:
    """Two figures (side by side on a wide screen, one above the other on a phone).

    First: per block, CLS attention to the patches that were outliers in the block's input, and the
    even-spread baseline (their share of the patches times CLS's attention on patches). Second: at
    block ``layer``, where CLS attention goes (input outliers, other patches, CLS and registers).
    Block 0 has no outlier mask (its input has no captured norms): no point and no outlier bar.
    ``roles``: each model's role (``ROLES``), which fixes its colour."""
    per_block, split = go.Figure(), go.Figure()
    for (label, result), colour in zip(items, model_colours(roles or [None] * len(items))):
        blocks = np.arange(result.outlier_mass.size)
        per_block.add_trace(go.Scatter(x=blocks, y=result.outlier_mass * 100, mode="lines+markers", legendgroup=label,
                                       name=f"{label}: attention on input outliers", line=dict(color=colour)))
        per_block.add_trace(go.Scatter(x=blocks, y=result.expected_outlier_mass * 100, mode="lines", legendgroup=label,
                                       name=f"{label}: if spread evenly over patches", line=dict(color=colour, dash="dot"),
                                       showlegend=False))  # the caption says what dotted is: half the legend on a phone
        parts = [result.outlier_mass[layer], result.normal_mass[layer], result.prefix_mass[layer]]
        split.add_trace(go.Bar(x=["input outliers", "other patches", "CLS + registers"], y=np.array(parts) * 100,
                               name=label, marker_color=colour, showlegend=False, texttemplate="%{y:.1f}%",
                               textposition="outside"))
    if layer == 0:
        split.add_annotation(text="block 0's input has no captured norms:<br>no outlier split", showarrow=False,
                             xref="x domain", yref="y domain", x=0.5, y=0.8)
    per_block.update_xaxes(title_text="block (0-based)")
    per_block.update_yaxes(title_text="% of CLS attention", rangemode="tozero")
    per_block.update_layout(title=dict(text="On the block's input outliers", font_size=14),
                            height=height + LEGEND_ROW_PX * len(items), margin=dict(l=60, r=10, t=40, b=50),
                            legend=dict(orientation="h", yanchor="top", y=-0.3, x=0))
    split.update_yaxes(title_text="% of CLS attention", range=[0, 110])
    split.update_layout(title=dict(text=f"Where it goes in block {layer}", font_size=14), barmode="group",
                        height=height, margin=dict(l=60, r=10, t=40, b=50))
    return per_block, split


def patch_prefix_figure(found: PatchAttention, label: str, height: int | None = None) -> go.Figure:
    """Per head, the chosen patch's attention to CLS and each register (left: their columns of its row) and
    theirs to the patch (right: its column of their rows), in % of the query's attention."""
    rows, cols = found.cell
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12,
                        subplot_titles=(f"patch ({rows}, {cols}) → CLS / registers", f"CLS / registers → patch ({rows}, {cols})"))
    heads = [f"head {h}" for h in range(found.gives_prefix.shape[0])]
    high = float(max(found.gives_prefix.max(initial=0), found.gets_prefix.max(initial=0), 1e-6)) * 100
    for col, values in ((1, found.gives_prefix), (2, found.gets_prefix)):
        fig.add_trace(go.Heatmap(z=values * 100, x=found.prefix_names, y=heads, coloraxis="coloraxis", texttemplate="%{z:.1f}",
                                 hovertemplate="%{y}, %{x}: %{z:.2f}%<extra></extra>"), row=1, col=col)
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(title=dict(text=f"{label}: the patch and the prefix tokens, block {found.layer}", font_size=14),
                      coloraxis=dict(colorscale=HEAT, cmin=0, cmax=high, colorbar=dict(title=dict(text="% of the query's attention", side="right"))),
                      height=height or 90 + 26 * len(heads), margin=dict(l=60, r=10, t=70, b=30))
    return fig


def embedding_figure(embedding: TokenEmbedding, image_names: Sequence[str], title: str = "", height: int = 560,
                     highlight: tuple[int, int, int] | None = None, width: int | None = None,
                     title_colour: str | None = None) -> go.Figure:
    """Patch tokens (normal / outlier) and prefix tokens (CLS, registers) in 2-D.

    With several images, normal patches are coloured by image and every patch point's symbol
    names its image; outliers stay red (larger, dark edge) whatever the image. CLS (star) and
    the registers (diamonds) are drawn last, CLS on top. Every patch point carries
    ``[image index, row, col, norm, image name]`` as customdata, so a hover or a click tells
    which image and cell it is. ``highlight`` (image, row, col) rings one point. ``width``: pixels
    (None: the container's); axis titles say when the tokens were scaled to unit length; ``title_colour``: the model's.
    """
    fig = go.Figure()
    names = np.array(list(image_names), dtype=object)
    symbols = np.array([IMAGE_SYMBOLS[i % len(IMAGE_SYMBOLS)] for i in range(len(names))], dtype=object)
    if len(names) > 1:
        groups = [(f"normal patch: {names[i]}", ~embedding.outlier & (embedding.image == i), IMAGE_COLOURS[i % len(IMAGE_COLOURS)])
                  for i in range(len(names))]
    else:
        groups = [("normal patch", ~embedding.outlier, NORMAL_COLOUR)]
    for label, selected, colour in groups:
        fig.add_trace(_patch_points(embedding, names, symbols, selected, label, dict(color=colour, size=5, opacity=0.7)))
    fig.add_trace(_patch_points(embedding, names, symbols, embedding.outlier, "outlier patch",
                                dict(color=OUTLIER_COLOUR, size=10, opacity=0.9, line=dict(color="#4a0000", width=1))))
    names_prefix = np.array(embedding.prefix_names, dtype=object)
    for label, selected, colour, symbol, size in (("registers", names_prefix != "cls", REGISTER_COLOUR, "diamond-open", 22),
                                                  ("CLS", names_prefix == "cls", CLS_COLOUR, "star", 18)):
        points = np.flatnonzero(selected) if names_prefix.size else np.zeros(0, dtype=int)
        if not points.size:
            continue
        fig.add_trace(go.Scattergl(  # WebGL like the patches and after them, so these are drawn on top
            x=embedding.prefix_coords[points, 0], y=embedding.prefix_coords[points, 1], mode="markers", name=label,
            marker=dict(color=colour, size=size, symbol=symbol, line=dict(color=colour if symbol.endswith("-open") else "white", width=2)),
            customdata=np.stack([names[embedding.prefix_image[points]], names_prefix[points]], axis=1),
            hovertemplate="%{customdata[0]}<br>%{customdata[1]} token<extra></extra>"))
    if highlight is not None:
        hit = np.flatnonzero((embedding.image == highlight[0]) & (embedding.row == highlight[1]) & (embedding.col == highlight[2]))
        if hit.size:
            fig.add_trace(go.Scatter(x=embedding.coords[hit, 0], y=embedding.coords[hit, 1], mode="markers", name="selected",
                                     marker=dict(size=18, color="rgba(0,0,0,0)", line=dict(color=OUTLINE, width=3)),
                                     hoverinfo="skip"))
    axis = "PC" if embedding.method == "pca" else "UMAP "
    titles = [f"{axis}{i + 1}" for i in range(2)]
    if embedding.explained is not None:
        titles = [f"{t} ({e:.0%} of variance)" for t, e in zip(titles, embedding.explained)]
    if embedding.normalized:
        titles = [f"{t}, unit-length tokens" for t in titles]
    fig.update_layout(title=dict(text=title, font=dict(color=title_colour)) if title else None, height=height, width=width,
                      margin=dict(l=60, r=10, t=60 if title else 20, b=50),
                      legend=dict(orientation="h", y=-0.12, x=0), xaxis_title=titles[0], yaxis_title=titles[1])
    return fig


def _patch_points(embedding: TokenEmbedding, names: np.ndarray, symbols: np.ndarray, selected: np.ndarray, label: str,
                  marker: dict) -> go.Scattergl:
    """One trace of patch tokens; each point's symbol is its image's."""
    points = np.flatnonzero(selected)
    custom = np.stack([embedding.image[points], embedding.row[points], embedding.col[points],
                       np.round(embedding.norm[points], 2), names[embedding.image[points]]], axis=1) if points.size else None
    per_point = symbols[embedding.image[points]].tolist()
    return go.Scattergl(
        x=embedding.coords[points, 0], y=embedding.coords[points, 1], mode="markers", name=label,
        marker=dict(marker, symbol=per_point if len(set(per_point)) > 1 else (per_point or ["circle"])[0]),
        customdata=custom,
        hovertemplate="%{customdata[4]}<br>row %{customdata[1]}, col %{customdata[2]}<br>norm (pre-final-norm) %{customdata[3]:.4g}<extra>"
                      + label + "</extra>")


@dataclass(frozen=True)
class Table:
    """Rows for a CSV download: column names and rows of plain values."""

    columns: list[str]
    rows: list[list] = field(default_factory=list)

    def to_csv(self) -> str:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(self.columns)
        for row in self.rows:
            writer.writerow(["" if v is None else (f"{v:.6g}" if isinstance(v, (float, np.floating)) else v) for v in row])
        return buffer.getvalue()


def neuron_counts_figure(layers: Sequence[int], num_layers: int, height: int = 280) -> go.Figure:
    """How many of the picked neurons sit in each block."""
    counts = np.bincount(np.asarray(layers, dtype=int), minlength=num_layers)
    fig = go.Figure(go.Bar(x=np.arange(num_layers), y=counts, marker_color=OUTLIER_COLOUR,
                           hovertemplate="layer %{x}: %{y} neurons<extra></extra>"))
    fig.update_xaxes(title_text="layer (block index, 0-based)", dtick=1 if num_layers <= 24 else 2)
    fig.update_yaxes(title_text="picked neurons", rangemode="tozero")
    fig.update_layout(height=height, margin=dict(l=60, r=10, t=20, b=50))
    return fig


def score_distribution_figure(scores: np.ndarray, cutoff: float | None, height: int = 280) -> go.Figure:
    """Histogram of every scored neuron's score (log counts), the lowest picked score marked."""
    fig = go.Figure(go.Histogram(x=scores.ravel(), nbinsx=80, marker_color=NORMAL_COLOUR,
                                 hovertemplate="score %{x}: %{y} neurons<extra></extra>"))
    if cutoff is not None:
        fig.add_vline(x=cutoff, line=dict(color=OUTLIER_COLOUR, dash="dash"),
                      annotation=dict(text="picked above", font=dict(color=OUTLIER_COLOUR)))
    fig.update_xaxes(title_text="mean |activation| at outlier tokens")
    fig.update_yaxes(title_text="neurons (log)", type="log")
    fig.update_layout(height=height, margin=dict(l=60, r=10, t=20, b=50))
    return fig


def change_figure(series: dict[str, np.ndarray], height: int = 320, title: str = "1 - cosine (log)") -> go.Figure:
    """1 - cosine per row (blocks, then the final norm), one line per series."""
    fig = go.Figure()
    for (label, values), colour in zip(series.items(), model_colours([None] * len(series))):
        rows = np.arange(values.size)
        fig.add_trace(go.Scatter(x=rows, y=np.maximum(1 - values, 1e-9), mode="lines+markers", name=label,
                                 line=dict(color=colour),
                                 hovertemplate="%{x}: %{y:.3g}<extra>%{fullData.name}</extra>"))
    depth = max(values.size for values in series.values())
    fig.update_xaxes(title_text=f"layer (block index; {depth - 1} = after the final norm)", dtick=1 if depth <= 25 else 2)
    fig.update_yaxes(title_text=title, type="log")
    fig.update_layout(height=height, margin=dict(l=60, r=10, t=20, b=50), legend=dict(orientation="h", y=-0.25, x=0))
    return fig


def sink_figure(masses: dict[str, np.ndarray], layers: Sequence[int], height: int = 360) -> go.Figure:
    """Attention mass each token group receives from all queries, mean over heads, per layer."""
    colours = {"cls": CLS_COLOUR, "registers": REGISTER_COLOUR, "test-time register": "#ff7f0e",
               "outliers": OUTLIER_COLOUR, "patches": NORMAL_COLOUR}
    fig = go.Figure()
    for group, values in masses.items():
        fig.add_trace(go.Scatter(x=list(layers), y=values.mean(axis=1), mode="lines+markers", name=group,
                                 line=dict(color=colours.get(group)), customdata=values.max(axis=1),
                                 hovertemplate="layer %{x}: %{y:.3f} (max head %{customdata:.3f})<extra>%{fullData.name}</extra>"))
    fig.update_xaxes(title_text="layer (block index, 0-based)", dtick=1)
    fig.update_yaxes(title_text="attention received (mean over queries and heads)", range=[0, 1])
    fig.update_layout(height=height, margin=dict(l=60, r=10, t=20, b=50), legend=dict(orientation="h", y=-0.2, x=0))
    return fig
