"""Outlier detection: synthetic norm distributions and models with known (planted) outliers."""
from __future__ import annotations

import numpy as np
import pytest

from vitlens.analysis.outliers import auto_threshold, find_outliers, layer_outliers, parse_threshold
from vitlens.capture import capture
from vitlens.errors import OptionError
from vitlens.images import GALLERY, gallery_image, resize_for_model, to_tensor


def _unimodal(kind: str, count: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "lognormal":
        return rng.lognormal(mean=3.0, sigma=0.3, size=count)
    if kind == "lognormal_wide":
        return rng.lognormal(mean=1.0, sigma=0.8, size=count)
    if kind == "gaussian":
        return rng.normal(loc=40.0, scale=4.0, size=count)
    if kind == "uniform":
        return rng.uniform(10.0, 30.0, size=count)
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["lognormal", "lognormal_wide", "gaussian", "uniform"])
@pytest.mark.parametrize("count", [256, 576, 1024, 1369])
def test_unimodal_norms_have_no_threshold(kind, count):
    for seed in range(5):
        norms = _unimodal(kind, count, np.random.default_rng(seed))
        assert auto_threshold(norms) is None, (kind, count, seed)


@pytest.mark.parametrize("count", [256, 576, 1369])
@pytest.mark.parametrize("seed", range(3))
def test_bimodal_norms_split_between_the_modes(count, seed):
    rng = np.random.default_rng(seed)
    high = max(1, round(0.02 * count))
    bulk = rng.lognormal(mean=np.log(20.0), sigma=0.15, size=count - high)
    outliers = rng.lognormal(mean=np.log(200.0), sigma=0.05, size=high)
    norms = rng.permutation(np.concatenate([bulk, outliers]))
    threshold = auto_threshold(norms)
    assert threshold is not None
    assert bulk.max() < threshold < outliers.min()
    result = find_outliers(norms.reshape(1, -1))
    assert result.count == high


def test_threshold_is_not_the_papers_constant():
    """A model-specific cutoff: the same shape at 1/10 the scale gives 1/10 the threshold."""
    rng = np.random.default_rng(0)
    norms = np.concatenate([rng.lognormal(np.log(20.0), 0.1, 500), rng.lognormal(np.log(200.0), 0.05, 10)])
    assert auto_threshold(norms / 10) == pytest.approx(auto_threshold(norms) / 10, rel=1e-6)


@pytest.mark.parametrize("norms", [np.full(100, 7.0), np.zeros(64), np.array([3.0]), np.array([1.0, 50.0])])
def test_degenerate_norms_have_no_threshold(norms):
    assert auto_threshold(norms) is None


def test_find_outliers_with_fixed_threshold_is_a_plain_comparison():
    norms = np.array([[1.0, 5.0], [10.0, 2.0]])
    result = find_outliers(norms, threshold=4.0)
    assert result.threshold == 4.0
    assert result.mask.tolist() == [[False, True], [True, False]]
    assert result.cells == [(0, 1), (1, 0)]
    assert result.count == 2 and result.fraction == 0.5


@pytest.mark.parametrize("text,value", [("auto", None), (" AUTO ", None), (None, None), ("12.5", 12.5), (3, 3.0)])
def test_parse_threshold(text, value):
    assert parse_threshold(text) == value


@pytest.mark.parametrize("text", ["banana", "", "-1", "0", "nan", "inf", "1e400"])
def test_parse_threshold_refuses_nonsense(text):
    with pytest.raises(OptionError) as error:
        parse_threshold(text)
    assert "\n" not in str(error.value)


def _expect_planted(result, planted) -> None:
    expected = planted.mask()
    for layer in range(result.masks.shape[0]):
        if layer < planted.layer:
            assert not result.masks[layer].any(), f"outliers before the planted layer, at layer {layer}"
        else:
            assert np.array_equal(result.masks[layer], expected), f"layer {layer}: {np.argwhere(result.masks[layer])}"


@pytest.mark.parametrize("seed", range(3))
def test_planted_outliers_are_found_exactly_from_their_layer(planted, pixels, seed):
    trace = capture(planted.loaded, pixels(planted.loaded, seed=seed))[0]
    result = layer_outliers(trace)
    _expect_planted(result, planted)
    assert result.first_layer == planted.layer
    assert np.isnan(result.thresholds[:planted.layer]).all()
    assert np.isfinite(result.thresholds[planted.layer:]).all()
    assert (result.counts[planted.layer:] == len(planted.cells)).all()
    layer = result.layer(planted.layer)
    assert sorted(layer.cells) == sorted(planted.cells)


def test_planted_outliers_with_a_fixed_threshold(planted, pixels):
    trace = capture(planted.loaded, pixels(planted.loaded, seed=5))[0]
    result = layer_outliers(trace, threshold=30.0)
    _expect_planted(result, planted)
    assert (result.thresholds == 30.0).all()


def test_planted_outliers_in_a_real_photograph(planted):
    loaded = planted.loaded
    image = gallery_image("astronaut")  # square, so the grid is the model's own 8x8
    trace = capture(loaded, to_tensor(resize_for_model(image.image, 112, 14), loaded.mean, loaded.std)[None])[0]
    _expect_planted(layer_outliers(trace), planted)


def test_outliers_are_read_before_the_final_norm(planted, pixels):
    """After the final LayerNorm the planted tokens are ordinary; the pre-norm stream is what counts."""
    trace = capture(planted.loaded, pixels(planted.loaded))[0]
    assert find_outliers(trace.patch_norms(post_norm=True)).count == 0


def test_models_without_planted_outliers_have_none(tiny_model, pixels):
    for seed in range(4):
        trace = capture(tiny_model, pixels(tiny_model, seed=seed))[0]
        result = layer_outliers(trace)
        assert result.counts.sum() == 0, (seed, result.counts)
        assert result.first_layer is None


@pytest.mark.parametrize("name", ["vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2"])
def test_unplanted_model_on_photographs_has_no_outliers(name):
    from vitlens.models import load_model

    loaded = load_model(name, "random", model_args=dict(depth=6, embed_dim=64, num_heads=4, img_size=112))
    for image_name in list(GALLERY)[:5]:
        image = gallery_image(image_name)
        pixels = to_tensor(resize_for_model(image.image, 112, 14), loaded.mean, loaded.std)[None]
        result = layer_outliers(capture(loaded, pixels)[0])
        assert result.counts.sum() == 0, (image_name, result.counts)
