"""Sweep results folders written in the sweep's own Parquet schema (``vitlens.sweep.SCHEMA``), with known outliers.

``write_results`` plants outliers (norm 100 among norms near 10) at the cells a callback names
for each (weights, image, layer), so a test knows every share, first checkpoint and grid map.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vitlens.sweep import SCHEMA, norm_histograms

Cells = Callable[[int | None, str, int], Sequence[int]]  # (step, image, layer) -> flat outlier cells


def results_rows(model: str, weights: str, step: int | None, images: Sequence[str], num_layers: int,
                 grid: tuple[int, int], cells: Cells, num_registers: int = 0, seed: int = 0) -> pa.Table:
    """One row per (image, layer) of one (model, weights) pair."""
    rng = np.random.default_rng(seed)
    patches = grid[0] * grid[1]
    columns: dict[str, list] = {name: [] for name in SCHEMA.names}
    for image in images:
        similarity = rng.uniform(0, 0.5, patches).astype(np.float32)  # neighbour similarity: 1 at the last layer's outliers
        similarity[sorted(set(int(c) for c in cells(step, image, num_layers - 1)))] = 1.0
        for layer in range(num_layers):
            found = sorted(set(int(c) for c in cells(step, image, layer)))
            norms = 10 + rng.uniform(-1, 1, patches)
            norms[found] = 100.0
            values = dict(model=model, weights=weights, step=step, image=image, layer=layer, num_outliers=len(found),
                          outlier_fraction=len(found) / patches, threshold=50.0 if found else math.nan,
                          norm_median=float(np.median(norms)), norm_max=float(norms.max()), num_layers=num_layers,
                          grid_rows=grid[0], grid_cols=grid[1], size=grid[1] * 14, antialias=True,
                          num_registers=num_registers, fingerprint="f" * 16, outlier_cells=found, norm_hist=norm_histograms(norms[None])[0].tolist(),
                          cls_norm=30.0, register_norm=40.0 if num_registers else math.nan,
                          neighbor_similarity=similarity.tolist() if layer == 0 else None)
            for name, value in values.items():
                columns[name].append(value)
    return pa.table(columns, schema=SCHEMA)


def write_results(folder: Path, tables: Sequence[pa.Table]) -> Path:
    """One Parquet part per table, as the sweep writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, table in enumerate(tables):
        pq.write_table(table, str(folder / f"part-{index:04d}.parquet"))
    return folder


TRAIN_STEPS = (0, 1000, 2000, 3000)
TRAIN_EMERGES = 2000  # the first step with outliers
TRAIN_LAYER = 3  # the first layer with outliers from then on
TRAIN_CELLS = (0, 7)  # flat cells of the planted outliers on a 4 x 6 grid
TRAIN_IMAGES = ("a.png", "b.png", "sub/c.png")


def training_results(folder: Path, model: str = "tiny_model") -> Path:
    """A checkpoint series of a 6-block model: outliers at ``TRAIN_CELLS`` from ``TRAIN_LAYER`` on,
    from step ``TRAIN_EMERGES`` on, in every image but ``b.png`` (which gets one outlier fewer)."""
    def cells(step: int | None, image: str, layer: int) -> list[int]:
        if step < TRAIN_EMERGES or layer < TRAIN_LAYER:
            return []
        return list(TRAIN_CELLS[:1]) if image == "b.png" else list(TRAIN_CELLS)

    tables = [results_rows(model, f"/runs/run1/training_{step}/teacher_checkpoint.pth", step, TRAIN_IMAGES, 6, (4, 6),
                           cells, seed=step) for step in TRAIN_STEPS]
    return write_results(folder, tables)
