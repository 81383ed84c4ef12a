"""Local and global probes on synthetic tokens with known answers."""
from __future__ import annotations

import numpy as np
import pytest

from vitlens.analysis.probes import LocalSample, global_probe, local_probes, pick_tokens, split_images
from vitlens.layout import TokenLayout

GRID = (6, 6)
CELLS = 36
CHANNELS = 64
VALUES = 12  # pixel values per patch


def _local_samples(images: int = 30, seed: int = 0) -> list[LocalSample]:
    """Normal tokens = position embedding + a linear code of the patch's pixels; outlier tokens (2 random
    cells per image) = one large random vector per image, which keeps neither."""
    rng = np.random.default_rng(seed)
    position = rng.normal(size=(CELLS, CHANNELS))
    code = rng.normal(size=(VALUES, CHANNELS))
    samples = []
    for _ in range(images):
        pixels = rng.normal(size=(CELLS, VALUES))
        tokens = position + pixels @ code + 0.05 * rng.normal(size=(CELLS, CHANNELS))
        outliers = np.zeros(CELLS, dtype=bool)
        outliers[rng.choice(CELLS, size=2, replace=False)] = True
        tokens[outliers] = 10 * rng.normal(size=CHANNELS)
        samples.append(LocalSample(tokens.astype(np.float32), pixels.astype(np.float32), outliers))
    return samples


def test_local_probes_read_position_and_pixels_from_normal_tokens_only():
    result = local_probes(_local_samples(), GRID)
    assert result.num_train_images + result.num_test_images == 30 and result.num_test_images == 8
    assert result.normal.count == 8 * 34 and result.outlier.count == 8 * 2
    assert result.normal.position_accuracy > 0.95 and result.outlier.position_accuracy < 0.3
    assert result.normal.position_distance < 0.1 < 1.0 < result.outlier.position_distance
    assert result.normal.pixel_error < 0.05 and result.outlier.pixel_error > 0.5  # pixels have variance 1
    assert result.summary()["outlier"]["count"] == 16


def test_local_probes_without_outliers_or_pixels():
    samples = [LocalSample(s.tokens, None, np.zeros(CELLS, dtype=bool)) for s in _local_samples(6)]
    result = local_probes(samples, GRID)
    assert result.outlier.count == 0 and result.outlier.position_accuracy is None
    assert result.normal.pixel_error is None and result.normal.position_accuracy is not None


def test_split_is_by_image_and_needs_two():
    train, test = split_images(10)
    assert len(test) == 2 or len(test) == 3
    assert not set(train) & set(test) and len(train) + len(test) == 10
    with pytest.raises(ValueError):
        split_images(1)


def _global_features(images_per_class: int = 20, classes: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), images_per_class)
    means = 3 * rng.normal(size=(classes, CHANNELS))
    carries = means[labels] + rng.normal(size=(len(labels), CHANNELS))
    local = rng.normal(size=(len(labels), CHANNELS))  # nothing about the class
    return carries, local, labels


def test_global_probe_accuracy_follows_the_class_information():
    carries, local, labels = _global_features()
    informed = global_probe(carries, labels)
    assert informed.accuracy == 1.0 and informed.num_classes == 3 and informed.num_test == 15
    assert global_probe(local, labels).accuracy < 0.7


def test_global_probe_refuses_one_class_or_single_images():
    carries, _, labels = _global_features()
    one_class = global_probe(carries[:20], labels[:20])
    assert one_class.accuracy is None and "2 classes" in one_class.reason
    singles = global_probe(carries[[0, 20, 40]], labels[[0, 20, 40]])
    assert singles.accuracy is None and singles.num_images == 3


def test_pick_tokens_takes_cls_a_normal_and_an_outlier_patch():
    layout = TokenLayout(num_cls=1, num_registers=2, grid=(2, 2))
    states = np.arange(7)[:, None] * np.ones((7, 3))  # token i has value i
    mask = np.array([[False, True], [False, False]])
    cls, normal, outlier = pick_tokens(states, layout, mask, np.random.default_rng(0))
    assert cls[0] == 0 and outlier[0] == 4 and normal[0] in (3, 5, 6)
    _, _, none = pick_tokens(states, layout, np.zeros((2, 2), dtype=bool), np.random.default_rng(0))
    assert none is None


class _Counting(list):
    """Samples that count how often each is read (a lazy loader reads each once)."""

    def __init__(self, samples):
        super().__init__(samples)
        self.reads = [0] * len(samples)

    def __getitem__(self, index):
        self.reads[index] += 1
        return super().__getitem__(index)


def test_local_probes_read_each_image_once_and_check_its_shape():
    samples = _Counting(_local_samples(8))
    local_probes(samples, GRID)
    assert samples.reads == [1] * 8
    with pytest.raises(ValueError, match="patch tokens"):
        local_probes(_local_samples(4), (5, 5))
