"""Linear probes on tokens (paper Table 1): what outlier tokens have lost and what they carry.

Local probes (Table 1, left) read patch tokens of one layer and predict (a) the token's position
(a ridge classifier over grid cells: top-1 accuracy and mean distance in cells) and (b) the
patch's pixels (ridge regression: mean squared error on normalised pixel values). They are fitted
on all patch tokens of the training images and scored separately on the outlier and normal tokens
of the test images; images, not tokens, are split, so no test image is seen in training. The fit
streams through the images (sums of ``x x^T`` and ``x y^T``), so memory does not grow with them.

Global probes (Table 1, right) read one vector per image (the CLS token, one random normal patch,
one random outlier patch) and predict the image's class with logistic regression.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ..layout import TokenLayout

RIDGE_ALPHA = 1e-3  # ridge penalty, relative to each feature's variance
TEST_FRACTION = 0.25
MIN_PER_CLASS = 2  # images of each class a global probe needs (one to train, one to test)


@dataclass(frozen=True, eq=False)
class LocalSample:
    """Patch tokens of one image.

    Attributes:
        tokens: Patch tokens of the chosen layer, row-major.  # [patch, channel]
        pixels: The patch's normalised pixels; None to skip the pixel probe.  # [patch, value]
        outliers: True at outlier tokens.  # [patch]
    """

    tokens: np.ndarray
    pixels: np.ndarray | None
    outliers: np.ndarray


@dataclass(frozen=True)
class LocalScore:
    """Local probes scored on one group of test tokens (None where the group is empty)."""

    count: int
    position_accuracy: float | None
    position_distance: float | None
    pixel_error: float | None


@dataclass(frozen=True)
class LocalProbeResult:
    """Local probes scored on normal and outlier tokens of the test images."""

    normal: LocalScore
    outlier: LocalScore
    grid: tuple[int, int]
    num_train_images: int
    num_test_images: int

    def summary(self) -> dict:
        return {"grid": list(self.grid), "num_train_images": self.num_train_images,
                "num_test_images": self.num_test_images, "normal": vars(self.normal), "outlier": vars(self.outlier)}


class _Ridge:
    """Least squares with a bias and a ridge penalty, from streamed sums (float64 totals of float32 chunks)."""

    def __init__(self, inputs: int, outputs: int) -> None:
        self.xtx = np.zeros((inputs + 1, inputs + 1))
        self.xty = np.zeros((inputs + 1, outputs))

    def add(self, x: np.ndarray, y: np.ndarray | None = None) -> None:
        """Add samples ``x`` [sample, input] with targets ``y`` [sample, output]; ``y`` None means
        the identity (sample i has target one-hot i, the position probe)."""
        x = _with_bias(x, np.float32)
        self.xtx += x.T @ x
        self.xty += x.T if y is None else x.T @ y.astype(np.float32)

    def solve(self, alpha: float = RIDGE_ALPHA) -> np.ndarray:
        """Weights ``[input + 1, output]`` (last row: bias); the penalty scales with each input's variance."""
        count = self.xtx[-1, -1]
        mean = self.xtx[-1, :-1] / count
        variance = np.diag(self.xtx)[:-1] / count - mean ** 2
        penalty = np.append(alpha * count * np.maximum(variance, 1e-12), 0.0)
        return np.linalg.solve(self.xtx + np.diag(penalty), self.xty)


def _with_bias(x: np.ndarray, dtype: type = np.float64) -> np.ndarray:
    return np.hstack([x.astype(dtype), np.ones((x.shape[0], 1), dtype=dtype)])


def split_images(count: int, test_fraction: float = TEST_FRACTION, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Image indices (train, test): a seeded shuffle, at least one image in each.

    Raises:
        ValueError: fewer than two images.
    """
    if count < 2:
        raise ValueError(f"a train/test split needs at least 2 images, got {count}")
    order = np.random.default_rng(seed).permutation(count)
    test = min(count - 1, max(1, round(count * test_fraction)))
    return np.sort(order[test:]), np.sort(order[:test])


def local_probes(samples: Sequence[LocalSample], grid: tuple[int, int], test_fraction: float = TEST_FRACTION,
                 seed: int = 0) -> LocalProbeResult:
    """Fit position and pixel probes on the training images; score them on the test images.

    Each sample is read once (``samples`` may load them lazily, so memory need not grow with them).

    Raises:
        ValueError: fewer than two images, or an image whose tokens do not fill ``grid``.
    """
    train, test = split_images(len(samples), test_fraction, seed)
    position, pixels = _fit(samples, train, grid[0] * grid[1])
    scores = _score(samples, test, grid, position, pixels)
    return LocalProbeResult(normal=scores[False], outlier=scores[True], grid=tuple(grid),
                            num_train_images=len(train), num_test_images=len(test))


def _checked(sample: LocalSample, cells: int) -> LocalSample:
    if sample.tokens.shape[0] != cells or sample.outliers.shape != (cells,):
        raise ValueError(f"expected {cells} patch tokens and outlier flags per image, got {sample.tokens.shape[0]}")
    return sample


def _fit(samples: Sequence[LocalSample], train: np.ndarray, cells: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Position weights and pixel weights (None when any training image has no pixels)."""
    position, pixels, with_pixels = None, None, True
    for index in train:
        sample = _checked(samples[index], cells)
        if position is None:
            position = _Ridge(sample.tokens.shape[1], cells)
        position.add(sample.tokens)  # targets: the identity, one cell per token
        with_pixels = with_pixels and sample.pixels is not None
        if with_pixels:
            pixels = pixels if pixels is not None else _Ridge(sample.tokens.shape[1], sample.pixels.shape[1])
            pixels.add(sample.tokens, sample.pixels)
    pixel_weights = pixels.solve().astype(np.float32) if with_pixels else None
    return position.solve().astype(np.float32), pixel_weights


def _score(samples: Sequence[LocalSample], test: np.ndarray, grid: tuple[int, int], position: np.ndarray,
           pixels: np.ndarray | None) -> dict[bool, LocalScore]:
    hits, distances, errors = {True: [], False: []}, {True: [], False: []}, {True: [], False: []}
    cell_rows, cell_cols = np.divmod(np.arange(grid[0] * grid[1]), grid[1])
    for index in test:
        sample = _checked(samples[index], grid[0] * grid[1])
        x = _with_bias(sample.tokens, np.float32)
        predicted = (x @ position).argmax(axis=1)  # [patch]
        distance = np.hypot(cell_rows[predicted] - cell_rows, cell_cols[predicted] - cell_cols)
        error = ((x @ pixels - sample.pixels) ** 2).mean(axis=1) if pixels is not None and sample.pixels is not None else None
        for group in (True, False):
            chosen = sample.outliers == group
            hits[group].append(predicted[chosen] == np.flatnonzero(chosen))
            distances[group].append(distance[chosen])
            if error is not None:
                errors[group].append(error[chosen])
    return {group: _local_score(hits[group], distances[group], errors[group]) for group in (True, False)}


def _local_score(hits: list[np.ndarray], distances: list[np.ndarray], errors: list[np.ndarray]) -> LocalScore:
    hit = np.concatenate(hits)
    if not hit.size:
        return LocalScore(0, None, None, None)
    error = np.concatenate(errors) if errors else np.zeros(0)
    return LocalScore(count=int(hit.size), position_accuracy=float(hit.mean()),
                      position_distance=float(np.concatenate(distances).mean()),
                      pixel_error=float(error.mean()) if error.size else None)


@dataclass(frozen=True)
class GlobalScore:
    """One global probe: test accuracy, or the reason it could not be run.

    Attributes:
        accuracy: Fraction of test images classified right; None when the probe was not run.
        num_images: Images with this kind of token.
        num_train: Training images.
        num_test: Test images.
        num_classes: Classes among the images with this kind of token.
        reason: Why the probe was not run (one sentence), else None.
    """

    accuracy: float | None
    num_images: int
    num_train: int
    num_test: int
    num_classes: int
    reason: str | None = None


def global_probe(features: np.ndarray, labels: np.ndarray, test_fraction: float = TEST_FRACTION, seed: int = 0) -> GlobalScore:
    """Logistic regression (standardised inputs) from one vector per image to its class.

    Args:
        features: One vector per image.  # [image, channel]
        labels: Class of each image.  # [image]
    """
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) < 2 or counts.min() < MIN_PER_CLASS:
        reason = (f"needs at least {MIN_PER_CLASS} images in each of at least 2 classes; "
                  f"has {len(labels)} images in {len(classes)} classes (smallest: {counts.min() if len(counts) else 0})")
        return GlobalScore(None, len(labels), 0, 0, len(classes), reason)
    test_size = min(len(labels) - len(classes), max(len(classes), round(len(labels) * test_fraction)))
    x_train, x_test, y_train, y_test = train_test_split(features, labels, test_size=test_size, stratify=labels,
                                                        random_state=seed)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    model.fit(x_train.astype(np.float64), y_train)
    accuracy = float((model.predict(x_test.astype(np.float64)) == y_test).mean())
    return GlobalScore(accuracy, len(labels), len(y_train), len(y_test), len(classes))


def pick_tokens(states: np.ndarray, layout: TokenLayout, outliers: np.ndarray,
                rng: np.random.Generator) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """The CLS token, one random normal patch token and one random outlier patch token of one image.

    Args:
        states: All tokens of one layer, in model order.  # [token, channel]
        outliers: True at outlier cells.  # [row, col]

    Returns:
        (cls, normal, outlier); None for a kind the image does not have.
    """
    patches = states[layout.patches]  # [patch, channel]
    flags = outliers.ravel()
    cls = states[layout.cls_index] if layout.cls_index is not None else None
    normal_cells, outlier_cells = np.flatnonzero(~flags), np.flatnonzero(flags)
    normal = patches[rng.choice(normal_cells)] if normal_cells.size else None
    outlier = patches[rng.choice(outlier_cells)] if outlier_cells.size else None
    return cls, normal, outlier
