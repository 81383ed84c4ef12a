"""Plotly figures of the population pages (Training, Models, Dataset): pure functions, no streamlit.

Shares are drawn in % of patch tokens; layers are 0-based block indices, as everywhere.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from figures import HEAT, model_colours
from vitlens.analysis.population import CellFrequency, DepthProfile, NormCounts, TrainingSeries

FIRST_COLOUR = "#00e5ff"  # the first checkpoint with outliers, on the Inferno heat map


def _checkpoint_axis(series: TrainingSeries) -> list[str]:
    return [checkpoint.label for checkpoint in series.checkpoints]


def training_heatmap(series: TrainingSeries, height: int = 420) -> go.Figure:
    """Checkpoint (rows, by step) x layer outlier share; the first checkpoint with outliers outlined.

    An invisible marker sits on each cell (x: layer, y: checkpoint label) and carries the hover
    text, so a click selects it (plotly does not select heat map cells).
    """
    labels = _checkpoint_axis(series)
    layers = np.arange(series.share.shape[1])
    share = series.share * 100  # [checkpoint, layer]
    fig = go.Figure(go.Heatmap(z=share, x=layers, y=labels, colorscale=HEAT, zmin=0, colorbar=dict(title="% outliers"),
                               hoverinfo="skip"))
    rows, cols = np.meshgrid(np.arange(len(labels)), layers, indexing="ij")
    fig.add_trace(go.Scatter(x=cols.ravel(), y=[labels[r] for r in rows.ravel()], mode="markers", name="cells",
                             marker=dict(symbol="square", size=14, opacity=0), showlegend=False,
                             text=[f"{v:.2f}%" for v in share.ravel()],
                             hovertemplate="%{y}, layer %{x}: %{text} of patches<br>click: open below<extra></extra>",
                             selected=dict(marker=dict(opacity=0)), unselected=dict(marker=dict(opacity=0))))
    first = series.first_checkpoint
    if first is not None:
        fig.add_shape(type="rect", x0=-0.5, x1=len(layers) - 0.5, y0=first - 0.5, y1=first + 0.5,
                      line=dict(color=FIRST_COLOUR, width=2))
        fig.add_annotation(x=-0.5, y=labels[first], xanchor="left", showarrow=False, bgcolor="rgba(255,255,255,0.85)",
                           text=f"first outliers: layer {series.first_layer}", font=dict(color="#006080"))
    fig.update_xaxes(title_text="layer (block index, 0-based)", dtick=1 if len(layers) <= 24 else 2,
                     range=[-0.5, len(layers) - 0.5])
    fig.update_yaxes(title_text="checkpoint", type="category", autorange="reversed")
    fig.update_layout(height=height, margin=dict(l=90, r=10, t=30, b=50), clickmode="event+select",
                      title=f"{series.model}: outlier share per checkpoint and layer")
    return fig


def _x_of(series: TrainingSeries) -> tuple[list, str]:
    if all(step is not None for step in series.steps):
        return list(series.steps), "training step"
    return _checkpoint_axis(series), "checkpoint"


def training_lines(series: TrainingSeries, layers: Sequence[int], height: int = 560) -> go.Figure:
    """Outlier share (top) and max/median norm (bottom, log) against step for the chosen layers."""
    x, title = _x_of(series)
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.1,
                        subplot_titles=("outlier share of patch tokens", "patch-token norm (pre-final-norm)"))
    for layer, colour in zip(layers, model_colours([None] * len(layers))):  # layers, not models: no role colours
        name = f"layer {layer}"
        fig.add_trace(go.Scatter(x=x, y=series.share[:, layer] * 100, mode="lines+markers", name=name, legendgroup=name,
                                 line=dict(color=colour), hovertemplate="%{x}: %{y:.2f}%<extra>" + name + "</extra>"),
                      row=1, col=1)
        fig.add_trace(go.Scatter(x=x, y=series.norm_max[:, layer], mode="lines+markers", name=f"{name}: max",
                                 legendgroup=name, line=dict(color=colour)), row=2, col=1)
        fig.add_trace(go.Scatter(x=x, y=series.norm_median[:, layer], mode="lines", name=f"{name}: median",
                                 legendgroup=name, line=dict(color=colour, dash="dot")), row=2, col=1)
    first = series.first_checkpoint
    if first is not None:
        for row in (1, 2):
            fig.add_vline(x=x[first], line=dict(color="#555", dash="dash"), row=row, col=1)
        fig.add_annotation(x=x[first], y=1, xref="x", yref="paper", showarrow=False, xanchor="left", yanchor="bottom",
                           text=f" first outliers: {series.checkpoints[first].label}")
    fig.update_xaxes(title_text=title, row=2, col=1)
    fig.update_yaxes(title_text="% of patches", rangemode="tozero", row=1, col=1)
    fig.update_yaxes(title_text="norm (log)", type="log", row=2, col=1)
    fig.update_layout(height=height, margin=dict(l=60, r=10, t=50, b=50), legend=dict(orientation="h", y=-0.14, x=0))
    return fig


def depth_figure(profiles: Sequence[DepthProfile], height: int = 440) -> go.Figure:
    """Outlier share per layer against relative depth: models without registers left, with registers right."""
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.05,
                        subplot_titles=("without registers", "with registers"))
    for profile, colour in zip(profiles, model_colours([None] * len(profiles))):  # the panel tells the role
        col = 2 if profile.series.num_registers else 1
        name = f"{profile.series.model} ({profile.series.num_layers} blocks)"
        fig.add_trace(go.Scatter(x=profile.depth, y=profile.share * 100, mode="lines+markers", name=name,
                                 line=dict(color=colour),
                                 hovertemplate="depth %{x:.2f}: %{y:.2f}%<extra>" + name + "</extra>"), row=1, col=col)
    for registers in (False, True):
        if not any(bool(p.series.num_registers) == registers for p in profiles):
            domain = (fig.layout.xaxis2 if registers else fig.layout.xaxis).domain
            fig.add_annotation(text=f"no model {'with' if registers else 'without'} registers in these results",
                               x=sum(domain) / 2, y=0.5, xref="paper", yref="paper", showarrow=False)
    fig.update_xaxes(title_text="relative depth ((layer + 1) / blocks)", range=[0, 1.02])
    fig.update_yaxes(title_text="% of patches", rangemode="tozero", row=1, col=1)
    fig.update_layout(height=height, margin=dict(l=60, r=10, t=40, b=50), legend=dict(orientation="h", y=-0.2, x=0))
    return fig


def layer_share_figure(items: Sequence[tuple[str, np.ndarray]], height: int = 320,
                       roles: Sequence[str | None] | None = None) -> go.Figure:
    """Outlier share per layer, one line per (label, share); ``roles`` (``figures.ROLES``) fix the colours."""
    fig = go.Figure()
    for (label, share), colour in zip(items, model_colours(roles or [None] * len(items))):
        fig.add_trace(go.Scatter(x=np.arange(share.size), y=share * 100, mode="lines+markers", name=label,
                                 line=dict(color=colour),
                                 hovertemplate="layer %{x}: %{y:.2f}%<extra>" + label + "</extra>"))
    fig.update_xaxes(title_text="layer (block index, 0-based)")
    fig.update_yaxes(title_text="% of patches", rangemode="tozero")
    fig.update_layout(height=height, margin=dict(l=60, r=10, t=20, b=50), legend=dict(orientation="h", y=-0.25, x=0))
    return fig


def norm_counts_figure(items: Sequence[tuple[str, NormCounts]], log_y: bool = True, height: int = 380,
                       roles: Sequence[str | None] | None = None) -> go.Figure:
    """Norm histograms over a dataset, each with its median outlier threshold dashed; ``roles``
    (``figures.ROLES``) fix the colours.

    The bins are log-spaced, so the x axis is log10 of the norm (linear, ticks labelled with the
    norm): plotly cannot draw bar widths on a log axis.
    """
    fig = go.Figure()
    low, high = np.inf, -np.inf
    for index, ((label, counts), colour) in enumerate(zip(items, model_colours(roles or [None] * len(items)))):
        used = np.flatnonzero(counts.counts)
        if used.size == 0:
            continue
        keep = slice(used[0], used[-1] + 1)
        lows, highs = np.log10(counts.edges[:-1][keep]), np.log10(counts.edges[1:][keep])
        low, high = min(low, lows[0]), max(high, highs[-1])
        fig.add_trace(go.Bar(x=(lows + highs) / 2, y=counts.counts[keep], width=highs - lows, name=label,
                             marker=dict(color=colour, opacity=0.55, line=dict(color=colour, width=1)),
                             customdata=np.stack([10 ** lows, 10 ** highs], axis=1).tolist(),
                             hovertemplate="norm %{customdata[0]:.3g}–%{customdata[1]:.3g}: %{y} tokens<extra>" + label + "</extra>"))
        if counts.threshold is not None:
            fig.add_vline(x=float(np.log10(counts.threshold)), line=dict(color=colour, dash="dash"),
                          annotation=dict(text=f"median threshold {counts.threshold:.3g}", font=dict(color=colour),
                                          yanchor="top", y=1 - 0.08 * index))
    decades = np.arange(np.floor(low), np.ceil(high) + 1) if np.isfinite(low) else np.arange(-2, 5)
    fig.update_xaxes(title_text="patch-token norm (pre-final-norm, log scale)", tickvals=decades,
                     ticktext=[f"{10 ** d:g}" for d in decades])
    fig.update_yaxes(title_text="tokens" + (" (log)" if log_y else ""), type="log" if log_y else "linear")
    fig.update_layout(barmode="overlay", bargap=0, height=height, margin=dict(l=60, r=10, t=20, b=50),
                      legend=dict(orientation="h", y=-0.25, x=0))
    return fig


def cell_frequency_figure(items: Sequence[tuple[str, CellFrequency]], height: int = 360) -> go.Figure:
    """Where outliers sit on the patch grid: the share of images (x layers) with an outlier at each cell."""
    fig = make_subplots(rows=1, cols=len(items), subplot_titles=[label for label, _ in items], horizontal_spacing=0.08)
    top = max(float(cells.frequency.max()) for _, cells in items) * 100 or 1.0
    for index, (label, cells) in enumerate(items):
        fig.add_trace(go.Heatmap(z=cells.frequency * 100, colorscale=HEAT, zmin=0, zmax=top, coloraxis=None,
                                 showscale=index == len(items) - 1, colorbar=dict(title="% of images"),
                                 hovertemplate="row %{y}, col %{x}: %{z:.1f}%<extra>" + label + "</extra>"),
                      row=1, col=index + 1)
        rows, cols = cells.frequency.shape
        fig.update_xaxes(range=[-0.5, cols - 0.5], constrain="domain", row=1, col=index + 1)
        fig.update_yaxes(range=[rows - 0.5, -0.5], scaleanchor=f"x{index + 1 if index else ''}", constrain="domain",
                         row=1, col=index + 1)
    fig.update_xaxes(title_text="col", showgrid=False, zeroline=False)
    fig.update_yaxes(showgrid=False, zeroline=False)
    fig.update_yaxes(title_text="row", col=1)
    fig.update_layout(height=height, margin=dict(l=50, r=10, t=40, b=40))
    return fig
