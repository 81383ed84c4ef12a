"""Prefix-token attention maps and CLS attention on outliers: synthetic traces and a tiny real ViT."""
import numpy as np
import pytest
import torch

from app_fixtures import TINY_REG, TINY_SIDE, register_tiny_models, synthetic_trace
from vitlens.analysis.attention import (attention_maps, cls_outlier_attention, head_maps, input_outlier_mask,
                                        patch_attention)
from vitlens.analysis.outliers import layer_outliers
from vitlens.capture import Trace, capture
from vitlens.errors import OptionError
from vitlens.layout import TokenLayout
from vitlens.models import load_model

PLANTED = {1: [(1, 2)], 2: [(1, 2), (0, 0)]}


def test_maps_put_each_token_on_its_cell():
    trace = synthetic_trace(outliers=PLANTED)
    maps = attention_maps(trace, layer=1, head=0)
    assert maps.names == ["cls", "reg0", "reg1"]
    assert maps.maps.shape == (3, 3, 4)
    assert maps.to_prefix.shape == (3, 3)
    cls = maps.map("cls")
    assert np.unravel_index(cls.argmax(), cls.shape) == (1, 2)
    assert cls[1, 2] == pytest.approx(0.5)
    np.testing.assert_allclose(maps.patch_mass + maps.to_prefix.sum(axis=1), 1.0, rtol=1e-5)


def test_mean_over_heads_and_negative_layer():
    trace = synthetic_trace(outliers=PLANTED)
    mean = attention_maps(trace, layer=-2)
    assert mean.layer == 1 and mean.head is None
    expected = trace.attention[1].mean(axis=0)[0, 3:].reshape(3, 4)
    np.testing.assert_allclose(mean.map("cls"), expected)


def test_bad_layer_head_and_token_are_option_errors():
    trace = synthetic_trace()
    with pytest.raises(OptionError, match="Layer 3"):
        attention_maps(trace, layer=3)
    with pytest.raises(OptionError, match="Head 2"):
        attention_maps(trace, layer=0, head=2)
    with pytest.raises(OptionError, match="reg5"):
        attention_maps(trace, layer=0).map("reg5")


def test_cls_mass_on_planted_outliers():
    trace = synthetic_trace(outliers=PLANTED)  # CLS (head 0) gives half its attention to each layer's own outliers
    result = cls_outlier_attention(trace, layer_outliers(trace), head=0)
    assert result.num_outliers[1:].tolist() == [0, 1]  # block l is paired with layer l - 1's outliers
    np.testing.assert_allclose(result.outlier_mass[1:], [0.0, 0.25], atol=1e-6)
    np.testing.assert_allclose((result.outlier_mass + result.normal_mass + result.prefix_mass)[1:], 1.0, rtol=1e-5)
    np.testing.assert_allclose(result.patch_mass + result.prefix_mass, 1.0, rtol=1e-5)
    assert np.isnan(result.outlier_per_token[0]) and np.isnan(result.outlier_per_token[1])
    assert result.outlier_per_token[2] == pytest.approx(0.25)
    assert result.outlier_mass[2] > 3 * result.expected_outlier_mass[2]
    averaged = cls_outlier_attention(trace, layer_outliers(trace))
    assert averaged.outlier_mass[2] < result.outlier_mass[2]  # head 1 is uniform


def test_no_class_token_is_an_option_error():
    trace = synthetic_trace(cls=False, outliers=PLANTED)
    with pytest.raises(OptionError, match="class token"):
        cls_outlier_attention(trace, layer_outliers(trace))


def test_real_tiny_model_attention_is_a_distribution():
    register_tiny_models()
    loaded = load_model(TINY_REG, "random")
    trace = capture(loaded, torch.randn(1, 3, TINY_SIDE, TINY_SIDE))[0]
    maps = attention_maps(trace, layer=2)
    assert maps.names == ["cls", "reg0", "reg1", "reg2", "reg3"]
    assert maps.maps.shape == (5, 8, 8)
    np.testing.assert_allclose(maps.patch_mass + maps.to_prefix.sum(axis=1), 1.0, rtol=1e-4)
    mass = cls_outlier_attention(trace, layer_outliers(trace, threshold=float(np.median(trace.norms))))
    np.testing.assert_allclose((mass.outlier_mass + mass.normal_mass + mass.prefix_mass)[1:], 1.0, rtol=1e-4)
    np.testing.assert_allclose(mass.patch_mass + mass.prefix_mass, 1.0, rtol=1e-4)
    assert mass.num_outliers[1:].sum() > 0


def test_pool_attention_map_reads_the_attention_pool_query():
    import dataclasses

    from vitlens.analysis.attention import POOL_QUERY, pool_attention_map

    trace = synthetic_trace(grid=(2, 3), num_registers=0, cls=False)
    assert trace.attention.shape[2] == 0 and pool_attention_map(trace) is None
    pool = np.zeros((2, 1, 6), dtype=np.float32)  # [pool_head, query, token]
    pool[0, 0, 4] = 1.0
    pool[1, 0, 1] = 1.0
    maps = pool_attention_map(dataclasses.replace(trace, pool_attention=pool))
    assert maps.names == [POOL_QUERY] and maps.layer == trace.num_layers - 1
    np.testing.assert_allclose(maps.maps[0], [[0, 0.5, 0], [0, 0.5, 0]])
    np.testing.assert_allclose(pool_attention_map(dataclasses.replace(trace, pool_attention=pool), head=0).maps[0],
                               [[0, 0, 0], [0, 1, 0]])


def _first_outliers_at_layer_one() -> Trace:
    """Three blocks, a 2x4 grid, CLS and no registers. Cells (0, 1) and (1, 3) become outliers in
    block 1's output and stay. Block 1's attention (computed from block 0's output, where those
    cells were ordinary) spreads evenly; block 2's attention gives 60% to them and 20% to CLS.
    """
    layout = TokenLayout(num_cls=1, num_registers=0, grid=(2, 4))
    outliers = [1 + 0 * 4 + 1, 1 + 1 * 4 + 3]
    norms = np.full((3, layout.num_tokens), 10.0, dtype=np.float32)
    norms[0] += np.linspace(0, 1, layout.num_tokens, dtype=np.float32)
    norms[1:, outliers] = 100.0
    attention = np.full((3, 1, 1, layout.num_tokens), 1 / layout.num_tokens, dtype=np.float32)
    attention[2, 0, 0] = 0.2 / 6
    attention[2, 0, 0, 0] = 0.2
    attention[2, 0, 0, outliers] = 0.3
    return Trace(layout=layout, input_size=(28, 56), norms=norms, final_norms=norms[-1], attention=attention,
                 neighbor_similarity=np.zeros((2, 4), dtype=np.float32))


def test_block_attention_is_paired_with_the_outliers_of_its_input():
    trace = _first_outliers_at_layer_one()
    found = layer_outliers(trace, threshold=50.0)
    assert found.counts.tolist() == [0, 2, 2]
    result = cls_outlier_attention(trace, found)
    assert np.isnan(result.outlier_mass[0]) and np.isnan(result.normal_mass[0]) and np.isnan(result.num_outliers[0])
    # block 1 reads block 0's output, where nothing was an outlier yet (old pairing: 2/9 on "outliers")
    assert result.num_outliers[1] == 0 and result.outlier_mass[1] == 0.0
    assert result.normal_mass[1] == pytest.approx(8 / 9)
    assert result.num_outliers[2] == 2 and result.outlier_mass[2] == pytest.approx(0.6)
    np.testing.assert_allclose(result.patch_mass, [8 / 9, 8 / 9, 0.8], rtol=1e-6)
    np.testing.assert_allclose(result.prefix_mass, [1 / 9, 1 / 9, 0.2], rtol=1e-6)
    assert input_outlier_mask(found, 0) is None
    np.testing.assert_array_equal(input_outlier_mask(found, 2), found.masks[1])


def test_the_baseline_is_the_outliers_share_of_the_attention_on_patches():
    """Uniform attention over patches gives the outliers their share of the patches times the
    attention that goes to patches at all (here 80%), not their share of all tokens."""
    trace = _first_outliers_at_layer_one()
    result = cls_outlier_attention(trace, layer_outliers(trace, threshold=50.0))
    assert np.isnan(result.expected_outlier_mass[0])
    assert result.expected_outlier_mass[1] == 0.0
    assert result.expected_outlier_mass[2] == pytest.approx(2 / 8 * 0.8)
    assert result.outlier_mass[2] / result.expected_outlier_mass[2] == pytest.approx(3.0)


def test_head_maps_give_every_head_of_one_prefix_query():
    trace = synthetic_trace(outliers={1: [(1, 2)]}, num_heads=2)
    maps = head_maps(trace, 1, "cls")
    assert maps.shape == (2, 3, 4)
    assert maps[0, 1, 2] > 5 * maps[1, 1, 2]  # the synthetic CLS looks at the outlier in head 0 only
    np.testing.assert_allclose(maps[1], 1 / trace.layout.num_tokens)
    assert head_maps(trace, 1, "reg1").shape == (2, 3, 4)
    with pytest.raises(OptionError, match="no 'reg5' token"):
        head_maps(trace, 1, "reg5")


def test_patch_attention_reads_the_patchs_row_and_column_with_the_prefix():
    layout = TokenLayout(num_cls=1, num_registers=2, grid=(2, 3))  # 3 prefix + 6 patches
    tokens = layout.num_tokens
    weights = np.arange(2 * tokens * tokens, dtype=np.float32).reshape(2, tokens, tokens)  # [head, query, key]
    found = patch_attention(weights, layout, layer=4, cell=(1, 0))
    token = 3 + 3  # row 1, col 0
    assert found.prefix_names == ["cls", "reg0", "reg1"] and found.cell == (1, 0)
    np.testing.assert_array_equal(found.gives[1], weights[1, token, 3:].reshape(2, 3))
    np.testing.assert_array_equal(found.gets[0], weights[0, 3:, token].reshape(2, 3))
    np.testing.assert_array_equal(found.gives_prefix, weights[:, token, :3])  # the register columns
    np.testing.assert_array_equal(found.gets_prefix, weights[:, :3, token])  # the register rows
    with pytest.raises(OptionError, match="outside the 2 x 3 grid"):
        patch_attention(weights, layout, 4, (2, 0))
