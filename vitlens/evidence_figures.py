"""Figures of the paper's evidence (results -> plotly figures or pictures), shared by the report and the app.

No streamlit here. Grids are drawn in cell coordinates (x: patch column, y: patch row, 0 at the top).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import plotly.graph_objects as go
from PIL import Image, ImageDraw
from plotly.subplots import make_subplots

from .analysis.redundancy import RedundancyResult
from .discovery import Discovery

NORMAL_COLOUR = "#8da0cb"
OUTLIER_COLOUR = "#e41a1c"
BOX_COLOUR = "#00e5ff"
SEED_COLOUR = "#ff2d95"


def norm_and_similarity_figure(norms: np.ndarray, similarity: np.ndarray, mask: np.ndarray | None, title: str,
                               width: int = 760) -> go.Figure:
    """Patch-token norms and neighbour similarity of one image side by side, outliers marked.

    Args:
        norms: Patch-token norms of one layer (before the final norm).  # [row, col]
        similarity: Neighbour similarity of the patch embeddings.  # [row, col]
        mask: Outlier cells, or None.  # [row, col]
    """
    rows, cols = norms.shape
    fig = make_subplots(1, 2, subplot_titles=("token norm (pre-final-norm)", "neighbour cosine similarity"),
                        horizontal_spacing=0.16)
    fig.add_trace(go.Heatmap(z=norms, colorscale="Inferno", colorbar=dict(x=0.42, len=0.9),
                             hovertemplate="row %{y}, col %{x}<br>norm %{z:.1f}<extra></extra>"), 1, 1)
    fig.add_trace(go.Heatmap(z=similarity, colorscale="Viridis", colorbar=dict(x=1.0, len=0.9),
                             hovertemplate="row %{y}, col %{x}<br>similarity %{z:.3f}<extra></extra>"), 1, 2)
    if mask is not None and mask.any():
        cells = np.argwhere(mask)
        for column in (1, 2):
            fig.add_trace(go.Scatter(x=cells[:, 1], y=cells[:, 0], mode="markers", name="outlier",
                                     marker=dict(symbol="square-open", size=9, color="#00e5ff", line=dict(width=2)),
                                     showlegend=column == 1, hoverinfo="skip"), 1, column)
    fig.update_yaxes(autorange="reversed", scaleanchor=None, constrain="domain")
    plot = (width - 200) / 2
    fig.update_layout(title=title, width=width, height=int(min(700, plot * rows / cols + 120)),
                      margin=dict(l=40, r=20, t=70, b=40), legend=dict(orientation="h", y=-0.08))
    return fig


def redundancy_figure(result: RedundancyResult, title: str = "", height: int = 380) -> go.Figure:
    """The two distributions of neighbour similarity (paper Fig. 5a), as densities."""
    fig = go.Figure()
    pooled = np.concatenate([result.normal, result.outlier])
    low, high = (float(pooled.min()), float(pooled.max())) if pooled.size else (0.0, 1.0)
    bins = dict(start=low, end=high + 1e-9, size=max(high - low, 1e-6) / 50)  # the same bins for both groups
    for name, values, colour in (("normal", result.normal, NORMAL_COLOUR), ("outlier", result.outlier, OUTLIER_COLOUR)):
        if values.size:
            fig.add_trace(go.Histogram(x=values, name=f"{name} ({values.size:,} cells)", histnorm="probability density",
                                       marker_color=colour, opacity=0.6, xbins=bins))
    auroc = "n/a" if result.auroc is None else f"{result.auroc:.3f}"
    fig.update_layout(barmode="overlay", height=height, title=title or f"neighbour similarity; AUROC {auroc}",
                      xaxis_title="cosine similarity to the 4 neighbours (patch embedding)", yaxis_title="density",
                      legend=dict(orientation="h", y=1.12), margin=dict(l=50, r=20, t=70, b=50))
    return fig


def outliers_per_layer_figure(counts: np.ndarray, num_images: int, height: int = 320) -> go.Figure:
    """Mean outlier tokens per image at each layer.  counts: [layer] totals over the images."""
    fig = go.Figure(go.Bar(x=np.arange(len(counts)), y=counts / max(num_images, 1), marker_color=OUTLIER_COLOUR))
    fig.update_layout(height=height, xaxis_title="layer (0-based block)", yaxis_title="outliers per image",
                      title="outlier tokens per layer", margin=dict(l=50, r=20, t=50, b=50))
    return fig


def norm_histogram_figure(norms: np.ndarray, thresholds: Sequence[float], layer: int, height: int = 340) -> go.Figure:
    """Patch-token norms of one layer over all images (log x, log counts), threshold(s) marked."""
    positive = norms[norms > 0]
    edges = np.logspace(np.log10(positive.min()), np.log10(positive.max() * 1.001), 61) if positive.size else np.array([0.0, 1.0])
    counts, _ = np.histogram(positive, bins=edges)
    centres = np.sqrt(edges[:-1] * edges[1:])
    fig = go.Figure(go.Bar(x=centres, y=counts, width=np.diff(edges), marker_color=NORMAL_COLOUR, name="patch tokens"))
    for threshold in sorted(set(float(t) for t in thresholds if np.isfinite(t)))[:5]:
        fig.add_vline(x=threshold, line_color=OUTLIER_COLOUR, line_dash="dash")
    fig.update_layout(height=height, title=f"patch-token norms at layer {layer} (pre-final-norm); dashed: thresholds",
                      xaxis=dict(type="log", title="norm"), yaxis=dict(type="log", title="tokens"),
                      margin=dict(l=50, r=20, t=50, b=50))
    return fig


def draw_discovery(image: Image.Image, found: Discovery, max_side: int = 480) -> Image.Image:
    """The picture with LOST's box and seed patch drawn on it (scaled to at most ``max_side``)."""
    scale = min(1.0, max_side / max(image.size))
    picture = image.convert("RGB").resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    draw = ImageDraw.Draw(picture)
    x0, y0, x1, y1 = (value * scale for value in found.box)
    draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=BOX_COLOUR, width=3)
    row, col = found.result.seed
    cell = found.patch_size / found.scale * scale
    draw.rectangle([col * cell, row * cell, (col + 1) * cell - 1, (row + 1) * cell - 1], outline=SEED_COLOUR, width=3)
    return picture
