"""A sweep's rows, built column-wise over a batch, equal the rows built image by image from ``layer_outliers``."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pyarrow as pa
import pytest

from vitlens.analysis.outliers import layer_outliers
from vitlens.capture import Trace, capture
from vitlens.sweep import NORM_HIST_EDGES, SCHEMA, Checkpoint, ImageItem, SweepConfig, Task, task_table


def _reference(task: Task, item: ImageItem, trace: Trace, fingerprint: str, config: SweepConfig) -> pa.Table:
    """One image's rows the straightforward way (how sweeps built them before the columnar builder)."""
    outliers = layer_outliers(trace, config.threshold)
    layout, grid = trace.layout, trace.patch_norms()  # [layer, row, col]
    layers = grid.shape[0]
    flat = grid.reshape(layers, -1)
    hist = [np.clip(np.searchsorted(NORM_HIST_EDGES, row, side="right") - 1, 0, len(NORM_HIST_EDGES) - 2) for row in flat]
    row = {
        "model": task.model, "weights": task.checkpoint.weights, "step": task.checkpoint.step, "image": item.name,
        "num_layers": layers, "grid_rows": layout.grid[0], "grid_cols": layout.grid[1], "size": max(trace.input_size),
        "antialias": config.antialias, "num_registers": layout.num_registers, "fingerprint": fingerprint,
    }
    rows = [{**row, "layer": layer, "num_outliers": int(outliers.counts[layer]),
             "outlier_fraction": float(outliers.fractions[layer]), "threshold": float(outliers.thresholds[layer]),
             "norm_median": float(outliers.norm_median[layer]), "norm_max": float(outliers.norm_max[layer]),
             "outlier_cells": np.flatnonzero(outliers.masks[layer]).tolist(),
             "norm_hist": np.bincount(hist[layer], minlength=len(NORM_HIST_EDGES) - 1).tolist(),
             "cls_norm": float(trace.norms[layer, 0]) if layout.cls_index is not None else math.nan,
             "register_norm": float(trace.norms[layer, layout.registers].mean()) if layout.num_registers else math.nan,
             "neighbor_similarity": trace.neighbor_similarity.ravel().astype(np.float32).tolist() if layer == 0 else None}
            for layer in range(layers)]
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def _traces(planted, pixels) -> list[Trace]:
    """Two input shapes (interleaved), a NaN cell on every layer, and a layer of NaN only."""
    loaded = planted.loaded
    traces = [capture(loaded, pixels(loaded, seed=seed, size=size))[0]
              for seed, size in enumerate([(112, 112), (112, 168), (364, 364), (112, 112), (364, 364)])]
    nan_cell, nan_layer = traces[3].norms.copy(), traces[4].norms.copy()
    nan_cell[:, -1] = np.nan
    nan_layer[1] = np.nan
    return [*traces[:3], dataclasses.replace(traces[3], norms=nan_cell), dataclasses.replace(traces[4], norms=nan_layer)]


@pytest.mark.parametrize("threshold", [None, 30.0], ids=["auto", "fixed"])
def test_rows_equal_the_image_by_image_rows(planted, pixels, threshold) -> None:
    traces = _traces(planted, pixels)
    items = [ImageItem(f"img{index}.png", f"/x/img{index}.png") for index in range(len(traces))]
    task = Task("m", Checkpoint("run/model_0012500.pth", 12500), tuple(items))
    config = SweepConfig(threshold=threshold)
    table = task_table(task, items, traces, "file:abc", config)
    expected = pa.concat_tables([_reference(task, item, trace, "file:abc", config) for item, trace in zip(items, traces)])
    assert table.schema == SCHEMA
    for name in SCHEMA.names:  # one column at a time, so a failure names it; NaN equals NaN
        assert table.column(name).to_pylist() == expected.column(name).to_pylist() or _same_floats(table, expected, name), name
    assert table.column("num_outliers").to_numpy().sum() > 0  # the planted outliers are there to compare


def _same_floats(table: pa.Table, expected: pa.Table, name: str) -> bool:
    return np.array_equal(table.column(name).to_numpy(), expected.column(name).to_numpy(), equal_nan=True)


def test_a_task_without_images_has_no_rows() -> None:
    assert task_table(Task("m", Checkpoint("random", None), ()), [], [], "f", SweepConfig()).num_rows == 0
