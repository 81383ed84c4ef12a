"""Neighbour redundancy (paper Fig. 5a): outliers sit where neighbouring patch embeddings are alike.

Capture records, for every patch, the mean cosine similarity of its patch embedding (before the
position embedding) to its 4 neighbours. This compares that similarity at outlier cells (of a
chosen layer) with the other cells, over many images, and measures the separation by the AUROC:
the probability that a random outlier cell is more redundant than a random normal cell (0.5: no
separation, 1: every outlier above every normal cell).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from ..errors import ResultsError


@dataclass(frozen=True, eq=False)
class RedundancyResult:
    """Neighbour similarity of outlier and normal patch cells.

    Attributes:
        outlier: Similarity at every outlier cell of every image.  # [outlier cell]
        normal: Similarity at every other cell.  # [normal cell]
        auroc: Separation of the two; None when either group is empty.
        num_images: Images pooled.
    """

    outlier: np.ndarray
    normal: np.ndarray
    auroc: float | None
    num_images: int

    def summary(self) -> dict:
        """Counts, means and AUROC as plain numbers (the CLI's JSON)."""
        def mean(values: np.ndarray) -> float | None:
            return float(values.mean()) if values.size else None
        return {"num_images": self.num_images, "num_outlier": int(self.outlier.size), "num_normal": int(self.normal.size),
                "outlier_mean": mean(self.outlier), "normal_mean": mean(self.normal), "auroc": self.auroc}


def redundancy(similarities: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> RedundancyResult:
    """Pool neighbour similarity by outlier status over images (grids may differ between images).

    Args:
        similarities: Per image, neighbour similarity per cell.  # each [row, col]
        masks: Per image, True at outlier cells of the chosen layer.  # each [row, col]

    Raises:
        ValueError: different numbers of images, or a mask whose shape differs from its similarity map.
    """
    if len(similarities) != len(masks):
        raise ValueError(f"{len(similarities)} similarity maps but {len(masks)} masks")
    outlier, normal = [], []
    for similarity, mask in zip(similarities, masks):
        if similarity.shape != mask.shape:
            raise ValueError(f"similarity {similarity.shape} and mask {mask.shape} differ")
        outlier.append(similarity[mask].ravel())
        normal.append(similarity[~mask].ravel())
    outlier_values = np.concatenate(outlier) if outlier else np.zeros(0)
    normal_values = np.concatenate(normal) if normal else np.zeros(0)
    return RedundancyResult(outlier_values, normal_values, auroc(outlier_values, normal_values), len(similarities))


def auroc(positive: np.ndarray, negative: np.ndarray) -> float | None:
    """Area under the ROC curve of ``positive`` scored above ``negative``; None if either is empty."""
    if not positive.size or not negative.size:
        return None
    labels = np.concatenate([np.ones(positive.size), np.zeros(negative.size)])
    return float(roc_auc_score(labels, np.concatenate([positive, negative])))


def results_redundancy(frame: pd.DataFrame, layer: int) -> dict[tuple[str, str], RedundancyResult]:
    """Outlier vs normal neighbour similarity per (model, weights) of a sweep results folder.

    Args:
        frame: Rows of ``read_results(folder, ("outlier_cells", "neighbor_similarity"))``: the similarity map on
            each image's layer-0 row, the outlier cells on every row.
        layer: Block whose outlier cells split the cells (0-based).

    Raises:
        ResultsError: no row at ``layer``, or no stored similarity (the folder was swept before it was recorded).
    """
    found = {}
    for (model, weights), rows in frame.groupby(["model", "weights"], sort=False):
        similarity = rows[rows.layer == 0].set_index("image").neighbor_similarity.dropna()
        at_layer = rows[rows.layer == layer]
        if at_layer.empty:
            raise ResultsError(f"{model} has no layer {layer} in these results (it has {rows.num_layers.max()}).")
        if similarity.empty:
            raise ResultsError("These results hold no neighbour similarity (swept before it was recorded); "
                               "sweep the images into a new results folder.")
        similarities, masks = [], []
        for row in at_layer[at_layer.image.isin(similarity.index)].itertuples():
            grid = np.asarray(similarity[row.image], np.float32).reshape(row.grid_rows, row.grid_cols)  # [row, col]
            mask = np.zeros(grid.size, bool)
            mask[np.asarray(row.outlier_cells, np.int64)] = True
            similarities.append(grid)
            masks.append(mask.reshape(grid.shape))
        found[(model, weights)] = redundancy(similarities, masks)
    return found
