"""Outliers over a population: checkpoints of a training run, model sizes, whole datasets.

Pure functions over the rows of a sweep results folder (``vitlens sweep``: one row per model,
weights, image and layer; schema in DESIGN.md). Shares are token-weighted: outlier tokens over
patch tokens, summed over the images, so an image with a larger grid counts for more tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow.dataset as ds

from ..errors import ResultsError
from ..sweep import NORM_HIST_EDGES

REQUIRED_COLUMNS = ("model", "weights", "step", "image", "layer", "num_outliers", "outlier_fraction", "threshold",
                    "norm_median", "norm_max", "num_layers", "grid_rows", "grid_cols", "size", "num_registers")
LIST_COLUMNS = ("outlier_cells", "norm_hist")


def read_results(folder: str | Path, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """The rows of a results folder (only ``columns`` when given; the required ones are always read).

    Raises:
        ResultsError: the folder holds no Parquet files or lacks a required column.
    """
    folder = Path(folder)
    if not folder.is_dir() or not any(folder.glob("*.parquet")):
        raise ResultsError(f"'{folder.name}' holds no sweep results (no .parquet files); run `vitlens sweep` into it first.")
    dataset = ds.dataset(str(folder), format="parquet")
    wanted = list(dict.fromkeys([*REQUIRED_COLUMNS, *(columns or [])]))
    missing = [name for name in wanted if name not in dataset.schema.names]
    if missing:
        raise ResultsError(f"'{folder.name}' is not a vitlens sweep results folder: no column {', '.join(missing)}.")
    frame = dataset.to_table(columns=wanted).to_pandas()
    frame["patches"] = frame.grid_rows * frame.grid_cols
    return frame


@dataclass(frozen=True)
class Series:
    """One (model, weights) pair of a results folder: one checkpoint of a series, or one model."""

    model: str
    weights: str
    step: int | None
    num_registers: int
    num_layers: int
    images: int

    @property
    def label(self) -> str:
        """Short name: the step when there is one, else the weights' file name."""
        if self.step is not None:
            return f"step {self.step}"
        return Path(self.weights).name or self.weights


def series_of(frame: pd.DataFrame, model: str | None = None) -> list[Series]:
    """The (model, weights) pairs in the rows, by model, then step (pairs without a step last), then weights."""
    rows = frame if model is None else frame[frame.model == model]
    found = []
    for (name, weights), group in rows.groupby(["model", "weights"], sort=False):
        step = group.step.iloc[0]
        found.append(Series(model=name, weights=weights, step=None if pd.isna(step) else int(step),
                            num_registers=int(group.num_registers.iloc[0]), num_layers=int(group.num_layers.max()),
                            images=int(group.image.nunique())))
    return sorted(found, key=lambda s: (s.model, s.step is None, s.step or 0, s.weights))


def _rows(frame: pd.DataFrame, series: Series, layers: Sequence[int] | None = None) -> pd.DataFrame:
    rows = frame[(frame.model == series.model) & (frame.weights == series.weights)]
    return rows if layers is None else rows[rows.layer.isin(list(layers))]


def layer_share(rows: pd.DataFrame, num_layers: int) -> np.ndarray:
    """Outlier share of patch tokens per layer over all images of ``rows``; NaN where a layer has no row.  # [layer]"""
    sums = rows.groupby("layer")[["num_outliers", "patches"]].sum()
    share = np.full(num_layers, np.nan)
    inside = sums.index[(sums.index >= 0) & (sums.index < num_layers)]
    share[inside] = sums.loc[inside, "num_outliers"] / sums.loc[inside, "patches"]
    return share


def _per_layer(rows: pd.DataFrame, column: str, how: str, num_layers: int) -> np.ndarray:
    values = rows.groupby("layer")[column].agg(how)
    out = np.full(num_layers, np.nan)
    inside = values.index[(values.index >= 0) & (values.index < num_layers)]
    out[inside] = values.loc[inside]
    return out


@dataclass(frozen=True, eq=False)
class TrainingSeries:
    """Outliers of one model across the checkpoints of a training run.

    Attributes:
        model: Model name.
        checkpoints: The checkpoints, by step.
        share: Outlier share of patch tokens over all images.  # [checkpoint, layer]
        norm_max: Largest patch-token norm over all images.  # [checkpoint, layer]
        norm_median: Median over images of each image's median patch-token norm.  # [checkpoint, layer]
    """

    model: str
    checkpoints: list[Series]
    share: np.ndarray
    norm_max: np.ndarray
    norm_median: np.ndarray

    @property
    def first_checkpoint(self) -> int | None:
        """Index of the first checkpoint with any outlier token in any layer, or None."""
        found = np.flatnonzero(np.nan_to_num(self.share).max(axis=1) > 0)
        return int(found[0]) if found.size else None

    @property
    def first_layer(self) -> int | None:
        """The first layer with outliers at the first checkpoint that has any, or None."""
        index = self.first_checkpoint
        if index is None:
            return None
        return int(np.flatnonzero(np.nan_to_num(self.share[index]) > 0)[0])

    @property
    def steps(self) -> list[int | None]:
        return [checkpoint.step for checkpoint in self.checkpoints]


def training_series(frame: pd.DataFrame, model: str) -> TrainingSeries:
    """Per checkpoint and layer: outlier share, max and median norm of ``model`` over all images.

    Raises:
        ResultsError: the rows hold nothing for ``model``.
    """
    checkpoints = series_of(frame, model)
    if not checkpoints:
        raise ResultsError(f"The results hold no rows for model '{model}'.")
    depth = max(checkpoint.num_layers for checkpoint in checkpoints)
    share, norm_max, norm_median = (np.full((len(checkpoints), depth), np.nan) for _ in range(3))
    for index, checkpoint in enumerate(checkpoints):
        rows = _rows(frame, checkpoint)
        share[index] = layer_share(rows, depth)
        norm_max[index] = _per_layer(rows, "norm_max", "max", depth)
        norm_median[index] = _per_layer(rows, "norm_median", "median", depth)
    return TrainingSeries(model=model, checkpoints=checkpoints, share=share, norm_max=norm_max, norm_median=norm_median)


@dataclass(frozen=True, eq=False)
class DepthProfile:
    """Outlier share per layer of one model, against relative depth.

    Attributes:
        series: The model and weights.
        depth: Relative depth of each block, (layer + 1) / num_layers.  # [layer]
        share: Outlier share of patch tokens over all images.  # [layer]
    """

    series: Series
    depth: np.ndarray
    share: np.ndarray

    @property
    def max_share(self) -> float:
        """The largest share of any layer (0 when no layer has rows)."""
        return float(np.nanmax(self.share)) if np.isfinite(self.share).any() else 0.0


def depth_profile(frame: pd.DataFrame, series: Series) -> DepthProfile:
    """Outlier share per layer of one (model, weights) pair against relative depth."""
    layers = np.arange(series.num_layers)
    return DepthProfile(series=series, depth=(layers + 1) / series.num_layers,
                        share=layer_share(_rows(frame, series), series.num_layers))


def model_profiles(frame: pd.DataFrame) -> list[DepthProfile]:
    """One depth profile per model: of its last checkpoint (highest step) when it has several weights."""
    last: dict[str, Series] = {}
    for series in series_of(frame):
        last[series.model] = series  # series_of orders each model's pairs by step
    return [depth_profile(frame, series) for series in last.values()]


@dataclass(frozen=True, eq=False)
class NormCounts:
    """Patch-token norms of a population as counts in fixed log-spaced bins.

    Attributes:
        edges: Bin edges.  # [bin + 1]
        counts: Tokens per bin, summed over images and layers.  # [bin]
        threshold: Median over images and layers of the outlier threshold; None when no row has one.
    """

    edges: np.ndarray
    counts: np.ndarray
    threshold: float | None

    @property
    def total(self) -> int:
        return int(self.counts.sum())


def norm_counts(frame: pd.DataFrame, series: Series, layers: Sequence[int]) -> NormCounts:
    """The norm histogram of the chosen layers over every image, from the rows' ``norm_hist``."""
    rows = _rows(frame, series, layers)
    bins = len(NORM_HIST_EDGES) - 1
    counts = np.zeros(bins, dtype=np.int64)
    for hist in rows.norm_hist:
        counts += np.asarray(hist, dtype=np.int64)
    thresholds = rows.threshold.dropna()
    return NormCounts(edges=NORM_HIST_EDGES, counts=counts, threshold=float(thresholds.median()) if len(thresholds) else None)


@dataclass(frozen=True, eq=False)
class CellFrequency:
    """How often each cell of the patch grid holds an outlier, over images and layers.

    Attributes:
        frequency: Outliers at the cell / (images x layers).  # [row, col]
        rows_used: Rows (image x layer) of the most common grid, the ones counted.
        rows_skipped: Rows of other grids (other aspect ratios), not counted.
    """

    frequency: np.ndarray
    rows_used: int
    rows_skipped: int


def outlier_frequency(frame: pd.DataFrame, series: Series, layers: Sequence[int]) -> CellFrequency:
    """Where on the grid the outliers sit (most common grid only), from the rows' ``outlier_cells``.

    Raises:
        ResultsError: no row for these layers.
    """
    rows = _rows(frame, series, layers)
    if rows.empty:
        raise ResultsError(f"The results hold no rows of {series.model} at layers {', '.join(map(str, layers))}.")
    grids = rows.grid_rows.astype(str) + "x" + rows.grid_cols.astype(str)
    common = grids.mode().iloc[0]
    used = rows[grids == common]
    grid_rows, grid_cols = (int(v) for v in common.split("x"))
    counts = np.zeros(grid_rows * grid_cols, dtype=np.int64)
    for cells in used.outlier_cells:
        counts += np.bincount(np.asarray(cells, dtype=np.int64), minlength=counts.size)[:counts.size]
    frequency = (counts / len(used)).reshape(grid_rows, grid_cols)  # [row, col]
    return CellFrequency(frequency=frequency, rows_used=len(used), rows_skipped=len(rows) - len(used))


@dataclass(frozen=True)
class ImageOutliers:
    """One image's outliers over the chosen layers."""

    image: str
    num_outliers: int
    share: float


def top_images(frame: pd.DataFrame, series: Series, layers: Sequence[int], count: int = 12) -> list[ImageOutliers]:
    """The images with the most outlier tokens over the chosen layers (most first; ties by name)."""
    rows = _rows(frame, series, layers)
    sums = rows.groupby("image")[["num_outliers", "patches"]].sum().reset_index()
    sums = sums.sort_values(["num_outliers", "image"], ascending=[False, True]).head(count)
    return [ImageOutliers(image=row.image, num_outliers=int(row.num_outliers), share=float(row.num_outliers / row.patches))
            for row in sums.itertuples()]


@dataclass(frozen=True, eq=False)
class DatasetSummary:
    """Everything the Dataset page shows of one (model, weights) pair over a dataset.

    Attributes:
        series: The pair.
        layers: The layers pooled for the histogram, the grid map and the gallery.
        share: Outlier share per layer (every layer).  # [layer]
        norms: Norm histogram of the pooled layers.
        cells: Outlier frequency on the grid, pooled layers.
        top: Images with the most outliers, pooled layers.
        overall_share: Outlier share of all patch tokens of the pooled layers.
    """

    series: Series
    layers: tuple[int, ...]
    share: np.ndarray
    norms: NormCounts
    cells: CellFrequency
    top: list[ImageOutliers]
    overall_share: float


def dataset_summary(frame: pd.DataFrame, series: Series, layers: Sequence[int], count: int = 12) -> DatasetSummary:
    """Norm histogram, per-layer share, grid map and top images of one pair over every image of the rows."""
    layers = tuple(sorted(set(layers)))
    pooled = _rows(frame, series, layers)
    return DatasetSummary(series=series, layers=layers, share=depth_profile(frame, series).share,
                          norms=norm_counts(frame, series, layers), cells=outlier_frequency(frame, series, layers),
                          top=top_images(frame, series, layers, count),
                          overall_share=float(pooled.num_outliers.sum() / max(1, pooled.patches.sum())))


def weights_in(folder: str | Path) -> set[str]:
    """The distinct ``weights`` of a results folder (empty when it holds no results)."""
    folder = Path(folder)
    if not folder.is_dir() or not any(folder.glob("*.parquet")):
        return set()
    return set(ds.dataset(str(folder), format="parquet").to_table(columns=["weights"]).column("weights").unique().to_pylist())
